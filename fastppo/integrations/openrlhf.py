"""OpenRLHF (0.11) adapter: ``PolicyLoss``, ``ValueLoss`` and GAE with OpenRLHF's API and numbers.

* ``PolicyLoss(clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type,
  is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold)``;
  ``forward(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size,
  batch_num_tokens, global_batch_size)`` -> ``(loss, clip_ratio, ppo_kl, vllm_kl,
  is_filter_ratio)``, the last two None unless the rollout-mismatch correction is on.
* ``ValueLoss(clip_eps, token_level_loss)``; ``forward(values, old_values, returns, action_mask,
  dp_size, batch_num_tokens, global_batch_size)`` -> the loss.
* ``get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)`` ->
  ``(advantages, returns)``.
* ``compute_approx_kl(log_probs, log_probs_base, log_probs_old, kl_estimator, unbiased_gradient)``:
  k1 / k2 / k3 with OpenRLHF's clamps, by ``fastppo.kl_penalty``.

``patch()`` / ``unpatch()`` put them into OpenRLHF's modules (the actor and critic build their
losses from names imported from ``openrlhf.models``; the experience maker calls its own
``get_advantages_and_returns`` method).

``policy_loss_type`` is ``"ppo"`` or ``"gspo"`` (the sequence-level ratio of GSPO fed to
``fastppo.policy_loss`` as a per-token log-ratio; fastppo clamps it to [-20, 20], OpenRLHF does
not, which differs only for a sequence whose mean log-ratio is beyond 20).
Where OpenRLHF gives NaN (an all-masked batch), these give 0.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
import torch.nn as nn

import fastppo
from fastppo.integrations import _global_aggregate, _promote

__all__ = ["PolicyLoss", "ValueLoss", "compute_approx_kl", "get_advantages_and_returns", "patch", "unpatch"]

# OpenRLHF's cap on the importance weight of the unbiased KL gradient (openrlhf.models.utils).
KL_IS_WEIGHT_CLIP = 10.0


def _mask_or_ones(action_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # OpenRLHF treats a missing mask as "every token counts".
    if action_mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    return action_mask.bool()


def _row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B, 1]`` mean over each row's valid tokens (0 for a row without any)."""
    total = torch.where(mask, x, 0.0).sum(-1)
    return (total / mask.sum(-1).clamp(min=1)).unsqueeze(-1)


class PolicyLoss(nn.Module):
    """PPO clipped surrogate (with optional dual clip) computed by ``fastppo.policy_loss``.

    Args:
        clip_eps_low, clip_eps_high: the ratio is clipped to [1 - low, 1 + high].
        dual_clip: c > 1 bounds the loss of tokens with negative advantage by -A * c; None: off.
        token_level_loss: mean over all valid tokens (True) or mean of per-sequence means.
        policy_loss_type: ``"ppo"`` or ``"gspo"`` (GSPO, arXiv 2507.18071: every token of a
            sequence gets the ratio exp(mean over its valid tokens of log_probs - old_log_probs),
            or of log_probs - rollout_log_probs when the correction is on, in which case GSPO
            applies no correction weights, as in OpenRLHF; the loss is always per sequence).
        is_correction_level: ``"off"``, ``"token"`` or ``"seq"``: reweight (or drop) tokens by
            the train/rollout probability ratio exp(old - rollout), gated by a statistic per
            token or per sequence.
        is_correction_mode: ``"mask"`` (drop out-of-band units, survivors keep their ratio as
            weight) or ``"clip"`` (clamp the ratio into the band).
        is_correction_gating: the gated statistic: ``"ratio"``, ``"binary_kl"`` or ``"tv"``.
        is_correction_threshold: ``(low, high)`` band of the statistic.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Any = (0.5, 5.0),
    ) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"policy_loss_type must be ppo or gspo, got {policy_loss_type!r}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        for name, value, allowed in (
            ("is_correction_level", is_correction_level, ("off", "token", "seq")),
            ("is_correction_mode", is_correction_mode, ("mask", "clip")),
            ("is_correction_gating", is_correction_gating, ("ratio", "binary_kl", "tv")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip needs is_correction_level=token and is_correction_gating=ratio")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(
                f"is_correction_gating={is_correction_gating} bounds a divergence from above only; "
                f"the lower threshold must be <= 0, got {is_correction_threshold[0]}"
            )
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        # GSPO's loss is per sequence whatever token_level_loss says (OpenRLHF's rule).
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    @torch.no_grad()
    def _correction(self, old_log_probs, rollout_log_probs, mask):
        """Per-token weights for the train/rollout mismatch, the filtered fraction and the KL.

        Returns ``(weights [B, T], is_filter_ratio 0-d, vllm_kl 0-d)``; all detached (the
        weights scale the loss, they are not optimised).
        """
        if rollout_log_probs is None:
            raise ValueError("is_correction_level != 'off' needs rollout_log_probs, got None")
        low, high = self.is_correction_threshold
        per_sequence = self.is_correction_level == "seq"
        log_is = old_log_probs - rollout_log_probs
        token_is = log_is.exp()
        if self.is_correction_gating == "ratio":
            stat = _row_mean(log_is, mask).exp() if per_sequence else token_is
        else:
            # Clamped so that the binary KL's logs stay finite at probabilities of 0 or 1.
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if per_sequence:
                stat = _row_mean(stat, mask)
        if self.is_correction_mode == "clip":
            weights = stat.clamp(min=low, max=high)
            dropped = (stat < low) | (stat > high)
        else:
            kept = (stat >= low) & (stat <= high)
            if per_sequence:
                # OpenRLHF's mean over an empty row is NaN, which fails the band test: dropped.
                kept = kept & mask.any(dim=-1, keepdim=True)
            weights = torch.where(kept, token_is, 0.0)
            dropped = ~kept
        weights = weights.expand_as(token_is)
        if per_sequence:
            # One unit per sequence, empty sequences included: the fraction of rows dropped.
            filter_ratio = dropped.to(token_is.dtype).mean()
        else:
            filter_ratio = fastppo.aggregate(dropped.to(token_is.dtype), mask, "token-mean")
        vllm_kl = fastppo.aggregate(rollout_log_probs - old_log_probs, mask, "token-mean")
        return weights, filter_ratio, vllm_kl

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ):
        """Args:
            log_probs: ``[B, T]`` current log-probs (differentiable).
            old_log_probs, advantages: ``[B, T]``; rollout_log_probs: ``[B, T]`` or None.
            action_mask: ``[B, T]`` bool or 0/1, None for all tokens.
            dp_size, batch_num_tokens, global_batch_size: normalise by the global token count
                (token level) or sequence count (sequence level) times ``dp_size``.
        Returns:
            ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``: 0-d tensors; the last two
            are None when ``is_correction_level == "off"``.
        """
        log_probs, old_log_probs, advantages, rollout_log_probs = _promote(
            log_probs, old_log_probs, advantages, rollout_log_probs
        )
        mask = _mask_or_ones(action_mask, log_probs)
        weights = vllm_kl = filter_ratio = None
        dual = None if self.dual_clip is None else float(self.dual_clip)
        if self.policy_loss_type == "gspo":
            if self.is_correction_level != "off":
                if rollout_log_probs is None:
                    raise ValueError("gspo with is_correction_level != 'off' needs rollout_log_probs, got None")
                base = rollout_log_probs
            else:
                base = old_log_probs

            # fastppo's GSPO op in OpenRLHF's form: one ratio per sequence, exp(mean of the valid
            # log-ratios), with the gradient through that mean (seq_grad=True). Unlike OpenRLHF's
            # product with the mask, garbage at masked positions stays out (a NaN there would make
            # OpenRLHF's whole row NaN); the log-ratio is clamped at 10 (OpenRLHF: not at all).
            def run(agg: str):
                return fastppo.gspo_loss(log_probs, base, advantages, mask, agg=agg, clip_low=float(self.clip_eps_low),
                                         clip_high=float(self.clip_eps_high), dual_clip=dual, seq_grad=True)
        else:
            if self.is_correction_level != "off":
                weights, filter_ratio, vllm_kl = self._correction(old_log_probs, rollout_log_probs, mask)

            def run(agg: str):
                return fastppo.policy_loss(log_probs, old_log_probs, advantages, mask,
                                           clip_low=float(self.clip_eps_low), clip_high=float(self.clip_eps_high),
                                           dual_clip=dual, agg=agg, is_weights=weights)

        loss, stats = _global_aggregate(
            run,
            mask,
            "token-mean" if self.token_level_loss else "seq-mean-token-mean",
            dp_size=dp_size,
            batch_num_tokens=batch_num_tokens if self.token_level_loss else None,
            global_batch_size=None if self.token_level_loss else global_batch_size,
            require_global=False,
        )
        # OpenRLHF reports the KL of the raw log-ratio; fastppo's approx_kl is of the clamped one.
        ppo_kl = fastppo.aggregate((old_log_probs - log_probs).detach(), mask, "token-mean")
        return loss, stats["clipfrac"], ppo_kl, vllm_kl, filter_ratio


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: torch.Tensor | None = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> torch.Tensor:
    """OpenRLHF's ``compute_approx_kl`` computed by ``fastppo.kl_penalty``.

    With d = log_probs - log_probs_base in float32: ``k1`` d, ``k2`` d^2 / 2, ``k3``
    exp(-d') + d' - 1 with d' = max(d, -10), accurate at small |d| where OpenRLHF's float32
    formula cancels; every estimate clamped to [-10, 10].
    ``unbiased_gradient``: the same value with the gradient of w * d^2 / 2, w = exp(log_probs -
    log_probs_old) capped at 10 and detached (1 without ``log_probs_old``).

    Args:
        log_probs: ``[B, T]`` (or any shape) current log-probs, differentiable.
        log_probs_base: the reference log-probs; log_probs_old: the rollout log-probs or None.
    Returns:
        float32 estimate of the input shape (OpenRLHF computes in float32 too).
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator!r}; expected k1, k2 or k3")
    log_ratio = log_probs.float() - log_probs_base.float()
    zeros = torch.zeros_like(log_ratio)
    # OpenRLHF bounds k3's log-ratio below at -10 before exp (fastppo's k3 clamps only the
    # estimate): done here so that log_probs = -inf gives OpenRLHF's 10, not NaN.
    d = log_ratio.clamp(min=-10) if kl_estimator == "k3" else log_ratio
    value = fastppo.kl_penalty(d, zeros, kl_estimator, clamp=10.0)
    if not unbiased_gradient:
        return value
    if log_probs_old is None:
        w = 1.0
    else:
        w = (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = w * fastppo.kl_penalty(log_ratio, zeros, "k2")
    # (s - s) first, exactly 0: OpenRLHF's (value + s) - s rounds the value to the spacing of s
    # (10 came back as 9.9999924 next to s = 200), the same gradient.
    return value.detach() + (surrogate - surrogate.detach())


class ValueLoss(nn.Module):
    """Clipped value loss computed by ``fastppo.value_loss``.

    0.5 * agg(max((v - R)^2, (old + clamp(v - old, -clip_eps, clip_eps) - R)^2)).

    Args:
        clip_eps: clip range of the value update; None gives the plain squared error.
        token_level_loss: mean over all valid tokens (True) or mean of per-sequence means.
    """

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> torch.Tensor:
        """Args:
            values: ``[B, T]`` current predictions (differentiable); old_values, returns: ``[B, T]``.
            action_mask: ``[B, T]`` bool or 0/1, None for all tokens.
        Returns:
            the 0-d loss.
        """
        values, old_values, returns = _promote(values, old_values, returns)
        mask = _mask_or_ones(action_mask, values)

        def run(agg: str):
            return fastppo.value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=agg)

        loss, _ = _global_aggregate(
            run,
            mask,
            "token-mean" if self.token_level_loss else "seq-mean-token-mean",
            dp_size=dp_size,
            batch_num_tokens=batch_num_tokens if self.token_level_loss else None,
            global_batch_size=None if self.token_level_loss else global_batch_size,
            require_global=False,
        )
        return loss


@torch.no_grad()
def get_advantages_and_returns(
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor | None,
    gamma: float,
    lambd: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's GAE computed by ``fastppo.gae``.

    OpenRLHF zeroes values and rewards at masked positions and then scans every position, so a
    masked position contributes V = 0 and r = 0 (after the last valid token of a right-padded row
    that means V(next) = 0 and A = 0, which is fastppo's skip-the-mask scan too). Running
    ``fastppo.gae`` on the zeroed inputs with an all-valid mask gives exactly OpenRLHF's numbers
    for any mask, left padding and gaps included.

    Args:
        values, rewards: ``[B, T]``; action_mask: ``[B, T]`` bool or 0/1, or None.
        gamma, lambd: discount and GAE lambda.
    Returns:
        ``(advantages, returns)``: ``[B, T]`` float32 (float64 for float64 inputs);
        returns = advantages + masked values.
    """
    values, rewards = _promote(values, rewards)
    if action_mask is not None:
        # where(), not OpenRLHF's multiplication: garbage (inf, NaN) in padding must not leak.
        valid = action_mask.bool()
        values = torch.where(valid, values, 0.0)
        rewards = torch.where(valid, rewards, 0.0)
    every = torch.ones_like(values, dtype=torch.bool)
    advantages, returns = fastppo.gae(rewards, values, every, gamma=float(gamma), lam=float(lambd))
    return advantages, returns


# --------------------------------------------------------------------------------------------
# Patching OpenRLHF
# --------------------------------------------------------------------------------------------

_saved: dict[tuple[str, str], Any] = {}


def _gae_method(self, values, rewards, action_mask, gamma, lambd):
    return get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)


_gae_method.__doc__ = get_advantages_and_returns.__doc__

_TARGETS = (
    # (module, attribute, fastppo's replacement)
    ("openrlhf.models.loss", "PolicyLoss", PolicyLoss),
    ("openrlhf.models.loss", "ValueLoss", ValueLoss),
    ("openrlhf.models", "PolicyLoss", PolicyLoss),
    ("openrlhf.models", "ValueLoss", ValueLoss),
    ("openrlhf.trainer.ray.ppo_actor", "PolicyLoss", PolicyLoss),
    ("openrlhf.trainer.ray.ppo_critic", "ValueLoss", ValueLoss),
    ("openrlhf.models.utils", "compute_approx_kl", compute_approx_kl),
    ("openrlhf.trainer.ray.ppo_actor", "compute_approx_kl", compute_approx_kl),
    ("openrlhf.trainer.ppo_utils.experience_maker", "compute_approx_kl", compute_approx_kl),
)


def patch(*, gae: bool = True) -> None:
    """Swap OpenRLHF's ``PolicyLoss`` / ``ValueLoss``, ``compute_approx_kl`` (and GAE) for
    fastppo's (idempotent).

    Patches the classes in ``openrlhf.models``, ``compute_approx_kl`` in ``openrlhf.models.utils``,
    and both in the already-imported actor, critic and experience-maker modules (which imported
    them by name), and, with ``gae``,
    ``RemoteExperienceMaker.get_advantages_and_returns``. Call it before the actor and critic
    are built, in every process that builds them.
    """
    importlib.import_module("openrlhf.models.loss")
    for module_name, attr, ours in _TARGETS:
        module = sys.modules.get(module_name)
        if module is None or not hasattr(module, attr) or getattr(module, attr) is ours:
            continue
        _saved.setdefault((module_name, attr), getattr(module, attr))
        setattr(module, attr, ours)
    if gae:
        maker = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker").RemoteExperienceMaker
        if maker.__dict__.get("get_advantages_and_returns") is not _gae_method:
            _saved.setdefault(("RemoteExperienceMaker", "get_advantages_and_returns"), maker.get_advantages_and_returns)
            maker.get_advantages_and_returns = _gae_method


def unpatch() -> None:
    """Undo ``patch()``."""
    for (module_name, attr), original in list(_saved.items()):
        if module_name == "RemoteExperienceMaker":
            maker = sys.modules["openrlhf.trainer.ppo_utils.experience_maker"].RemoteExperienceMaker
            setattr(maker, attr, original)
        else:
            setattr(sys.modules[module_name], attr, original)
    _saved.clear()
