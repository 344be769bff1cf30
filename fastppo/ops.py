"""The public, dispatching ops: ``fastppo.<op>``.

Each op validates its inputs once (``fastppo._checks``), then runs the Triton kernel or the
PyTorch reference as ``fastppo._dispatch`` decides. Signatures, dtypes and numbers are those of
``fastppo.reference``, whose docstrings carry the formulas.
"""

from __future__ import annotations

import torch

from . import _checks, _library, reference
from ._dispatch import pick


def _tracing() -> bool:
    """Under torch.compile / export tracing the ops go through their custom ops (``fastppo._library``)."""
    return torch.compiler.is_compiling()


def _doc(op):
    """Reuse the reference's docstring: both must describe the very same numbers."""

    def wrap(fn):
        fn.__doc__ = getattr(reference, op).__doc__
        return fn

    return wrap


@_doc("logprobs_from_logits")
def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: torch.Tensor | None = None,
    inplace_backward: bool = False,
):
    kwargs = dict(temperature=temperature, return_entropy=return_entropy, mask=mask, inplace_backward=inplace_backward)
    _checks.run(_checks.logprobs_from_logits, logits, labels, **kwargs)
    if _tracing():
        return _library.logprobs_from_logits(logits, labels, **kwargs)
    return pick("logprobs_from_logits", logits.device)(logits, labels, **kwargs)


@_doc("entropy_from_logits")
def entropy_from_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, inplace_backward: bool = False
) -> torch.Tensor:
    _checks.run(_checks.entropy_from_logits, logits, temperature=temperature, inplace_backward=inplace_backward)
    if _tracing():
        return _library.entropy_from_logits(logits, temperature=temperature, inplace_backward=inplace_backward)
    impl = pick("entropy_from_logits", logits.device)
    return impl(logits, temperature=temperature, inplace_backward=inplace_backward)


@_doc("kl_penalty")
def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", *, clamp: float | None = None
) -> torch.Tensor:
    _checks.run(_checks.kl_penalty, logprobs, ref_logprobs, estimator, clamp=clamp)
    if _tracing():
        return _library.kl_penalty(logprobs, ref_logprobs, estimator, clamp=clamp)
    return pick("kl_penalty", logprobs.device)(logprobs, ref_logprobs, estimator, clamp=clamp)


@_doc("shape_rewards")
def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
):
    _checks.run(_checks.shape_rewards, scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)
    if _tracing():
        return _library.shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)
    impl = pick("shape_rewards", logprobs.device)
    return impl(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)


@_doc("gae")
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
):
    _checks.run(_checks.gae, rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    if _tracing():
        return _library.gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    return pick("gae", rewards.device)(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)


@_doc("masked_whiten")
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    _checks.run(_checks.masked_whiten, x, mask, shift_mean=shift_mean, eps=eps)
    if _tracing():
        return _library.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    return pick("masked_whiten", x.device)(x, mask, shift_mean=shift_mean, eps=eps)


@_doc("aggregate")
def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    _checks.run(_checks.aggregate, loss_mat, mask, agg)
    if _tracing():
        return _library.aggregate(loss_mat, mask, agg)
    return pick("aggregate", loss_mat.device)(loss_mat, mask, agg)


@_doc("policy_loss")
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    is_weights: torch.Tensor | None = None,
):
    kwargs = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, is_weights=is_weights)
    _checks.run(_checks.policy_loss, logprobs, old_logprobs, advantages, mask, **kwargs)
    if _tracing():
        return _library.policy_loss(logprobs, old_logprobs, advantages, mask, **kwargs)
    return pick("policy_loss", logprobs.device)(logprobs, old_logprobs, advantages, mask, **kwargs)


@_doc("value_loss")
def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
):
    _checks.run(_checks.value_loss, values, old_values, returns, mask, clip=clip, agg=agg)
    if _tracing():
        return _library.value_loss(values, old_values, returns, mask, clip=clip, agg=agg)
    return pick("value_loss", values.device)(values, old_values, returns, mask, clip=clip, agg=agg)


@_doc("compute_advantages")
def compute_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
):
    kwargs = dict(kl_coef=kl_coef, estimator=estimator, gamma=gamma, lam=lam, whiten=whiten)
    _checks.run(_checks.compute_advantages, scores, logprobs, ref_logprobs, values, mask, **kwargs)
    if _tracing():
        return _library.compute_advantages(scores, logprobs, ref_logprobs, values, mask, **kwargs)
    return pick("compute_advantages", logprobs.device)(scores, logprobs, ref_logprobs, values, mask, **kwargs)


@_doc("ppo_loss")
def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
    agg: str = "token-mean",
    is_weights: torch.Tensor | None = None,
):
    kwargs = dict(
        entropy=entropy,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        value_clip=value_clip,
        vf_coef=vf_coef,
        ent_coef=ent_coef,
        agg=agg,
        is_weights=is_weights,
    )
    _checks.run(_checks.ppo_loss, logprobs, old_logprobs, advantages, values, old_values, returns, mask, **kwargs)
    if _tracing():
        return _library.ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, **kwargs)
    impl = pick("ppo_loss", logprobs.device)
    return impl(logprobs, old_logprobs, advantages, values, old_values, returns, mask, **kwargs)


# --------------------------------------------------------------------------------------------
# linear_logprobs (issue 10): its ``auto`` backend has a CPU fast path of its own
# --------------------------------------------------------------------------------------------

from ._dispatch import current_backend  # noqa: E402


@_doc("linear_logprobs")
def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
):
    kwargs = dict(bias=bias, temperature=temperature, return_entropy=return_entropy, mask=mask, chunk_size=chunk_size)
    _checks.run(_checks.linear_logprobs, hidden, weight, labels, **kwargs)
    if _tracing():
        return _library.linear_logprobs(hidden, weight, labels, **kwargs)
    if current_backend() == "auto" and hidden.device.type != "cuda":
        # Not the full-logits reference: CPU users get the chunked path's memory saving too.
        from . import linear

        impl = linear.linear_logprobs
    else:
        impl = pick("linear_logprobs", hidden.device)
    return impl(hidden, weight, labels, **kwargs)


@_doc("linear_ppo_loss")
def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    is_weights: torch.Tensor | None = None,
    ent_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    chunk_size: int | None = None,
):
    kwargs = dict(old_logprobs=old_logprobs, advantages=advantages, mask=mask, bias=bias, temperature=temperature,
                  clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, is_weights=is_weights,
                  ent_coef=ent_coef, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator,
                  chunk_size=chunk_size)
    _checks.run(_checks.linear_ppo_loss, hidden, weight, labels, **kwargs)
    if _tracing():
        # No custom op of its own: the registered ops it is made of (the recomputing backward).
        lp, ent = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True,
                                  mask=mask, chunk_size=chunk_size)
        ops = {"policy_loss": policy_loss, "aggregate": aggregate, "kl_penalty": kl_penalty}
        return reference.ppo_objective(lp, ent, old_logprobs, advantages, mask, ref_logprobs, clip_low=clip_low,
                                       clip_high=clip_high, dual_clip=dual_clip, agg=agg, is_weights=is_weights,
                                       ent_coef=ent_coef, kl_coef=kl_coef, kl_estimator=kl_estimator, ops=ops.get)
    if current_backend() == "auto" and hidden.device.type != "cuda":
        from . import linear

        impl = linear.linear_ppo_loss
    else:
        impl = pick("linear_ppo_loss", hidden.device)
    return impl(hidden, weight, labels, **kwargs)


# --------------------------------------------------------------------------------------------
# Critic-free advantages (issue 11)
# --------------------------------------------------------------------------------------------


@_doc("group_advantages")
def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    mask: torch.Tensor,
    *,
    estimator: str = "grpo",
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    kwargs = dict(estimator=estimator, norm_by_std=norm_by_std, eps=eps)
    _checks.run(_checks.group_advantages, scores, group_size, mask, **kwargs)
    if _tracing():
        return _library.group_advantages(scores, group_size, mask, **kwargs)
    return pick("group_advantages", scores.device)(scores, group_size, mask, **kwargs)


@_doc("reinforce_pp_advantages")
def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0):
    _checks.run(_checks.reinforce_pp_advantages, rewards, mask, gamma=gamma)
    if _tracing():
        return _library.reinforce_pp_advantages(rewards, mask, gamma=gamma)
    return pick("reinforce_pp_advantages", rewards.device)(rewards, mask, gamma=gamma)
