"""Plain-PyTorch references of the sequence-level and covariance-selection policy losses.

verl 0.9.1's ``gspo``, ``geo_mean``, ``clip_cov`` and ``kl_cov``. They are re-exported by
``fastppo.reference`` (``fastppo.reference.gspo_loss`` ...), like every other reference: same
conventions (float32 out, float64 in -> float64 out, masked positions replaced by 0 before any
arithmetic, NaN at a valid position propagates, an empty mask gives 0), the unvalidated body
reachable as ``.raw``. The input checks live here too, next to the formulas they guard.
"""

from __future__ import annotations

import torch

from ._checks import _loss_common, _number
from .reference import _masked_fraction, _validated, aggregate, compute_dtype, valid_positions

__all__ = ["gspo_loss", "geo_mean_loss", "clip_cov_loss", "kl_cov_loss"]

# exp() of a GSPO log-ratio above this is clamped (verl's constant: exp(10) ~ 2.2e4).
GSPO_LOG_RATIO_MAX = 10.0
# geo_mean's geometric mean of is_weights: log(w + this), verl's guard against log(0).
GEO_LOG_EPS = 1e-10


# --------------------------------------------------------------------------------------------
# Input checks (both backends run these once, through the public op)
# --------------------------------------------------------------------------------------------


def _common(logprobs, old_logprobs, advantages, mask, agg, is_weights, clip_low, clip_high) -> None:
    _loss_common(
        [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
         ("is_weights", is_weights)],
        mask,
        agg,
    )
    _number("clip_low", clip_low, low=0.0)
    _number("clip_high", clip_high, low=0.0, allow_none=True)


def check_gspo(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None,
               clip_low=0.2, clip_high=None, dual_clip=None, seq_grad=False) -> None:
    _common(logprobs, old_logprobs, advantages, mask, agg, is_weights, clip_low, clip_high)
    _number("clip_low", clip_low, low=0.0, high=1.0)
    _number("dual_clip", dual_clip, low=1.0, low_open=True, allow_none=True)
    if not isinstance(seq_grad, bool):
        raise ValueError(f"seq_grad must be a bool, got {seq_grad!r}")


def check_geo_mean(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None,
                   clip_low=0.2, clip_high=None) -> None:
    _common(logprobs, old_logprobs, advantages, mask, agg, is_weights, clip_low, clip_high)


def check_clip_cov(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None,
                   clip_low=0.2, clip_high=None, clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0,
                   generator=None) -> None:
    _common(logprobs, old_logprobs, advantages, mask, agg, is_weights, clip_low, clip_high)
    _number("clip_low", clip_low, low=0.0, high=1.0)
    _number("clip_cov_ratio", clip_cov_ratio, low=0.0, low_open=True, high=1.0)
    _number("clip_cov_lb", clip_cov_lb)
    _number("clip_cov_ub", clip_cov_ub)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_kl_cov(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None,
                 kl_cov_ratio=0.0002, ppo_kl_coef=0.1) -> None:
    _loss_common(
        [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
         ("is_weights", is_weights)],
        mask,
        agg,
    )
    _number("kl_cov_ratio", kl_cov_ratio, low=0.0, low_open=True, high=1.0)
    _number("ppo_kl_coef", ppo_kl_coef)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def _zeroed(t, valid, dtype):
    # where(), not multiplication: a masked position may hold NaN or inf, and 0 * NaN = NaN would
    # reach the value and the gradient.
    return torch.where(valid, t.to(dtype), 0.0)


def _zero(like):
    return torch.zeros((), dtype=like.dtype, device=like.device)


@_validated(check_gspo)
def gspo_loss(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None,
              clip_low=0.2, clip_high=None, dual_clip=None, seq_grad=False):
    """GSPO: the clipped surrogate on a sequence-level importance ratio (verl's ``gspo``).

    Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071 (GSPO-token form)::

        n_b     = number of valid tokens of row b
        s_b     = sum_t (lp - old)[b, t] / max(n_b, 1)             sequence log-ratio (detached)
        r[b, t] = exp(min(lp[b, t] - sg(lp[b, t]) + sg(s_b), 10))    value exp(s_b); d r / d lp = r
        L[b, t] = max(-A * r, -A * clamp(r, 1 - clip_low, 1 + clip_high))   (* is_weights)
        dual clip (c > 1), tokens with A < 0:   L[b, t] = min(L[b, t], -A * c)
        loss    = aggregate(L, mask, agg)

    The sequence ratio is the geometric mean of the token ratios; each token's gradient is its own
    token's (the stop-gradients), scaled by the sequence ratio. ``seq_grad=True`` takes the
    gradient through the sequence mean instead, r[b, t] = exp(min(s_b, 10)) with s_b not detached:
    the paper's sequence-level GSPO, OpenRLHF's and TRL's form (the same gradient as the token form
    when A is constant along each row). ``dual_clip`` is not in verl's GSPO (OpenRLHF has it). clip_high defaults to clip_low
    (verl: ``clip_ratio_low`` / ``clip_ratio_high``); ``agg`` defaults to ``seq-mean-token-mean``,
    the paper's and verl's default for this loss. Statistics (verl's metric names in brackets):
    ``clipfrac`` (``pg_clipfrac``, valid tokens whose clipped term is strictly larger),
    ``clipfrac_lower`` (0 without dual clip, as in verl; else valid tokens with A < 0 whose dual
    bound is strictly smaller), ``approx_kl`` (``ppo_kl``, masked mean of old - lp).

    Args:
        logprobs: ``[B, T]`` current log-probs (differentiable); old_logprobs, advantages,
        is_weights (optional): ``[B, T]``; mask: ``[B, T]``, valid where ``!= 0``.
    Returns:
        ``(loss, stats)``: 0-d float32 loss and a dict of detached 0-d float32 statistics.
    """
    dtype = compute_dtype(logprobs, old_logprobs, advantages, is_weights)
    clip_high = clip_low if clip_high is None else clip_high
    valid = valid_positions(mask)
    lp = _zeroed(logprobs, valid, dtype)
    adv = _zeroed(advantages, valid, dtype)
    log_ratio = lp - _zeroed(old_logprobs, valid, dtype)
    n = valid.to(dtype).sum(dim=-1)
    seq_log_ratio = log_ratio.sum(dim=-1) / n.clamp(min=1)
    if seq_grad:
        token_log_ratio = seq_log_ratio.unsqueeze(-1).expand_as(lp)
    else:
        token_log_ratio = lp - lp.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = torch.exp(torch.clamp(token_log_ratio, max=GSPO_LOG_RATIO_MAX))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    clipfrac_lower = torch.zeros((), dtype=dtype, device=lp.device)
    if dual_clip is not None:
        lower_bound = -adv * dual_clip
        negative = adv < 0
        clipfrac_lower = _masked_fraction((per_token > lower_bound) & negative, mask, dtype)
        per_token = torch.where(negative, torch.minimum(per_token, lower_bound), per_token)
    if is_weights is not None:
        per_token = per_token * _zeroed(is_weights, valid, dtype)
    loss = aggregate.raw(per_token, mask, agg)
    stats = {
        "clipfrac": _masked_fraction(clipped > unclipped, mask, dtype).detach(),
        "clipfrac_lower": clipfrac_lower.detach(),
        "approx_kl": aggregate.raw(-log_ratio.detach(), mask, "token-mean"),
    }
    return loss, stats


def seq_mean(per_row: torch.Tensor, n: torch.Tensor, T: int, agg: str) -> torch.Tensor:
    """``aggregate`` of a per-sequence loss broadcast to every valid token of its row.

    ``per_row``: ``[B]``, ``n``: ``[B]`` valid-token counts. token-mean weighs a row by its
    length, the seq-mean modes weigh every row with a valid token alike.
    """
    rows = n > 0
    weighted = torch.where(rows, per_row * n, 0.0)
    n_rows = rows.to(per_row.dtype).sum().clamp(min=1)
    if agg == "token-mean":
        return weighted.sum() / n.sum().clamp(min=1)
    if agg == "token-sum":
        return weighted.sum()
    if agg == "seq-mean-token-mean":
        return torch.where(rows, per_row, 0.0).sum() / n_rows
    out = weighted.sum() / n_rows
    return out / max(T, 1) if agg == "seq-mean-token-sum-norm" else out


@_validated(check_geo_mean)
def geo_mean_loss(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None,
                  clip_low=0.2, clip_high=None):
    """GMPO: the geometric mean of token-clipped ratios per sequence (verl's ``geo_mean``).

    Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv:2507.20673::

        d[b, t] = lp - old,   sgn = sign(A)
        c[b, t] = sgn * min(sgn * d, sgn * clamp(d, -clip_low, clip_high))   (clip in log space)
        n_b     = number of valid tokens of row b
        R_b     = exp(sum_t c[b, t] / n_b),   A_b = sum_t A[b, t] / n_b
        W_b     = exp(sum_t log(is_weights + 1e-10) / n_b)     (1 without is_weights)
        P_b     = -A_b * R_b * W_b
        loss    = aggregate of P_b broadcast to the valid tokens of row b

    ``agg`` (default ``seq-mean-token-mean``: the mean of P_b over rows with a valid token, the
    paper's objective). verl ignores ``loss_agg_mode`` here and takes the mean over ALL B rows,
    an empty row counting as 0: that is ``seq-mean-token-mean`` times (rows with a valid token) / B,
    which is what the verl adapter returns; the two agree whenever no row is empty. The other modes
    weigh P_b as a loss repeated on each token (token-mean: by row length). verl divides by
    ``n_b + 1e-8``, which equals n_b in float32. Statistics: ``clipfrac`` (valid tokens with A > 0
    whose d was clipped), ``clipfrac_lower`` (the same with A < 0), ``approx_kl`` (mean of -d).

    Args and returns as :func:`gspo_loss`.
    """
    dtype = compute_dtype(logprobs, old_logprobs, advantages, is_weights)
    clip_high = clip_low if clip_high is None else clip_high
    valid = valid_positions(mask)
    lp = _zeroed(logprobs, valid, dtype)
    adv = _zeroed(advantages, valid, dtype)
    log_ratio = lp - _zeroed(old_logprobs, valid, dtype)
    sgn = torch.sign(adv)
    log_ratio_clamped = torch.clamp(log_ratio, -clip_low, clip_high)
    clipped_log_ratio = sgn * torch.minimum(sgn * log_ratio, sgn * log_ratio_clamped)
    n = valid.to(dtype).sum(dim=-1)
    inv_n = 1.0 / n.clamp(min=1)
    seq_ratio = torch.exp(clipped_log_ratio.sum(dim=-1) * inv_n)
    seq_adv = adv.sum(dim=-1) * inv_n
    per_row = -seq_adv * seq_ratio
    if is_weights is not None:
        log_w = torch.where(valid, torch.log(is_weights.to(dtype) + GEO_LOG_EPS), 0.0)
        per_row = per_row * torch.exp(log_w.sum(dim=-1) * inv_n)
    loss = seq_mean(per_row, n, logprobs.shape[1], agg)
    was_clipped = log_ratio != log_ratio_clamped
    stats = {
        "clipfrac": _masked_fraction(was_clipped & (adv > 0), mask, dtype).detach(),
        "clipfrac_lower": _masked_fraction(was_clipped & (adv < 0), mask, dtype).detach(),
        "approx_kl": aggregate.raw(-log_ratio.detach(), mask, "token-mean"),
    }
    return loss, stats


def _masked_mean_like_verl(x: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean`` with the mask made 0/1 in its own dtype: sum(x * m) / (sum(m) + 1e-8).

    Same dtype promotion as verl (bf16 values times a float32 mask sum in float32), so that the
    covariance, and with it the set of candidate tokens, is verl's to the bit.
    """
    m = valid.to(mask.dtype) if mask.dtype.is_floating_point else valid
    return (torch.where(valid, x, 0.0) * m).sum() / (m.sum() + 1e-8)


def clip_cov_selection(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, clip_cov_ratio,
                       clip_cov_lb, clip_cov_ub, generator=None) -> torch.Tensor:
    """The ``[B, T]`` bool tokens that Clip-Cov drops from the loss (PyTorch, host-synchronising).

    In the inputs' own dtype, as verl computes it, so that the same tokens are candidates:
    cov = (A - mean A) * (lp - mean lp) over valid tokens; candidates are the valid tokens whose
    ratio exp(lp - old) is not clipped and lb < cov < ub, in row-major order; a
    ``torch.randperm(#candidates)`` (on ``generator``, by default torch's global CPU generator,
    exactly verl's single draw) picks max(int(ratio * #valid), 1) of them.
    """
    valid = valid_positions(mask)
    lp = torch.where(valid, logprobs, 0.0).detach()
    adv = torch.where(valid, advantages, 0.0).detach()
    ratio = torch.exp(lp - torch.where(valid, old_logprobs, 0.0).detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    cov = (adv - _masked_mean_like_verl(adv, valid, mask)) * (lp - _masked_mean_like_verl(lp, valid, mask))
    candidate = valid & ~(clipped > unclipped) & (cov < clip_cov_ub) & (cov > clip_cov_lb)
    drop = torch.zeros_like(valid)
    n_valid = int(valid.sum().item())
    clip_num = max(int(clip_cov_ratio * n_valid), 1)
    idx = torch.nonzero(candidate)
    if len(idx) > 0:
        perm = torch.randperm(len(idx), generator=generator)
        idx = idx[perm[: min(clip_num, len(idx))].to(idx.device)]
        drop[idx[:, 0], idx[:, 1]] = True
    return drop


@_validated(check_clip_cov)
def clip_cov_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None,
                  clip_low=0.2, clip_high=None, clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0,
                  generator=None):
    """Clip-Cov: PPO's clipped surrogate with a few high-covariance tokens dropped (verl's ``clip_cov``).

    Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models", arXiv:2505.22617::

        r[b, t] = exp(lp - old)                                    (no clamp, as verl)
        L[b, t] = max(-A * r, -A * clamp(r, 1 - clip_low, 1 + clip_high)) * (1 - drop[b, t])
        loss    = aggregate(L * is_weights, mask, agg)

    drop: a random choice of max(int(clip_cov_ratio * #valid), 1) tokens among the valid,
    unclipped tokens with clip_cov_lb < (A - mean A)(lp - mean lp) < clip_cov_ub (see
    :func:`clip_cov_selection`). The selection (covariance, nonzero, randperm) stays in PyTorch
    on every backend and synchronises with the host; with the same torch seed (or ``generator``)
    it draws the tokens verl draws. Statistics: ``clipfrac`` (verl's ``pg_clipfrac``: the
    fraction of valid tokens dropped), ``clipfrac_lower`` (0), ``approx_kl`` (mean of old - lp).
    Options are verl's ``clip_ratio_low/high``, ``clip_cov_ratio``, ``clip_cov_lb``,
    ``clip_cov_ub``, with verl's defaults.

    Args and returns as :func:`gspo_loss`; ``generator``: optional ``torch.Generator`` (CPU).
    """
    dtype = compute_dtype(logprobs, old_logprobs, advantages, is_weights)
    clip_high = clip_low if clip_high is None else clip_high
    valid = valid_positions(mask)
    drop = clip_cov_selection(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                              clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub,
                              generator=generator)
    lp = _zeroed(logprobs, valid, dtype)
    adv = _zeroed(advantages, valid, dtype)
    log_ratio = lp - _zeroed(old_logprobs, valid, dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.where(drop, 0.0, torch.maximum(unclipped, clipped))
    if is_weights is not None:
        per_token = per_token * _zeroed(is_weights, valid, dtype)
    loss = aggregate.raw(per_token, mask, agg)
    stats = {
        "clipfrac": _masked_fraction(drop, mask, dtype),
        "clipfrac_lower": _zero(loss),
        "approx_kl": aggregate.raw(-log_ratio.detach(), mask, "token-mean"),
    }
    return loss, stats


def kl_cov_selection(logprobs, advantages, valid, *, kl_cov_ratio) -> torch.Tensor:
    """The ``[B, T]`` bool tokens that KL-Cov penalises (PyTorch, host-synchronising).

    As verl: the valid tokens' A and lp (row-major, moved to the CPU, in their own dtype),
    cov = (A - mean A) * (lp - mean lp), the top max(1, int(#valid * kl_cov_ratio)) by
    ``torch.topk``. No valid token: none.
    """
    n_valid = int(valid.sum().item())
    chosen = torch.zeros_like(valid)
    if n_valid == 0:
        return chosen
    adv = advantages[valid].detach().reshape(-1).cpu()
    lp = logprobs[valid].detach().reshape(-1).cpu()
    cov = (adv - adv.mean()) * (lp - lp.mean())
    top = torch.topk(cov, max(1, int(n_valid * kl_cov_ratio)), largest=True).indices
    flat = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    chosen.view(-1)[flat[top.to(flat.device)]] = True
    return chosen


@_validated(check_kl_cov)
def kl_cov_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None,
                kl_cov_ratio=0.0002, ppo_kl_coef=0.1):
    """KL-Cov: the unclipped surrogate plus |log ratio| on the highest-covariance tokens (verl's ``kl_cov``).

    Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models", arXiv:2505.22617::

        d = lp - old,   r = exp(d)                                 (no clamp, as verl)
        L[b, t] = -A * r + ppo_kl_coef * |d| * chosen[b, t]
        loss    = aggregate(L * is_weights, mask, agg)

    chosen: the top max(1, int(kl_cov_ratio * #valid)) valid tokens by (A - mean A)(lp - mean lp)
    (see :func:`kl_cov_selection`; PyTorch on every backend, host-synchronising, no randomness).
    Statistics: ``approx_kl`` (verl's ``ppo_kl`` here: the masked mean of |d|), ``clipfrac`` and
    ``clipfrac_lower`` (0: nothing is clipped; kept so every objective returns the same keys).
    Options are verl's ``kl_cov_ratio`` and ``ppo_kl_coef`` with verl's config defaults.

    Args and returns as :func:`gspo_loss`.
    """
    dtype = compute_dtype(logprobs, old_logprobs, advantages, is_weights)
    valid = valid_positions(mask)
    chosen = kl_cov_selection(logprobs, advantages, valid, kl_cov_ratio=kl_cov_ratio)
    lp = _zeroed(logprobs, valid, dtype)
    adv = _zeroed(advantages, valid, dtype)
    log_ratio = lp - _zeroed(old_logprobs, valid, dtype)
    per_token = -adv * torch.exp(log_ratio)
    per_token = torch.where(chosen, per_token + ppo_kl_coef * log_ratio.abs(), per_token)
    if is_weights is not None:
        per_token = per_token * _zeroed(is_weights, valid, dtype)
    loss = aggregate.raw(per_token, mask, agg)
    stats = {
        "clipfrac": _zero(loss),
        "clipfrac_lower": _zero(loss),
        "approx_kl": aggregate.raw(log_ratio.detach().abs(), mask, "token-mean"),
    }
    return loss, stats



# Part of ``fastppo.reference`` like every other reference (``fastppo.reference.gspo_loss`` ...,
# what the dispatcher falls back to), attached from here so that the two modules import in one
# direction only (``fastppo/__init__`` imports this module through ``fastppo.seq_objectives``).
from . import reference as _reference  # noqa: E402

for _name in __all__:
    setattr(_reference, _name, globals()[_name])
    if _name not in _reference.__all__:
        _reference.__all__.append(_name)
del _name
