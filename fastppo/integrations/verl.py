"""verl (0.9) adapter: fastppo's kernels behind verl's policy-loss registry, GAE and value loss.

Three functions with verl's signatures and verl's numbers:

* ``compute_policy_loss_fastppo(old_log_prob, log_prob, advantages, response_mask,
  loss_agg_mode, config, rollout_is_weights)`` -> ``(loss, metrics)``: verl's "vanilla" loss
  (clip_ratio / clip_ratio_low / clip_ratio_high, dual clip at clip_ratio_c, rollout importance
  weights, global-batch normalisation from ``config.global_batch_info``) with the metrics
  ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` as Python floats.
* ``compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam)`` ->
  ``(advantages, returns)``: GAE over valid tokens, advantages whitened; like verl, masked
  positions are *not* zeroed: they hold the advantage of the next valid token (0 after the last
  one) before whitening, and ``returns`` = that + ``values`` everywhere.
* ``compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode,
  dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)`` -> ``(vf_loss, vf_clipfrac)``.

Opt-in takeovers of more of verl (``install(vanilla=True, kl_penalty=True, agg_loss=True,
estimators=True)``), each with verl's signature and numbers:

* ``vanilla``: ``compute_policy_loss_fastppo`` also as ``loss_mode=vanilla``;
* ``kl_penalty(logprob, ref_logprob, kl_penalty)`` / ``kl_penalty_forward``: verl's names
  ``kl``/``k1``, ``abs``, ``mse``/``k2``, ``low_var_kl``/``k3`` (log-ratio clamped to [-20, 20],
  estimate to [-10, 10]) and the ``+`` straight-through variants (k2's gradient);
* ``agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
  loss_scale_factor)`` by ``fastppo.aggregate``;
* ``compute_grpo_outcome_advantage`` / ``compute_rloo_outcome_advantage`` (any ``index``
  grouping, uneven groups included) by ``fastppo.group_advantages`` and
  ``compute_reinforce_plus_plus_outcome_advantage`` by ``fastppo.reinforce_pp_advantages``,
  registered as verl's ``grpo``, ``rloo`` and ``reinforce_plus_plus``, and verl's ten other
  estimators from ``fastppo.integrations._verl_estimators`` under their verl names.

``install()`` registers the policy loss as ``loss_mode=fastppo`` and swaps the GAE and value loss
(and whatever of the above it is asked for) in everywhere verl looks them up; ``uninstall()``
undoes all of it. Importing this module installs it
when verl is importable, which is how verl's ``external_lib`` hook (and
``VERL_USE_EXTERNAL_MODULES``) use it: ``FASTPPO_VERL_INSTALL=loss`` limits that to the policy
loss, ``FASTPPO_VERL_INSTALL=0`` turns it off.

Where verl fails, these do not: an all-masked batch gives a loss of 0 (verl: NaN) and fewer than
two valid tokens whiten as ``x - mean`` unscaled (verl raises ``ValueError``); both hold for
``agg_loss`` and REINFORCE++ too. ``agg_loss`` counts mask entries (``mask != 0``) where verl
would weigh by a fractional mask (verl passes 0/1 masks), and returns float32.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

import numpy as np
import torch

import fastppo
from fastppo.integrations import _as_float, _cfg, _global_aggregate, _promote, _verl_linear
from fastppo.integrations._verl_policy_losses import ADAPTERS as _POLICY_ADAPTERS
from fastppo.reference import compute_dtype

from ._verl_estimators import VERL_ESTIMATORS as _MORE_ESTIMATORS
from ._verl_estimators import _carry_into_gaps, _outcome

__all__ = [
    "LOSS_NAME",
    "agg_loss",
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_policy_loss_fastppo",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_value_loss",
    "install",
    "installed",
    "kl_penalty",
    "kl_penalty_forward",
    "uninstall",
]

LOSS_NAME = "fastppo"
_CORE_ALGOS = "verl.trainer.ppo.core_algos"
_logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The three verl functions
# --------------------------------------------------------------------------------------------


def compute_policy_loss_fastppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's "vanilla" PPO policy loss computed by ``fastppo.policy_loss``.

    Reads ``clip_ratio``, ``clip_ratio_low`` / ``clip_ratio_high`` (default: ``clip_ratio``),
    ``clip_ratio_c`` (dual clip, default 3.0, must be > 1; verl always applies it) and
    ``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``loss_scale_factor``) from ``config``, verl's ActorConfig.

    Args:
        old_log_prob, log_prob, advantages: ``[B, T]``; ``log_prob`` is differentiable.
        response_mask: ``[B, T]`` bool or 0/1.
        loss_agg_mode: ``token-mean``, ``token-sum``, ``seq-mean-token-mean``,
            ``seq-mean-token-sum`` or ``seq-mean-token-sum-norm``.
        config: the actor config (required, as in verl).
        rollout_is_weights: optional ``[B, T]`` weights multiplying each token's loss.
    Returns:
        ``(loss, metrics)``: 0-d loss; ``metrics`` maps ``actor/pg_clipfrac``, ``actor/ppo_kl``
        and ``actor/pg_clipfrac_lower`` to Python floats, as verl's vanilla loss does.
    """
    if config is None:
        raise ValueError("the fastppo policy loss needs verl's actor config (clip_ratio, ...), got config=None")
    clip = _cfg(config, "clip_ratio")
    if clip is None:
        raise ValueError("the actor config has no clip_ratio; verl's vanilla loss requires one")
    clip_low = _cfg(config, "clip_ratio_low", clip)
    clip_high = _cfg(config, "clip_ratio_high", clip)
    clip_c = _cfg(config, "clip_ratio_c", 3.0)
    if not clip_c > 1.0:
        raise ValueError(f"clip_ratio_c (the dual-clip bound) must be > 1.0, got {clip_c}")
    batch_info = dict(_cfg(config, "global_batch_info", {}) or {})

    log_prob, old_log_prob, advantages, rollout_is_weights = _promote(
        log_prob, old_log_prob, advantages, rollout_is_weights
    )

    def run(agg: str):
        return fastppo.policy_loss(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            clip_low=float(clip_low),
            clip_high=float(clip_high),
            dual_clip=float(clip_c),
            agg=agg,
            is_weights=rollout_is_weights,
        )

    loss, stats = _global_aggregate(run, response_mask, loss_agg_mode, **batch_info)
    # verl reports Python floats (and so syncs here); its Metric would .item() tensors anyway.
    metrics = {
        "actor/pg_clipfrac": stats["clipfrac"].item(),
        "actor/ppo_kl": stats["approx_kl"].item(),
        "actor/pg_clipfrac_lower": stats["clipfrac_lower"].item(),
    }
    return loss, metrics


@torch.no_grad()
def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: Any,
    lam: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GAE (``algorithm.adv_estimator=gae``) computed by ``fastppo.gae``.

    At valid positions the reverse scan skips masked positions (``fastppo.gae``). Like verl:
    ``returns`` = raw advantages + ``values``; advantages are whitened by the mean and unbiased
    variance of the valid positions, applied at every position; masked positions keep the
    (whitened) advantage of the next valid token, or of 0 after the last one.

    Args:
        token_level_rewards, values: ``[B, T]``.
        response_mask: ``[B, T]`` bool or 0/1.
        gamma, lam: floats (or 0-d tensors) in [0, 1].
    Returns:
        ``(advantages, returns)``, both ``[B, T]`` float32 (float64 for float64 inputs).
    """
    rewards, values = _promote(token_level_rewards, values)
    mask = response_mask.bool()
    advantages, _ = fastppo.gae(rewards, values, mask, gamma=_as_float(gamma), lam=_as_float(lam))
    advantages = _carry_into_gaps(advantages, mask)
    returns = advantages + values.to(advantages.dtype)
    return _whiten_everywhere(advantages, mask), returns


def _whiten_everywhere(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_whiten``: the valid positions' mean and unbiased variance, applied at every
    position. ``fastppo.masked_whiten`` gives 0 at masked positions (its contract), while verl
    keeps the whitened carried advantage there, so the adapter applies the map itself."""
    valid = mask.to(x.dtype)
    n = valid.sum()
    mean = (x * valid).sum() / n
    var = ((x - mean).square() * valid).sum() / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float | None,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's clipped value loss computed by ``fastppo.value_loss``.

    0.5 * agg(max((vpreds - R)^2, (clamp(vpreds, values - c, values + c) - R)^2)), with verl's
    global-batch normalisation.

    Args:
        vpreds: ``[B, T]`` current predictions (differentiable).
        returns, values: ``[B, T]`` targets and the old (rollout) values.
        response_mask: ``[B, T]`` bool or 0/1.
        cliprange_value: c; None gives the plain squared error.
    Returns:
        ``(vf_loss, vf_clipfrac)``: 0-d tensors.
    """
    vpreds, returns, values = _promote(vpreds, returns, values)

    def run(agg: str):
        return fastppo.value_loss(vpreds, values, returns, response_mask, clip=cliprange_value, agg=agg)

    loss, _ = _global_aggregate(
        run,
        response_mask,
        loss_agg_mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    return loss, _value_clipfrac(vpreds, returns, values, response_mask, cliprange_value)


@torch.no_grad()
def _value_clipfrac(vpreds, returns, values, mask, clip) -> torch.Tensor:
    """verl's vf_clipfrac: the fraction of valid tokens whose clipped error is strictly larger.

    Recomputed rather than taken from fastppo's stats because the strict comparison sees the last
    bit: verl clips as clamp(v, old - c, old + c), fastppo as old + clamp(v - old, -c, c), which
    can differ by one rounding where no clipping happens and then count a token as clipped.
    """
    dtype = compute_dtype(vpreds, returns, values)
    valid = mask.bool()
    if clip is None:
        return torch.zeros((), dtype=dtype, device=vpreds.device)
    v, R, old = vpreds.detach().to(dtype), returns.to(dtype), values.to(dtype)
    clipped = torch.clamp(v, min=old - clip, max=old + clip)
    larger = (clipped - R).square() > (v - R).square()
    return (larger & valid).to(dtype).sum() / valid.to(dtype).sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# KL penalty, agg_loss and the critic-free estimators
# --------------------------------------------------------------------------------------------

# verl's kl_penalty names -> fastppo's estimators.
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's ``kl_penalty_forward`` computed by ``fastppo.kl_penalty``.

    With d = logprob - ref_logprob: ``kl``/``k1`` d, ``abs`` |d|, ``mse``/``k2`` d^2 / 2,
    ``low_var_kl``/``k3`` exp(-d') + d' - 1 clamped to [-10, 10] with d' = clamp(d, -20, 20),
    accurate at small |d| (verl's float32 exp(r) - r - 1 returns 0 at |d| = 1e-4).
    ``full`` and unknown names raise ``NotImplementedError``, as in verl.

    Returns the elementwise estimate, float32 (float64 for float64 inputs), any shape.
    """
    if kl_penalty == "full":
        raise NotImplementedError("kl_penalty='full' needs the full distributions; verl does not implement it either")
    estimator = _KL_NAMES.get(kl_penalty)
    if estimator is None:
        # verl raises NotImplementedError here (not fastppo's ValueError): callers may rely on it.
        raise NotImplementedError(f"unknown kl_penalty {kl_penalty!r}; expected one of {', '.join(_KL_NAMES)}")
    logprob, ref_logprob = _promote(logprob, ref_logprob)
    if estimator != "k3":
        return fastppo.kl_penalty(logprob, ref_logprob, estimator)
    # verl clamps the log-ratio to [-20, 20] before exp, fastppo's k3 only the estimate: clamp d
    # here and hand it over against a zero reference (exact: clamp(-r) = -clamp(r)). This keeps
    # verl's 10 (not NaN) at logprob = -inf, and the clamp's zero gradient past +-20.
    d = (logprob - ref_logprob).clamp(-20.0, 20.0)
    return fastppo.kl_penalty(d, torch.zeros_like(d), "k3", clamp=10.0)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's ``kl_penalty``: ``kl_penalty_forward`` and, for a name ending in ``+`` (``k1+``,
    ``k3+``, ...), the straight-through estimator: the forward value of the named estimator with
    the gradient of k2 = d^2 / 2 (the unbiased KL gradient). ``k2+``/``mse`` are k2 itself.
    """
    straight_through = kl_penalty.endswith("+")
    forward = kl_penalty_forward(logprob, ref_logprob, kl_penalty[:-1] if straight_through else kl_penalty)
    if not straight_through or kl_penalty in ("mse", "k2"):
        return forward
    backward = fastppo.kl_penalty(*_promote(logprob, ref_logprob), "k2")
    # verl's expression, evaluated in verl's order (an inf backward score gives NaN, as in verl).
    return backward - backward.detach() + forward.detach()


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
) -> torch.Tensor:
    """verl's ``agg_loss`` computed by ``fastppo.aggregate`` (with verl's global-batch scaling).

    Args:
        loss_mat: ``[B, T]`` per-token loss (differentiable).
        loss_mask: ``[B, T]`` bool or 0/1.
        loss_agg_mode: one of verl's five modes; ``dp_size``, ``batch_num_tokens``,
            ``global_batch_size``, ``loss_scale_factor`` as in verl.
    Returns:
        the 0-d float32 loss (0 for an all-masked batch, where verl's local modes give NaN).
    """

    def run(agg: str):
        return fastppo.aggregate(loss_mat, loss_mask, agg), {}

    loss, _ = _global_aggregate(
        run,
        loss_mask,
        loss_agg_mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    return loss


def _outcome_advantages(token_level_rewards, response_mask, index, estimator, norm_by_std, eps):
    """verl's outcome estimators: score = row sum of the token rewards, advantages per ``index``
    group by ``fastppo.group_advantages``, broadcast as ``a * response_mask`` (``_verl_estimators._outcome``,
    shared with the estimators only fastppo's verl adapter adds)."""
    advantages = _outcome(token_level_rewards, response_mask, index, estimator, norm_by_std=norm_by_std, eps=eps)
    return advantages, advantages


@torch.no_grad()
def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO (``algorithm.adv_estimator=grpo``) computed by ``fastppo.group_advantages``.

    s_b = sum_t token_level_rewards[b, t]; per group of rows with the same ``index`` entry:
    (s - mean) / (std + epsilon) (unbiased std), or s - mean without ``norm_adv_by_std_in_grpo``
    (Dr. GRPO); a group of one gets mean 0 and std 1. Returns ``(advantages, advantages)``,
    ``[B, T]`` = a_b * response_mask, float32.
    """
    return _outcome_advantages(token_level_rewards, response_mask, index, "grpo", bool(norm_adv_by_std_in_grpo), float(epsilon))


@torch.no_grad()
def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's RLOO (``algorithm.adv_estimator=rloo``) computed by ``fastppo.group_advantages``.

    Per ``index`` group of n > 1 rows: s_i - mean of the others = (s_i - mean) * n / (n - 1);
    a group of one keeps s. ``epsilon`` and ``config`` are unused, as in verl. Returns
    ``(advantages, advantages)``, ``[B, T]`` = a_b * response_mask, float32.
    """
    return _outcome_advantages(token_level_rewards, response_mask, index, "rloo", True, 1e-6)


@torch.no_grad()
def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's REINFORCE++ (``algorithm.adv_estimator=reinforce_plus_plus``) computed by
    ``fastppo.reinforce_pp_advantages`` with ``gamma = config.gamma``.

    Returns-to-go over the valid tokens (a masked gap carries the running return unchanged),
    whitened over the batch; both outputs 0 at masked positions, as in verl. Returns
    ``(advantages, returns)``, ``[B, T]`` float32.
    """
    if config is None:
        raise ValueError("REINFORCE++ needs verl's algorithm config (gamma), got config=None")
    gamma = _cfg(config, "gamma")
    if gamma is None:
        raise ValueError("the algorithm config has no gamma; verl's REINFORCE++ requires one")
    (rewards,) = _promote(token_level_rewards)
    return fastppo.reinforce_pp_advantages(rewards, response_mask, gamma=_as_float(gamma))


# --------------------------------------------------------------------------------------------
# Installing into verl
# --------------------------------------------------------------------------------------------

# (module name, attribute) or (registry, key) -> verl's original object, for uninstall().
_saved: dict[tuple[str, str], Any] = {}
_registered_names: set[str] = set()

# The parts install() can take over: the core_algos functions (attribute, replacement) ...
_SWAPS: dict[str, tuple[tuple[str, Any], ...]] = {
    "gae": (("compute_gae_advantage_return", compute_gae_advantage_return),),
    "value_loss": (("compute_value_loss", compute_value_loss),),
    "vanilla": (("compute_policy_loss_vanilla", compute_policy_loss_fastppo),),
    "kl_penalty": (("kl_penalty", kl_penalty), ("kl_penalty_forward", kl_penalty_forward)),
    "agg_loss": (("agg_loss", agg_loss),),
    "policy_losses": tuple((f"compute_policy_loss_{n}", fn) for n, fn in _POLICY_ADAPTERS.items()),
    "estimators": (
        ("compute_grpo_outcome_advantage", compute_grpo_outcome_advantage),
        ("compute_rloo_outcome_advantage", compute_rloo_outcome_advantage),
        ("compute_reinforce_plus_plus_outcome_advantage", compute_reinforce_plus_plus_outcome_advantage),
    ),
}
# ... and their registry entries (registry attribute of core_algos, key, replacement).
_REGISTRY_SWAPS: dict[str, tuple[tuple[str, str, Any], ...]] = {
    "gae": (("ADV_ESTIMATOR_REGISTRY", "gae", compute_gae_advantage_return),),
    "vanilla": (("POLICY_LOSS_REGISTRY", "vanilla", compute_policy_loss_fastppo),),
    "policy_losses": tuple(("POLICY_LOSS_REGISTRY", n, fn) for n, fn in _POLICY_ADAPTERS.items()),
    "estimators": (
        ("ADV_ESTIMATOR_REGISTRY", "grpo", compute_grpo_outcome_advantage),
        ("ADV_ESTIMATOR_REGISTRY", "rloo", compute_rloo_outcome_advantage),
        ("ADV_ESTIMATOR_REGISTRY", "reinforce_plus_plus", compute_reinforce_plus_plus_outcome_advantage),
    ),
}
# The rest of verl's estimators (issue 19) live in their own module.
_SWAPS["estimators"] += tuple((attr, ours) for attr, _, ours in _MORE_ESTIMATORS)
_REGISTRY_SWAPS["estimators"] += tuple(("ADV_ESTIMATOR_REGISTRY", key, ours) for _, key, ours in _MORE_ESTIMATORS)
PARTS = ("policy_loss", "gae", "value_loss", "vanilla", "kl_penalty", "agg_loss", "estimators", "policy_losses", "rollout_correction", "linear_cross_entropy")


def _swap_everywhere(attr: str, replacement: Any, original: Any) -> None:
    """Point every loaded verl module's ``attr`` that holds ``original`` at ``replacement``.

    Modules that did ``from core_algos import compute_value_loss`` hold their own reference;
    modules imported later pick up the patched ``core_algos`` attribute by themselves.
    """
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "verl" or name.startswith("verl.")):
            continue
        if getattr(module, attr, None) is original:
            _saved.setdefault((name, attr), original)
            setattr(module, attr, replacement)


def install(
    *,
    policy_loss: bool = True,
    gae: bool = True,
    value_loss: bool = True,
    vanilla: bool = False,
    kl_penalty: bool = False,
    agg_loss: bool = False,
    estimators: bool = False,
    policy_losses: bool = False,
    rollout_correction: bool = False,
    linear_cross_entropy: bool = False,
    name: str = LOSS_NAME,
) -> None:
    """Put fastppo into verl (idempotent).

    * ``policy_loss``: register ``compute_policy_loss_fastppo`` as ``name`` with verl's
      ``register_policy_loss`` (select it with ``actor_rollout_ref.actor.policy_loss.loss_mode``).
    * ``gae``: replace ``core_algos.compute_gae_advantage_return`` and the ``gae`` entry of the
      advantage-estimator registry (``algorithm.adv_estimator=gae`` then runs fastppo).
    * ``value_loss``: replace ``core_algos.compute_value_loss`` and the copies that verl's
      modules imported by name (``verl.workers.utils.losses``).
    * ``vanilla``: ``compute_policy_loss_fastppo`` also as ``loss_mode=vanilla`` (verl's default).
    * ``kl_penalty``: replace ``kl_penalty`` and ``kl_penalty_forward`` (the KL reward penalty
      and the actor's KL loss).
    * ``agg_loss``: replace ``agg_loss`` (every verl loss is reduced by it).
    * ``estimators``: replace every advantage estimator of verl 0.9.1 but GAE and their registry
      entries (``grpo``, ``rloo``, ``reinforce_plus_plus`` and the ten of
      ``fastppo.integrations._verl_estimators``: ``grpo_vectorized``, ``rloo_vectorized``,
      ``gdpo``, ``grpo_passk``, ``reinforce_plus_plus_baseline``, ``opo``, ``remax``, ``gpg``,
      ``optimal_token_baseline``, ``tir_optimal_token_baseline``).
    * ``policy_losses``: verl's other policy losses (``dppo_tv``, ``dppo_kl``, ``sapo``, ``gpg``,
      ``cispo``, ``dro``...: ``fastppo.integrations._verl_policy_losses.ADAPTERS``), their
      registry entries and ``compute_policy_loss_<name>`` functions; the sequence-level ones
      (``gspo``, ``geo_mean``, ``clip_cov``, ``kl_cov``) are
      ``fastppo.integrations._verl_seq_losses.VERL_SEQ_LOSSES``.
    * ``rollout_correction``: replace ``rollout_corr_helper``'s IS-weight, rejection and metric
      functions by ``fastppo.rollout_correction`` and ``loss_mode=bypass_mode`` by
      ``fastppo.bypass_mode_loss`` (``fastppo.integrations._verl_rollout_corr``).
    * ``linear_cross_entropy``: replace ``verl.utils.kernel.linear_cross_entropy`` (the fused LM
      head of ``use_fused_kernels``, CUDA-only in verl) by ``fastppo.linear_logprobs``
      (``fastppo.integrations._verl_linear``).

    Every function is swapped in ``core_algos`` and in the verl modules that imported it by name.
    Raises ImportError when verl's ``core_algos`` cannot be imported.
    """
    core_algos = importlib.import_module(_CORE_ALGOS)
    if policy_loss:
        core_algos.register_policy_loss(name)(compute_policy_loss_fastppo)
        _registered_names.add(name)
    if rollout_correction:
        from fastppo.integrations import _verl_rollout_corr

        _verl_rollout_corr.install()
    wanted = dict(gae=gae, value_loss=value_loss, vanilla=vanilla, kl_penalty=kl_penalty,
                  agg_loss=agg_loss, estimators=estimators, policy_losses=policy_losses)
    for part, on in wanted.items():
        if not on:
            continue
        for attr, ours in _SWAPS[part]:
            original = _saved.get((_CORE_ALGOS, attr), getattr(core_algos, attr))
            if original is not ours:
                _swap_everywhere(attr, ours, original)
        for registry_name, key, ours in _REGISTRY_SWAPS.get(part, ()):
            registry = getattr(core_algos, registry_name)
            if registry.get(key) is not ours:
                # Written directly: register_adv_est refuses to overwrite a registered name.
                _saved.setdefault((registry_name, key), registry.get(key))
                registry[key] = ours
    if policy_losses:
        # gspo, geo_mean, clip_cov, kl_cov (fastppo/integrations/_verl_seq_losses.py)
        from fastppo.integrations import _verl_seq_losses

        _verl_seq_losses.register(core_algos, _saved)
    if linear_cross_entropy:
        _verl_linear.install()


def uninstall() -> None:
    """Undo ``install()``: verl's own functions and registry entries come back."""
    from fastppo.integrations import _verl_rollout_corr

    _verl_rollout_corr.uninstall()
    _verl_linear.uninstall()
    core_algos = sys.modules.get(_CORE_ALGOS)
    if core_algos is None:
        _saved.clear()
        _registered_names.clear()
        return
    for name in _registered_names:
        if core_algos.POLICY_LOSS_REGISTRY.get(name) is compute_policy_loss_fastppo:
            del core_algos.POLICY_LOSS_REGISTRY[name]
    _registered_names.clear()
    from fastppo.integrations import _verl_seq_losses

    _verl_seq_losses.unregister(core_algos, _saved)
    for swaps in _REGISTRY_SWAPS.values():
        for registry_name, key, ours in swaps:
            if (registry_name, key) not in _saved:
                continue
            original = _saved.pop((registry_name, key))
            registry = getattr(core_algos, registry_name)
            if registry.get(key) is ours:
                if original is None:
                    del registry[key]
                else:
                    registry[key] = original
    for swaps in _SWAPS.values():
        for attr, ours in swaps:
            original = _saved.get((_CORE_ALGOS, attr))
            if original is None:
                continue
            # Catch modules imported after install(): they copied our function, not verl's.
            for name, module in list(sys.modules.items()):
                if module is not None and (name == "verl" or name.startswith("verl.")):
                    if getattr(module, attr, None) is ours:
                        setattr(module, attr, original)
    _saved.clear()


def installed() -> dict[str, bool]:
    """Which parts of fastppo are in verl right now (the keys of ``PARTS``)."""
    core_algos = sys.modules.get(_CORE_ALGOS)
    if core_algos is None:
        return dict(dict.fromkeys(PARTS, False), linear_cross_entropy=_verl_linear.installed())
    state = {"policy_loss": core_algos.POLICY_LOSS_REGISTRY.get(LOSS_NAME) is compute_policy_loss_fastppo}
    from fastppo.integrations import _verl_rollout_corr

    state["rollout_correction"] = _verl_rollout_corr.installed()
    state["linear_cross_entropy"] = _verl_linear.installed()
    for part in PARTS[1:]:
        if part not in _SWAPS:
            continue
        state[part] = all(getattr(core_algos, attr, None) is ours for attr, ours in _SWAPS[part]) and all(
            getattr(core_algos, registry_name).get(key) is ours
            for registry_name, key, ours in _REGISTRY_SWAPS.get(part, ())
        )
    return state


def _install_on_import() -> None:
    """verl's ``external_lib`` hook only imports a module, so the import has to do the work.

    ``FASTPPO_VERL_INSTALL``: ``all`` (default: the loss, GAE and value loss), ``loss``,
    ``full`` (every part), ``0``, or a comma-separated list of ``PARTS``.
    """
    mode = os.environ.get("FASTPPO_VERL_INSTALL", "all").strip().lower()
    if mode in ("0", "off", "none", "false", "no"):
        return
    if mode in ("all", "1", "on", "true", "yes"):
        parts = {"policy_loss", "gae", "value_loss"}
    elif mode == "loss":
        parts = {"policy_loss"}
    elif mode == "full":
        parts = set(PARTS)
    else:
        parts = {p.strip() for p in mode.split(",") if p.strip()}
        unknown = parts - set(PARTS)
        if unknown or not parts:
            raise ValueError(
                f"FASTPPO_VERL_INSTALL must be all, loss, full, 0 or a comma-separated list of "
                f"{', '.join(PARTS)}; got {mode!r}"
            )
    if importlib.util.find_spec("verl") is None:
        return
    try:
        install(**{part: part in parts for part in PARTS})
    except Exception as exc:  # noqa: BLE001
        # verl is present but its core cannot load (a missing dependency): leave verl alone
        # rather than make fastppo unimportable; install() called by hand raises instead.
        _logger.warning("fastppo: verl found but not installed into (%s)", exc)


_install_on_import()
