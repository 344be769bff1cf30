"""Triton kernels of the sequence-level policy losses: ``gspo_loss`` and ``geo_mean_loss``.

Both are a per-row reduction first (the sequence log-ratio), then per-token arithmetic, then an
aggregation over rows. The kernels do every pass over the ``[B, T]`` tokens; what is left is
O(B) arithmetic on per-row sums, done in PyTorch (a handful of ``[B]`` elementwise ops, no host
synchronisation), which also carries autograd from the loss back to the per-row sums::

    forward   one program per row, looping over T in BLOCK_T slices:
              gspo:     pass 1  n_b, sum d          (d = lp - old; s_b = sum d / max(n_b, 1))
                        pass 2  sum L, #clipped     (L the clipped surrogate on exp(min(s_b, 10)))
              geo_mean: pass 1  n_b, sum c, sum A, sum log(w + 1e-10), sum d, #clipped (A>0, A<0)
              -> a [B, 8] float32 table of row sums (column meanings in ROW_COLUMNS)
    backward  one program per (row, BLOCK_T slice): d lp = g_b * (the token's own derivative),
              g_b = d loss / d (the row's differentiable sum: sum L for gspo, sum c for geo_mean)

The per-token derivative is local in both losses: GSPO's stop-gradients make d r / d lp = r, and
GMPO's sequence ratio is exp(sum c / n), whose derivative in lp_t is that of c_t scaled by the
row. GSPO's sequence form (``seq_grad=True``, OpenRLHF's and TRL's) differentiates through the
row mean: the forward also sums d L / d r over the row, and the backward spreads it as
g_b * that sum * r_b / n_b. Trust rules as in kernels/ppo_loss.py: masked positions become 0 right after the load (a NaN
there never reaches an output or a gradient), NaN at a valid position propagates (NaN-propagating
max/min/clamp; ``lp - lp`` keeps GSPO's NaN for an infinite log-prob as PyTorch does),
B = 0 or T = 0 gives a 0 loss without a launch.

Layers, top to bottom: the ``@triton.jit`` kernels; the launchers; the autograd Function; the
public functions with the reference's signatures (``fastppo.reference.gspo_loss`` ...).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastppo import reference
from fastppo._seq_reference import GEO_LOG_EPS, GSPO_LOG_RATIO_MAX, seq_mean
from fastppo.kernels._common import new_output, overriding
from fastppo.kernels.ppo_loss import _clamp_nan, _load_valid, _mask_arg, _max_grads, _max_nan, _min_grad, _min_nan

MODES = {"gspo": 0, "geo_mean": 1}
NCOL = 8
_NCOL = tl.constexpr(NCOL)
# Columns of the [B, 8] row table each forward program writes (unused columns are written as 0).
ROW_COLUMNS = {
    "gspo": ("count", "loss_sum", "clipped", "log_ratio_sum", "seq_log_ratio", "dual_clipped",
             "dloss_dratio_sum (seq_grad)", "-"),
    "geo_mean": ("count", "clipped_log_ratio_sum", "adv_sum", "log_weight_sum", "log_ratio_sum",
                 "clipped_high", "clipped_low", "-"),
}
_LOG_RATIO_MAX = tl.constexpr(GSPO_LOG_RATIO_MAX)
_LOG_EPS = tl.constexpr(GEO_LOG_EPS)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _sign(a):
    """torch.sign: NaN for NaN (a * 0), 0 for +-0."""
    return tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, a * 0.0))


@triton.jit
def _gspo_token(lp, adv, s, clip_lo, clip_hi, SEQ: tl.constexpr):
    """(log r, r, -A r, -A clamp(r)) of GSPO's token ratio r = exp(min((lp - lp) + s, 10))
    (SEQ, the sequence form: r = exp(min(s, 10)))."""
    if SEQ:
        log_r = tl.zeros_like(lp) + s
    else:
        # lp - lp, not 0: an infinite lp gives NaN here, as lp - sg(lp) does in PyTorch.
        log_r = (lp - lp) + s
    r = tl.exp(_min_nan(log_r, _LOG_RATIO_MAX))
    return log_r, r, -adv * r, -adv * _clamp_nan(r, 1.0 - clip_lo, 1.0 + clip_hi)


@triton.jit
def _gspo_dual(pt, adv, dual_c, DUAL: tl.constexpr):
    """(the dual-clipped term, whether its bound was strictly smaller) for tokens with A < 0."""
    if DUAL:
        lower = -adv * dual_c
        neg = adv < 0
        return tl.where(neg, _min_nan(pt, lower), pt), neg & (pt > lower)
    else:
        return pt, tl.zeros_like(pt) != 0.0


@triton.jit
def _gspo_grad_r(g, adv, r, pg1, pg2, clip_lo, clip_hi, dual_c, DUAL: tl.constexpr):
    """d L / d r for an upstream g of the token's loss L (autograd's rules for max, min, clamp)."""
    if DUAL:
        lower = -adv * dual_c
        g = tl.where(adv < 0, _min_grad(g, _max_nan(pg1, pg2), lower), g)
    ga, gb = _max_grads(g, pg1, pg2)
    in_band = (r >= 1.0 - clip_lo) & (r <= 1.0 + clip_hi)
    return ga * -adv + tl.where(in_band, gb * -adv, 0.0)


@triton.jit
def _geo_token(d, adv, clip_lo, clip_hi):
    """(sign(A), clamp(d), c) of GMPO: c = sgn * min(sgn * d, sgn * clamp(d, -clip_lo, clip_hi))."""
    sgn = _sign(adv)
    dc = _clamp_nan(d, -clip_lo, clip_hi)
    return sgn, dc, sgn * _min_nan(sgn * d, sgn * dc)


@triton.jit
def _slice_valid(mask_ptr, base, offs, T):
    """(in bounds, valid) for the positions offs of the row starting at base: valid is the
    contract's mask != 0, never true past T."""
    inb = offs < T
    return inb, (tl.load(mask_ptr + base + offs, mask=inb, other=0) != 0) & inb


@triton.jit
def _row_out(c0, c1, c2, c3, c4, c5, c6):
    """The row's 8 table columns as one vector (one 32-byte store; column 7 is 0)."""
    k = tl.arange(0, _NCOL)
    out = tl.where(k == 0, c0, tl.where(k == 1, c1, tl.where(k == 2, c2, tl.where(k == 3, c3, 0.0))))
    return tl.where(k == 4, c4, tl.where(k == 5, c5, tl.where(k == 6, c6, out)))


@triton.jit
def _seq_fwd_kernel(lp_ptr, old_ptr, adv_ptr, w_ptr, mask_ptr, row_ptr, T, clip_lo, clip_hi, dual_c,
                    MODE: tl.constexpr, HAS_W: tl.constexpr, DUAL: tl.constexpr, SEQ: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    cols = tl.arange(0, BLOCK_T)
    zero = tl.zeros([BLOCK_T], dtype=tl.float32)
    count = zero
    dsum = zero
    if MODE == 0:
        for start in range(0, T, BLOCK_T):
            offs = start + cols
            inb, valid = _slice_valid(mask_ptr, base, offs, T)
            lp = _load_valid(lp_ptr, base + offs, inb, valid)
            old = _load_valid(old_ptr, base + offs, inb, valid)
            count += valid.to(tl.float32)
            dsum += lp - old
        n = tl.sum(count, axis=0)
        d_total = tl.sum(dsum, axis=0)
        s = d_total / _max_nan(n, 1.0)
        lsum = zero
        csum = zero
        lowsum = zero
        ksum = zero
        for start in range(0, T, BLOCK_T):
            offs = start + cols
            inb, valid = _slice_valid(mask_ptr, base, offs, T)
            lp = _load_valid(lp_ptr, base + offs, inb, valid)
            adv = _load_valid(adv_ptr, base + offs, inb, valid)
            _, r, pg1, pg2 = _gspo_token(lp, adv, s, clip_lo, clip_hi, SEQ)
            pt, low = _gspo_dual(_max_nan(pg1, pg2), adv, dual_c, DUAL)
            w = zero + 1.0
            if HAS_W:
                w = _load_valid(w_ptr, base + offs, inb, valid)
                pt = pt * w
            lsum += tl.where(valid, pt, 0.0)
            csum += tl.where(valid & (pg2 > pg1), 1.0, 0.0)
            lowsum += tl.where(valid & low, 1.0, 0.0)
            if SEQ:
                # Sequence form: every token's loss depends on every token of the row through
                # s_b, so the backward needs the row's sum of d L / d r (the same r on the row).
                ksum += tl.where(valid, _gspo_grad_r(w, adv, r, pg1, pg2, clip_lo, clip_hi, dual_c, DUAL), 0.0)
        out = _row_out(n, tl.sum(lsum, axis=0), tl.sum(csum, axis=0), d_total, s, tl.sum(lowsum, axis=0),
                       tl.sum(ksum, axis=0))
    else:
        csum = zero
        asum = zero
        wsum = zero
        hi_cnt = zero
        lo_cnt = zero
        for start in range(0, T, BLOCK_T):
            offs = start + cols
            inb, valid = _slice_valid(mask_ptr, base, offs, T)
            lp = _load_valid(lp_ptr, base + offs, inb, valid)
            old = _load_valid(old_ptr, base + offs, inb, valid)
            adv = _load_valid(adv_ptr, base + offs, inb, valid)
            d = lp - old
            _, dc, c = _geo_token(d, adv, clip_lo, clip_hi)
            count += valid.to(tl.float32)
            dsum += d
            csum += tl.where(valid, c, 0.0)
            asum += adv
            was_clipped = valid & (d != dc)
            hi_cnt += tl.where(was_clipped & (adv > 0), 1.0, 0.0)
            lo_cnt += tl.where(was_clipped & (adv < 0), 1.0, 0.0)
            if HAS_W:
                w = _load_valid(w_ptr, base + offs, inb, valid)
                wsum += tl.where(valid, tl.log(w + _LOG_EPS), 0.0)
        out = _row_out(tl.sum(count, axis=0), tl.sum(csum, axis=0), tl.sum(asum, axis=0), tl.sum(wsum, axis=0),
                       tl.sum(dsum, axis=0), tl.sum(hi_cnt, axis=0), tl.sum(lo_cnt, axis=0))
    tl.store(row_ptr + b.to(tl.int64) * _NCOL + tl.arange(0, _NCOL), out)


@triton.jit
def _seq_bwd_kernel(lp_ptr, old_ptr, adv_ptr, w_ptr, mask_ptr, row_ptr, g_ptr, dlp_ptr, T, clip_lo, clip_hi, dual_c,
                    MODE: tl.constexpr, HAS_W: tl.constexpr, DUAL: tl.constexpr, SEQ: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    base = b.to(tl.int64) * T
    inb, valid = _slice_valid(mask_ptr, base, offs, T)
    g = tl.load(g_ptr + b)
    lp = _load_valid(lp_ptr, base + offs, inb, valid)
    adv = _load_valid(adv_ptr, base + offs, inb, valid)
    if MODE == 0:
        row = row_ptr + b.to(tl.int64) * _NCOL
        s = tl.load(row + 4)
        log_r, r, pg1, pg2 = _gspo_token(lp, adv, s, clip_lo, clip_hi, SEQ)
        if SEQ:
            # d s_b / d lp_t = 1 / n_b: the row's summed d L / d r, spread evenly.
            gr = tl.zeros([BLOCK_T], dtype=tl.float32) + g * tl.load(row + 6) / _max_nan(tl.load(row), 1.0)
        else:
            gpt = tl.zeros([BLOCK_T], dtype=tl.float32) + g
            if HAS_W:
                gpt = gpt * _load_valid(w_ptr, base + offs, inb, valid)
            gr = _gspo_grad_r(gpt, adv, r, pg1, pg2, clip_lo, clip_hi, dual_c, DUAL)
        dlp = tl.where(log_r <= _LOG_RATIO_MAX, gr * r, 0.0)
    else:
        old = _load_valid(old_ptr, base + offs, inb, valid)
        d = lp - old
        sgn, dc, _ = _geo_token(d, adv, clip_lo, clip_hi)
        up = g * sgn
        a1 = sgn * d
        a2 = sgn * dc
        in_band = (d >= -clip_lo) & (d <= clip_hi)
        dlp = _min_grad(up, a1, a2) * sgn + tl.where(in_band, _min_grad(up, a2, a1) * sgn, 0.0)
    tl.store(dlp_ptr + base + offs, tl.where(valid, dlp, 0.0).to(dlp_ptr.dtype.element_ty), mask=inb)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


_BLOCK_OVERRIDE: dict[str, int] = {}


def block_sizes(**sizes: int) -> contextlib.AbstractContextManager[None]:
    """Force ``block_t`` (a power of two): tests make rows span several slices in the interpreter."""
    return overriding(_BLOCK_OVERRIDE, sizes)


def _block_t(T: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps): up to 1024 tokens per slice, 4 per thread (16-byte fp32 loads)."""
    block = _BLOCK_OVERRIDE.get("block_t") or min(1024, max(16, triton.next_power_of_2(T)))
    return block, max(1, min(8, block // 128))


def _args(lp, old, adv, w, mask):
    m = _mask_arg(mask)
    return [t.contiguous() for t in (lp, old, adv)] + [m if w is None else w.contiguous(), m]


class Config(NamedTuple):
    """One call's switches: the loss (MODES), its clip range, GSPO's dual clip and gradient form."""

    mode: int
    clip_lo: float
    clip_hi: float
    dual_c: float = 0.0
    dual: bool = False
    seq: bool = False


def _row_sums(lp, old, adv, w, mask, cfg: Config) -> torch.Tensor:
    """Launch the forward: the ``[B, 8]`` float32 row table."""
    B, T = lp.shape
    table = new_output((B, NCOL), torch.float32, lp.device)
    block, warps = _block_t(T)
    _seq_fwd_kernel[(B,)](*_args(lp, old, adv, w, mask), table, T, cfg.clip_lo, cfg.clip_hi, cfg.dual_c,
                          MODE=cfg.mode, HAS_W=w is not None, DUAL=cfg.dual, SEQ=cfg.seq, BLOCK_T=block,
                          num_warps=warps)
    return table


def _row_grad(lp, old, adv, w, mask, table, g, cfg: Config) -> torch.Tensor:
    """Launch the backward: d lp (in lp's dtype) for the upstream ``[B]`` gradient ``g``."""
    B, T = lp.shape
    dlp = new_output((B, T), lp.dtype, lp.device)
    block, warps = _block_t(T)
    _seq_bwd_kernel[(B, triton.cdiv(T, block))](*_args(lp, old, adv, w, mask), table,
                                                g.to(torch.float32).contiguous(), dlp, T, cfg.clip_lo,
                                                cfg.clip_hi, cfg.dual_c, MODE=cfg.mode, HAS_W=w is not None,
                                                DUAL=cfg.dual, SEQ=cfg.seq, BLOCK_T=block, num_warps=warps)
    return dlp


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class _RowSums(torch.autograd.Function):
    """(the row's differentiable sum [B], the row table [B, 8]); differentiable in lp only."""

    @staticmethod
    def forward(ctx, lp, old, adv, w, mask, cfg):
        B, T = lp.shape
        if B * T == 0:
            table = torch.zeros((B, NCOL), dtype=torch.float32, device=lp.device)
        else:
            table = _row_sums(lp, old, adv, w, mask, cfg)
        ctx.mark_non_differentiable(table)
        ctx.cfg = cfg
        ctx.save_for_backward(lp, old, adv, w, mask, table)
        return table[:, 1].clone(), table

    @staticmethod
    def backward(ctx, g, _g_table):
        lp, old, adv, w, mask, table = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        if lp.numel() == 0:
            return torch.zeros_like(lp), *(None,) * 5
        return _row_grad(lp, old, adv, w, mask, table, g, ctx.cfg), *(None,) * 5


# --------------------------------------------------------------------------------------------
# Public ops (signatures of fastppo.reference; inputs already validated)
# --------------------------------------------------------------------------------------------


def _use_reference(*tensors) -> bool:
    # float64 is the tests' ground-truth dtype, not a kernel dtype.
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _fraction(count: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return count.sum() / n.sum().clamp(min=1)


def gspo_loss(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None,
              clip_low=0.2, clip_high=None, dual_clip=None, seq_grad=False):
    """Kernel of ``fastppo.gspo_loss`` (formulas in ``fastppo.reference.gspo_loss``).

    Args:
        logprobs, old_logprobs, advantages, is_weights (optional): ``[B, T]`` fp32/bf16/fp16;
        mask: ``[B, T]`` any dtype, valid where ``!= 0``.
    Returns:
        ``(loss, stats)``: 0-d float32 loss (differentiable in ``logprobs``) and detached 0-d
        float32 ``clipfrac``, ``clipfrac_lower`` (0), ``approx_kl``.
    """
    if _use_reference(logprobs, old_logprobs, advantages, is_weights):
        return reference.gspo_loss.raw(logprobs, old_logprobs, advantages, mask, agg=agg, is_weights=is_weights,
                                       clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                                       seq_grad=seq_grad)
    hi = clip_low if clip_high is None else clip_high
    cfg = Config(MODES["gspo"], float(clip_low), float(hi), float(dual_clip or 0.0), dual_clip is not None,
                 bool(seq_grad))
    row_loss, table = _RowSums.apply(logprobs, old_logprobs, advantages, is_weights, mask, cfg)
    n = table[:, 0]
    loss = _aggregate_rows(row_loss, n, logprobs.shape[1], agg)
    stats = {
        "clipfrac": _fraction(table[:, 2], n),
        "clipfrac_lower": _fraction(table[:, 5], n),
        "approx_kl": -_fraction(table[:, 3], n),
    }
    return loss, stats


def _aggregate_rows(row_sum: torch.Tensor, n: torch.Tensor, T: int, agg: str) -> torch.Tensor:
    """``aggregate`` from per-row sums and valid counts (same formulas as the reference's)."""
    rows = n > 0
    n_rows = rows.to(row_sum.dtype).sum().clamp(min=1)
    if agg == "token-mean":
        return row_sum.sum() / n.sum().clamp(min=1)
    if agg == "token-sum":
        return row_sum.sum()
    if agg == "seq-mean-token-mean":
        return torch.where(rows, row_sum / n.clamp(min=1), 0.0).sum() / n_rows
    out = row_sum.sum() / n_rows
    return out / max(T, 1) if agg == "seq-mean-token-sum-norm" else out


def geo_mean_loss(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None,
                  clip_low=0.2, clip_high=None):
    """Kernel of ``fastppo.geo_mean_loss`` (formulas in ``fastppo.reference.geo_mean_loss``).

    Args and returns as :func:`gspo_loss`; ``clipfrac_lower`` counts clipped tokens with A < 0.
    """
    if _use_reference(logprobs, old_logprobs, advantages, is_weights):
        return reference.geo_mean_loss.raw(logprobs, old_logprobs, advantages, mask, agg=agg,
                                           is_weights=is_weights, clip_low=clip_low, clip_high=clip_high)
    hi = clip_low if clip_high is None else clip_high
    c_sum, table = _RowSums.apply(logprobs, old_logprobs, advantages, is_weights, mask,
                                  Config(MODES["geo_mean"], float(clip_low), float(hi)))
    n = table[:, 0]
    inv_n = 1.0 / n.clamp(min=1)
    per_row = -(table[:, 2] * inv_n) * torch.exp(c_sum * inv_n)
    if is_weights is not None:
        per_row = per_row * torch.exp(table[:, 3] * inv_n)
    loss = seq_mean(per_row, n, logprobs.shape[1], agg)
    stats = {
        "clipfrac": _fraction(table[:, 5], n),
        "clipfrac_lower": _fraction(table[:, 6], n),
        "approx_kl": -_fraction(table[:, 4], n),
    }
    return loss, stats
