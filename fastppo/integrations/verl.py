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

``install()`` registers the policy loss as ``loss_mode=fastppo`` and swaps the GAE and value loss
in everywhere verl looks them up; ``uninstall()`` undoes it. Importing this module installs it
when verl is importable, which is how verl's ``external_lib`` hook (and
``VERL_USE_EXTERNAL_MODULES``) use it: ``FASTPPO_VERL_INSTALL=loss`` limits that to the policy
loss, ``FASTPPO_VERL_INSTALL=0`` turns it off.

Where verl fails, these do not: an all-masked batch gives a loss of 0 (verl: NaN) and fewer than
two valid tokens whiten as ``x - mean`` unscaled (verl raises ``ValueError``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

import torch

import fastppo
from fastppo.integrations import _as_float, _cfg, _global_aggregate, _promote
from fastppo.reference import compute_dtype

__all__ = [
    "LOSS_NAME",
    "compute_gae_advantage_return",
    "compute_policy_loss_fastppo",
    "compute_value_loss",
    "install",
    "installed",
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
# Installing into verl
# --------------------------------------------------------------------------------------------

# (module name, attribute) -> verl's original object, for uninstall().
_saved: dict[tuple[str, str], Any] = {}
_registered_names: set[str] = set()

_SWAPS = {
    "gae": ("compute_gae_advantage_return", compute_gae_advantage_return),
    "value_loss": ("compute_value_loss", compute_value_loss),
}


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


def install(*, policy_loss: bool = True, gae: bool = True, value_loss: bool = True, name: str = LOSS_NAME) -> None:
    """Put fastppo into verl (idempotent).

    * ``policy_loss``: register ``compute_policy_loss_fastppo`` as ``name`` with verl's
      ``register_policy_loss`` (select it with ``actor_rollout_ref.actor.policy_loss.loss_mode``).
    * ``gae``: replace ``core_algos.compute_gae_advantage_return`` and the ``gae`` entry of the
      advantage-estimator registry (``algorithm.adv_estimator=gae`` then runs fastppo).
    * ``value_loss``: replace ``core_algos.compute_value_loss`` and the copies that verl's
      modules imported by name (``verl.workers.utils.losses``).

    Raises ImportError when verl's ``core_algos`` cannot be imported.
    """
    core_algos = importlib.import_module(_CORE_ALGOS)
    if policy_loss:
        core_algos.register_policy_loss(name)(compute_policy_loss_fastppo)
        _registered_names.add(name)
    for wanted, key in ((gae, "gae"), (value_loss, "value_loss")):
        if not wanted:
            continue
        attr, ours = _SWAPS[key]
        original = _saved.get((_CORE_ALGOS, attr), getattr(core_algos, attr))
        if original is not ours:
            _swap_everywhere(attr, ours, original)
    if gae:
        registry = core_algos.ADV_ESTIMATOR_REGISTRY
        if registry.get("gae") is not compute_gae_advantage_return:
            _saved.setdefault((_CORE_ALGOS, "ADV_ESTIMATOR_REGISTRY['gae']"), registry.get("gae"))
            registry["gae"] = compute_gae_advantage_return


def uninstall() -> None:
    """Undo ``install()``: verl's own GAE, value loss and registry entries come back."""
    core_algos = sys.modules.get(_CORE_ALGOS)
    if core_algos is None:
        _saved.clear()
        _registered_names.clear()
        return
    for name in _registered_names:
        if core_algos.POLICY_LOSS_REGISTRY.get(name) is compute_policy_loss_fastppo:
            del core_algos.POLICY_LOSS_REGISTRY[name]
    _registered_names.clear()
    registry_key = (_CORE_ALGOS, "ADV_ESTIMATOR_REGISTRY['gae']")
    if registry_key in _saved:
        original = _saved.pop(registry_key)
        if core_algos.ADV_ESTIMATOR_REGISTRY.get("gae") is compute_gae_advantage_return:
            core_algos.ADV_ESTIMATOR_REGISTRY["gae"] = original
    for attr, ours in _SWAPS.values():
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
    """Which parts of fastppo are in verl right now (``policy_loss``, ``gae``, ``value_loss``)."""
    core_algos = sys.modules.get(_CORE_ALGOS)
    if core_algos is None:
        return {"policy_loss": False, "gae": False, "value_loss": False}
    return {
        "policy_loss": core_algos.POLICY_LOSS_REGISTRY.get(LOSS_NAME) is compute_policy_loss_fastppo,
        "gae": core_algos.compute_gae_advantage_return is compute_gae_advantage_return,
        "value_loss": core_algos.compute_value_loss is compute_value_loss,
    }


def _install_on_import() -> None:
    """verl's ``external_lib`` hook only imports a module, so the import has to do the work."""
    mode = os.environ.get("FASTPPO_VERL_INSTALL", "all").strip().lower()
    if mode in ("0", "off", "none", "false", "no"):
        return
    if mode not in ("all", "1", "on", "true", "yes", "loss"):
        raise ValueError(f"FASTPPO_VERL_INSTALL must be all, loss or 0, got {mode!r}")
    if importlib.util.find_spec("verl") is None:
        return
    try:
        only_loss = mode == "loss"
        install(gae=not only_loss, value_loss=not only_loss)
    except Exception as exc:  # noqa: BLE001
        # verl is present but its core cannot load (a missing dependency): leave verl alone
        # rather than make fastppo unimportable; install() called by hand raises instead.
        _logger.warning("fastppo: verl found but not installed into (%s)", exc)


_install_on_import()
