"""The token-level policy objectives (``fastppo.policy_objectives``) as ONE PyTorch custom op,
``fastppo::token_policy_loss``, what ``torch.compile`` sees (the scheme of ``fastppo._library``).

``token_policy_loss(op, logprobs, old_logprobs, advantages, mask, a, b, c, agg, is_weights)``:
``op`` names the objective (``dppo_tv_loss``...), ``a, b, c`` are its options in the order of
:data:`OPTION_ORDER` (None where unused). Outputs: the 0-d loss and the stats vector in
``kernels/policy_objectives.STAT_NAMES`` order (every objective reports all three).
The real implementation picks the backend when the node runs, exactly as in eager; the backward,
``fastppo::token_policy_loss_backward``, recomputes the forward with autograd on and pulls the
gradient through the implementation's own backward (the Triton backward kernel or the
reference's autograd). Kept apart from ``fastppo._library.OPS`` so that list stays the core ops'.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch, reference
from ._library import _autograd_inside_op, _fresh

STAT_NAMES = ("clipfrac", "clipfrac_lower", "approx_kl")
OPTION_ORDER = {
    "dppo_tv_loss": ("clip_low", "clip_high", "clip_ratio_c"),
    "dppo_kl_loss": ("clip_low", "clip_high", "clip_ratio_c"),
    "sapo_loss": ("tau_pos", "tau_neg"),
    "gpg_loss": (),
    "cispo_loss": ("clip_low", "clip_high"),
    "dro_loss": ("beta",),
}


def _call(op, logprobs, old_logprobs, advantages, mask, a, b, c, agg, is_weights):
    options = dict(zip(OPTION_ORDER[op], (a, b, c)))
    loss, stats = _dispatch.pick(op, logprobs.device)(logprobs, old_logprobs, advantages, mask, agg=agg,
                                                      is_weights=is_weights, **options)
    return loss, torch.stack([stats[k].detach().to(loss.dtype) for k in STAT_NAMES])


@torch.library.custom_op("fastppo::token_policy_loss", mutates_args=())
def _forward_op(op: str, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                a: Optional[float], b: Optional[float], c: Optional[float], agg: str,
                is_weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        outs = _call(op, logprobs, old_logprobs, advantages, mask, a, b, c, agg, is_weights)
    return tuple(_fresh(outs, (logprobs, old_logprobs, advantages, mask, is_weights)))


@_forward_op.register_fake
def _(op, logprobs, old_logprobs, advantages, mask, a, b, c, agg, is_weights):
    dtype = reference.compute_dtype(logprobs, old_logprobs, advantages, is_weights)
    return (torch.empty((), dtype=dtype, device=logprobs.device),
            torch.empty((len(STAT_NAMES),), dtype=dtype, device=logprobs.device))


@torch.library.custom_op("fastppo::token_policy_loss_backward", mutates_args=())
def _backward_op(grad: Tensor, op: str, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                 a: Optional[float], b: Optional[float], c: Optional[float], agg: str,
                 is_weights: Optional[Tensor]) -> Tensor:
    with _autograd_inside_op():
        leaf = logprobs.detach().requires_grad_()
        loss, _ = _call(op, leaf, old_logprobs, advantages, mask, a, b, c, agg, is_weights)
        (dlp,) = torch.autograd.grad(loss, leaf, grad.to(loss.dtype), allow_unused=True)
    if dlp is None:
        dlp = torch.zeros_like(logprobs)
    return _fresh([dlp], (grad, logprobs, old_logprobs, advantages, mask, is_weights))[0]


@_backward_op.register_fake
def _(grad, op, logprobs, old_logprobs, advantages, mask, a, b, c, agg, is_weights):
    return torch.empty_like(logprobs)


def _setup(ctx, inputs, output):
    op, lp, old, adv, mask, a, b, c, agg, w = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(lp, old, adv, mask, w)
    ctx.others = (op, a, b, c, agg)


def _backward(ctx, grad_loss, grad_stats):
    if not ctx.needs_input_grad[1]:
        return (None,) * 10
    lp, old, adv, mask, w = ctx.saved_tensors
    op, a, b, c, agg = ctx.others
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=torch.float32, device=lp.device)
    dlp = _backward_op(grad_loss, op, lp, old, adv, mask, a, b, c, agg, w)
    return (None, dlp) + (None,) * 8


_forward_op.register_autograd(_backward, setup_context=_setup)


def token_policy_loss(op, logprobs, old_logprobs, advantages, mask, *, agg, is_weights, **options):
    """The public ``fastppo.<op>`` under tracing: ``(loss, stats)`` around the custom op."""
    values = [None if options.get(k) is None else float(options[k]) for k in OPTION_ORDER[op]]
    values += [None] * (3 - len(values))
    loss, stats = torch.ops.fastppo.token_policy_loss(op, logprobs, old_logprobs, advantages, mask, *values, agg,
                                                      is_weights)
    return loss, {k: stats[i] for i, k in enumerate(STAT_NAMES)}
