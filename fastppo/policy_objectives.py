"""The token-level policy objectives of verl 0.9.1 as fastppo ops (issue 19):
``dppo_tv_loss``, ``dppo_kl_loss``, ``sapo_loss``, ``gpg_loss``, ``cispo_loss``, ``dro_loss``.

Each is registered in :mod:`fastppo.objectives` under verl's ``loss_mode`` name (``dppo_tv``,
``dppo_kl``, ``sapo``, ``gpg``, ``cispo``, ``dro``) with the uniform signature::

    fn(logprobs, old_logprobs, advantages, mask, *, agg, is_weights, **options) -> (loss, stats)

and dispatches like :func:`fastppo.policy_loss`: one validation (``fastppo._checks``), then the
Triton kernel family ``kernels/policy_objectives.py`` (one fused forward launch, one backward) or
the reference (``fastppo.reference``, whose docstrings carry the formulas and papers), as
``FASTPPO_BACKEND`` decides. Under ``torch.compile`` they go through the custom op
``fastppo::token_policy_loss``.
"""

from __future__ import annotations

import torch

from . import _checks, _library_objectives
from ._dispatch import pick
from .objectives import register_policy_loss
from .ops import _doc, _tracing

# verl loss_mode name -> (fastppo op name, the options it takes with verl's defaults)
TOKEN_OBJECTIVES = {
    "dppo_tv": ("dppo_tv_loss", {"clip_low": 0.2, "clip_high": None, "clip_ratio_c": 3.0}),
    "dppo_kl": ("dppo_kl_loss", {"clip_low": 0.2, "clip_high": None, "clip_ratio_c": 3.0}),
    "sapo": ("sapo_loss", {"tau_pos": 1.0, "tau_neg": 1.05}),
    "gpg": ("gpg_loss", {}),
    "cispo": ("cispo_loss", {"clip_low": 0.2, "clip_high": None}),
    "dro": ("dro_loss", {"beta": None}),
}


def _run(op: str, logprobs, old_logprobs, advantages, mask, agg, is_weights, options):
    _checks.run(getattr(_checks, op), logprobs, old_logprobs, advantages, mask, agg=agg, is_weights=is_weights,
                **options)
    if _tracing():
        return _library_objectives.token_policy_loss(op, logprobs, old_logprobs, advantages, mask, agg=agg,
                                                     is_weights=is_weights, **options)
    return pick(op, logprobs.device)(logprobs, old_logprobs, advantages, mask, agg=agg, is_weights=is_weights,
                                     **options)


@register_policy_loss("dppo_tv")
@_doc("dppo_tv_loss")
def dppo_tv_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 clip_low: float = 0.2, clip_high: float | None = None, clip_ratio_c: float = 3.0,
                 agg: str = "token-mean", is_weights: torch.Tensor | None = None):
    return _run("dppo_tv_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights,
                dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c))


@register_policy_loss("dppo_kl")
@_doc("dppo_kl_loss")
def dppo_kl_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 clip_low: float = 0.2, clip_high: float | None = None, clip_ratio_c: float = 3.0,
                 agg: str = "token-mean", is_weights: torch.Tensor | None = None):
    return _run("dppo_kl_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights,
                dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c))


@register_policy_loss("sapo")
@_doc("sapo_loss")
def sapo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              tau_pos: float = 1.0, tau_neg: float = 1.05, agg: str = "seq-mean-token-mean",
              is_weights: torch.Tensor | None = None):
    return _run("sapo_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights,
                dict(tau_pos=tau_pos, tau_neg=tau_neg))


@register_policy_loss("gpg")
@_doc("gpg_loss")
def gpg_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             agg: str = "token-mean", is_weights: torch.Tensor | None = None):
    return _run("gpg_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights, {})


@register_policy_loss("cispo")
@_doc("cispo_loss")
def cispo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
               clip_low: float = 0.2, clip_high: float | None = None, agg: str = "token-mean",
               is_weights: torch.Tensor | None = None):
    return _run("cispo_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights,
                dict(clip_low=clip_low, clip_high=clip_high))


@register_policy_loss("dro")
@_doc("dro_loss")
def dro_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             beta: float | None = None, agg: str = "token-mean", is_weights: torch.Tensor | None = None):
    return _run("dro_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights, dict(beta=beta))
