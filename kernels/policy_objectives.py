"""Triton kernels of the token-level policy objectives of verl 0.9.1: ``dppo_tv_loss``,
``dppo_kl_loss``, ``sapo_loss``, ``gpg_loss``, ``cispo_loss``, ``dro_loss`` (issue 19).

One kernel family for all six: a per-token term L[t] of (lp, old, A) selected at compile time
(``MODE``), times is_weights[t], reduced by one of verl's aggregation modes::

    loss = agg(L),   stats = masked means of (flag1, flag2, -log ratio)

Forward: ONE launch, the scheme of ``kernels/ppo_loss.py`` (whose helpers it imports): every
program reads a [BLOCK_R, BLOCK_T] tile once, computes the per-token terms and writes its partial
sums (term sum, valid count, two flag counts, KL sum, rows with a valid token) to its own slot of
a scratch table; the program that takes the last ticket folds the table in a fixed order
(bitwise reproducible), applies the aggregation and writes the 0-d loss, the statistics and the
per-token gradient scale. No host synchronisation.

Backward: ONE launch that recomputes dL/dlp per token from the inputs (the objectives' detached
factors make it a closed form: see each reference's docstring) and writes d logprobs in its
input's dtype.

Trust rules as in ``kernels/ppo_loss.py``: masked positions are replaced by 0 right after the
load; NaN / inf at a valid position give what PyTorch autograd of the float64 formula gives
(every max/min/clamp propagates NaN); B = 0 or T = 0 gives 0 without a launch.

Layers, top to bottom: the ``@triton.jit`` kernels; the launchers; the ``torch.autograd.Function``;
the public functions with the reference's signatures.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastppo import reference
from fastppo.kernels._common import new_output
from fastppo.kernels.ppo_loss import (
    AGG_CODES,
    _NPART,
    _agg_scale,
    _clamp_nan,
    _col,
    _fold_parts,
    _join_rows,
    _forward_buffers,
    _load_valid,
    _mask_arg,
    _max_nan,
    _min_nan,
    _sums,
    _ticket,
    _unpack,
    block_sizes,  # noqa: F401  (re-exported: tests force tiny tiles through it)
)

MODES = {"dppo_tv_loss": 0, "dppo_kl_loss": 1, "sapo_loss": 2, "gpg_loss": 3, "cispo_loss": 4, "dro_loss": 5}
# Order of the statistics vector the forward writes; every objective reports all three, under
# fastppo's names (verl's pg_clipfrac, pg_clipfrac_lower, ppo_kl), 0 for a fraction it has no
# clip for (sapo, gpg, dro; dppo's and cispo's lower fraction as verl's), so any objective's
# stats read the same.
STAT_NAMES = ("clipfrac", "clipfrac_lower", "approx_kl")


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _token(lp, old, adv, p0, p1, p2, MODE: tl.constexpr):
    """(L, dL/dlp, flag1, flag2, -log ratio) of one tile of valid-zeroed float32 inputs.

    p0, p1, p2: dppo: (clip_low, clip_high, clip_ratio_c); sapo: (tau_pos, tau_neg, -);
    cispo: (clip_low, clip_high, -); dro: (beta / 2, beta, -). flag1 counts into clipfrac,
    flag2 into clipfrac_lower. The arithmetic follows the reference's order, so that float32
    results agree to the last bit where no reduction is involved.
    """
    raw = lp - old
    log_ratio = _clamp_nan(raw, -20.0, 20.0)
    ratio = tl.exp(log_ratio)
    kl = -log_ratio
    # All-false flags (not lp * 0 != 0: that is true where lp is NaN).
    flag1 = tl.zeros_like(lp) != 0.0
    flag2 = flag1
    if MODE <= 1:
        trunc = _min_nan(ratio, p2)
        prob = tl.exp(lp)
        old_prob = tl.exp(old)
        if MODE == 0:
            gap = prob - old_prob
            keep_pos = gap <= p1
            keep_neg = gap >= -p0
        else:
            binary_kl = old_prob * (old - lp) + (1 - old_prob) * tl.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            keep_pos = (binary_kl <= p1) | (prob <= old_prob)
            keep_neg = (binary_kl <= p0) | (prob >= old_prob)
        keep_b = tl.where(adv > 0, keep_pos, keep_neg)
        keep = keep_b.to(tl.float32)
        term = -adv * trunc * lp * keep
        d = -adv * trunc * keep
        flag1 = keep_b == 0
        flag2 = (ratio > p2) & keep_b
    elif MODE == 2:
        tau = tl.where(adv > 0, p0, p1)
        s = tl.sigmoid(tau * (ratio - 1.0))
        term = -(s * (4.0 / tau)) * adv
        # d sigmoid = s (1 - s); the clamp passes the gradient only where lo <= raw <= hi (a
        # select: a NaN raw gets 0, as torch.clamp's backward gives).
        d = tl.where((raw >= -20.0) & (raw <= 20.0), -adv * (4.0 / tau) * (s * (1.0 - s)) * tau * ratio, 0.0)
    elif MODE == 3:
        term = -lp * adv
        d = -adv
    elif MODE == 4:
        clipped = _clamp_nan(ratio, 1.0 - p0, 1.0 + p1)
        term = -clipped * adv * lp
        d = -clipped * adv
        flag1 = ratio != clipped
    else:
        term = -(lp * adv - p0 * (raw * raw))
        d = -(adv - p1 * raw)
        kl = -raw
    return term, d, flag1, flag2, kl


@triton.jit
def _tok_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr,          # [B, T] inputs
    mask_ptr,                                 # [B, T] any dtype (bool as uint8); valid where != 0
    part_ptr,                                 # [P, NPART] f32 scratch: one slot per program
    row_part_ptr,                             # [2, NCB, B] f32 scratch: per-row partials (split rows)
    row_inv_ptr,                              # [B] f32 out: 1 / max(row count, 1)  (seq-mean-token-mean)
    ticket_ptr,                               # [1] int32, 0 on entry
    loss_ptr,                                 # [] f32 out
    stats_ptr,                                # [3] f32 out, in STAT_NAMES order
    scale_ptr,                                # [1] f32 out: d loss / d L[t] up to row_inv
    B, T, NCB,
    p0, p1, p2, inv_T,
    MODE: tl.constexpr, HAS_W: tl.constexpr, AGG: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_RB: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_r = tl.num_programs(0)
    pid = pid_t * n_r + pid_r
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = row_ok[:, None] & (cols < T)[None, :]
    offs = rows.to(tl.int64)[:, None] * T + cols[None, :]

    valid = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
    validf = valid.to(tl.float32)
    lp = _load_valid(lp_ptr, offs, inb, valid)
    old = _load_valid(old_ptr, offs, inb, valid)
    adv = _load_valid(adv_ptr, offs, inb, valid)
    term, _, flag1, flag2, kl = _token(lp, old, adv, p0, p1, p2, MODE)
    if HAS_W:
        term = term * _load_valid(w_ptr, offs, inb, valid)
    t_p = tl.where(valid, term, 0.0)
    t_kl = tl.where(valid, kl, 0.0)
    # Counts of at most 2048 per tile travel in pairs in one float (see ppo_loss._token_terms).
    t_c = validf + 4096.0 * tl.where(valid & flag1, 1.0, 0.0)
    t_c2 = tl.where(valid & flag2, 1.0, 0.0)
    zero = validf * 0.0
    c_row, p_row, kl_row, c2_row, _, _ = _sums(t_c, t_p, t_kl, t_c2, zero, zero, 1, True, False, False)
    row_cnt, _ = _unpack(c_row)

    if SPLIT:
        if AGG >= 2:
            rp = row_part_ptr + pid_t * B + rows
            tl.store(rp, p_row, mask=row_ok)
            tl.store(rp + NCB * B, row_cnt, mask=row_ok)
        s_has = 0.0
        p_fold = p_row
    else:
        has = row_cnt > 0
        s_has = tl.sum(has.to(tl.float32), 0)
        if AGG == 2:
            inv = 1.0 / _max_nan(row_cnt, 1.0)
            tl.store(row_inv_ptr + rows, inv, mask=row_ok)
            p_fold = tl.where(has, p_row * inv, 0.0)
        else:
            p_fold = p_row
    zr = c_row * 0.0
    s_c, s_p, s_kl, s_c2, _, _ = _sums(c_row, p_fold, kl_row, c2_row, zr, zr, 0, True, False, False)
    s_cnt, s_f1 = _unpack(s_c)
    slot = part_ptr + pid * _NPART
    tl.store(slot + 0, s_p)
    tl.store(slot + 1, s_cnt)
    tl.store(slot + 2, s_has)
    tl.store(slot + 3, s_f1)
    tl.store(slot + 4, s_c2)
    tl.store(slot + 5, s_kl)

    # Last-program-finalises (see ppo_loss._ppo_fwd_kernel): stores ordered before the acq_rel
    # ticket, volatile loads of the other programs' slots.
    tl.debug_barrier()
    n_prog = n_r * tl.num_programs(1)
    ticket = tl.atomic_add(ticket_ptr, 1)
    if ticket == n_prog - 1:
        tot, ks = _fold_parts(part_ptr, n_prog, 6, BLOCK_P)
        s_p = _col(tot, ks, 0)
        count = _col(tot, ks, 1)
        n_rows = _col(tot, ks, 2)
        s_f1 = _col(tot, ks, 3)
        s_f2 = _col(tot, ks, 4)
        s_kl = _col(tot, ks, 5)
        if SPLIT:
            if AGG >= 2:
                n_rows, j_p, _, _ = _join_rows(row_part_ptr, row_inv_ptr, B, NCB, 1, False, AGG, BLOCK_RB)
                if AGG == 2:
                    s_p = j_p
        scale, inv_n = _agg_scale(count, n_rows, inv_T, AGG)
        tl.store(loss_ptr, s_p * scale)
        tl.store(stats_ptr + 0, s_f1 * inv_n)
        tl.store(stats_ptr + 1, s_f2 * inv_n)
        tl.store(stats_ptr + 2, s_kl * inv_n)
        tl.store(scale_ptr, scale)


@triton.jit
def _tok_bwd_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr, mask_ptr,
    grad_ptr,                                 # [] upstream d loss (f32)
    scale_ptr,                                # [1] f32 from the forward
    row_inv_ptr,                              # [B] f32 from the forward (seq-mean-token-mean)
    dlp_ptr,                                  # [B, T] out, in logprobs' dtype
    B, T,
    p0, p1, p2,
    MODE: tl.constexpr, HAS_W: tl.constexpr, AGG: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < B
    inb = row_ok[:, None] & (cols < T)[None, :]
    offs = rows.to(tl.int64)[:, None] * T + cols[None, :]
    valid = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb

    g = tl.load(grad_ptr).to(tl.float32) * tl.load(scale_ptr)
    if AGG == 2:
        g_row = g * tl.load(row_inv_ptr + rows, mask=row_ok, other=0.0)
    else:
        g_row = g + tl.zeros((BLOCK_R,), dtype=tl.float32)
    g_tok = tl.where(valid, g_row[:, None], 0.0)
    if HAS_W:
        g_tok = g_tok * _load_valid(w_ptr, offs, inb, valid)
    lp = _load_valid(lp_ptr, offs, inb, valid)
    old = _load_valid(old_ptr, offs, inb, valid)
    adv = _load_valid(adv_ptr, offs, inb, valid)
    _, d, _, _, _ = _token(lp, old, adv, p0, p1, p2, MODE)
    # A select, not g * d: 0 at masked positions even for a non-finite upstream gradient.
    dlp = tl.where(valid, g_tok * d, 0.0)
    tl.store(dlp_ptr + offs, dlp.to(dlp_ptr.dtype.element_ty), mask=inb)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _params(op: str, options: dict) -> tuple[float, float, float]:
    """The kernels' (p0, p1, p2) for ``op`` (see ``_token``)."""
    if op in ("dppo_tv_loss", "dppo_kl_loss", "cispo_loss"):
        low = float(options["clip_low"])
        high = low if options.get("clip_high") is None else float(options["clip_high"])
        return low, high, float(options.get("clip_ratio_c", 0.0))
    if op == "sapo_loss":
        return float(options["tau_pos"]), float(options["tau_neg"]), 0.0
    if op == "dro_loss":
        beta = float(options["beta"])
        return 0.5 * beta, beta, 0.0
    return 0.0, 0.0, 0.0


def _forward(lp, old, adv, w, mask, mode: int, params, agg: int):
    """Launch the forward kernel: (loss [] f32, stats [3] f32, scale [1] f32, row_inv, tiling)."""
    B, T = mask.shape
    device = mask.device
    m = _mask_arg(mask)
    til, split, part, row_part, row_inv, loss, stats, scale, block_p, block_rb = _forward_buffers(
        B, T, device, 2, agg, len(STAT_NAMES))
    _tok_fwd_kernel[(til.grid_r, til.grid_t)](
        lp, old, adv, m if w is None else w, m,
        part, row_part, row_inv, _ticket(device), loss, stats, scale,
        B, T, til.grid_t,
        *params, 1.0 / T,
        MODE=mode, HAS_W=w is not None, AGG=agg, SPLIT=split,
        BLOCK_R=til.block_r, BLOCK_T=til.block_t, BLOCK_P=block_p, BLOCK_RB=block_rb,
        num_warps=til.num_warps,
    )
    return loss, stats, scale, row_inv, til


def _backward(lp, old, adv, w, mask, grad, scale, row_inv, mode: int, params, agg: int, til):
    B, T = mask.shape
    m = _mask_arg(mask)
    dlp = new_output((B, T), lp.dtype, mask.device)
    _tok_bwd_kernel[(til.grid_r, til.grid_t)](
        lp, old, adv, m if w is None else w, m,
        grad.to(torch.float32).contiguous(), scale, row_inv, dlp,
        B, T, *params,
        MODE=mode, HAS_W=w is not None, AGG=agg,
        BLOCK_R=til.block_r, BLOCK_T=til.block_t,
        num_warps=til.num_warps,
    )
    return dlp


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class _TokenLoss(torch.autograd.Function):
    """loss = agg(L(lp)); differentiable in lp only (old log-probs, advantages, weights are data)."""

    @staticmethod
    def forward(ctx, lp, old, adv, w, mask, mode, params, agg):
        lp, old, adv = lp.contiguous(), old.contiguous(), adv.contiguous()
        w = None if w is None else w.contiguous()
        mask = mask.contiguous()
        if mask.numel() == 0:
            # B = 0 or T = 0: every aggregation and statistic of no token is 0; no launch.
            loss = torch.zeros((), dtype=torch.float32, device=mask.device)
            stats = torch.zeros(len(STAT_NAMES), dtype=torch.float32, device=mask.device)
            scale = row_inv = torch.zeros(1, dtype=torch.float32, device=mask.device)
            til = None
        else:
            loss, stats, scale, row_inv, til = _forward(lp, old, adv, w, mask, mode, params, agg)
        ctx.mark_non_differentiable(stats)
        ctx.cfg = (mode, params, agg, til)
        ctx.save_for_backward(lp, old, adv, w, mask, scale, row_inv)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        lp, old, adv, w, mask, scale, row_inv = ctx.saved_tensors
        mode, params, agg, til = ctx.cfg
        if til is None:
            return (torch.zeros_like(lp),) + (None,) * 7
        dlp = _backward(lp, old, adv, w, mask, grad_loss, scale, row_inv, mode, params, agg, til)
        return (dlp,) + (None,) * 7


# --------------------------------------------------------------------------------------------
# Public ops (signatures of fastppo.reference; inputs already validated)
# --------------------------------------------------------------------------------------------


def _run(op: str, logprobs, old_logprobs, advantages, mask, agg, is_weights, options):
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
                    ("mask", mask)):
        if t is None:
            raise ValueError(f"{name} is required, got None (expected a [B, T] tensor)")
    if any(t is not None and t.dtype == torch.float64 for t in (logprobs, old_logprobs, advantages, is_weights)):
        # float64 is the tests' ground-truth dtype, not a kernel dtype.
        return getattr(reference, op).raw(logprobs, old_logprobs, advantages, mask, agg=agg, is_weights=is_weights,
                                          **options)
    loss, stats = _TokenLoss.apply(logprobs, old_logprobs, advantages, is_weights, mask, MODES[op],
                                   _params(op, options), AGG_CODES[agg])
    return loss, {k: stats[i] for i, k in enumerate(STAT_NAMES)}


def dppo_tv_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, clip_ratio_c=3.0,
                 agg="token-mean", is_weights=None):
    """Kernel of ``fastppo.dppo_tv_loss`` (formula in ``fastppo.reference.dppo_tv_loss``)."""
    return _run("dppo_tv_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights,
                dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c))


def dppo_kl_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, clip_ratio_c=3.0,
                 agg="token-mean", is_weights=None):
    """Kernel of ``fastppo.dppo_kl_loss`` (formula in ``fastppo.reference.dppo_kl_loss``)."""
    return _run("dppo_kl_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights,
                dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c))


def sapo_loss(logprobs, old_logprobs, advantages, mask, *, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean",
              is_weights=None):
    """Kernel of ``fastppo.sapo_loss`` (formula in ``fastppo.reference.sapo_loss``)."""
    return _run("sapo_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights,
                dict(tau_pos=tau_pos, tau_neg=tau_neg))


def gpg_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None):
    """Kernel of ``fastppo.gpg_loss`` (formula in ``fastppo.reference.gpg_loss``)."""
    return _run("gpg_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights, {})


def cispo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, agg="token-mean",
               is_weights=None):
    """Kernel of ``fastppo.cispo_loss`` (formula in ``fastppo.reference.cispo_loss``)."""
    return _run("cispo_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights,
                dict(clip_low=clip_low, clip_high=clip_high))


def dro_loss(logprobs, old_logprobs, advantages, mask, *, beta=None, agg="token-mean", is_weights=None):
    """Kernel of ``fastppo.dro_loss`` (formula in ``fastppo.reference.dro_loss``)."""
    return _run("dro_loss", logprobs, old_logprobs, advantages, mask, agg, is_weights, dict(beta=beta))
