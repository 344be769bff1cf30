"""verl 0.9.1's ``gspo``, ``geo_mean``, ``clip_cov`` and ``kl_cov`` policy losses, by fastppo.

Each adapter has verl's signature ``(old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode, config, rollout_is_weights) -> (loss, metrics)``, reads verl's options from
``config`` (``clip_ratio``, ``clip_ratio_low`` / ``clip_ratio_high``, ``policy_loss.clip_cov_ratio``,
``clip_cov_lb``, ``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef``, ``global_batch_info``) and
returns verl's metric names as Python floats. ``VERL_SEQ_LOSSES`` maps verl's ``loss_mode`` name
to the adapter; ``fastppo.integrations.verl.install(policy_losses=True)`` puts them into verl's
``POLICY_LOSS_REGISTRY`` (through :func:`register`), ``uninstall()`` restores verl's.

Numbers are verl's: ``clip_cov`` draws its tokens with one ``torch.randperm`` on torch's global
CPU generator, as verl does, so the same ``torch.manual_seed`` drops the same tokens; ``geo_mean``
ignores ``loss_agg_mode`` and averages over all rows, as verl does. Where they differ from verl:
the loss is float32 for bf16 inputs (verl: bf16); NaN or inf at masked positions never leaks
(verl: ``geo_mean``'s ``(x * mask).sum`` and GSPO's sequence sum propagate it); a float mask counts
``mask != 0`` (verl weighs by it in places).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

import fastppo
from fastppo.integrations import _cfg, _global_aggregate, _promote

__all__ = [
    "VERL_SEQ_LOSSES",
    "compute_policy_loss_gspo",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_kl_cov",
    "register",
    "unregister",
]


def _clips(config: Any) -> tuple[float, float]:
    if config is None:
        raise ValueError("verl's policy losses need the actor config (clip_ratio, ...), got config=None")
    clip = _cfg(config, "clip_ratio", 0.2)
    return float(_cfg(config, "clip_ratio_low", clip)), float(_cfg(config, "clip_ratio_high", clip))


def _loss_options(config: Any, name: str, default: float) -> float:
    return float(_cfg(_cfg(config, "policy_loss", {}), name, default))


def _floats(stats: dict, names: dict[str, str]) -> dict[str, float]:
    # verl reports Python floats (and so syncs here), as its own losses do.
    return {verl_name: stats[ours].item() for verl_name, ours in names.items()}


_PG_METRICS = {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl", "actor/pg_clipfrac_lower": "clipfrac_lower"}


def _run(op: Callable, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, weights, **options):
    log_prob, old_log_prob, advantages, weights = _promote(log_prob, old_log_prob, advantages, weights)
    batch_info = dict(_cfg(config, "global_batch_info", {}) or {})

    def run(agg: str):
        return op(log_prob, old_log_prob, advantages, response_mask, agg=agg, is_weights=weights, **options)

    return _global_aggregate(run, response_mask, loss_agg_mode, **batch_info)


def compute_policy_loss_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-mean",
                             config: Any = None, rollout_is_weights: torch.Tensor | None = None):
    """verl's ``gspo`` by :func:`fastppo.gspo_loss`; metrics ``actor/pg_clipfrac``, ``actor/ppo_kl``,
    ``actor/pg_clipfrac_lower`` (0)."""
    low, high = _clips(config)
    loss, stats = _run(fastppo.gspo_loss, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                       rollout_is_weights, clip_low=low, clip_high=high)
    return loss, _floats(stats, _PG_METRICS)


def compute_policy_loss_geo_mean(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                 response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                 rollout_is_weights: torch.Tensor | None = None):
    """verl's ``geo_mean`` (GMPO) by :func:`fastppo.geo_mean_loss`.

    Like verl, ``loss_agg_mode`` and ``global_batch_info`` are not used: the loss is the mean of
    the sequence losses over all B rows, an empty row counting 0 (fastppo's ``seq-mean-token-mean``
    times the non-empty rows over B).
    """
    low, high = _clips(config)
    log_prob, old_log_prob, advantages, weights = _promote(log_prob, old_log_prob, advantages, rollout_is_weights)
    loss, stats = fastppo.geo_mean_loss(log_prob, old_log_prob, advantages, response_mask, agg="seq-mean-token-mean",
                                        is_weights=weights, clip_low=low, clip_high=high)
    B = response_mask.shape[0]
    if B:
        loss = loss * ((response_mask != 0).any(dim=-1).sum() / B)
    return loss, _floats(stats, _PG_METRICS)


def compute_policy_loss_clip_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                 response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                 rollout_is_weights: torch.Tensor | None = None):
    """verl's ``clip_cov`` by :func:`fastppo.clip_cov_loss` (the same randperm draw as verl's);
    metrics ``actor/pg_clipfrac`` (fraction of tokens dropped), ``actor/ppo_kl``."""
    low, high = _clips(config)
    loss, stats = _run(fastppo.clip_cov_loss, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                       rollout_is_weights, clip_low=low, clip_high=high,
                       clip_cov_ratio=_loss_options(config, "clip_cov_ratio", 0.0002),
                       clip_cov_lb=_loss_options(config, "clip_cov_lb", 1.0),
                       clip_cov_ub=_loss_options(config, "clip_cov_ub", 5.0))
    return loss, _floats(stats, {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl"})


def compute_policy_loss_kl_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                               response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                               rollout_is_weights: torch.Tensor | None = None):
    """verl's ``kl_cov`` by :func:`fastppo.kl_cov_loss`; metric ``actor/ppo_kl`` (mean |log ratio|).

    ``ppo_kl_coef`` defaults to 1.0 when the config has none, as verl's function does (verl's
    PolicyLossConfig itself defaults it to 0.1).
    """
    if config is None:
        raise ValueError("verl's kl_cov loss needs the actor config (policy_loss.kl_cov_ratio, ...), got config=None")
    loss, stats = _run(fastppo.kl_cov_loss, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                       rollout_is_weights, kl_cov_ratio=_loss_options(config, "kl_cov_ratio", 0.0002),
                       ppo_kl_coef=_loss_options(config, "ppo_kl_coef", 1.0))
    return loss, _floats(stats, {"actor/ppo_kl": "approx_kl"})


VERL_SEQ_LOSSES: dict[str, Callable] = {
    "gspo": compute_policy_loss_gspo,
    "geo_mean": compute_policy_loss_geo_mean,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
}


def register(core_algos: Any, saved: dict) -> None:
    """Put the adapters into ``core_algos.POLICY_LOSS_REGISTRY`` under verl's names, keeping
    verl's functions in ``saved`` (keyed like the verl adapter's other registry swaps)."""
    registry = core_algos.POLICY_LOSS_REGISTRY
    for name, ours in VERL_SEQ_LOSSES.items():
        if registry.get(name) is not ours:
            # Written directly: register_policy_loss refuses to overwrite a registered name.
            saved.setdefault(("POLICY_LOSS_REGISTRY", name), registry.get(name))
            registry[name] = ours


def unregister(core_algos: Any, saved: dict) -> None:
    """Undo :func:`register`: verl's own functions back in the registry."""
    registry = core_algos.POLICY_LOSS_REGISTRY
    for name, ours in VERL_SEQ_LOSSES.items():
        if ("POLICY_LOSS_REGISTRY", name) not in saved:
            continue
        original = saved.pop(("POLICY_LOSS_REGISTRY", name))
        if registry.get(name) is ours:
            if original is None:
                del registry[name]
            else:
                registry[name] = original


def installed(core_algos: Any) -> bool:
    return all(core_algos.POLICY_LOSS_REGISTRY.get(name) is ours for name, ours in VERL_SEQ_LOSSES.items())
