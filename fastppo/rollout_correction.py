"""Rollout correction: importance weights and rejection masks for the rollout-training mismatch.

The policy that sampled a rollout (vLLM in bf16, an older checkpoint) is not the policy the
trainer scores it with. With ``r_t = pi_train(y_t) / pi_rollout(y_t)`` (``log r_t = old_logprobs -
rollout_logprobs``) this module gives, with verl 0.9.1's options, numbers and metric names
(``verl/trainer/ppo/rollout_corr_helper.py``):

* importance weights (IS), detached, for the losses' ``is_weights``: per token ``r_t``, per
  sequence ``prod_t r_t``, or the geometric mean ``exp(mean_t log r_t)`` (the per-sequence
  length-normalised ratio), truncated at an upper bound (TIS) or zeroed outside ``[lower, upper]``
  (IcePop, the "mask" mode);
* rejection sampling (RS): tokens or whole sequences whose divergence statistic (k1 ``-log r``,
  k2 ``(log r)^2 / 2``, k3 ``r - 1 - log r``; per token, or a sequence's sum, mean or max) falls
  outside the thresholds leave the mask; verl's older ``veto`` (drop a sequence in which any token's
  ratio is below a bound) is kept as an option;
* diagnostics of the mismatch (KL, perplexities, chi-square).

References: Liu, Li, Fu, Wang, Liu, Shen, "When Speed Kills Stability: Demystifying RL Collapse
from the Training-Inference Mismatch" (2025); Yao et al., "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training" (TIS, 2025); IcePop (Ling Team, "Every Step Evolves", 2025).

This op is elementwise arithmetic plus per-row reductions over ``[B, T]`` rollout data, done once
per batch: it is PyTorch on both backends (no Triton kernel; a kernel would save microseconds per
iteration), so ``fastppo.rollout_correction`` is its own reference. ``fastppo.groundtruth``
holds an independent float64 spelling.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch

from .objectives import register_policy_loss
from .ops import aggregate, policy_loss
from .reference import _k3

__all__ = [
    "BYPASS_LOSS_TYPES",
    "bypass_mode_loss",
    "IS_LEVELS",
    "IS_MODES",
    "RS_ALIASES",
    "RS_OPTIONS",
    "SAFETY_BOUND",
    "parse_rs",
    "rollout_correction",
]

# exp(+-20): the bound verl puts on every log-ratio before it is exponentiated.
SAFETY_BOUND = 20.0
IS_LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask")
RS_OPTIONS = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)  # fmt: skip
# verl before 0.7 named its rejection levels token / sequence / geometric (ratio bounds).
RS_ALIASES = {"token": "token_k1", "sequence": "seq_sum_k1", "geometric": "seq_mean_k1"}

F32 = torch.float32


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def _number(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (Real, str)):
        raise ValueError(f"{what} must be a number, got {x!r}")
    try:
        value = float(x)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {x!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive finite number, got {x!r}")
    return value


def parse_rs(rs, rs_threshold) -> list[tuple[str, float | None, float]]:
    """Rejection options and thresholds -> ``[(option, lower, upper), ...]`` (duplicates dropped).

    ``rs``: verl's comma-separated option string (``"token_k1,seq_max_k3"``), a sequence of
    names, or an alias (``token``, ``sequence``, ``geometric`` = ``token_k1``, ``seq_sum_k1``,
    ``seq_mean_k1``). ``rs_threshold``: one spec for all options or one per option, as a
    comma-separated string, a number or a sequence. A k1 option takes ratio bounds
    ``"lower_upper"`` (or ``(lower, upper)``); a single number ``u`` means ``[1/u, u]``. k2 and k3
    options take one upper bound on the divergence.
    """
    names = [s.strip() for s in rs.split(",")] if isinstance(rs, str) else [str(s).strip() for s in rs]
    options: list[str] = []
    for name in names:
        if not name:
            continue
        name = RS_ALIASES.get(name, name)
        if name not in RS_OPTIONS:
            raise ValueError(
                f"unknown rejection option {name!r}; expected {', '.join(RS_OPTIONS)} "
                f"(or {', '.join(RS_ALIASES)})"
            )
        if name not in options:
            options.append(name)
    if not options:
        raise ValueError(f"rs names no rejection option: {rs!r}")
    if rs_threshold is None:
        raise ValueError(f"rejection {', '.join(options)} needs rs_threshold, got None")
    if isinstance(rs_threshold, str):
        specs = [s.strip() for s in rs_threshold.split(",") if s.strip()]
    elif isinstance(rs_threshold, (list, tuple)) and not (
        len(rs_threshold) == 2 and len(options) == 1 and all(isinstance(v, Real) for v in rs_threshold)
    ):
        specs = list(rs_threshold)
    else:
        specs = [rs_threshold]
    if len(specs) == 1:
        specs = specs * len(options)
    if len(specs) != len(options):
        raise ValueError(
            f"rs_threshold needs one spec for all options or one per option ({len(options)}), got {len(specs)}"
        )
    out = []
    for option, spec in zip(options, specs):
        what = f"rs_threshold for {option}"
        if isinstance(spec, str) and "_" in spec:
            pair = spec.split("_", 1)
        elif isinstance(spec, (list, tuple)):
            pair = list(spec)
            if len(pair) != 2:
                raise ValueError(f"{what} must be one number or a (lower, upper) pair, got {spec!r}")
        else:
            pair = None
        if option.endswith("k1"):
            if pair is None:
                upper = _number(spec, what)
                lower = 1.0 / upper
            else:
                lower, upper = _number(pair[0], what), _number(pair[1], what)
            if lower > upper:
                raise ValueError(f"{what}: lower bound {lower} is above the upper bound {upper}")
        else:
            if pair is not None:
                raise ValueError(f"{what} (a divergence) takes one upper bound, not a lower_upper pair: {spec!r}")
            lower, upper = None, _number(spec, what)
        out.append((option, lower, upper))
    return out


def _check(old_logprobs, rollout_logprobs, mask, level, mode, upper, lower, veto):
    for name, t in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs must be [B, T], got shape {list(old_logprobs.shape)}")
    for name, t in (("rollout_logprobs", rollout_logprobs), ("mask", mask)):
        if t.shape != old_logprobs.shape:
            raise ValueError(f"{name} must have old_logprobs' shape {list(old_logprobs.shape)}, got {list(t.shape)}")
        if t.device != old_logprobs.device:
            raise ValueError(f"{name} is on {t.device}, old_logprobs on {old_logprobs.device}")
    for name, t in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if level is not None and level not in IS_LEVELS:
        raise ValueError(f"unknown level {level!r}; expected None, {', '.join(IS_LEVELS)}")
    if mode not in IS_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected {', '.join(IS_MODES)}")
    upper = _number(upper, "upper")
    lower = None if lower is None else _number(lower, "lower")
    if lower is not None and lower > upper:
        raise ValueError(f"lower ({lower}) must be <= upper ({upper})")
    veto = None if veto is None else _number(veto, "veto")
    return upper, lower, veto


# --------------------------------------------------------------------------------------------
# Masked reductions (masked positions are selected away, never multiplied by 0: no NaN leaks)
# --------------------------------------------------------------------------------------------


def _sum(x, valid, dim=None):
    x = torch.where(valid, x, 0.0)
    return x.sum() if dim is None else x.sum(dim)


def _mean(x, valid, dim=None):
    # verl divides by (count + 1e-8): the count itself for count >= 1 in float32, and 0 / x = 0
    # for an empty row, which clamp_min(1) gives too.
    count = valid.sum() if dim is None else valid.sum(dim)
    return _sum(x, valid, dim) / count.clamp_min(1).to(F32)


def _max(x, valid):
    any_ = valid.any()
    return torch.where(any_, torch.where(valid, x, -math.inf).amax(), 0.0) if x.numel() else x.new_zeros(())


def _min(x, valid):
    any_ = valid.any()
    return torch.where(any_, torch.where(valid, x, math.inf).amin(), 0.0) if x.numel() else x.new_zeros(())


def _std(x, valid):
    """Unbiased std over the valid entries (torch.std), 0 with fewer than two."""
    n = valid.sum()
    m = _sum(x, valid) / n.clamp_min(1)
    var = _sum((x - m) ** 2, valid) / (n - 1).clamp_min(1)
    return torch.where(n > 1, var.sqrt(), 0.0)


def _all_mean(x):
    # Mean over all rows (verl averages some per-row figures over empty rows too).
    return x.mean() if x.numel() else x.new_zeros(())


def _all_max(x):
    return x.amax() if x.numel() else x.new_zeros(())


def _all_min(x):
    return x.amin() if x.numel() else x.new_zeros(())


def _clamped_std(x, valid, lo, hi):
    """verl's spread figure: sqrt(E[c^2] - E[c]^2) of c = clamp(x, lo, hi) over valid tokens."""
    c = x.clamp(min=lo, max=hi)
    var = _mean(c * c, valid) - _mean(c, valid) ** 2
    return torch.where(valid.sum() > 1, var.clamp_min(0.0).sqrt(), 0.0)


def _global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # Under torch.distributed the batch mean spans every rank, as verl's distributed_masked_mean.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        both = torch.stack([total, count.to(total.dtype)])
        torch.distributed.all_reduce(both)
        total, count = both[0], both[1]
    return total / count


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str | None = "token",
    mode: str = "truncate",
    upper: float = 2.0,
    lower: float | None = None,
    batch_normalize: bool = False,
    rs: str | Sequence[str] | None = None,
    rs_threshold=None,
    veto: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights, rejection mask and mismatch metrics of a rollout (verl 0.9.1's numbers).

    With ``log r_t = old_logprobs - rollout_logprobs`` at valid positions:

    * ``level`` (verl's ``rollout_is``): ``"token"``: ``w_t = r_t``; ``"sequence"``: ``w_t =
      exp(sum_t log r_t)`` for every token of the row; ``"geometric"``: ``w_t = exp(mean_t log
      r_t)`` (not in verl 0.9.1, whose ``seq_mean_k1`` rejection uses the same statistic); ``None``:
      no weights (``weights`` is None). Log-ratios are clamped to [-20, 20] before ``exp``.
    * ``mode``: ``"truncate"`` (TIS, verl's single-number ``rollout_is_threshold``): ``min(w,
      upper)``; ``"mask"`` (IcePop, verl's ``"lower_upper"`` threshold): ``w`` outside ``[lower,
      upper]`` becomes 0 (the token stays in the mask). ``lower`` defaults to ``1 / upper`` (it
      also sets the ``ratio_fraction_low`` metrics in truncate mode).
    * ``batch_normalize``: divide the weights by their mean (over valid tokens for ``token``, over
      rows with a valid token for the sequence levels; across ranks under torch.distributed) when
      that mean is above 1e-8. Metrics describe the weights before this step, as in verl.
    * ``rs`` / ``rs_threshold`` (verl's ``rollout_rs`` / ``rollout_rs_threshold``; see
      :func:`parse_rs`): every option must pass for a token to be kept. With ``s = clamp(log r,
      -20, 20)``: k1 = ``-s`` kept when ``log(lower) <= k1 <= log(upper)``; k2 = ``s^2 / 2`` and
      k3 = ``exp(s) - 1 - s`` kept when ``<= upper``; ``token_*`` per token, ``seq_sum_*`` /
      ``seq_mean_*`` / ``seq_max_*`` per row (a row passes or fails as a whole). A NaN statistic
      fails (the token, or its row, is rejected).
    * ``veto``: a row in which any valid token has ``r_t < veto`` is rejected whole (verl < 0.7's
      ``rollout_token_veto_threshold``).

    Args:
        old_logprobs: ``[B, T]`` the trainer's log-probs of the sampled tokens (any float dtype).
        rollout_logprobs: ``[B, T]`` the sampler's log-probs of the same tokens.
        mask: ``[B, T]`` bool or numbers, ``mask != 0`` is a valid response token.
    Returns:
        ``(weights, keep, metrics)``: ``weights`` ``[B, T]`` float32, detached, 0 at masked
        positions (None when ``level`` is None); ``keep`` ``[B, T]`` bool, ``mask != 0`` minus the
        rejected tokens; ``metrics``: 0-d float32 tensors under verl's names (``rollout_corr/
        rollout_is_mean``, ``rollout_corr/rollout_rs_token_k1_masked_fraction``, ``rollout_corr/kl``,
        ...), never ``.item()``-ed here. An empty mask (T = 0 included) gives zero weights, an empty
        ``keep`` and metrics of 0 (verl raises). NaN at a valid position propagates into the
        weights and metrics; nothing at a masked position reaches any output.
    """
    upper, lower, veto = _check(old_logprobs, rollout_logprobs, mask, level, mode, upper, lower, veto)
    options = parse_rs(rs, rs_threshold) if rs is not None else []
    valid = mask != 0
    old = old_logprobs.to(F32)
    roll = rollout_logprobs.to(F32)
    zero = torch.zeros((), dtype=F32, device=old.device)
    # Masked positions hold 0 from here on: whatever they held cannot reach a sum or an exp.
    old = torch.where(valid, old, zero)
    roll = torch.where(valid, roll, zero)
    log_ratio = old - roll
    n_tok = valid.sum(-1)
    has_tok = n_tok > 0
    metrics: dict[str, torch.Tensor] = {}

    weights = None
    if level is not None:
        weights = _is_weights(log_ratio, valid, n_tok, has_tok, level, mode, upper, lower, batch_normalize, metrics)

    keep = valid.clone()
    if options:
        keep = _rejection(log_ratio, valid, n_tok, has_tok, options, metrics) & valid
    if veto is not None:
        bad_tok = valid & (log_ratio < math.log(veto))
        vetoed = bad_tok.any(-1)
        metrics["rollout_is_veto_fraction"] = _sum(vetoed.to(F32), has_tok) / has_tok.sum().clamp_min(1)
        metrics["rollout_is_catastrophic_token_fraction"] = _mean(bad_tok.to(F32), valid)
        keep = keep & ~vetoed.unsqueeze(-1)

    metrics.update(_offpolicy_metrics(old, roll, log_ratio, valid))
    return weights, keep, {f"rollout_corr/{k}": v for k, v in metrics.items()}


def _is_weights(log_ratio, valid, n_tok, has_tok, level, mode, upper, lower, batch_normalize, metrics):
    lower_m = 1.0 / upper if lower is None else lower
    if level == "token":
        row_log = None
        raw = torch.where(valid, torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)), 0.0)
    else:
        row_log = log_ratio.sum(-1)
        if level == "geometric":
            row_log = row_log / n_tok.clamp_min(1).to(F32)
        row_w = torch.exp(row_log.clamp(-SAFETY_BOUND, SAFETY_BOUND))
        raw = torch.where(valid, row_w.unsqueeze(-1), 0.0)
    if mode == "truncate":
        w = raw.clamp(max=upper)
    else:
        # NaN compares false both ways and so stays NaN (verl's IcePop zeroes it).
        out = (raw < lower_m) | (raw > upper)
        w = torch.where(out, 0.0, raw)
        metrics["rollout_is_oob_ratio"] = _mean(out.to(F32), valid)

    metrics["rollout_is_mean"] = _mean(w, valid)
    if row_log is not None:
        # Sequence levels report the row ratios in log space (over every row, as verl).
        metrics["rollout_is_max"] = torch.exp(_all_max(row_log).clamp(max=SAFETY_BOUND))
        metrics["rollout_is_min"] = torch.exp(_all_min(row_log))
        metrics["rollout_is_ratio_fraction_high"] = _all_mean((row_log > math.log(upper)).to(F32))
        metrics["rollout_is_ratio_fraction_low"] = _all_mean((row_log < math.log(lower_m)).to(F32))
    else:
        metrics["rollout_is_ratio_fraction_high"] = _mean((raw > upper).to(F32), valid)
        metrics["rollout_is_ratio_fraction_low"] = _mean((raw < lower_m).to(F32), valid)
        metrics["rollout_is_max"] = _max(w, valid)
        metrics["rollout_is_min"] = _min(w, valid)
    metrics["rollout_is_std"] = _clamped_std(w, valid, 0.0, upper)
    c = w.clamp(min=0.0, max=upper)
    normalized = c / (_mean(c, valid) + 1e-8)
    metrics["rollout_is_eff_sample_size"] = 1.0 / _mean(normalized * normalized, valid)
    seq_w = _mean(w, valid, -1)
    metrics["rollout_is_seq_mean"] = _all_mean(seq_w)
    metrics["rollout_is_seq_std"] = _std(seq_w, torch.ones_like(has_tok))
    metrics["rollout_is_seq_max"] = _all_max(seq_w)
    metrics["rollout_is_seq_min"] = _all_min(seq_w)
    metrics["rollout_is_seq_max_deviation"] = _all_max((seq_w - 1.0).abs())
    raw_seq = _mean(raw, valid, -1)
    metrics["rollout_is_seq_fraction_high"] = _all_mean((raw_seq > upper).to(F32))
    metrics["rollout_is_seq_fraction_low"] = _all_mean((raw_seq < lower_m).to(F32))

    if batch_normalize:
        if level == "token":
            mean = _global_mean(_sum(w, valid), valid.sum())
        else:
            mean = _global_mean(_sum(seq_w, has_tok), has_tok.sum())
        ok = mean > 1e-8
        w = torch.where(ok, w / torch.where(ok, mean, 1.0), w)
        metrics["rollout_is_batch_norm_factor"] = torch.where(ok, mean, 1.0)
    return w


def _rejection(log_ratio, valid, n_tok, has_tok, options, metrics):
    s = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    stats = {"k1": -s, "k2": 0.5 * s * s, "k3": _k3(s)}
    keep = torch.ones_like(valid)
    n_seq = has_tok.sum().clamp_min(1)
    for option, lower, upper in options:
        kind = option[-2:]
        tok = stats[kind]
        if kind == "k1":
            lo, hi = math.log(lower), math.log(upper)
        else:
            lo, hi = None, upper
        if option.startswith("token"):
            row = None
            stat = tok
        else:
            if option.startswith("seq_sum"):
                row = _sum(tok, valid, -1)
            elif option.startswith("seq_mean"):
                row = _mean(tok, valid, -1)
            else:  # seq_max: 0 for an empty row, as verl
                row = torch.where(valid, tok, -math.inf).amax(-1) if tok.shape[-1] else tok.new_zeros(tok.shape[0])
                row = torch.where(has_tok, row, 0.0)
            stat = row.unsqueeze(-1).expand_as(tok)
        passed = stat <= hi
        if lo is not None:
            passed = passed & (stat >= lo)
        keep = keep & passed

        p = f"rollout_rs_{option}"
        seq_vals = _mean(tok, valid, -1) if row is None else row
        metrics[f"{p}_mean"] = _mean(stat, valid)
        if row is None:
            metrics[f"{p}_max"] = _max(stat, valid)
            metrics[f"{p}_min"] = _min(stat, valid)
            metrics[f"{p}_fraction_high"] = _mean((stat > hi).to(F32), valid)
            metrics[f"{p}_fraction_low"] = _mean((stat < lo).to(F32), valid) if lo is not None else stat.new_zeros(())
        else:
            metrics[f"{p}_max"] = _max(row, has_tok)
            metrics[f"{p}_min"] = _min(row, has_tok)
            metrics[f"{p}_fraction_high"] = _sum((row > hi).to(F32), has_tok) / n_seq
            metrics[f"{p}_fraction_low"] = (
                _sum((row < lo).to(F32), has_tok) / n_seq if lo is not None else stat.new_zeros(())
            )
        metrics[f"{p}_std"] = _clamped_std(stat, valid, lo if lo is not None else 0.0, hi)
        metrics[f"{p}_seq_mean"] = _sum(seq_vals, has_tok) / n_seq
        metrics[f"{p}_seq_std"] = _std(seq_vals, has_tok)
        metrics[f"{p}_seq_max"] = _max(seq_vals, has_tok)
        metrics[f"{p}_seq_min"] = _min(seq_vals, has_tok)
        metrics[f"{p}_seq_max_deviation"] = _max(seq_vals.abs(), has_tok)
        metrics[f"{p}_seq_fraction_high"] = _sum((seq_vals > hi).to(F32), has_tok) / n_seq
        if lo is not None:
            metrics[f"{p}_seq_fraction_low"] = _sum((seq_vals < lo).to(F32), has_tok) / n_seq
        rejected = valid & ~passed
        metrics[f"{p}_masked_fraction"] = _mean((~passed).to(F32), valid)
        metrics[f"{p}_seq_masked_fraction"] = _sum(rejected.any(-1).to(F32), has_tok) / n_seq
    metrics["rollout_rs_masked_fraction"] = _mean((~keep).to(F32), valid)
    metrics["rollout_rs_seq_masked_fraction"] = _all_mean((valid & ~keep).any(-1).to(F32))
    return keep


def _offpolicy_metrics(old, roll, log_ratio, valid):
    """verl's ``compute_offpolicy_metrics``: KL, perplexities and chi-square of the mismatch."""
    m: dict[str, torch.Tensor] = {}
    mean_old = _mean(old, valid, -1)
    mean_roll = _mean(roll, valid, -1)
    m["training_ppl"] = _all_mean(torch.exp(-mean_old))
    m["training_log_ppl"] = _all_mean(-mean_old)
    m["kl"] = _mean(roll - old, valid)
    m["k3_kl"] = _mean(_k3(log_ratio), valid)
    m["rollout_ppl"] = _all_mean(torch.exp(-mean_roll))
    m["rollout_log_ppl"] = _all_mean(-mean_roll)
    diff = mean_roll - mean_old
    m["log_ppl_diff"] = _all_mean(diff)
    m["log_ppl_abs_diff"] = _all_mean(diff.abs())
    m["log_ppl_diff_max"] = _all_max(diff)
    m["log_ppl_diff_min"] = _all_min(diff)
    m["ppl_ratio"] = _all_mean(torch.exp(diff))
    rho = torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    m["chi2_token"] = _mean(rho * rho, valid) - 1.0
    seq = log_ratio.sum(-1).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    m["chi2_seq"] = _all_mean(torch.exp(2.0 * seq)) - 1.0
    return m


# --------------------------------------------------------------------------------------------
# verl's bypass_mode policy loss
# --------------------------------------------------------------------------------------------

BYPASS_LOSS_TYPES = ("ppo_clip", "reinforce")


@register_policy_loss("bypass_mode")
def bypass_mode_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    agg: str = "token-mean",
    is_weights: torch.Tensor | None = None,
    loss_type: str = "ppo_clip",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = 3.0,
    level: str | None = None,
    mode: str = "truncate",
    upper: float = 2.0,
    lower: float | None = None,
    batch_normalize: bool = False,
    rs=None,
    rs_threshold=None,
    veto: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's ``bypass_mode`` loss: the rollout's log-probs stand in for the old policy's.

    ``old_logprobs`` here *are* the rollout (sampler) log-probs: verl's bypass mode skips the
    old-policy forward and corrects against the sampler directly (Liu et al. 2025, "When Speed
    Kills Stability"). First :func:`rollout_correction` of ``logprobs`` (detached) against
    ``old_logprobs`` with the given ``level`` / ``mode`` / ``upper`` / ``lower`` /
    ``batch_normalize`` / ``rs`` / ``rs_threshold`` / ``veto`` gives weights ``w`` and the kept
    tokens, then over the kept tokens only:

    * ``loss_type="ppo_clip"``: the clipped surrogate of :func:`fastppo.policy_loss` with ratio
      ``pi / pi_rollout`` (``clip_low``, ``clip_high``, ``dual_clip``; verl's vanilla applies its
      ``clip_ratio_c`` = 3 dual clip always). ``w`` is not applied: the ratio already is the
      importance weight (verl: "would be double-counting"); it still feeds the metrics.
    * ``loss_type="reinforce"``: ``-A * w * log pi`` (REINFORCE with detached truncated IS;
      ``w = 1`` when ``level`` is None), aggregated by ``agg``.

    ``is_weights`` (extra per-token weights from the caller; verl passes none here) multiply the
    per-token loss of either type.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (differentiable).
        old_logprobs: ``[B, T]`` the rollout engine's log-probs of the sampled tokens.
        advantages, mask, is_weights: ``[B, T]``, as :func:`fastppo.policy_loss`.
    Returns:
        ``(loss, stats)``: float32 0-d loss; ``stats``: ``approx_kl`` (masked mean of ``rollout
        - current`` over kept tokens, verl's ``actor/ppo_kl``), with ``ppo_clip`` also
        ``clipfrac`` and ``clipfrac_lower``, and every ``rollout_corr/...`` metric of
        :func:`rollout_correction`.
    """
    if loss_type not in BYPASS_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(BYPASS_LOSS_TYPES)}")
    if not isinstance(logprobs, torch.Tensor):
        raise ValueError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    weights, keep, rc_metrics = rollout_correction(
        logprobs.detach(), old_logprobs, mask, level=level, mode=mode, upper=upper, lower=lower,
        batch_normalize=batch_normalize, rs=rs, rs_threshold=rs_threshold, veto=veto,
    )
    if loss_type == "ppo_clip":
        loss, stats = policy_loss(logprobs, old_logprobs, advantages, keep, clip_low=clip_low, clip_high=clip_high,
                                  dual_clip=dual_clip, agg=agg, is_weights=is_weights)
    else:
        if not isinstance(advantages, torch.Tensor) or advantages.shape != logprobs.shape:
            raise ValueError(f"advantages must be a tensor of logprobs' shape {list(logprobs.shape)}")
        if is_weights is not None and (not isinstance(is_weights, torch.Tensor) or is_weights.shape != logprobs.shape):
            raise ValueError(f"is_weights must be None or a tensor of logprobs' shape {list(logprobs.shape)}")
        # Selected, not multiplied: a NaN at a dropped position reaches neither loss nor gradient.
        lp = torch.where(keep, logprobs.float(), 0.0)
        coef = torch.where(keep, advantages.detach().float(), 0.0)
        if weights is not None:
            coef = coef * torch.where(keep, weights, 0.0)
        if is_weights is not None:
            coef = coef * torch.where(keep, is_weights.detach().float(), 0.0)
        loss = aggregate(-coef * lp, keep, agg)
        # verl's REINFORCE reports the unclamped mean of rollout - current as actor/ppo_kl.
        old = torch.where(keep, old_logprobs.detach().float(), 0.0)
        stats = {"approx_kl": (old - lp.detach()).sum() / keep.sum().clamp_min(1)}
    stats.update(rc_metrics)
    return loss, stats
