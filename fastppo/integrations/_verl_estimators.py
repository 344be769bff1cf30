"""verl 0.9.1's advantage estimators with verl's exact signatures, computed by fastppo's ops.

``fastppo.integrations.verl.install(estimators=True)`` registers these (with GRPO, RLOO and
REINFORCE++ of ``verl.py``) under verl's ``algorithm.adv_estimator`` names:

=============================  ===============================================================
verl name                      fastppo op
=============================  ===============================================================
grpo_vectorized                ``group_advantages(estimator="grpo")`` (the same as ``grpo``)
rloo_vectorized                ``group_advantages(estimator="rloo")`` (the same as ``rloo``)
gdpo                           ``gdpo_advantages`` (GRPO per reward component, whitened)
grpo_passk                     ``group_advantages(estimator="grpo_passk")``
reinforce_plus_plus_baseline   ``reinforce_pp_baseline_advantages``
opo                            ``group_advantages(estimator="opo")``
remax                          ``remax_advantages``
gpg                            ``gpg_advantages``
optimal_token_baseline         ``optimal_token_baseline_advantages``
tir_optimal_token_baseline     ``optimal_token_baseline_advantages(multi_turn=True)``
=============================  ===============================================================

``index`` is any host array of group labels (verl's ``uid``): rows are gathered into padded
groups of consecutive slots, computed, and put back. Outputs are float32, verl's numbers,
including verl's values at masked positions (advantages ``a * response_mask``; ReMax's and the
optimal token baselines' ``returns`` carry the next valid token's return into masked gaps).

Where these differ from verl: a row with no valid token is not a group member for OPO and the
optimal token baselines (verl counts it in the group size, so its lone partner loses its
"no baseline" rule); fewer than two valid tokens whiten as ``x - mean`` (verl raises).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

import fastppo
from fastppo import estimators as _est

__all__ = [
    "compute_gdpo_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_opo_outcome_advantage",
    "compute_optimal_token_baseline_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
]


def _carry_into_gaps(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """At each masked position, the value of ``x`` at the next valid position (0 if none).

    verl's reverse scan keeps its running advantage unchanged across masked positions and stores
    it there, while fastppo's gae writes 0; this puts verl's numbers back.

    Args:
        x: ``[B, T]``; mask: ``[B, T]`` bool.
    Returns:
        ``[B, T]`` like ``x``, equal to ``x`` at valid positions.
    """
    B, T = mask.shape
    positions = torch.arange(T, device=mask.device).expand(B, T)
    next_valid = torch.where(mask, positions, T)
    next_valid = next_valid.flip(-1).cummin(dim=-1).values.flip(-1)
    padded = torch.cat([x, x.new_zeros(B, 1)], dim=1)
    return padded.gather(1, next_valid)


def _group_slots(index: Any, batch: int) -> tuple[np.ndarray, int, int]:
    """Lay verl's arbitrary ``index`` grouping out as fastppo's consecutive groups of K.

    verl groups rows by equal ``index`` entries (uids), in any order and of any sizes; fastppo
    wants ``G`` blocks of ``K`` consecutive rows. Row ``b`` goes to slot ``group * K + rank``
    (K = the largest group); unused slots are padding rows with no valid token, which are not
    group members. Host-side numpy only (``index`` is a host array in verl).

    Returns ``(slots [B] int64, G, K)``.
    """
    ids = np.asarray(index)
    if ids.shape != (batch,):
        raise ValueError(f"index must have one entry per row, shape ({batch},), got shape {ids.shape}")
    if batch == 0:
        return np.zeros(0, dtype=np.int64), 0, 1
    _, group = np.unique(ids, return_inverse=True)
    group = group.reshape(-1).astype(np.int64)
    counts = np.bincount(group)
    K = int(counts.max())
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(batch, dtype=np.int64)
    rank[order] = np.arange(batch) - starts[group[order]]
    return group * K + rank, len(counts), K


def _cfg_get(config: Any, name: str, default: Any) -> Any:
    from fastppo.integrations import _cfg

    return _cfg(config, name, default)


def _row_sum(rewards: torch.Tensor) -> torch.Tensor:
    """verl's score, the row sum of the token rewards, in float32 (float64 stays): not in bf16.

    verl sums every position of the row (its token rewards are 0 outside the mask anyway); a bf16
    sum would round each score to 8 bits."""
    return rewards.sum(dim=-1, dtype=torch.float64 if rewards.dtype == torch.float64 else torch.float32)


def _row_scalars(scores: torch.Tensor, index: Any, estimator: str, **kw) -> torch.Tensor:
    """``group_advantages`` per ``index`` group with every row a member (verl's rule): ``[B]``.

    verl counts every row as a group member, valid tokens or not; fastppo's mask would drop empty
    rows from their group, so membership is handed over as an all-member [G*K, 1] mask."""
    B = scores.shape[0]
    slots, G, K = _group_slots(index, B)
    slots = torch.as_tensor(slots, device=scores.device)
    padded = scores.new_zeros(G * K).index_copy(0, slots, scores)
    member = torch.zeros(G * K, 1, dtype=torch.bool, device=scores.device).index_fill(0, slots, True)
    return fastppo.group_advantages(padded, K, member, estimator=estimator, **kw)[:, 0].index_select(0, slots)


def _outcome(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any, estimator: str,
             **kw) -> torch.Tensor:
    """verl's outcome estimators: one scalar per row (``_row_scalars`` of the row sums) broadcast
    as ``a * response_mask``, ``[B, T]``."""
    # verl multiplies by the mask (not fastppo's where()): a NaN score spreads over its whole row,
    # masked positions included, exactly as in verl.
    return _row_scalars(_row_sum(token_level_rewards), index, estimator, **kw).unsqueeze(-1) * response_mask


def _to_groups(index: Any, tensors: list[Optional[torch.Tensor]], mask: torch.Tensor):
    """Rows into padded consecutive group slots ``[G*K, T]`` (padding rows: no valid token)."""
    B, T = mask.shape
    slots, G, K = _group_slots(index, B)
    slots = torch.as_tensor(slots, device=mask.device)

    def place(t):
        if t is None:
            return None
        return t.new_zeros(G * K, T).index_copy(0, slots, t)

    return slots, K, [place(t) for t in tensors], place(mask.to(torch.float32)) != 0


@torch.no_grad()
def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``grpo_vectorized``: the same numbers as ``grpo`` (``fastppo.group_advantages``)."""
    adv = _outcome(token_level_rewards, response_mask, index, "grpo", norm_by_std=bool(norm_adv_by_std_in_grpo),
                   eps=float(epsilon))
    return adv, adv


@torch.no_grad()
def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``rloo_vectorized``: the same numbers as ``rloo`` (``fastppo.group_advantages``)."""
    adv = _outcome(token_level_rewards, response_mask, index, "rloo")
    return adv, adv


@torch.no_grad()
def compute_grpo_passk_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``grpo_passk``: the best response of each group gets (best - second best), divided
    by the group std + epsilon when ``config.norm_adv_by_std_in_grpo`` (verl reads the config, not
    the argument); groups of fewer than two responses are a ``ValueError``, as in verl."""
    if config is None:
        raise ValueError("grpo_passk needs verl's algorithm config (norm_adv_by_std_in_grpo), got config=None")
    norm = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    ids = np.asarray(index)
    if ids.size:
        _, counts = np.unique(ids, return_counts=True)
        if counts.min() < 2:
            raise ValueError(f"Pass@k requires at least 2 samples per group, got a group of {int(counts.min())}")
    adv = _outcome(token_level_rewards, response_mask, index, "grpo_passk", norm_by_std=norm, eps=float(epsilon))
    return adv, adv


@torch.no_grad()
def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``reinforce_plus_plus_baseline``: score - group mean, whitened over the valid tokens
    (``fastppo.group_advantages`` + ``fastppo.masked_whiten``, eps 1e-8 as verl)."""
    centred = _outcome(token_level_rewards, response_mask, index, "dr_grpo")
    adv = fastppo.masked_whiten(centred.to(torch.float32), response_mask) * response_mask
    return adv, adv


@torch.no_grad()
def compute_opo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``opo``: score - the group's length-weighted mean score
    (``group_advantages(estimator="opo")``)."""
    scores = _row_sum(token_level_rewards)
    slots, K, (padded_rewards,), padded_mask = _to_groups(index, [token_level_rewards], response_mask)
    padded_scores = scores.new_zeros(padded_mask.shape[0]).index_copy(0, slots, scores)
    per_row = fastppo.group_advantages(padded_scores, K, padded_mask, estimator="opo")
    # The row's scalar, read at its first valid token, then multiplied by the mask as verl does.
    first = padded_mask.to(torch.uint8).argmax(dim=1, keepdim=True)
    scalar = per_row.gather(1, first)[:, 0].index_select(0, slots)
    adv = scalar.unsqueeze(-1) * response_mask
    return adv, adv


@torch.no_grad()
def compute_remax_outcome_advantage(
    token_level_rewards: torch.Tensor,
    reward_baselines: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``remax``: returns-to-go minus the greedy response's reward (``remax_advantages``);
    at masked positions verl's returns carry the next valid token's return, and so do these."""
    from fastppo.integrations import _promote

    rewards, baselines = _promote(token_level_rewards, reward_baselines)
    adv, returns = _est.remax_advantages(rewards, baselines, response_mask)
    valid = response_mask != 0
    returns = _carry_into_gaps(returns, valid)
    return torch.where(valid, adv, returns), returns


@torch.no_grad()
def compute_gpg_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
    alpha: float = 1.0,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``gpg``: alpha * (score - group mean) / f_norm with alpha = B / (nonzero scores);
    verl recomputes alpha and ignores the argument, and so does this."""
    scores = _row_sum(token_level_rewards)
    adv = _row_scalars(scores, index, "gpg") / float(f_norm)
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


@torch.no_grad()
def compute_gdpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    non_tensor_batch: Optional[dict] = None,
    batch: Optional[dict] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``gdpo``: GRPO per reward component (``config.gdpo_reward_keys`` of
    ``non_tensor_batch``, weighted by ``config.gdpo_reward_weights``; without them the summed token
    rewards), weighted sum, whitened over the valid tokens."""
    components, weights = None, None
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = _cfg_get(config, "gdpo_reward_keys", None)
        if not keys:
            raise ValueError("GDPO requires 'algorithm.gdpo_reward_keys' listing the reward component keys")
        missing = [k for k in keys if k not in non_tensor_batch]
        if missing:
            raise ValueError(f"GDPO reward keys {missing} not found in non_tensor_batch "
                             f"(available: {list(non_tensor_batch.keys())})")
        components = [torch.tensor(np.asarray(non_tensor_batch[k], dtype=np.float32), device=response_mask.device)
                      for k in keys]
        w = _cfg_get(config, "gdpo_reward_weights", None)
        weights = None if w is None else [float(x) for x in w]
    if components is None:
        components = [_row_sum(token_level_rewards)]
    weights = weights or [1.0] * len(components)
    total = None
    for w, comp in zip(weights, components):
        a = w * _row_scalars(comp, index, "grpo", norm_by_std=bool(norm_adv_by_std_in_grpo), eps=float(epsilon))
        total = a if total is None else total + a
    adv = fastppo.masked_whiten((total.unsqueeze(-1) * response_mask).to(torch.float32), response_mask)
    adv = adv * response_mask
    return adv, adv


def _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
         handle_zero_tail, epsilon, multi_turn):
    from fastppo.integrations import _promote

    rewards, lp, spp, iw = _promote(token_level_rewards, old_log_probs, sum_pi_squared, rollout_is_weights)
    slots, K, (r_, lp_, spp_, iw_), m_ = _to_groups(index, [rewards, lp, spp, iw], response_mask)
    adv, returns = _est.optimal_token_baseline_advantages(r_, m_, K, lp_, spp_, is_weights=iw_,
                                                          handle_zero_tail=bool(handle_zero_tail),
                                                          eps=float(epsilon), multi_turn=multi_turn)
    adv, returns = adv.index_select(0, slots), returns.index_select(0, slots)
    return adv, _carry_into_gaps(returns, response_mask != 0)


@torch.no_grad()
def compute_optimal_token_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: torch.Tensor = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``optimal_token_baseline`` by ``fastppo.estimators.optimal_token_baseline_advantages``
    (members aligned by position)."""
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
                handle_zero_tail, epsilon, False)


@torch.no_grad()
def compute_multi_turn_optimal_token_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: torch.Tensor = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``tir_optimal_token_baseline`` (members aligned by the index of the valid token)."""
    return _otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights,
                handle_zero_tail, epsilon, True)


# (core_algos attribute, ADV_ESTIMATOR_REGISTRY key, ours): read by verl.install(estimators=True).
VERL_ESTIMATORS = (
    ("compute_grpo_vectorized_outcome_advantage", "grpo_vectorized", compute_grpo_vectorized_outcome_advantage),
    ("compute_rloo_vectorized_outcome_advantage", "rloo_vectorized", compute_rloo_vectorized_outcome_advantage),
    ("compute_gdpo_outcome_advantage", "gdpo", compute_gdpo_outcome_advantage),
    ("compute_grpo_passk_outcome_advantage", "grpo_passk", compute_grpo_passk_outcome_advantage),
    ("compute_reinforce_plus_plus_baseline_outcome_advantage", "reinforce_plus_plus_baseline",
     compute_reinforce_plus_plus_baseline_outcome_advantage),
    ("compute_opo_outcome_advantage", "opo", compute_opo_outcome_advantage),
    ("compute_remax_outcome_advantage", "remax", compute_remax_outcome_advantage),
    ("compute_gpg_outcome_advantage", "gpg", compute_gpg_outcome_advantage),
    ("compute_optimal_token_baseline_advantage", "optimal_token_baseline", compute_optimal_token_baseline_advantage),
    ("compute_multi_turn_optimal_token_baseline_advantage", "tir_optimal_token_baseline",
     compute_multi_turn_optimal_token_baseline_advantage),
)
