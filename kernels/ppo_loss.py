"""Triton kernels of the clipped PPO losses: ``policy_loss``, ``value_loss``, ``ppo_loss``, ``aggregate``.

All four ops are one fused objective with some terms switched off at compile time::

    loss = agg(P) + vf_coef * agg(V) + x_coef * agg(X)

    P[t] = policy term (clipped surrogate, optional dual clip, optional is_weights)
    V[t] = 0.5 * max((v - R)^2, (v_clipped - R)^2)        (the value loss's 0.5 folded in)
           v_clipped = clamp(v, old - clip, old + clip)
    X[t] = any [B, T] tensor: the entropy (x_coef = -ent_coef) or aggregate's loss_mat (x_coef = 1)

Forward: ONE launch. Every program reads a [BLOCK_R, BLOCK_T] tile of the inputs once, computes
the per-token terms and writes its partial sums (term sums, valid count, clip counts, KL sum,
rows with a valid token) to its own slot of a scratch table. The program that finishes last
(an atomic ticket tells it so) folds the table in a fixed order (so the loss is bitwise
reproducible), applies the aggregation mode and writes the 0-d loss and the statistics, plus
the per-token gradient scale the backward needs. Nothing synchronises with the host.

Trust rules (issue 9): a position is valid where mask != 0; masked positions are replaced by 0
right after the load, before any arithmetic, so whatever they hold never reaches an output or
a gradient; NaN / inf at a valid position give what float64 PyTorch (autograd included) gives,
never depending on PTX max/min dropping NaN; a required input given as None is a ValueError;
B = 0 or T = 0 gives a 0 loss and 0 statistics without a launch.

Backward: ONE launch that recomputes the per-token terms from the inputs (cheaper than storing
them) and writes d logprobs, d values and d X in their inputs' dtypes.

Layers, top to bottom: the ``@triton.jit`` kernels; the launchers (tiling, contiguity, scratch);
the ``torch.autograd.Function``; the public functions with the reference's signatures.
Only long-standing ``triton.language`` features are used; compiled offline for sm_90 with Triton 3.6 and 3.9.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastppo import reference
from fastppo.kernels._common import new_output, overriding

AGG_CODES = {
    "token-mean": 0,
    "token-sum": 1,
    "seq-mean-token-mean": 2,
    "seq-mean-token-sum": 3,
    "seq-mean-token-sum-norm": 4,
}

# Columns of a program's slot in the partial-sum table (padded to NPART for 2-D loads).
_P_SUM, _V_SUM, _X_SUM, _COUNT, _CLIP, _CLIP_LOW, _KL, _VCLIP, _NROWS = range(9)
NPART = 16
# The same width for the kernels: a @triton.jit body may only read constexpr globals.
_NPART = tl.constexpr(NPART)

# Order of the statistics vector the forward writes.
STAT_NAMES = ("policy_loss", "value_loss", "entropy", "clipfrac", "clipfrac_lower", "approx_kl", "value_clipfrac")


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


# NaN rule: a NaN at a valid position must come out as NaN, exactly as float64 PyTorch gives.
# Plain tl.maximum / tl.minimum lower to PTX max.f32 / min.f32, which return the non-NaN operand
# (and the interpreter's fmax agrees), so every max/min/clamp goes through these three (the ones
# on counts too, which are never NaN: then the sm_90 PTX holds no non-propagating max/min at all,
# which tests/test_trust_ppo_loss.py checks).


@triton.jit
def _max_nan(a, b):
    """torch.maximum: NaN if either operand is NaN (PTX max.NaN.f32)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    """torch.minimum: NaN if either operand is NaN (PTX min.NaN.f32)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp_nan(x, lo, hi):
    """torch.clamp(x, lo, hi) = min(max(x, lo), hi), NaN if any operand is NaN."""
    return _min_nan(_max_nan(x, lo), hi)


@triton.jit
def _max_grads(g, a, b):
    """(d/da, d/db) of max(a, b) for an upstream g, as torch.maximum's autograd gives them:

        where(a == b, g / 2, g).masked_fill(a < b, 0)   (and the mirror for b)

    The loser gets an exact 0 (a select, not g * 0: g may be inf); when a or b is NaN no
    comparison holds and BOTH get g.
    """
    half = g * 0.5
    ga = tl.where(a == b, half, tl.where(a < b, 0.0, g))
    gb = tl.where(a == b, half, tl.where(a > b, 0.0, g))
    return ga, gb


@triton.jit
def _min_grad(g, a, b):
    """d/da of min(a, b) for an upstream g, as torch.minimum's autograd gives it."""
    return tl.where(a == b, g * 0.5, tl.where(a > b, 0.0, g))


@triton.jit
def _clipped_value_err(v, oldv, ret, vclip):
    """(clamp(v, old - clip, old + clip) - R, lo <= v <= hi), evaluated accurately.

    The band test uses v - old and the clipped error (old - R) +- clip, both exact-ish where
    v, old and R are close (Sterbenz), instead of rounding old +- clip at |old| ~ 1e4 first.
    Inside the band the value is v - R itself (no rounding tie ever counts as clipped).
    Where v - old is NaN, torch.clamp gives: NaN for a NaN old (here old itself), NaN for a NaN
    v (here v - R), and v for v = old = +-inf (here v - R, in the band): selects, no clamp.
    """
    step = v - oldv
    base = oldv - ret
    cdiff = tl.where(step > vclip, base + vclip,
                     tl.where(step < -vclip, base - vclip, tl.where(oldv != oldv, oldv, v - ret)))
    in_band = ((step >= -vclip) & (step <= vclip)) | (v == oldv)
    return cdiff, in_band


@triton.jit
def _load_valid(ptr, offs, inb, valid):
    # `other` and the where() both matter: out-of-range lanes are not read at all, and masked
    # positions may hold inf/NaN garbage that must not reach any arithmetic.
    x = tl.load(ptr + offs, mask=inb, other=0.0).to(tl.float32)
    return tl.where(valid, x, 0.0)



@triton.jit
def _sums(c, p, kl, c2, v, x, AXIS: tl.constexpr, HAS_P: tl.constexpr, HAS_V: tl.constexpr,
          HAS_X: tl.constexpr):
    """Sums along AXIS of six same-shape tensors in at most two reductions of their joins.

    Each tl.sum pays its own shared-memory round trip with 2 CTA barriers; a joined tensor
    ([..., 2, 2]) keeps a token's values in one thread, so one reduction covers all of them.
    Two groups, not one join of six: all six live at once would cost ~20 more registers.
    The counts come packed in c and c2 (see _ppo_fwd_kernel). Terms that are off come back 0.
    """
    zero = tl.sum(c, axis=AXIS) * 0.0
    sp = zero
    skl = zero
    sc2 = zero
    sv = zero
    sx = zero
    if HAS_P or HAS_V:
        a, b = tl.split(tl.sum(tl.join(tl.join(c, p), tl.join(kl, c2)), axis=AXIS))
        sc, sp = tl.split(a)
        skl, sc2 = tl.split(b)
        if HAS_V or HAS_X:
            sv, sx = tl.split(tl.sum(tl.join(v, x), axis=AXIS))
    else:
        sc, sx = tl.split(tl.sum(tl.join(c, x), axis=AXIS))
    return sc, sp, skl, sc2, sv, sx


@triton.jit
def _unpack(packed):
    """(low, high) of a float holding low + 4096 * high, both integers in [0, 4096)."""
    high = tl.floor(packed * (1.0 / 4096.0))
    return packed - 4096.0 * high, high


@triton.jit
def _fold_parts(part_ptr, n_prog, NUSED: tl.constexpr, BLOCK_P: tl.constexpr):
    """The finisher's fold of the n_prog slots of the partial-sum table: (column sums [_NPART],
    column index [_NPART]). Rows are added in a fixed order, so the result is bitwise
    reproducible; loads are volatile because L1 is not coherent across SMs."""
    ks = tl.arange(0, _NPART)
    acc = tl.zeros((BLOCK_P, _NPART), dtype=tl.float32)
    for p0 in range(0, n_prog, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(
            part_ptr + ps[:, None] * _NPART + ks[None, :],
            mask=(ps < n_prog)[:, None] & (ks < NUSED)[None, :],
            other=0.0,
            volatile=True,
        )
    return tl.sum(acc, axis=0), ks


@triton.jit
def _col(tot, ks, k):
    """Column k of a folded slot vector as a scalar."""
    return tl.sum(tl.where(ks == k, tot, 0.0), 0)


@triton.jit
def _agg_scale(count, n_rows, inv_T, AGG: tl.constexpr):
    """(factor turning a term sum into the aggregated loss, 1 / valid count) for aggregation AGG
    (AGG_CODES); the factor is also each valid token's gradient scale."""
    inv_n = 1.0 / _max_nan(count, 1.0)
    if AGG == 0:
        scale = inv_n
    elif AGG == 1:
        scale = inv_n * 0.0 + 1.0
    elif AGG == 4:
        scale = (1.0 / _max_nan(n_rows, 1.0)) * inv_T
    else:
        scale = 1.0 / _max_nan(n_rows, 1.0)
    return scale, inv_n


@triton.jit
def _join_rows(row_part_ptr, row_inv_ptr, B, NCB, CNT: tl.constexpr, HAS_VX: tl.constexpr, AGG: tl.constexpr,
               BLOCK_RB: tl.constexpr):
    """The finisher's join of split rows (seq-mean modes): each row's pieces from its NCB column
    programs, laid out [pieces, NCB, B] with the term sum at piece 0, the value and extra sums at
    1 and 2 (HAS_VX) and the valid count at piece CNT. Returns (rows with a valid token, and for
    AGG == 2 the sums of the per-row means of term, value, extra), writing 1 / row count to
    row_inv for the backward."""
    nr_acc = tl.zeros((BLOCK_RB,), dtype=tl.float32)
    ap = tl.zeros((BLOCK_RB,), dtype=tl.float32)
    av = tl.zeros((BLOCK_RB,), dtype=tl.float32)
    ax = tl.zeros((BLOCK_RB,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_RB):
        rb = b0 + tl.arange(0, BLOCK_RB)
        rm = rb < B
        cnt = tl.zeros((BLOCK_RB,), dtype=tl.float32)
        rsp = tl.zeros((BLOCK_RB,), dtype=tl.float32)
        rsv = tl.zeros((BLOCK_RB,), dtype=tl.float32)
        rsx = tl.zeros((BLOCK_RB,), dtype=tl.float32)
        for c in range(0, NCB):
            rpc = row_part_ptr + c * B + rb
            cnt += tl.load(rpc + CNT * NCB * B, mask=rm, other=0.0, volatile=True)
            if AGG == 2:
                rsp += tl.load(rpc, mask=rm, other=0.0, volatile=True)
                if HAS_VX:
                    rsv += tl.load(rpc + NCB * B, mask=rm, other=0.0, volatile=True)
                    rsx += tl.load(rpc + 2 * NCB * B, mask=rm, other=0.0, volatile=True)
        has = cnt > 0
        nr_acc += has.to(tl.float32)
        if AGG == 2:
            denom = _max_nan(cnt, 1.0)
            tl.store(row_inv_ptr + rb, 1.0 / denom, mask=rm)
            ap += tl.where(has, rsp / denom, 0.0)
            if HAS_VX:
                av += tl.where(has, rsv / denom, 0.0)
                ax += tl.where(has, rsx / denom, 0.0)
    return tl.sum(nr_acc, 0), tl.sum(ap, 0), tl.sum(av, 0), tl.sum(ax, 0)


@triton.jit
def _token_terms(lp_ptr, old_ptr, adv_ptr, w_ptr, v_ptr, oldv_ptr, ret_ptr, x_ptr, mask_ptr, offs, inb,
                 clip_lo, clip_hi, dual_c, vclip,
                 HAS_P: tl.constexpr, HAS_W: tl.constexpr, DUAL: tl.constexpr,
                 HAS_V: tl.constexpr, VCLIP: tl.constexpr, HAS_X: tl.constexpr):
    """Per-token terms of one slice, 0 where not valid: (count + 4096 clip, policy term,
    -log ratio, dual-clip count + 4096 value-clip count, value term, x).

    Integer counts of at most 2048 per tile travel in pairs in one float (low + 4096 * high,
    exact below 2^24; the launcher asserts tiles of at most 2048 tokens): 6 sums instead of 8.
    """
    valid = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
    validf = valid.to(tl.float32)
    zero = validf * 0.0
    p_tok = zero
    clip_tok = zero
    low_tok = zero
    kl_tok = zero
    if HAS_P:
        lp = _load_valid(lp_ptr, offs, inb, valid)
        old = _load_valid(old_ptr, offs, inb, valid)
        adv = _load_valid(adv_ptr, offs, inb, valid)
        log_ratio = _clamp_nan(lp - old, -20.0, 20.0)
        ratio = tl.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * _clamp_nan(ratio, 1.0 - clip_lo, 1.0 + clip_hi)
        pt = _max_nan(unclipped, clipped)
        clip_tok = tl.where(valid & (clipped > unclipped), 1.0, 0.0)
        if DUAL:
            lower = -adv * dual_c
            neg = adv < 0
            low_tok = tl.where(valid & neg & (pt > lower), 1.0, 0.0)
            pt = tl.where(neg, _min_nan(pt, lower), pt)
        if HAS_W:
            pt = pt * _load_valid(w_ptr, offs, inb, valid)
        p_tok = tl.where(valid, pt, 0.0)
        kl_tok = tl.where(valid, -log_ratio, 0.0)

    v_tok = zero
    vclip_tok = zero
    if HAS_V:
        v = _load_valid(v_ptr, offs, inb, valid)
        ret = _load_valid(ret_ptr, offs, inb, valid)
        err = (v - ret) * (v - ret)
        if VCLIP:
            oldv = _load_valid(oldv_ptr, offs, inb, valid)
            cdiff, _ = _clipped_value_err(v, oldv, ret, vclip)
            err_clipped = cdiff * cdiff
            vclip_tok = tl.where(valid & (err_clipped > err), 1.0, 0.0)
            err = _max_nan(err, err_clipped)
        v_tok = tl.where(valid, 0.5 * err, 0.0)

    x_tok = zero
    if HAS_X:
        x_tok = _load_valid(x_ptr, offs, inb, valid)

    return validf + 4096.0 * clip_tok, p_tok, kl_tok, low_tok + 4096.0 * vclip_tok, v_tok, x_tok


@triton.jit
def _ppo_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr,          # policy inputs   [B, T]
    v_ptr, oldv_ptr, ret_ptr,                 # value inputs    [B, T]
    x_ptr,                                    # extra term      [B, T]
    mask_ptr,                                 # [B, T] any dtype (bool as uint8); valid where != 0
    part_ptr,                                 # [P, NPART] f32 scratch: one slot per program
    row_part_ptr,                             # [4, NCB, B] f32 scratch: per-row partials (split rows)
    row_inv_ptr,                              # [B] f32 out: 1 / max(row count, 1)  (seq-mean-token-mean)
    ticket_ptr,                               # [1] int32, 0 on entry: this launch's own
    loss_ptr,                                 # [] f32 out
    stats_ptr,                                # [7] f32 out, in STAT_NAMES order
    scale_ptr,                                # [1] f32 out: d loss / d term[t] up to row_inv
    B, T, NCB,
    clip_lo, clip_hi, dual_c, vclip, vf_coef, x_coef, inv_T,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, DUAL: tl.constexpr,
    HAS_V: tl.constexpr, VCLIP: tl.constexpr, HAS_X: tl.constexpr,
    AGG: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_RB: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_r = tl.num_programs(0)
    pid = pid_t * n_r + pid_r
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    slot = part_ptr + pid * _NPART

    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = row_ok[:, None] & (cols < T)[None, :]
    offs = rows.to(tl.int64)[:, None] * T + cols[None, :]
    # 4 tokens per thread (the launcher's tiles): every input's loads of the tile fit in
    # registers at once. Two joined reductions (_sums) replace eight tl.sum calls with 2 CTA
    # barriers each.
    t_c, t_p, t_kl, t_c2, t_v, t_x = _token_terms(
        lp_ptr, old_ptr, adv_ptr, w_ptr, v_ptr, oldv_ptr, ret_ptr, x_ptr, mask_ptr, offs, inb,
        clip_lo, clip_hi, dual_c, vclip, HAS_P, HAS_W, DUAL, HAS_V, VCLIP, HAS_X)
    c_row, p_row, kl_row, c2_row, v_row, x_row = _sums(t_c, t_p, t_kl, t_c2, t_v, t_x, 1, HAS_P, HAS_V, HAS_X)
    row_cnt, _ = _unpack(c_row)

    if SPLIT:
        # Rows span several programs: keep per-row pieces for the last program to join.
        if AGG >= 2:
            rp = row_part_ptr + pid_t * B + rows
            tl.store(rp, p_row, mask=row_ok)
            tl.store(rp + NCB * B, v_row, mask=row_ok)
            tl.store(rp + 2 * NCB * B, x_row, mask=row_ok)
            tl.store(rp + 3 * NCB * B, row_cnt, mask=row_ok)
        s_has = 0.0
        p_fold = p_row
        v_fold = v_row
        x_fold = x_row
    else:
        # Whole rows live in this program: fold the per-row part of the aggregation here so
        # the last program only has to add P slots.
        has = row_cnt > 0
        s_has = tl.sum(has.to(tl.float32), 0)
        if AGG == 2:
            inv = 1.0 / _max_nan(row_cnt, 1.0)
            tl.store(row_inv_ptr + rows, inv, mask=row_ok)
            p_fold = tl.where(has, p_row * inv, 0.0)
            v_fold = tl.where(has, v_row * inv, 0.0)
            x_fold = tl.where(has, x_row * inv, 0.0)
        else:
            p_fold = p_row
            v_fold = v_row
            x_fold = x_row
    s_c, s_p, s_kl, s_c2, s_v, s_x = _sums(c_row, p_fold, kl_row, c2_row, v_fold, x_fold, 0, HAS_P, HAS_V, HAS_X)
    s_cnt, s_clip = _unpack(s_c)
    s_low, s_vclip = _unpack(s_c2)
    tl.store(slot + 0, s_p)
    tl.store(slot + 1, s_v)
    tl.store(slot + 2, s_x)
    tl.store(slot + 3, s_cnt)
    tl.store(slot + 4, s_has)
    tl.store(slot + 5, s_clip)
    tl.store(slot + 6, s_low)
    tl.store(slot + 7, s_kl)
    tl.store(slot + 8, s_vclip)

    # Last-program-finalises: every thread's stores must be ordered before the ticket, which
    # is taken with acq_rel semantics; the last program then reads the slots with volatile
    # loads (L1 is not coherent across SMs).
    tl.debug_barrier()
    n_prog = n_r * tl.num_programs(1)
    ticket = tl.atomic_add(ticket_ptr, 1)
    if ticket == n_prog - 1:
        tot, ks = _fold_parts(part_ptr, n_prog, 9, BLOCK_P)
        s_p = _col(tot, ks, 0)
        s_v = _col(tot, ks, 1)
        s_x = _col(tot, ks, 2)
        count = _col(tot, ks, 3)
        n_rows = _col(tot, ks, 4)
        s_clip = _col(tot, ks, 5)
        s_low = _col(tot, ks, 6)
        s_kl = _col(tot, ks, 7)
        s_vclip = _col(tot, ks, 8)
        if SPLIT:
            if AGG >= 2:
                n_rows, j_p, j_v, j_x = _join_rows(row_part_ptr, row_inv_ptr, B, NCB, 3, True, AGG, BLOCK_RB)
                if AGG == 2:
                    s_p = j_p
                    s_v = j_v
                    s_x = j_x
        scale, inv_n = _agg_scale(count, n_rows, inv_T, AGG)
        p_loss = s_p * scale
        v_loss = s_v * scale
        x_agg = s_x * scale
        tl.store(loss_ptr, p_loss + vf_coef * v_loss + x_coef * x_agg)
        tl.store(stats_ptr + 0, p_loss)
        tl.store(stats_ptr + 1, v_loss)
        tl.store(stats_ptr + 2, x_agg)
        tl.store(stats_ptr + 3, s_clip * inv_n)
        tl.store(stats_ptr + 4, s_low * inv_n)
        tl.store(stats_ptr + 5, s_kl * inv_n)
        tl.store(stats_ptr + 6, s_vclip * inv_n)
        tl.store(scale_ptr, scale)


@triton.jit
def _ppo_bwd_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr,
    v_ptr, oldv_ptr, ret_ptr,
    mask_ptr,
    grad_ptr,                                 # [] upstream d loss (f32)
    scale_ptr,                                # [1] f32 from the forward
    row_inv_ptr,                              # [B] f32 from the forward (seq-mean-token-mean)
    dlp_ptr, dv_ptr, dx_ptr,                  # [B, T] outs, in their inputs' dtypes
    B, T,
    clip_lo, clip_hi, dual_c, vclip, vf_coef, x_coef,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, DUAL: tl.constexpr,
    HAS_V: tl.constexpr, VCLIP: tl.constexpr, HAS_X: tl.constexpr,
    AGG: tl.constexpr,
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

    # d loss / d term[t] for a valid t; 0 (not garbage * 0) at masked positions.
    g = tl.load(grad_ptr).to(tl.float32) * tl.load(scale_ptr)
    if AGG == 2:
        g_row = g * tl.load(row_inv_ptr + rows, mask=row_ok, other=0.0)
    else:
        g_row = g + tl.zeros((BLOCK_R,), dtype=tl.float32)
    g_tok = tl.where(valid, g_row[:, None], 0.0)

    if HAS_P:
        lp = _load_valid(lp_ptr, offs, inb, valid)
        old = _load_valid(old_ptr, offs, inb, valid)
        adv = _load_valid(adv_ptr, offs, inb, valid)
        # Autograd of the float64 reference formula, step by step, so that NaN and inf at a
        # valid position give what PyTorch gives: clamp passes the gradient where
        # lo <= x <= hi (never for NaN: a where, not a product), max/min split it as torch does.
        raw = lp - old
        ratio = tl.exp(_clamp_nan(raw, -20.0, 20.0))
        lo = 1.0 - clip_lo
        hi = 1.0 + clip_hi
        unclipped = -adv * ratio
        clipped = -adv * _clamp_nan(ratio, lo, hi)
        gp = g_tok
        if HAS_W:
            gp = gp * _load_valid(w_ptr, offs, inb, valid)
        if DUAL:
            pt = _max_nan(unclipped, clipped)
            gp = tl.where(adv < 0, _min_grad(gp, pt, -adv * dual_c), gp)
        g_unc, g_clp = _max_grads(gp, unclipped, clipped)
        d_ratio = g_unc * -adv + tl.where((ratio >= lo) & (ratio <= hi), g_clp * -adv, 0.0)
        dlp = tl.where((raw >= -20.0) & (raw <= 20.0), d_ratio * ratio, 0.0)
        tl.store(dlp_ptr + offs, dlp.to(dlp_ptr.dtype.element_ty), mask=inb)

    if HAS_V:
        v = _load_valid(v_ptr, offs, inb, valid)
        ret = _load_valid(ret_ptr, offs, inb, valid)
        diff = v - ret
        if VCLIP:
            oldv = _load_valid(oldv_ptr, offs, inb, valid)
            cdiff, in_band = _clipped_value_err(v, oldv, ret, vclip)
            # 0.5 * d/dv (.)^2 = (.); the clamp passes the gradient where lo <= v <= hi. Inside
            # the band the two errors tie exactly and the halves add up to diff.
            g_unc, g_clp = _max_grads(g_tok, diff * diff, cdiff * cdiff)
            dd = g_unc * diff + tl.where(in_band, g_clp * cdiff, 0.0)
        else:
            dd = diff
        if not VCLIP:
            dd = g_tok * dd
        tl.store(dv_ptr + offs, (vf_coef * dd).to(dv_ptr.dtype.element_ty), mask=inb)

    if HAS_X:
        tl.store(dx_ptr + offs, (g_tok * x_coef).to(dx_ptr.dtype.element_ty), mask=inb)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


class Config(NamedTuple):
    """Compile-time switches and scalar coefficients of one fused-loss call."""

    has_p: bool
    has_w: bool
    dual: bool
    has_v: bool
    vclip: bool
    has_x: bool
    agg: int
    clip_lo: float = 0.2
    clip_hi: float = 0.2
    dual_c: float = 0.0
    vclip_value: float = 0.0
    vf_coef: float = 0.0
    x_coef: float = 0.0


_BLOCK_OVERRIDE: dict[str, int] = {}


def block_sizes(**sizes: int) -> contextlib.AbstractContextManager[None]:
    """Force tile sizes (powers of two): ``block_r``, ``block_t``, ``block_p``, ``block_rb``.

    For tests: tiny blocks make a small batch span many programs and split rows, so every
    reduction path runs in the interpreter.
    """
    return overriding(_BLOCK_OVERRIDE, sizes)


class Tiling(NamedTuple):
    block_r: int
    block_t: int
    grid_r: int
    grid_t: int
    num_warps: int


def _tiling(B: int, T: int) -> Tiling:
    # Enough programs to fill a GPU before tiles grow, up to 1024 tokens each; rows longer
    # than a tile split across programs. 4 tokens per thread (one 16-byte load per fp32 input):
    # with up to 8 inputs per token, 8 tokens per thread (2048-token tiles on 8 warps) held
    # 56-90 registers and ptxas issued the loads in many dependent batches; 4 per thread needs
    # 45-51 registers on Triton 3.6 and 3.9, and 2M tokens make 2048 programs, 3.1 waves at
    # 5 CTAs/SM on 132 SMs (offline sm_90 compile, benchmarks/NOTES.md).
    n = B * T
    tile = min(1024, max(256, triton.next_power_of_2(max(1, n // 264))))
    block_t = _BLOCK_OVERRIDE.get("block_t") or min(triton.next_power_of_2(T), tile)
    block_r = _BLOCK_OVERRIDE.get("block_r") or max(1, min(tile // block_t, triton.next_power_of_2(B)))
    num_warps = max(1, min(8, (block_r * block_t) // 128))
    # The forward packs two counts of at most 2048 into one float sum (see _token_terms).
    assert block_r * block_t <= 2048, (block_r, block_t)
    return Tiling(block_r, block_t, triton.cdiv(B, block_r), triton.cdiv(T, block_t), num_warps)


def _ticket(device: torch.device) -> torch.Tensor:
    """The forward's ticket counter: a fresh int32 zero per launch, never cached.

    A counter kept per stream and reset by the finishing program is only right if every earlier
    launch ran to its end: one that died midway (or a CUDA graph replayed around it) leaves a
    non-zero count, and every later launch would silently skip its finisher and return stale
    loss and statistics. The zero fill is one small stream-ordered kernel that a CUDA graph
    captures and replays with the launch, so capture needs no special case.
    """
    return torch.zeros(1, dtype=torch.int32, device=device)


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels load it. They test `m != 0` (an unordered compare for floats:
    2, 0.5, -1 and NaN are valid, 0 and -0 are not), so only bf16 masks need a host-side pass."""
    if mask.dtype == torch.bfloat16:
        # The interpreter cannot compare a bf16 block (triton 3.9: "cannot reshape array");
        # a rare mask dtype, so one cheap elementwise op on the host.
        mask = mask != 0
    mask = mask.contiguous()
    # Triton loads bool as i1 from byte storage inconsistently across versions; bytes are safe.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# Names of the [B, T] inputs in the order the kernels take them (the launchers' `inputs`).
_INPUT_NAMES = ("logprobs", "old_logprobs", "advantages", "is_weights", "values", "old_values", "returns", "x")


def _required(cfg: Config) -> tuple[bool, ...]:
    """Which of the _INPUT_NAMES inputs the kernels read under this configuration."""
    return (cfg.has_p, cfg.has_p, cfg.has_p, cfg.has_p and cfg.has_w, cfg.has_v, cfg.has_v and cfg.vclip, cfg.has_v, cfg.has_x)


def _kernel_args(inputs, cfg: Config, stand_in: torch.Tensor) -> list[torch.Tensor]:
    """The inputs made contiguous; an input the kernel never reads becomes a stand-in pointer.

    A None where the configuration reads the tensor raises ValueError: the kernel must never
    read another tensor's memory in place of a missing input.
    """
    args = []
    for name, t, needed in zip(_INPUT_NAMES, inputs, _required(cfg)):
        if t is None:
            if needed:
                raise ValueError(f"{name} is required by this loss but was given as None")
            t = stand_in
        args.append(t.contiguous())
    return args


def _require(**tensors) -> None:
    """ValueError for a required argument given as None (before any dtype dispatch)."""
    for name, t in tensors.items():
        if t is None:
            raise ValueError(f"{name} is required, got None (expected a [B, T] tensor)")


def _forward_buffers(B: int, T: int, device, n_row_parts: int, agg: int, n_stats: int):
    """Tiling, block sizes and fresh buffers of a one-launch forward with a last-program finisher
    (this file's and kernels/policy_objectives.py's).

    Returns (tiling, split, part [n_prog, NPART], row_part [n_row_parts, grid_t, B] (split rows,
    seq-mean modes), row_inv [B] (seq-mean-token-mean), loss [], stats [n_stats], scale [1],
    block_p, block_rb); buffers a mode does not use are ``part`` as a stand-in, all float32.
    """
    til = _tiling(B, T)
    split = til.grid_t > 1
    n_prog = til.grid_r * til.grid_t
    f32 = torch.float32
    part = new_output((n_prog, NPART), f32, device)
    row_part = new_output((n_row_parts, til.grid_t, B), f32, device) if split and agg >= 2 else part
    row_inv = new_output((B,), f32, device) if agg == 2 else part
    loss = new_output((), f32, device)
    stats = new_output((n_stats,), f32, device)
    scale = new_output((1,), f32, device)
    # The finisher folds BLOCK_P partial rows of 16 floats: more than 32 per warp spill on one warp.
    block_p = _BLOCK_OVERRIDE.get("block_p") or min(256, 32 * til.num_warps, triton.next_power_of_2(n_prog))
    # The split seq-mean join keeps 8 [BLOCK_RB] vectors: 2 rows per thread stay under 64 registers.
    block_rb = _BLOCK_OVERRIDE.get("block_rb") or min(64 * til.num_warps, triton.next_power_of_2(B))
    return til, split, part, row_part, row_inv, loss, stats, scale, block_p, block_rb


def _fused_forward(inputs, mask, cfg: Config):
    """Launch the forward kernel.

    Args:
        inputs: (lp, old, adv, w, v, oldv, ret, x), each a [B, T] tensor or None.
        mask: [B, T] of any dtype; a position is valid where mask != 0 (a count, never a weight).
    Returns:
        (loss [] f32, stats [7] f32, scale [1] f32, row_inv [B] f32 or a stand-in, tiling).
    """
    B, T = mask.shape
    device = mask.device
    m = _mask_arg(mask)
    args = _kernel_args(inputs, cfg, m)
    til, split, part, row_part, row_inv, loss, stats, scale, block_p, block_rb = _forward_buffers(
        B, T, device, 4, cfg.agg, len(STAT_NAMES))
    _ppo_fwd_kernel[(til.grid_r, til.grid_t)](
        *args, m,
        part, row_part, row_inv, _ticket(device), loss, stats, scale,
        B, T, til.grid_t,
        cfg.clip_lo, cfg.clip_hi, cfg.dual_c, cfg.vclip_value, cfg.vf_coef, cfg.x_coef, 1.0 / T,
        HAS_P=cfg.has_p, HAS_W=cfg.has_w, DUAL=cfg.dual, HAS_V=cfg.has_v, VCLIP=cfg.vclip,
        HAS_X=cfg.has_x, AGG=cfg.agg, SPLIT=split,
        BLOCK_R=til.block_r, BLOCK_T=til.block_t, BLOCK_P=block_p, BLOCK_RB=block_rb,
        num_warps=til.num_warps,
    )
    return loss, stats, scale, row_inv, til


def _fused_backward(inputs, mask, grad, scale, row_inv, cfg: Config, til: Tiling, need):
    """Launch the backward kernel; returns (d lp, d v, d x), each in its input's dtype or None."""
    lp, old, adv, w, v, oldv, ret, x = inputs
    B, T = mask.shape
    device = mask.device
    m = _mask_arg(mask)
    want_p, want_v, want_x = need
    dlp = new_output((B, T), lp.dtype, device) if want_p else None
    dv = new_output((B, T), v.dtype, device) if want_v else None
    dx = new_output((B, T), x.dtype, device) if want_x else None
    args = _kernel_args(inputs, cfg, m)[:7]
    grad = grad.to(torch.float32).contiguous()
    _ppo_bwd_kernel[(til.grid_r, til.grid_t)](
        *args, m, grad, scale, row_inv,
        *(m if d is None else d for d in (dlp, dv, dx)),
        B, T,
        cfg.clip_lo, cfg.clip_hi, cfg.dual_c, cfg.vclip_value, cfg.vf_coef, cfg.x_coef,
        HAS_P=want_p, HAS_W=cfg.has_w, DUAL=cfg.dual, HAS_V=want_v, VCLIP=cfg.vclip,
        HAS_X=want_x, AGG=cfg.agg,
        BLOCK_R=til.block_r, BLOCK_T=til.block_t,
        num_warps=til.num_warps,
    )
    return dlp, dv, dx


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class _FusedLoss(torch.autograd.Function):
    """loss = agg(P(lp)) + vf_coef * agg(V(v)) + x_coef * agg(x); differentiable in lp, v, x.

    old_logprobs, advantages, is_weights, old_values and returns are constants (no gradient),
    as in every PPO trainer.
    """

    @staticmethod
    def forward(ctx, lp, v, x, old, adv, w, oldv, ret, mask, cfg):
        # Contiguous once here, so the backward reuses these instead of copying again.
        inputs = tuple(None if t is None else t.contiguous() for t in (lp, old, adv, w, v, oldv, ret, x))
        mask = mask.contiguous()
        if mask.numel() == 0:
            # B = 0 or T = 0: nothing to launch (a grid of 0 programs would write nothing).
            # Every aggregation of no token is 0, and so is every statistic.
            _kernel_args(inputs, cfg, mask)  # the same None check as a launch
            loss = torch.zeros((), dtype=torch.float32, device=mask.device)
            stats = torch.zeros(len(STAT_NAMES), dtype=torch.float32, device=mask.device)
            scale = row_inv = torch.zeros(1, dtype=torch.float32, device=mask.device)
            til = None
        else:
            loss, stats, scale, row_inv, til = _fused_forward(inputs, mask, cfg)
        ctx.mark_non_differentiable(stats)
        ctx.cfg, ctx.til = cfg, til
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(*inputs, mask, scale, row_inv)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        saved = ctx.saved_tensors
        inputs, (mask, scale, row_inv) = saved[: ctx.n_inputs], saved[ctx.n_inputs :]
        lp, _, _, _, v, _, _, x = inputs
        need = (
            lp is not None and ctx.needs_input_grad[0],
            v is not None and ctx.needs_input_grad[1],
            x is not None and ctx.needs_input_grad[2],
        )
        if not any(need):
            return (None,) * 10
        if ctx.til is None:  # empty: gradients of shape [B, 0] (or [0, T])
            dlp, dv, dx = (torch.zeros_like(t) if n else None for t, n in zip((lp, v, x), need))
            return dlp, dv, dx, None, None, None, None, None, None, None
        dlp, dv, dx = _fused_backward(inputs, mask, grad_loss, scale, row_inv, ctx.cfg, ctx.til, need)
        return dlp, dv, dx, None, None, None, None, None, None, None


def _fused(lp=None, v=None, x=None, old=None, adv=None, w=None, oldv=None, ret=None, *, mask, cfg):
    return _FusedLoss.apply(lp, v, x, old, adv, w, oldv, ret, mask, cfg)


# --------------------------------------------------------------------------------------------
# Public ops (signatures of fastppo.reference; inputs already validated)
# --------------------------------------------------------------------------------------------


def _use_reference(*tensors: torch.Tensor | None) -> bool:
    # float64 is the tests' ground-truth dtype, not a kernel dtype. Empty inputs (B = 0 or
    # T = 0) stay on the kernel path, which answers them without a launch.
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    is_weights=None,
):
    """Kernel of ``fastppo.policy_loss`` (formulas in ``fastppo.reference.policy_loss``).

    Args:
        logprobs, old_logprobs, advantages, is_weights (optional): ``[B, T]`` fp32/bf16/fp16.
        mask: ``[B, T]`` any dtype, valid where ``!= 0``.
    Returns:
        ``(loss, stats)``: 0-d float32 loss (differentiable in ``logprobs``) and detached 0-d
        float32 ``clipfrac``, ``clipfrac_lower``, ``approx_kl``.
    """
    _require(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if _use_reference(logprobs, old_logprobs, advantages, is_weights):
        return reference.policy_loss.raw(
            logprobs, old_logprobs, advantages, mask,
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, is_weights=is_weights,
        )
    cfg = Config(
        has_p=True, has_w=is_weights is not None, dual=dual_clip is not None,
        has_v=False, vclip=False, has_x=False, agg=AGG_CODES[agg],
        clip_lo=float(clip_low), clip_hi=float(clip_low if clip_high is None else clip_high),
        dual_c=float(dual_clip or 0.0),
    )
    loss, stats = _fused(logprobs, old=old_logprobs, adv=advantages, w=is_weights, mask=mask, cfg=cfg)
    return loss, {"clipfrac": stats[3], "clipfrac_lower": stats[4], "approx_kl": stats[5]}


def value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean"):
    """Kernel of ``fastppo.value_loss`` (formulas in ``fastppo.reference.value_loss``).

    Args:
        values, old_values, returns: ``[B, T]`` fp32/bf16/fp16; mask: ``[B, T]`` any dtype, valid where ``!= 0``.
    Returns:
        ``(loss, {"clipfrac": ...})``: 0-d float32, loss differentiable in ``values``.
    """
    _require(values=values, old_values=old_values, returns=returns, mask=mask)
    if _use_reference(values, old_values, returns):
        return reference.value_loss.raw(values, old_values, returns, mask, clip=clip, agg=agg)
    cfg = Config(
        has_p=False, has_w=False, dual=False, has_v=True, vclip=clip is not None, has_x=False,
        agg=AGG_CODES[agg], vclip_value=float(clip or 0.0), vf_coef=1.0,
    )
    loss, stats = _fused(v=values, oldv=old_values, ret=returns, mask=mask, cfg=cfg)
    return loss, {"clipfrac": stats[6]}


def aggregate(loss_mat, mask, agg="token-mean"):
    """Kernel of ``fastppo.aggregate``: ``[B, T]`` fp32/bf16/fp16 -> 0-d float32 (differentiable)."""
    _require(loss_mat=loss_mat, mask=mask)
    if _use_reference(loss_mat):
        return reference.aggregate.raw(loss_mat, mask, agg)
    cfg = Config(
        has_p=False, has_w=False, dual=False, has_v=False, vclip=False, has_x=True,
        agg=AGG_CODES[agg], x_coef=1.0,
    )
    loss, _ = _fused(x=loss_mat, mask=mask, cfg=cfg)
    return loss


def ppo_loss(
    logprobs,
    old_logprobs,
    advantages,
    values,
    old_values,
    returns,
    mask,
    *,
    entropy=None,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    value_clip=0.2,
    vf_coef=0.5,
    ent_coef=0.0,
    agg="token-mean",
    is_weights=None,
):
    """Kernel of ``fastppo.ppo_loss``: policy + vf_coef * value - ent_coef * agg(entropy), fused.

    Args:
        logprobs, old_logprobs, advantages, values, old_values, returns, entropy (optional),
        is_weights (optional): ``[B, T]`` fp32/bf16/fp16; mask: ``[B, T]`` any dtype, valid where ``!= 0``.
    Returns:
        ``(loss, stats)``: 0-d float32 loss, differentiable in ``logprobs``, ``values`` and
        ``entropy``; detached 0-d float32 stats named as in ``fastppo.reference.ppo_loss``.
    """
    _require(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
        values=values, old_values=old_values, returns=returns, mask=mask,
    )
    tensors = (logprobs, old_logprobs, advantages, values, old_values, returns, entropy, is_weights)
    if _use_reference(*tensors):
        return reference.ppo_loss.raw(
            logprobs, old_logprobs, advantages, values, old_values, returns, mask,
            entropy=entropy, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
            value_clip=value_clip, vf_coef=vf_coef, ent_coef=ent_coef, agg=agg, is_weights=is_weights,
        )
    cfg = Config(
        has_p=True, has_w=is_weights is not None, dual=dual_clip is not None,
        has_v=True, vclip=value_clip is not None, has_x=entropy is not None, agg=AGG_CODES[agg],
        clip_lo=float(clip_low), clip_hi=float(clip_low if clip_high is None else clip_high),
        dual_c=float(dual_clip or 0.0), vclip_value=float(value_clip or 0.0),
        vf_coef=float(vf_coef), x_coef=-float(ent_coef),
    )
    loss, stats = _fused(
        logprobs, values, entropy, old_logprobs, advantages, is_weights, old_values, returns, mask=mask, cfg=cfg
    )
    return loss, dict(zip(STAT_NAMES, stats.unbind(0)))
