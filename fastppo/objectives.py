"""Policy objectives by name: one registry that the trainer, ``fastppo verify`` and the adapters
read, so that a new objective is usable everywhere once it is registered.

Every registered function has the signature of :func:`fastppo.policy_loss`'s core::

    fn(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None, **options)
        -> (loss, stats)

``logprobs``, ``old_logprobs``, ``advantages``: ``[B, T]`` (any float dtype; the loss is float32),
``mask``: ``[B, T]`` (``mask != 0`` is valid), ``is_weights``: ``[B, T]`` or None, detached
per-token weights (rollout correction). ``options`` are the objective's own hyper-parameters
(clip ranges, temperatures...), all keyword-only with defaults. ``stats`` is a dict of detached
0-d float32 tensors with at least ``policy_loss``'s three keys, ``clipfrac``, ``clipfrac_lower``
and ``approx_kl`` (verl's ``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl``; 0 for a fraction
the objective has no clip for), so that any objective's stats read the same; extra keys are
allowed (``bypass_mode``'s ``rollout_corr/`` metrics).

The names are verl 0.9.1's ``loss_mode`` names (``vanilla``, ``cispo``, ``gspo``...).
"""

from __future__ import annotations

from typing import Callable

import torch

from .ops import policy_loss

PolicyLossFn = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]

POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register ``fn`` as the policy objective ``name`` (an existing name is an error)."""

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES and POLICY_LOSSES[name] is not fn:
            raise ValueError(f"policy loss {name!r} is registered already (by {POLICY_LOSSES[name].__module__})")
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def get_policy_loss(name: str) -> PolicyLossFn:
    """The registered policy objective ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return POLICY_LOSSES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(POLICY_LOSSES))
        raise ValueError(f"unknown policy loss {name!r}; expected one of: {known}") from None


@register_policy_loss("vanilla")
def vanilla_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None,
                 clip_low=0.2, clip_high=None, dual_clip=None):
    """verl's ``vanilla``: the clipped PPO surrogate of :func:`fastppo.policy_loss` (same numbers)."""
    return policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                       dual_clip=dual_clip, agg=agg, is_weights=is_weights)
