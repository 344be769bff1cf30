"""verl 0.9.1's token-level policy losses computed by fastppo, with verl's signature and numbers.

:data:`ADAPTERS` maps verl's ``loss_mode`` name to a function with the signature of verl's
``compute_policy_loss_<name>``::

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
       rollout_is_weights=None) -> (loss, metrics)

Each reads its options from ``config`` (verl's ActorConfig, an omegaconf DictConfig or a dict) as
verl does, aggregates with ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``) as verl's ``agg_loss`` does, and reports verl's
metrics (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``, from fastppo's
``clipfrac``, ``approx_kl``, ``clipfrac_lower``; only those verl's function reports) as Python floats.
``fastppo.integrations.verl.install(policy_losses=True)`` puts them behind verl's registry names.

Differences from verl, all on purpose: fastppo computes in float32 whatever the input dtype
(verl computes bf16 inputs in bf16, tau of SAPO included); masked positions never reach the loss
or the metrics (verl multiplies by the mask, so a NaN there leaks); an all-masked batch gives 0,
not NaN; a missing config raises ``ValueError`` (verl: ``AssertionError``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

import fastppo
from fastppo.integrations import _cfg, _global_aggregate, _promote

__all__ = ["ADAPTERS"]


def _need_config(config: Any, name: str) -> None:
    if config is None:
        raise ValueError(f"fastppo's {name} policy loss needs verl's actor config, got config=None")


def _clips(config: Any) -> tuple[float, float]:
    clip = _cfg(config, "clip_ratio")
    low = _cfg(config, "clip_ratio_low", clip)
    high = _cfg(config, "clip_ratio_high", clip)
    if low is None or high is None:
        raise ValueError("the actor config has no clip_ratio (nor clip_ratio_low / clip_ratio_high)")
    return float(low), float(high)


# fastppo's stat name -> verl's metric name; verl's gpg reports no metric and its dro only ppo_kl.
_VERL_METRICS = {"clipfrac": "actor/pg_clipfrac", "approx_kl": "actor/ppo_kl",
                 "clipfrac_lower": "actor/pg_clipfrac_lower"}


def _run(fn: Callable, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
         rollout_is_weights, metrics=tuple(_VERL_METRICS), **options):
    log_prob, old_log_prob, advantages, rollout_is_weights = _promote(
        log_prob, old_log_prob, advantages, rollout_is_weights
    )
    batch_info = dict(_cfg(config, "global_batch_info", {}) or {})

    def run(agg: str):
        return fn(log_prob, old_log_prob, advantages, response_mask, agg=agg, is_weights=rollout_is_weights,
                  **options)

    loss, stats = _global_aggregate(run, response_mask, loss_agg_mode, **batch_info)
    # verl reports Python floats (and so syncs here).
    return loss, {_VERL_METRICS[k]: stats[k].item() for k in metrics}


def _dppo(fn: Callable, name: str, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
          rollout_is_weights):
    """Both dppo losses read the same options (see ``compute_policy_loss_dppo_tv``)."""
    _need_config(config, name)
    low, high = _clips(config)
    return _run(fn, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                rollout_is_weights, clip_low=low, clip_high=high,
                clip_ratio_c=float(_cfg(config, "clip_ratio_c", 20.0)))


def compute_policy_loss_dppo_tv(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: torch.Tensor | None = None):
    """verl's ``dppo_tv`` by ``fastppo.dppo_tv_loss``: ``clip_ratio`` / ``_low`` / ``_high`` are
    the TV thresholds, ``clip_ratio_c`` the truncation of the IS ratio (20.0 when the config has
    none, as verl's ``config.get``)."""
    return _dppo(fastppo.dppo_tv_loss, "dppo_tv", old_log_prob, log_prob, advantages, response_mask,
                 loss_agg_mode, config, rollout_is_weights)


def compute_policy_loss_dppo_kl(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: torch.Tensor | None = None):
    """verl's ``dppo_kl`` by ``fastppo.dppo_kl_loss`` (options as ``dppo_tv``)."""
    return _dppo(fastppo.dppo_kl_loss, "dppo_kl", old_log_prob, log_prob, advantages, response_mask,
                 loss_agg_mode, config, rollout_is_weights)


def compute_policy_loss_sapo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-mean",
                             config: Any = None, rollout_is_weights: torch.Tensor | None = None):
    """verl's ``sapo`` by ``fastppo.sapo_loss``: ``tau_pos`` / ``tau_neg`` from the config; always
    aggregated ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says, as verl does."""
    _need_config(config, "sapo")
    return _run(fastppo.sapo_loss, old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
                rollout_is_weights, tau_pos=float(_cfg(config, "tau_pos", 1.0)),
                tau_neg=float(_cfg(config, "tau_neg", 1.05)))


def compute_policy_loss_gpg(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                            rollout_is_weights: torch.Tensor | None = None):
    """verl's ``gpg`` by ``fastppo.gpg_loss``; no metrics (verl returns ``{}``)."""
    _need_config(config, "gpg")
    return _run(fastppo.gpg_loss, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                rollout_is_weights, metrics=())


def compute_policy_loss_cispo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                              response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                              rollout_is_weights: torch.Tensor | None = None):
    """verl's ``cispo`` by ``fastppo.cispo_loss`` (``clip_ratio`` / ``_low`` / ``_high``)."""
    _need_config(config, "cispo")
    low, high = _clips(config)
    return _run(fastppo.cispo_loss, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                rollout_is_weights, clip_low=low, clip_high=high)


def compute_policy_loss_dro(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                            rollout_is_weights: torch.Tensor | None = None):
    """verl's ``dro`` by ``fastppo.dro_loss``: ``beta`` is ``config.policy_loss.dro_beta``; metric
    ``actor/ppo_kl`` only, as verl's."""
    _need_config(config, "dro")
    beta = _cfg(_cfg(config, "policy_loss"), "dro_beta")
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    return _run(fastppo.dro_loss, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                rollout_is_weights, metrics=("approx_kl",), beta=float(beta))


# verl loss_mode name -> adapter (verl's function of that loss is compute_policy_loss_<name>).
ADAPTERS: dict[str, Callable] = {
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "cispo": compute_policy_loss_cispo,
    "dro": compute_policy_loss_dro,
}
