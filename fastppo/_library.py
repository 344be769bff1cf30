"""Every public fastppo op as a PyTorch custom op (``torch.library``): what ``torch.compile`` sees.

Dynamo cannot trace into a Triton launcher, a Python loop over the vocabulary, an
``autograd.Function`` with a host-side branch, or a ``nonzero()``. So under tracing
(``torch.compiler.is_compiling()``) the public ``fastppo.<op>`` checks its arguments (shapes,
dtypes, numbers: all static, trace-safe) and then calls ``torch.ops.fastppo.<op>``, an opaque node
of the graph with

* a real implementation that runs the very same code the eager op runs: the backend is picked
  when the node *runs* (``FASTPPO_BACKEND`` / ``fastppo.use_backend``; CPU tensors -> reference
  under ``auto``, CUDA -> Triton kernels, CPU -> Triton under ``triton`` + ``TRITON_INTERPRET=1``);
* a fake (meta) implementation giving the outputs' shapes and dtypes (0-d losses, stats
  stacked in one small vector);
* for the differentiable ops an autograd formula whose backward is its own custom op,
  ``fastppo::<op>_backward``:

  - the logits ops (:data:`FROM_STATS`: ``logprobs_from_logits``, ``entropy_from_logits``,
    ``linear_logprobs``) save what the eager kernels save. Their forward op returns two more
    outputs, marked non-differentiable and dropped by the public adapters: the row max ``m`` of
    the raw logits and the log-sum ``L``, of the shape of the labels, float32 (float64 for
    float64 inputs), such that log p_v = (x_v - m) / T - L. The backward op takes the incoming
    gradients, the forward's inputs, ``m``, ``L`` and the entropy (d H needs H) and computes the
    gradient in closed form, never running the forward again: the Triton backward launcher
    (``kernels/logprob.py``: one read of the logits, one write of d logits), the chunked loops'
    backward (``fastppo.linear.backward_rows``: each chunk's logits tile is recomputed by one
    matmul, as in eager) or the reference's PyTorch formula (``fastppo.reference``);
  - the elementwise and loss ops (:data:`RECOMPUTED`) recompute their forward with autograd on and
    pull the gradient through the implementation's own backward: they read a few ``[B, T]``
    tensors, so the extra forward costs little, and nothing is saved but the op's inputs.

  Either way the gradients are those of the eager op.

Outside tracing the public ops keep their direct eager path (no extra dispatch, no recompute).
A custom op returns tensors only, so the adapters at the bottom rebuild the public return
values (tuples, stat dicts) around ``torch.ops.fastppo.*``. Non-differentiable ops mark their
outputs non-differentiable: they carry no gradient whatever the inputs, as in eager.

Registered: ``fastppo::<op>`` for each name in :data:`OPS` and ``fastppo::<op>_backward`` for
each name in :data:`DIFFERENTIABLE`.
"""

import contextlib
import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _dispatch, reference

__all__ = ["OPS", "DIFFERENTIABLE"]

# Names of the stats dicts, in the order of the op's stats vector.
POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl")
VALUE_STATS = ("clipfrac",)
PPO_STATS = ("policy_loss", "value_loss", "entropy", "clipfrac", "clipfrac_lower", "approx_kl", "value_clipfrac")


def _out_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    return reference.compute_dtype(*tensors)


def _empty(like: Tensor) -> Tensor:
    """The stand-in for an output that was not asked for (a custom op cannot return None)."""
    return torch.empty(0, dtype=torch.float32, device=like.device)


def _fresh(outputs, inputs) -> list[Tensor]:
    """Contiguous outputs that share no storage with an input or with each other (a custom op's
    outputs must not alias; an identity-like gradient would otherwise hand back its input)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel() > 0}
    result = []
    for out in outputs:
        out = out.detach().contiguous()
        if out.numel() == 0:
            # Empty tensors may share a null data pointer; a new one aliases nothing.
            out = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        else:
            ptr = out.untyped_storage().data_ptr()
            if ptr in seen:
                out = out.clone()
                ptr = out.untyped_storage().data_ptr()
            seen.add(ptr)
        result.append(out)
    return result


@contextlib.contextmanager
def _autograd_inside_op():
    """Turn autograd back on inside a custom op's implementation.

    The dispatcher runs an op's implementation with the autograd dispatch keys excluded, so
    ``requires_grad_()`` leaves would record nothing; the backward ops need autograd to run the
    implementation's own backward (the Triton backward launchers or the reference's autograd).
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _vjp(call: Callable, tensors: list, diff: tuple[int, ...], needs: list[bool], grads: list[Tensor]) -> list[Tensor]:
    """Gradients of ``call(*tensors)`` (a tuple of outputs) for the inputs at positions ``diff``.

    Only the inputs with ``needs`` set become leaves, so the implementation computes only the
    gradients asked for. An input not asked for (or None) gets an empty stand-in; an input the
    outputs do not depend on gets zeros.
    """
    with _autograd_inside_op():
        leaves = [t.detach() if isinstance(t, Tensor) else t for t in tensors]
        wanted = []
        for i, need in zip(diff, needs):
            if need and leaves[i] is not None:
                leaves[i] = leaves[i].requires_grad_()
                wanted.append(i)
        if not wanted:
            return [_empty(grads[0]) for _ in diff]
        outs = call(*leaves)
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
        got = [None] * len(wanted)
        if pairs:
            got = torch.autograd.grad(
                [o for o, _ in pairs], [leaves[i] for i in wanted], [g.to(o.dtype) for o, g in pairs], allow_unused=True
            )
    by_index = dict(zip(wanted, got))
    result = []
    for i in diff:
        if i not in by_index:
            result.append(_empty(grads[0]))
        else:
            g = by_index[i]
            result.append(torch.zeros_like(tensors[i]) if g is None else g)
    return _fresh(result, list(tensors) + list(grads))


# --------------------------------------------------------------------------------------------
# The implementations: one call per op into the backend in force, returning a tuple of tensors
# in the op's output order (the eager op's outputs, flattened).
# --------------------------------------------------------------------------------------------


def _impl(op: str, device: torch.device) -> Callable:
    return _dispatch.pick(op, device)


def _runs_kernel(op: str, logits: Tensor) -> bool:
    """Whether ``op`` runs its Triton kernel (kernels/logprob.py) for ``logits`` under the backend
    in force; the kernels hand float64 to the reference, and so does the op."""
    return _impl(op, logits.device) is not getattr(reference, op).raw and logits.dtype != torch.float64


def _logprob_kernels():
    from fastppo.kernels import logprob

    return logprob


def _call_logprobs(logits, labels, mask, temperature, return_entropy):
    """(log-probs, entropy or a stand-in, row max, log-sum), each of the shape of ``labels``: the
    eager op's outputs plus the two row statistics its backward starts from (float32; float64
    for float64 logits), with log p_v = (x_v - row max) / temperature - log-sum."""
    if _runs_kernel("logprobs_from_logits", logits):
        kernels, n = _logprob_kernels(), labels.numel()
        lp, ent, rowmax, logsum = kernels._forward(
            logits, labels.reshape(n).contiguous(), kernels._valid_flags(mask, n), 1.0 / float(temperature), True,
            return_entropy,
        )
    else:
        lp, ent, rowmax, logsum = reference._logprobs_with_stats(logits, labels, temperature, mask)
    shape = labels.shape
    ent = ent.view(shape) if return_entropy else _empty(logits)
    return lp.view(shape), ent, rowmax.view(shape), logsum.view(shape)


def _call_entropy(logits, temperature):
    """(entropy, row max, log-sum), each of shape ``logits.shape[:-1]`` (see :func:`_call_logprobs`)."""
    if _runs_kernel("entropy_from_logits", logits):
        _, ent, rowmax, logsum = _logprob_kernels()._forward(logits, None, None, 1.0 / float(temperature), False, True)
    else:
        _, ent, rowmax, logsum = reference._logprobs_with_stats(logits, None, temperature)
    shape = logits.shape[:-1]
    return ent.view(shape), rowmax.view(shape), logsum.view(shape)


def _dlogits(op, logits, labels, mask, temperature, rowmax, logsum, entropy, grad_logprob, grad_entropy):
    """d logits of ``op`` (log-probs and / or entropy) from the forward's row statistics, in
    closed form: the kernel backward (one read of the logits, one write of d logits) or the
    reference's PyTorch formula. Shape and dtype of ``logits``."""
    if not _runs_kernel(op, logits):
        return reference._logprobs_backward(logits, labels, mask, temperature, rowmax, logsum, entropy,
                                            grad_logprob, grad_entropy)
    kernels, n = _logprob_kernels(), rowmax.numel()

    def flat(t):
        return None if t is None else t.reshape(n).contiguous()

    return kernels._backward(
        logits, None if labels is None else flat(labels), kernels._valid_flags(mask, n), flat(rowmax), flat(logsum),
        flat(entropy), kernels._flat_grad(grad_logprob, n), kernels._flat_grad(grad_entropy, n),
        1.0 / float(temperature), False,
    )


def _logprobs_backward(grads, args, rowmax, logsum, entropy, needs):
    logits, labels, mask, temperature, return_entropy = args
    if not needs[0]:
        return [_empty(logits)]
    return [_dlogits("logprobs_from_logits", logits, labels, mask, temperature, rowmax, logsum, entropy, grads[0],
                     grads[1] if return_entropy else None)]


def _entropy_backward(grads, args, rowmax, logsum, entropy, needs):
    logits, temperature = args
    if not needs[0]:
        return [_empty(logits)]
    return [_dlogits("entropy_from_logits", logits, None, None, temperature, rowmax, logsum, entropy, None, grads[0])]


def _call_kl(logprobs, ref_logprobs, estimator, clamp):
    return (_impl("kl_penalty", logprobs.device)(logprobs, ref_logprobs, estimator, clamp=clamp),)


def _call_aggregate(loss_mat, mask, agg):
    return (_impl("aggregate", loss_mat.device)(loss_mat, mask, agg),)


def _call_policy(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg, is_weights):
    loss, stats = _impl("policy_loss", logprobs.device)(
        logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        agg=agg, is_weights=is_weights,
    )
    return loss, torch.stack([stats[k].detach() for k in POLICY_STATS])


def _call_gspo(logprobs, old_logprobs, advantages, mask, agg, is_weights, clip_low, clip_high, dual_clip, seq_grad):
    loss, stats = _impl("gspo_loss", logprobs.device)(
        logprobs, old_logprobs, advantages, mask, agg=agg, is_weights=is_weights, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, seq_grad=seq_grad,
    )
    return loss, torch.stack([stats[k].detach() for k in POLICY_STATS])


def _call_geo_mean(logprobs, old_logprobs, advantages, mask, agg, is_weights, clip_low, clip_high):
    loss, stats = _impl("geo_mean_loss", logprobs.device)(
        logprobs, old_logprobs, advantages, mask, agg=agg, is_weights=is_weights, clip_low=clip_low,
        clip_high=clip_high,
    )
    return loss, torch.stack([stats[k].detach() for k in POLICY_STATS])


def _call_value(values, old_values, returns, mask, clip, agg):
    loss, stats = _impl("value_loss", values.device)(values, old_values, returns, mask, clip=clip, agg=agg)
    return loss, torch.stack([stats[k].detach() for k in VALUE_STATS])


def _call_ppo(logprobs, old_logprobs, advantages, values, old_values, returns, mask, entropy, clip_low, clip_high,
              dual_clip, value_clip, vf_coef, ent_coef, agg, is_weights):
    loss, stats = _impl("ppo_loss", logprobs.device)(
        logprobs, old_logprobs, advantages, values, old_values, returns, mask, entropy=entropy, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, value_clip=value_clip, vf_coef=vf_coef, ent_coef=ent_coef,
        agg=agg, is_weights=is_weights,
    )
    return loss, torch.stack([stats[k].detach() for k in PPO_STATS])


def _linear_folds(hidden):
    """The chunk steps of ``fastppo.linear`` that the backend in force uses for the op, or None
    for the full-logits reference."""
    from . import linear

    backend = _dispatch.current_backend()
    if backend == "torch":
        return None
    if backend == "auto" and hidden.device.type != "cuda":
        return linear.TorchFolds
    _dispatch.pick("linear_logprobs", hidden.device)  # the triton backend's device checks
    from fastppo.kernels.linear_logprob import TritonFolds

    return linear.TorchFolds if hidden.dtype == torch.float64 else TritonFolds


def _call_linear(hidden, weight, labels, bias, mask, temperature, return_entropy, chunk_size):
    """(log-probs, entropy or a stand-in, row max, log-sum), each of the shape of ``labels``, in
    the compute dtype. Full rows, masked by ``where`` (``compact=False``): no ``nonzero()``, no
    host sync."""
    from . import linear

    folds = _linear_folds(hidden)
    if folds is None:
        lp, ent, rowmax, logsum = reference._linear_logprobs_with_stats(hidden, weight, labels, bias, temperature,
                                                                        mask)
    else:
        lp, ent, _, _, rowmax, logsum, _ = linear.forward_rows(
            hidden, weight, bias, labels, mask, 1.0 / float(temperature), return_entropy, chunk_size, folds,
            linear.floor_needed(folds, bias, compact=False), compact=False,
        )
    shape = labels.shape
    ent = ent.view(shape) if return_entropy else _empty(hidden)
    return lp.view(shape), ent, rowmax.view(shape), logsum.view(shape)


def _linear_backward(grads, args, rowmax, logsum, entropy, needs):
    """(d hidden, d weight, d bias) from the row statistics: the chunked loops' backward (each
    chunk's logits tile is recomputed by one matmul, as in eager) or the reference's formula."""
    from . import linear

    hidden, weight, labels, bias, mask, temperature, return_entropy, chunk_size = args
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    grad_lp, grad_ent = grads[0], grads[1] if return_entropy else None
    folds = _linear_folds(hidden)
    if not (need_h or need_w or need_b):
        got = (None, None, None)
    elif folds is None:
        got = reference._linear_logprobs_backward(hidden, weight, labels, bias, mask, temperature, rowmax, logsum,
                                                  entropy, grad_lp, grad_ent, need_h, need_w, need_b)
    else:
        n = labels.numel()
        _, lab, sel = linear.select_rows(hidden, labels, mask, weight.shape[0], compact=False)
        got = linear.backward_rows(
            hidden, weight, bias, lab, sel, rowmax.reshape(n), logsum.reshape(n),
            None if entropy is None else entropy.reshape(n), grad_lp, grad_ent, 1.0 / float(temperature), chunk_size,
            folds, linear.floor_needed(folds, bias, compact=False), False, need_h, need_w, need_b,
        )
    return [_empty(hidden) if g is None else g for g in got]


def _forward(call: Callable, *args) -> list[Tensor]:
    with torch.no_grad():
        outs = call(*args)
    return _fresh(outs, args)


def _op(name: str, fn: Callable):
    return torch.library.custom_op(f"fastppo::{name}", fn, mutates_args=())


# --------------------------------------------------------------------------------------------
# Forward ops. Signatures: the public op's arguments, tensors first, in a fixed order, no
# keyword-only arguments; ``Optional[Tensor]`` where the public op accepts None.
# --------------------------------------------------------------------------------------------


def _logprobs_fn(logits: Tensor, labels: Tensor, mask: Optional[Tensor], temperature: float,
                 return_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_forward(_call_logprobs, logits, labels, mask, temperature, return_entropy))


def _entropy_fn(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_forward(_call_entropy, logits, temperature))


def _kl_fn(logprobs: Tensor, ref_logprobs: Tensor, estimator: str, clamp: Optional[float]) -> Tensor:
    return _forward(_call_kl, logprobs, ref_logprobs, estimator, clamp)[0]


def _shape_rewards_fn(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float,
                      estimator: str) -> tuple[Tensor, Tensor]:
    impl = _impl("shape_rewards", logprobs.device)
    return tuple(_forward(lambda *a: impl(*a, kl_coef=kl_coef, estimator=estimator), scores, logprobs,
                          ref_logprobs, mask))


def _gae_fn(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
            whiten: bool) -> tuple[Tensor, Tensor]:
    impl = _impl("gae", rewards.device)
    return tuple(_forward(lambda *a: impl(*a, gamma=gamma, lam=lam, whiten=whiten), rewards, values, mask))


def _masked_whiten_fn(x: Tensor, mask: Tensor, shift_mean: bool, eps: float) -> Tensor:
    impl = _impl("masked_whiten", x.device)
    return _forward(lambda *a: (impl(*a, shift_mean=shift_mean, eps=eps),), x, mask)[0]


def _aggregate_fn(loss_mat: Tensor, mask: Tensor, agg: str) -> Tensor:
    return _forward(_call_aggregate, loss_mat, mask, agg)[0]


def _policy_fn(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_low: float,
               clip_high: Optional[float], dual_clip: Optional[float], agg: str,
               is_weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return tuple(_forward(_call_policy, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                          agg, is_weights))


def _gspo_fn(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, agg: str,
             is_weights: Optional[Tensor], clip_low: float, clip_high: Optional[float], dual_clip: Optional[float],
             seq_grad: bool) -> tuple[Tensor, Tensor]:
    return tuple(_forward(_call_gspo, logprobs, old_logprobs, advantages, mask, agg, is_weights, clip_low, clip_high,
                          dual_clip, seq_grad))


def _geo_mean_fn(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, agg: str,
                 is_weights: Optional[Tensor], clip_low: float, clip_high: Optional[float]) -> tuple[Tensor, Tensor]:
    return tuple(_forward(_call_geo_mean, logprobs, old_logprobs, advantages, mask, agg, is_weights, clip_low,
                          clip_high))


def _value_fn(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: Optional[float],
              agg: str) -> tuple[Tensor, Tensor]:
    return tuple(_forward(_call_value, values, old_values, returns, mask, clip, agg))


def _compute_advantages_fn(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, mask: Tensor,
                           kl_coef: float, estimator: str, gamma: float, lam: float,
                           whiten: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _impl("compute_advantages", logprobs.device)
    return tuple(_forward(
        lambda *a: impl(*a, kl_coef=kl_coef, estimator=estimator, gamma=gamma, lam=lam, whiten=whiten),
        scores, logprobs, ref_logprobs, values, mask,
    ))


def _ppo_fn(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, values: Tensor, old_values: Tensor,
            returns: Tensor, mask: Tensor, entropy: Optional[Tensor], clip_low: float, clip_high: Optional[float],
            dual_clip: Optional[float], value_clip: Optional[float], vf_coef: float, ent_coef: float, agg: str,
            is_weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return tuple(_forward(_call_ppo, logprobs, old_logprobs, advantages, values, old_values, returns, mask, entropy,
                          clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, agg, is_weights))


def _linear_fn(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
               temperature: float, return_entropy: bool,
               chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_forward(_call_linear, hidden, weight, labels, bias, mask, temperature, return_entropy, chunk_size))


def _group_fn(scores: Tensor, group_size: int, mask: Tensor, estimator: str, norm_by_std: bool,
              eps: float) -> Tensor:
    impl = _impl("group_advantages", scores.device)
    return _forward(lambda s, m: (impl(s, group_size, m, estimator=estimator, norm_by_std=norm_by_std, eps=eps),),
                    scores, mask)[0]


def _reinforce_fn(rewards: Tensor, mask: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    impl = _impl("reinforce_pp_advantages", rewards.device)
    return tuple(_forward(lambda *a: impl(*a, gamma=gamma), rewards, mask))


# --------------------------------------------------------------------------------------------
# Fake implementations: shapes and dtypes only (float32, float64 for float64 inputs)
# --------------------------------------------------------------------------------------------


def _new(like: Tensor, shape, *dtype_from) -> Tensor:
    return torch.empty(tuple(shape), dtype=_out_dtype(*dtype_from), device=like.device)


def _two(like, shape, *dtype_from):
    return _new(like, shape, *dtype_from), _new(like, shape, *dtype_from)


_FAKES = {
    # Log-probs, entropy (or a stand-in), then the row max and log-sum for the backward.
    "logprobs_from_logits": lambda logits, labels, mask, temperature, return_entropy: (
        _new(logits, labels.shape, logits),
        _new(logits, labels.shape, logits) if return_entropy else _empty(logits),
        *_two(logits, labels.shape, logits),
    ),
    "entropy_from_logits": lambda logits, temperature: (
        _new(logits, logits.shape[:-1], logits), *_two(logits, logits.shape[:-1], logits),
    ),
    "kl_penalty": lambda lp, ref, estimator, clamp: _new(lp, lp.shape, lp, ref),
    "shape_rewards": lambda scores, lp, ref, mask, kl_coef, estimator: _two(lp, lp.shape, scores, lp, ref),
    "gae": lambda rewards, values, mask, gamma, lam, whiten: _two(rewards, rewards.shape, rewards, values),
    "masked_whiten": lambda x, mask, shift_mean, eps: _new(x, x.shape, x),
    "aggregate": lambda loss_mat, mask, agg: _new(loss_mat, (), loss_mat),
    "policy_loss": lambda lp, old, adv, mask, cl, ch, dc, agg, w: (
        _new(lp, (), lp, old, adv, w), _new(lp, (len(POLICY_STATS),), lp, old, adv, w),
    ),
    "value_loss": lambda v, oldv, ret, mask, clip, agg: (
        _new(v, (), v, oldv, ret), _new(v, (len(VALUE_STATS),), v, oldv, ret),
    ),
    "compute_advantages": lambda scores, lp, ref, values, mask, kl_coef, estimator, gamma, lam, whiten: tuple(
        _new(lp, lp.shape, scores, lp, ref, values) for _ in range(4)
    ),
    "ppo_loss": lambda lp, old, adv, v, oldv, ret, mask, ent, *rest: (
        _new(lp, (), lp, old, adv, v, oldv, ret, ent, rest[-1]),
        _new(lp, (len(PPO_STATS),), lp, old, adv, v, oldv, ret, ent, rest[-1]),
    ),
    "linear_logprobs": lambda hidden, weight, labels, bias, mask, temperature, return_entropy, chunk_size: (
        _new(hidden, labels.shape, hidden, weight, bias),
        _new(hidden, labels.shape, hidden, weight, bias) if return_entropy else _empty(hidden),
        *_two(hidden, labels.shape, hidden, weight, bias),
    ),
    "group_advantages": lambda scores, group_size, mask, estimator, norm_by_std, eps: _new(scores, mask.shape, scores),
    "reinforce_pp_advantages": lambda rewards, mask, gamma: _two(rewards, rewards.shape, rewards),
    "gspo_loss": lambda lp, old, adv, mask, agg, w, *rest: (
        _new(lp, (), lp, old, adv, w), _new(lp, (len(POLICY_STATS),), lp, old, adv, w),
    ),
    "geo_mean_loss": lambda lp, old, adv, mask, agg, w, *rest: (
        _new(lp, (), lp, old, adv, w), _new(lp, (len(POLICY_STATS),), lp, old, adv, w),
    ),
}

_FORWARDS = {
    "logprobs_from_logits": _logprobs_fn,
    "entropy_from_logits": _entropy_fn,
    "kl_penalty": _kl_fn,
    "shape_rewards": _shape_rewards_fn,
    "gae": _gae_fn,
    "masked_whiten": _masked_whiten_fn,
    "aggregate": _aggregate_fn,
    "policy_loss": _policy_fn,
    "value_loss": _value_fn,
    "compute_advantages": _compute_advantages_fn,
    "ppo_loss": _ppo_fn,
    "linear_logprobs": _linear_fn,
    "group_advantages": _group_fn,
    "reinforce_pp_advantages": _reinforce_fn,
    "gspo_loss": _gspo_fn,
    "geo_mean_loss": _geo_mean_fn,
}

OPS = tuple(_FORWARDS)

# Differentiable ops: the positions of the differentiable inputs in the op's signature.
# Everything else of an op is a constant, as in the kernels (old log-probs, advantages, weights,
# returns, ...).
DIFFERENTIABLE = {
    "logprobs_from_logits": (0,),
    "entropy_from_logits": (0,),
    "kl_penalty": (0, 1),
    "aggregate": (0,),
    "policy_loss": (0,),
    "value_loss": (0,),
    "ppo_loss": (0, 3, 7),
    "linear_logprobs": (0, 1, 3),
    "gspo_loss": (0,),
    "geo_mean_loss": (0,),
}

# The elementwise and loss ops: the backward recomputes the outputs with autograd (cheap: they
# read a few [B, T] tensors), this is the call that does it.
RECOMPUTED = {
    "kl_penalty": _call_kl,
    "aggregate": _call_aggregate,
    "policy_loss": _call_policy,
    "value_loss": _call_value,
    "ppo_loss": _call_ppo,
    "gspo_loss": _call_gspo,
    "geo_mean_loss": _call_geo_mean,
}

# The logits ops: the forward's last two outputs are the row max and log-sum, saved with the
# entropy for a closed-form backward, ``fn(grads, forward args, rowmax, logsum, entropy or None,
# needs)``, that never runs the forward again. The entropy's position among the outputs, or None
# when it was not asked for.
FROM_STATS = {
    "logprobs_from_logits": (_logprobs_backward, lambda args: 1 if args[4] else None),
    "entropy_from_logits": (_entropy_backward, lambda args: 0),
    "linear_logprobs": (_linear_backward, lambda args: 1 if args[6] else None),
}

# How many leading outputs of each differentiable op carry a gradient (the rest are stats, row
# statistics, or an empty stand-in for an entropy that was not asked for).
_N_DIFF_OUT = {
    "logprobs_from_logits": lambda args: 2 if args[4] else 1,
    "entropy_from_logits": lambda args: 1,
    "kl_penalty": lambda args: 1,
    "aggregate": lambda args: 1,
    "policy_loss": lambda args: 1,
    "value_loss": lambda args: 1,
    "ppo_loss": lambda args: 1,
    "linear_logprobs": lambda args: 2 if args[6] else 1,
    "gspo_loss": lambda args: 1,
    "geo_mean_loss": lambda args: 1,
}


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _make_backward_op(name: str, forward_fn: Callable):
    """``fastppo::<name>_backward(grads, *forward args, [rowmax, logsum, entropy,] needs) -> grads
    of the differentiable inputs``; the bracketed arguments for the ops in :data:`FROM_STATS`."""
    diff = DIFFERENTIABLE[name]
    from_stats = name in FROM_STATS
    params = list(inspect.signature(forward_fn).parameters.values())
    n_args = len(params)

    def backward_impl(*args):
        grads, fwd_args, needs = list(args[0]), list(args[1 : 1 + n_args]), list(args[-1])
        n_out = _N_DIFF_OUT[name](fwd_args)
        if not from_stats:
            return _vjp(RECOMPUTED[name], fwd_args, diff, needs, grads[:n_out])
        rowmax, logsum, entropy = args[1 + n_args : 4 + n_args]
        with torch.no_grad():
            got = FROM_STATS[name][0](grads[:n_out], fwd_args, rowmax, logsum, entropy, needs)
        return _fresh(got, list(args[1:-1]) + grads)

    def backward_fake(*args):
        fwd_args, needs = args[1 : 1 + n_args], args[-1]
        return [
            torch.empty(fwd_args[i].shape, dtype=fwd_args[i].dtype, device=fwd_args[i].device)
            if need and fwd_args[i] is not None else _empty(args[0][0])
            for i, need in zip(diff, needs)
        ]

    P = inspect.Parameter
    stats = []
    if from_stats:
        stats = [P("rowmax", P.POSITIONAL_OR_KEYWORD, annotation=Tensor),
                 P("logsum", P.POSITIONAL_OR_KEYWORD, annotation=Tensor),
                 P("entropy", P.POSITIONAL_OR_KEYWORD, annotation=Optional[Tensor])]
    backward_impl.__signature__ = inspect.Signature(
        [P("grads", P.POSITIONAL_OR_KEYWORD, annotation=list[Tensor])]
        + params
        + stats
        + [P("needs", P.POSITIONAL_OR_KEYWORD, annotation=list[bool])],
        return_annotation=list[Tensor],
    )
    backward_impl.__name__ = f"{name}_backward"
    op = _op(f"{name}_backward", backward_impl)
    op.register_fake(backward_fake)
    return op


def _register(name: str):
    forward_fn = _FORWARDS[name]
    op = _op(name, forward_fn)
    op.register_fake(_FAKES[name])
    n_args = len(inspect.signature(forward_fn).parameters)

    if name not in DIFFERENTIABLE:
        def setup_nondiff(ctx, inputs, output):
            ctx.mark_non_differentiable(*_as_tuple(output))

        def backward_nondiff(ctx, *grads):
            return (None,) * n_args

        op.register_autograd(backward_nondiff, setup_context=setup_nondiff)
        return op, None

    backward_op = _make_backward_op(name, forward_fn)
    diff = DIFFERENTIABLE[name]
    from_stats = name in FROM_STATS

    def setup(ctx, inputs, output):
        outs = _as_tuple(output)
        n_out = _N_DIFF_OUT[name](inputs)
        # Stats, row statistics (and an entropy stand-in) are not differentiable.
        if len(outs) > n_out:
            ctx.mark_non_differentiable(*outs[n_out:])
        tensors = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.tensor_positions = tensors
        saved = [inputs[i] for i in tensors]
        ctx.has_entropy = False
        if from_stats:
            # The row max and log-sum, and the entropy for its own gradient (d H needs H).
            at = FROM_STATS[name][1](inputs)
            ctx.has_entropy = at is not None
            saved += list(outs[-2:]) + ([outs[at]] if at is not None else [])
        ctx.save_for_backward(*saved)
        ctx.others = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.out_meta = [(o.shape, o.dtype, o.device) for o in outs[:n_out]]

    def backward(ctx, *grads):
        args = list(ctx.others)
        saved = ctx.saved_tensors
        for i, t in zip(ctx.tensor_positions, saved):
            args[i] = t
        needs = [bool(ctx.needs_input_grad[i]) for i in diff]
        if not any(needs):
            return (None,) * n_args
        n_out = _N_DIFF_OUT[name](args)
        # Grads arrive materialised; a None (an output nobody used) counts as zeros.
        grads = [g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                 for g, (shape, dtype, device) in zip(grads[:n_out], ctx.out_meta)]
        stats = []
        if from_stats:
            rest = saved[len(ctx.tensor_positions):]
            stats = [rest[0], rest[1], rest[2] if ctx.has_entropy else None]
        got = backward_op(grads, *args, *stats, needs)
        result = [None] * n_args
        for i, need, g in zip(diff, needs, got):
            if need and args[i] is not None:
                result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup)
    return op, backward_op


_REGISTERED = {name: _register(name) for name in OPS}


def op(name: str):
    """The registered forward custom op ``fastppo::<name>`` (``torch.ops.fastppo.<name>``)."""
    return _REGISTERED[name][0]


def backward_op(name: str):
    """The registered backward custom op ``fastppo::<name>_backward`` of a differentiable op."""
    return _REGISTERED[name][1]


# --------------------------------------------------------------------------------------------
# Adapters: the public signatures and return values around ``torch.ops.fastppo.*``. The public
# ops in ``fastppo.ops`` call these under ``torch.compile`` (arguments already checked).
# --------------------------------------------------------------------------------------------

_ops = torch.ops.fastppo


def _f(x):
    return None if x is None else float(x)


def logprobs_from_logits(logits, labels, *, temperature=1.0, return_entropy=False, mask=None, inplace_backward=False):
    # inplace_backward is not honoured here: a graph's backward gets a fresh gradient buffer.
    # The row max and log-sum are for the backward only.
    lp, ent, _, _ = _ops.logprobs_from_logits(logits, labels, mask, float(temperature), return_entropy)
    return (lp, ent) if return_entropy else lp


def entropy_from_logits(logits, *, temperature=1.0, inplace_backward=False):
    return _ops.entropy_from_logits(logits, float(temperature))[0]


def kl_penalty(logprobs, ref_logprobs, estimator="k1", *, clamp=None):
    return _ops.kl_penalty(logprobs, ref_logprobs, estimator, _f(clamp))


def shape_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1"):
    return tuple(_ops.shape_rewards(scores, logprobs, ref_logprobs, mask, float(kl_coef), estimator))


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=False):
    return tuple(_ops.gae(rewards, values, mask, float(gamma), float(lam), whiten))


def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    return _ops.masked_whiten(x, mask, shift_mean, float(eps))


def aggregate(loss_mat, mask, agg="token-mean"):
    return _ops.aggregate(loss_mat, mask, agg)


def _stats(names, vec) -> dict:
    return {k: vec[i] for i, k in enumerate(names)}


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                agg="token-mean", is_weights=None):
    loss, stats = _ops.policy_loss(logprobs, old_logprobs, advantages, mask, float(clip_low), _f(clip_high),
                                   _f(dual_clip), agg, is_weights)
    return loss, _stats(POLICY_STATS, stats)


def value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean"):
    loss, stats = _ops.value_loss(values, old_values, returns, mask, _f(clip), agg)
    return loss, _stats(VALUE_STATS, stats)


def compute_advantages(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, estimator="k1", gamma=1.0,
                       lam=0.95, whiten=True):
    return tuple(_ops.compute_advantages(scores, logprobs, ref_logprobs, values, mask, float(kl_coef), estimator,
                                         float(gamma), float(lam), whiten))


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, *, entropy=None, clip_low=0.2,
             clip_high=None, dual_clip=None, value_clip=0.2, vf_coef=0.5, ent_coef=0.0, agg="token-mean",
             is_weights=None):
    loss, stats = _ops.ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, entropy,
                                float(clip_low), _f(clip_high), _f(dual_clip), _f(value_clip), float(vf_coef),
                                float(ent_coef), agg, is_weights)
    return loss, _stats(PPO_STATS, stats)


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, return_entropy=False, mask=None,
                    chunk_size=None):
    lp, ent, _, _ = _ops.linear_logprobs(hidden, weight, labels, bias, mask, float(temperature), return_entropy,
                                         chunk_size)
    return (lp, ent) if return_entropy else lp


def group_advantages(scores, group_size, mask, *, estimator="grpo", norm_by_std=True, eps=1e-6):
    return _ops.group_advantages(scores, group_size, mask, estimator, norm_by_std, float(eps))


def reinforce_pp_advantages(rewards, mask, *, gamma=1.0):
    return tuple(_ops.reinforce_pp_advantages(rewards, mask, float(gamma)))


def gspo_loss(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None, clip_low=0.2,
              clip_high=None, dual_clip=None, seq_grad=False):
    loss, stats = _ops.gspo_loss(logprobs, old_logprobs, advantages, mask, agg, is_weights, float(clip_low),
                                 _f(clip_high), _f(dual_clip), bool(seq_grad))
    return loss, _stats(POLICY_STATS, stats)


def geo_mean_loss(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None,
                  clip_low=0.2, clip_high=None):
    loss, stats = _ops.geo_mean_loss(logprobs, old_logprobs, advantages, mask, agg, is_weights, float(clip_low),
                                     _f(clip_high))
    return loss, _stats(POLICY_STATS, stats)
