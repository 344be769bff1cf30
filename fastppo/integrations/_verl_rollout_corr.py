"""verl 0.9.1 rollout correction backed by ``fastppo.rollout_correction`` (verl's signatures).

Used by ``fastppo.integrations.verl.install(rollout_correction=True)``, which points these names
of ``verl.trainer.ppo.rollout_corr_helper`` at the functions below (verl's own
``compute_rollout_correction_and_add_to_batch`` then runs fastppo, as it looks them up at call
time) and puts :func:`compute_policy_loss_bypass_mode` behind ``loss_mode=bypass_mode``:

* ``compute_rollout_correction_and_rejection_mask(old_log_prob, rollout_log_prob, response_mask,
  rollout_is, rollout_is_threshold, rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold)``
  -> ``(DataProto | None, modified_response_mask, metrics)``;
* ``compute_rollout_correction_weights(log_ratio, response_mask, rollout_is, rollout_is_threshold,
  rollout_is_batch_normalize)`` -> ``(weights, metrics)``;
* ``compute_rollout_rejection_mask(log_ratio, response_mask, rollout_rs, rollout_rs_threshold)``
  -> ``(modified_response_mask, metrics)``;
* ``compute_offpolicy_metrics`` and ``compute_rollout_corr_metrics_from_logprobs``.

verl's lower-level ``compute_is_metrics`` / ``compute_rs_metrics`` (which take weights already
computed) are left as they are. Differences from verl, all where verl would give NaN or raise:
nothing at a masked position reaches the weights (verl multiplies ``exp(NaN)`` by the mask), an
all-masked batch gives metrics of 0 (verl raises), and the weights are computed in float32 before
being cast back to the inputs' dtype. ``rollout_is="geometric"`` is accepted as well.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import torch

import fastppo
from fastppo.integrations import _cfg, _global_aggregate, _promote
from fastppo.rollout_correction import rollout_correction

__all__ = [
    "REPLACED",
    "compute_offpolicy_metrics",
    "compute_policy_loss_bypass_mode",
    "compute_rollout_corr_metrics_from_logprobs",
    "compute_rollout_correction_and_rejection_mask",
    "compute_rollout_correction_weights",
    "compute_rollout_rejection_mask",
]

_PREFIX = "rollout_corr/"


def _is_options(rollout_is_threshold) -> dict:
    """verl's threshold spec: a number (TIS, truncate at it) or ``"lower_upper"`` (IcePop)."""
    if isinstance(rollout_is_threshold, bool):
        raise TypeError("rollout_is_threshold must be a float or a 'lower_upper' string, not a boolean")
    if isinstance(rollout_is_threshold, Real):
        return dict(mode="truncate", upper=float(rollout_is_threshold), lower=None)
    if isinstance(rollout_is_threshold, str):
        spec = rollout_is_threshold.strip()
        if "_" in spec:
            lo, hi = spec.split("_", 1)
            try:
                return dict(mode="mask", upper=float(hi), lower=float(lo))
            except ValueError:
                raise ValueError(f"invalid rollout_is_threshold {rollout_is_threshold!r}") from None
        try:
            return dict(mode="truncate", upper=float(spec), lower=None)
        except ValueError:
            raise ValueError(f"invalid rollout_is_threshold {rollout_is_threshold!r}") from None
    raise TypeError("rollout_is_threshold must be a float or a 'lower_upper' string, "
                    f"got {type(rollout_is_threshold).__name__}")


def _floats(metrics: dict[str, torch.Tensor], keep=lambda k: True, strip: str = "") -> dict[str, float]:
    # verl's metrics are Python floats: one host copy for all of them.
    keys = [k for k in metrics if keep(k)]
    if not keys:
        return {}
    values = torch.stack([metrics[k].reshape(()) for k in keys]).tolist()
    return {k[len(strip):] if strip and k.startswith(strip) else k: v for k, v in zip(keys, values)}


def _check_shapes(old_log_prob, rollout_log_prob, response_mask):
    if old_log_prob.shape != rollout_log_prob.shape:
        raise ValueError(f"old_log_prob shape {tuple(old_log_prob.shape)} does not match rollout_log_prob shape "
                         f"{tuple(rollout_log_prob.shape)}")
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(f"log_prob shape {tuple(old_log_prob.shape)} does not match response_mask shape "
                         f"{tuple(response_mask.shape)}")


def compute_rollout_correction_and_rejection_mask(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: str | None = None,
    rollout_is_threshold: str | float | None = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: str | float | None = None,
):
    """verl's function of the same name: IS weights (a DataProto or None), the response mask with
    rejected tokens zeroed (``response_mask``'s dtype) and ``rollout_corr/`` metrics (floats)."""
    _check_shapes(old_log_prob, rollout_log_prob, response_mask)
    level = rollout_is if rollout_is_threshold is not None else None
    opts = _is_options(rollout_is_threshold) if level is not None else {}
    if rollout_rs is not None and rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled")
    weights, keep, metrics = rollout_correction(
        old_log_prob, rollout_log_prob, response_mask, level=level,
        batch_normalize=rollout_is_batch_normalize, rs=rollout_rs, rs_threshold=rollout_rs_threshold, **opts,
    )
    proto = None
    if weights is not None:
        from verl.protocol import DataProto

        dtype = torch.promote_types(old_log_prob.dtype, rollout_log_prob.dtype)
        proto = DataProto.from_dict(tensors={"rollout_is_weights": weights.to(dtype)})
    new_mask = (response_mask * keep.to(response_mask.dtype)) if response_mask.dtype != torch.bool else keep
    return proto, new_mask, _floats(metrics)


def compute_rollout_correction_weights(
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: str = "token",
    rollout_is_threshold: str | float = 2.0,
    rollout_is_batch_normalize: bool = False,
):
    """verl's function of the same name: ``(weights, metrics)``, the metrics without a prefix."""
    if rollout_is not in ("token", "sequence", "geometric"):
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of token, sequence, geometric.")
    weights, _, metrics = rollout_correction(
        log_ratio, torch.zeros_like(log_ratio), response_mask, level=rollout_is,
        batch_normalize=rollout_is_batch_normalize, **_is_options(rollout_is_threshold),
    )
    return weights.to(log_ratio.dtype), _floats(metrics, lambda k: k.startswith(_PREFIX + "rollout_is_"), _PREFIX)


def compute_rollout_rejection_mask(
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_rs: str = "token_k1",
    rollout_rs_threshold: str | float | None = None,
):
    """verl's function of the same name: ``(modified_response_mask, metrics)``."""
    if rollout_rs is None or not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options).")
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    _, keep, metrics = rollout_correction(
        log_ratio, torch.zeros_like(log_ratio), response_mask, level=None, rs=rollout_rs,
        rs_threshold=rollout_rs_threshold,
    )
    new_mask = (response_mask * keep.to(response_mask.dtype)) if response_mask.dtype != torch.bool else keep
    return new_mask, _floats(metrics, lambda k: k.startswith(_PREFIX + "rollout_rs_"), _PREFIX)


_TRAINING_ONLY = ("training_ppl", "training_log_ppl")


def compute_offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask) -> dict[str, Any]:
    """verl's function of the same name (no prefix); only the training perplexities when
    ``rollout_log_prob`` is None."""
    other = old_log_prob if rollout_log_prob is None else rollout_log_prob
    _, _, metrics = rollout_correction(old_log_prob, other, response_mask, level=None)
    metrics = _floats(metrics, strip=_PREFIX)
    if rollout_log_prob is None:
        metrics = {k: metrics[k] for k in _TRAINING_ONLY}
    return metrics


def compute_rollout_corr_metrics_from_logprobs(log_prob, rollout_log_prob, response_mask) -> dict[str, float]:
    """verl's function of the same name: the off-policy metrics with the ``rollout_corr/`` prefix."""
    return {_PREFIX + k: v for k, v in compute_offpolicy_metrics(log_prob, rollout_log_prob, response_mask).items()}


def compute_policy_loss_bypass_mode(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``bypass_mode`` loss by ``fastppo.rollout_correction`` + ``fastppo.bypass_mode_loss``.

    ``old_log_prob`` is the rollout's log-probs. Reads ``config.policy_loss.rollout_correction``
    (``loss_type``, ``rollout_is``, ``rollout_is_threshold``, ``rollout_is_batch_normalize``,
    ``rollout_rs``, ``rollout_rs_threshold``), the clip settings of verl's vanilla loss and
    ``global_batch_info``. ``rollout_is_weights`` is ignored, as in verl (computed here).
    Returns ``(loss, metrics)`` with verl's metric names as floats.
    """
    if config is None:
        raise ValueError("the bypass_mode loss needs verl's actor config, got config=None")
    policy_cfg = _cfg(config, "policy_loss")
    rc = _cfg(policy_cfg, "rollout_correction") if policy_cfg is not None else None
    if rc is None:
        raise ValueError("rollout_correction config not found in policy_loss; loss_mode='bypass_mode' needs it")
    loss_type = _cfg(rc, "loss_type", "ppo_clip")
    level = _cfg(rc, "rollout_is")
    threshold = _cfg(rc, "rollout_is_threshold", 2.0)
    rs = _cfg(rc, "rollout_rs")
    rs_threshold = _cfg(rc, "rollout_rs_threshold")
    if rs is not None and rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled")
    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    clip = _cfg(config, "clip_ratio", 0.2)
    clip_low = float(_cfg(config, "clip_ratio_low", clip))
    clip_high = float(_cfg(config, "clip_ratio_high", clip))
    clip_c = float(_cfg(config, "clip_ratio_c", 3.0))
    batch_info = dict(_cfg(config, "global_batch_info", {}) or {})
    log_prob, old_log_prob, advantages = _promote(log_prob, old_log_prob, advantages)

    # The correction runs once, here: the aggregation below needs the kept tokens (verl divides
    # by the kept rows) and may evaluate the loss under another mode.
    weights, keep, rc_metrics = rollout_correction(
        log_prob.detach(), old_log_prob, response_mask, level=level,
        batch_normalize=bool(_cfg(rc, "rollout_is_batch_normalize", False)), rs=rs, rs_threshold=rs_threshold,
        **(_is_options(threshold) if level is not None else {}),
    )

    def run(agg: str):
        return fastppo.bypass_mode_loss(
            log_prob, old_log_prob, advantages, keep, agg=agg, loss_type=loss_type,
            is_weights=weights if loss_type == "reinforce" else None,
            clip_low=clip_low, clip_high=clip_high, dual_clip=clip_c,
        )

    loss, stats = _global_aggregate(run, keep, loss_agg_mode, **batch_info)
    names = {"approx_kl": "actor/ppo_kl"}
    if loss_type == "ppo_clip":
        names.update(clipfrac="actor/pg_clipfrac", clipfrac_lower="actor/pg_clipfrac_lower")
    picked = {verl_name: stats[ours] for ours, verl_name in names.items()}
    picked.update(rc_metrics)
    return loss, _floats(picked)


# rollout_corr_helper's attribute -> ours (install() swaps them, uninstall() puts verl's back).
REPLACED = {
    "compute_rollout_correction_and_rejection_mask": compute_rollout_correction_and_rejection_mask,
    "compute_rollout_correction_weights": compute_rollout_correction_weights,
    "compute_rollout_rejection_mask": compute_rollout_rejection_mask,
    "compute_offpolicy_metrics": compute_offpolicy_metrics,
    "compute_rollout_corr_metrics_from_logprobs": compute_rollout_corr_metrics_from_logprobs,
}
HELPER_MODULE = "verl.trainer.ppo.rollout_corr_helper"
_CORE_ALGOS = "verl.trainer.ppo.core_algos"
_saved: dict[tuple[str, str], Any] = {}


def _verl_modules():
    import sys

    return [(n, m) for n, m in list(sys.modules.items()) if m is not None and (n == "verl" or n.startswith("verl."))]


def install() -> None:
    """Swap rollout_corr_helper's functions (and copies imported by name) and put
    :func:`compute_policy_loss_bypass_mode` behind ``loss_mode=bypass_mode`` (idempotent)."""
    import importlib

    helper = importlib.import_module(HELPER_MODULE)
    core_algos = importlib.import_module(_CORE_ALGOS)
    swaps = dict(REPLACED, compute_policy_loss_bypass_mode=compute_policy_loss_bypass_mode)
    for attr, ours in swaps.items():
        home = core_algos if attr == "compute_policy_loss_bypass_mode" else helper
        original = _saved.get(("attr", attr), getattr(home, attr))
        _saved.setdefault(("attr", attr), original)
        for _, module in _verl_modules():
            if getattr(module, attr, None) is original:
                setattr(module, attr, ours)
    registry = core_algos.POLICY_LOSS_REGISTRY
    if registry.get("bypass_mode") is not compute_policy_loss_bypass_mode:
        _saved.setdefault(("registry", "bypass_mode"), registry.get("bypass_mode"))
        registry["bypass_mode"] = compute_policy_loss_bypass_mode


def uninstall() -> None:
    """Put verl's own functions and registry entry back."""
    import sys

    core_algos = sys.modules.get(_CORE_ALGOS)
    if core_algos is not None and ("registry", "bypass_mode") in _saved:
        original = _saved[("registry", "bypass_mode")]
        if core_algos.POLICY_LOSS_REGISTRY.get("bypass_mode") is compute_policy_loss_bypass_mode:
            if original is None:
                del core_algos.POLICY_LOSS_REGISTRY["bypass_mode"]
            else:
                core_algos.POLICY_LOSS_REGISTRY["bypass_mode"] = original
    swaps = dict(REPLACED, compute_policy_loss_bypass_mode=compute_policy_loss_bypass_mode)
    for attr, ours in swaps.items():
        original = _saved.get(("attr", attr))
        if original is None:
            continue
        for _, module in _verl_modules():
            if getattr(module, attr, None) is ours:
                setattr(module, attr, original)
    _saved.clear()


def installed() -> bool:
    import sys

    helper = sys.modules.get(HELPER_MODULE)
    core_algos = sys.modules.get(_CORE_ALGOS)
    if helper is None or core_algos is None:
        return False
    return (
        all(getattr(helper, attr, None) is ours for attr, ours in REPLACED.items())
        and core_algos.POLICY_LOSS_REGISTRY.get("bypass_mode") is compute_policy_loss_bypass_mode
    )
