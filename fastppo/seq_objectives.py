"""Sequence-level and covariance-selection policy losses: verl 0.9.1's ``gspo``, ``geo_mean``,
``clip_cov`` and ``kl_cov`` as public ops, registered in :mod:`fastppo.objectives` under verl's
``loss_mode`` names.

``gspo_loss`` and ``geo_mean_loss`` dispatch like every op (Triton kernel family
``kernels/seq_policy_loss.py``, or the reference); ``clip_cov_loss`` and ``kl_cov_loss`` choose
their tokens by a covariance over the whole batch (nonzero + randperm, top-k), which stays in
PyTorch, so they run the PyTorch formulation on every backend. Under ``torch.compile`` the first
two go through the custom ops ``torch.ops.fastppo.gspo_loss`` / ``geo_mean_loss``
(``fastppo._library``: one graph, backward by recomputation); the selection of the other two is
data-dependent (a random draw the backward could not repeat), so they are left to dynamo, which
breaks the graph at their host synchronisation. Formulas, papers and statistics
are in the docstrings of ``fastppo.reference.<op>`` (``fastppo/_seq_reference.py``), which these
functions share.
"""

from __future__ import annotations

import torch

from . import _checks, _library, _seq_reference
from ._dispatch import pick
from .objectives import register_policy_loss

__all__ = ["gspo_loss", "geo_mean_loss", "clip_cov_loss", "kl_cov_loss"]


def _doc(fn):
    fn.__doc__ = getattr(_seq_reference, fn.__name__).__doc__
    return fn


@register_policy_loss("gspo")
@_doc
def gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              agg: str = "seq-mean-token-mean", is_weights: torch.Tensor | None = None, clip_low: float = 0.2,
              clip_high: float | None = None, dual_clip: float | None = None, seq_grad: bool = False):
    kwargs = dict(agg=agg, is_weights=is_weights, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                  seq_grad=seq_grad)
    _checks.run(_seq_reference.check_gspo, logprobs, old_logprobs, advantages, mask, **kwargs)
    if torch.compiler.is_compiling():
        return _library.gspo_loss(logprobs, old_logprobs, advantages, mask, **kwargs)
    return pick("gspo_loss", logprobs.device)(logprobs, old_logprobs, advantages, mask, **kwargs)


@register_policy_loss("geo_mean")
@_doc
def geo_mean_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, *, agg: str = "seq-mean-token-mean", is_weights: torch.Tensor | None = None,
                  clip_low: float = 0.2, clip_high: float | None = None):
    kwargs = dict(agg=agg, is_weights=is_weights, clip_low=clip_low, clip_high=clip_high)
    _checks.run(_seq_reference.check_geo_mean, logprobs, old_logprobs, advantages, mask, **kwargs)
    if torch.compiler.is_compiling():
        return _library.geo_mean_loss(logprobs, old_logprobs, advantages, mask, **kwargs)
    return pick("geo_mean_loss", logprobs.device)(logprobs, old_logprobs, advantages, mask, **kwargs)


@register_policy_loss("clip_cov")
@_doc
def clip_cov_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, *, agg: str = "token-mean", is_weights: torch.Tensor | None = None,
                  clip_low: float = 0.2, clip_high: float | None = None, clip_cov_ratio: float = 0.0002,
                  clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0, generator: torch.Generator | None = None):
    kwargs = dict(agg=agg, is_weights=is_weights, clip_low=clip_low, clip_high=clip_high,
                  clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, generator=generator)
    _checks.run(_seq_reference.check_clip_cov, logprobs, old_logprobs, advantages, mask, **kwargs)
    return _seq_reference.clip_cov_loss.raw(logprobs, old_logprobs, advantages, mask, **kwargs)


@register_policy_loss("kl_cov")
@_doc
def kl_cov_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *, agg: str = "token-mean", is_weights: torch.Tensor | None = None, kl_cov_ratio: float = 0.0002,
                ppo_kl_coef: float = 0.1):
    kwargs = dict(agg=agg, is_weights=is_weights, kl_cov_ratio=kl_cov_ratio, ppo_kl_coef=ppo_kl_coef)
    _checks.run(_seq_reference.check_kl_cov, logprobs, old_logprobs, advantages, mask, **kwargs)
    return _seq_reference.kl_cov_loss.raw(logprobs, old_logprobs, advantages, mask, **kwargs)
