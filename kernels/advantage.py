"""Triton kernels for the advantage pass: KL penalty, reward shaping, GAE and masked whitening.

Layout of this file, top to bottom: the ``@triton.jit`` kernels, the Python launchers (input
checks, block and chunk sizes, contiguity), then the public functions with the exact signatures
of ``fastppo.reference``. ``kl_penalty`` is differentiable in both inputs (``_KLPenalty``, with a
Triton backward kernel); ``shape_rewards``, ``gae``, ``masked_whiten`` and ``compute_advantages``
run on rollout data and return tensors that never require grad.

NaN and masks (TRUST_SPEC.md): a position is valid where ``mask != 0``; every loaded value is
selected with ``tl.where(valid, x, 0)`` before any arithmetic, so NaN/inf at masked positions
never reach an output or the whitening statistics, while NaN at a valid position flows through
the scan and the statistics as it would in float64 PyTorch. No result depends on what
``tl.maximum``/``tl.minimum`` do with NaN (PTX ``max.f32`` drops it): float max/min are
``propagate_nan=ALL`` (``max.NaN.f32``) or explicit selects.

How the reverse GAE scan is split over programs
-----------------------------------------------
Every row is cut into chunks of ``CHUNK`` positions and a program owns a tile of ``BLOCK_B`` rows
by one chunk, so that few long rows (8 x 32768) and many short rows (8192 x 1024) both give the
GPU thousands of programs. With c = gamma * lam and the quantity handed from a valid position to
the previous valid one

    X = gamma * V(next valid) + c * A(next valid),

a valid position t computes A[t] = (r[t] - V[t]) + X_in and hands on X_out = u[t] + v[t] * X_in,
with u[t] = gamma * V[t] + c * (r[t] - V[t]) and v[t] = c; a masked position is the identity
(u = 0, v = 1), which is exactly verl's rule that values and advantages carry across a gap.
These affine maps compose associatively, so

* launch 1 (``_summary_kernel``) scans each chunk with X_in unknown and keeps, per chunk, its
  composite map (u, v); for whitening, also the moments of A over the chunk as a function of
  X_in (A[t] = p[t] + w[t] * X_in, so mean(A) and M2(A) follow from centred moments of p, w);
  the last program to finish (atomic ticket, no host sync) composes the chunk maps of every row
  and reduces the global mean and variance with Chan's formula;
* launch 2 (``_finalize_kernel``) composes the maps of the chunks to the right of its own
  (a short scan over at most ``T / CHUNK`` summaries), rescans its chunk with the true X_in and
  writes the outputs, whitened with the global statistics.

The sequence score enters as the X_in of the row's end (X past the last valid token is
``score``), so shaping never needs to know in launch 1 where the last valid token is. Within a
chunk the scan runs over reversed indices with a forward ``tl.associative_scan``; the
``reverse=True`` flag is avoided on purpose (triton-lang/triton#4362 gives wrong results for
this kind of combine).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastppo import reference

from ._common import new_output, output_dtype

# Modes shared by both launches of the chunked pass.
MODE_ADV = 0  # compute_advantages: rewards from log-probs + score, GAE, optional whitening
MODE_GAE = 1  # gae: rewards given
MODE_WHITEN = 2  # masked_whiten: statistics of x, written at every position
MODE_SHAPE = 3  # shape_rewards: only the position of the last valid token matters

ESTIMATOR_IDS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}

# Summary planes of the workspace, each of B * NC float32 (one entry per row and chunk);
# constexpr so that the kernels may read them as globals.
_N, _U, _V, _MP, _MW, _CPP, _CPW, _CWW, _SP = (tl.constexpr(i) for i in range(9))
_PLANES = tl.constexpr(9)
_N_PLANES = 9  # the same number, for the host


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _kl_estimate(lp, ref, clamp_val, EST: tl.constexpr, CLAMP: tl.constexpr):
    """Per-token KL estimate from float32 log-probs (the estimators of ``kl_penalty``)."""
    d = lp - ref
    if EST == 0:
        kl = d
    elif EST == 1:
        kl = tl.abs(d)
    elif EST == 2:
        kl = 0.5 * d * d
    else:
        kl = tl.exp(-d) + d - 1.0
    if CLAMP:
        # Explicit selects, not tl.minimum/tl.maximum: PTX min/max.f32 return the non-NaN operand,
        # and torch.clamp(NaN) is NaN (a comparison with NaN is False, so NaN passes through).
        kl = tl.where(kl < -clamp_val, -clamp_val, tl.where(kl > clamp_val, clamp_val, kl))
    return kl


@triton.jit
def _fmax(a, b):
    """max(a, b) that returns NaN when either is NaN, on the GPU too (PTX max.NaN.f32)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pow2_scale(a):
    """The power of two 2^e <= a < 2^(e+1) of a >= 0 (its exponent bits; exact); 1 for 0 or denormal a.

    Dividing by it is exact and leaves |a| / 2^e < 2, so scaled sums of squares cannot overflow
    float32 and the scale multiplies back without rounding. inf and NaN give inf, which turns
    what it scales into NaN (only reachable with inf or NaN at a valid position).
    """
    e = (a.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(e > 0.0, e, 1.0)


@triton.jit
def _kl_kernel(lp_ptr, ref_ptr, out_ptr, N, clamp_val, EST: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lp = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _kl_estimate(lp, ref, clamp_val, EST, CLAMP), mask=ok)


@triton.jit
def _kl_bwd_kernel(lp_ptr, ref_ptr, g_ptr, glp_ptr, gref_ptr, N, clamp_val,
                   EST: tl.constexpr, CLAMP: tl.constexpr, GRAD_LP: tl.constexpr, GRAD_REF: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Gradients of kl_penalty, written as PyTorch autograd of the reference formula computes them.

    With d = lp - ref and g the incoming gradient: clamp passes g where -c <= kl <= c (0 elsewhere,
    NaN kl included, as torch.clamp's backward); then dkl/dd is 1 (k1), sign(d) (abs; 0 at 0 and
    at NaN, as torch.sign), d (k2) or 1 - exp(-d) (k3, as g - g * exp(-d)). d/dref = -d/dlp.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lp = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    d = lp - ref
    if EST == 0:
        gd = g
    elif EST == 1:
        gd = g * ((d > 0.0).to(tl.float32) - (d < 0.0).to(tl.float32))
    elif EST == 2:
        gd = g * d
    else:
        gd = g - g * tl.exp(-d)
    if CLAMP:
        # Where the clamp holds, autograd multiplies a zero gradient into the derivative. For a
        # finite d that is exactly 0, even where float32's exp(-d) overflows (k3 at d < -88,
        # whose float64 derivative is finite): select 0 rather than compute 0 * inf = NaN. For a
        # NaN or infinite d keep autograd's product (NaN in, NaN out).
        kl = _kl_estimate(lp, ref, clamp_val, EST, False)
        finite_d = tl.abs(d) < float("inf")
        gd = tl.where((kl >= -clamp_val) & (kl <= clamp_val), gd, tl.where(finite_d, 0.0, 0.0 * gd))
    if GRAD_LP:
        tl.store(glp_ptr + offs, gd, mask=ok)
    if GRAD_REF:
        tl.store(gref_ptr + offs, -gd, mask=ok)


@triton.jit
def _max_nan_combine(a, b):
    return _fmax(a, b)


@triton.jit
def _affine_combine(u1, v1, u2, v2):
    # Map 1 is applied first (it lies later in time): X -> u2 + v2 * (u1 + v1 * X).
    return u2 + v2 * u1, v1 * v2


@triton.jit
def _gae_combine(h1, f1, d1, u1, v1, h2, f2, d2, u2, v2):
    # (h, f, d) describe the advantage at the segment's earliest valid position as f + d * X_in
    # (h: the segment has a valid position); (u, v) is the segment's map of X. A segment with
    # no valid position keeps the advantage of the segment after it.
    take2 = h2 > 0.0
    f = tl.where(take2, f2 + d2 * u1, f1)
    d = tl.where(take2, d2 * v1, d1)
    return _fmax(h1, h2), f, d, u2 + v2 * u1, v1 * v2


@triton.jit
def _tile_coords(B, T, NC, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr):
    """Rows and (reversed) time positions of this program's [BLOCK_B, CHUNK] tile."""
    pid = tl.program_id(0)
    c = pid % NC
    rows = (pid // NC) * BLOCK_B + tl.arange(0, BLOCK_B)
    # Column j holds time c * CHUNK + CHUNK - 1 - j: a forward scan over j is the reverse scan.
    t = c * CHUNK + (CHUNK - 1) - tl.arange(0, CHUNK)
    row_ok = rows < B
    inb = row_ok[:, None] & (t < T)[None, :]
    return c, rows, row_ok, t, inb


@triton.jit
def _load_tile(ptr, rows, t, stride, inb):
    offs = rows.to(tl.int64)[:, None] * stride + t[None, :]
    return tl.load(ptr + offs, mask=inb, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, rows, t, T, val, inb):
    offs = rows.to(tl.int64)[:, None] * T + t[None, :]
    tl.store(ptr + offs, val, mask=inb)


@triton.jit
def _load_valid(mask_ptr, rows, t, stride, inb):
    offs = rows.to(tl.int64)[:, None] * stride + t[None, :]
    return (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb


@triton.jit
def _rewards_tile(a_ptr, b_ptr, rows, t, stride_a, stride_b, inb, valid, kl_coef, clamp_val,
                  MODE: tl.constexpr, EST: tl.constexpr, CLAMP: tl.constexpr):
    """(rewards without the score, kl) of the tile; both 0 at masked positions."""
    if MODE == 1:
        r = tl.where(valid, _load_tile(a_ptr, rows, t, stride_a, inb), 0.0)
        kl = r
    else:
        lp = _load_tile(a_ptr, rows, t, stride_a, inb)
        ref = _load_tile(b_ptr, rows, t, stride_b, inb)
        kl = tl.where(valid, _kl_estimate(lp, ref, clamp_val, EST, CLAMP), 0.0)
        r = -kl_coef * kl
    return r, kl


@triton.jit
def _scan_tile(r, val, valid, gamma, c):
    """In-chunk reverse GAE scan: A = f + d * X_in at valid positions; (u, v) the chunk prefix maps."""
    rv = tl.where(valid, r - val, 0.0)
    one = tl.full(rv.shape, 1.0, tl.float32)
    h = valid.to(tl.float32)
    u = tl.where(valid, gamma * val + c * rv, 0.0)
    v = tl.where(valid, one * c, one)
    h, f, d, u, v = tl.associative_scan((h, rv, one, u, v), 1, _gae_combine)
    return f, d, u, v


@triton.jit
def _later_chunks(rows, row_ok, c, NC, NCB: tl.constexpr):
    """Offsets into the summary planes of the chunks after chunk c, latest first, and their mask."""
    i = tl.arange(0, NCB)
    cc = NC - 1 - i
    ok = row_ok[:, None] & (cc > c)[None, :]
    base = rows[:, None] * NC + tl.maximum(cc, 0)[None, :]
    return base, ok, i


@triton.jit
def _finish_stats(ws_ptr, score_ptr, B, NC, P, eps,
                  MODE: tl.constexpr, FIN_B: tl.constexpr, FIN_C: tl.constexpr):
    """Global mean and scale of the whitening, from every chunk's summary (one program).

    Every chunk's moments are combined in units of a running power of two S (exact scaling):
    S covers the chunk means, spreads and carries, so no square overflows float32 even at
    |x| ~ 1e30; when a tile needs a larger S, the running sums are rescaled (like an online
    softmax). NaN at a valid position reaches the sums (and so every output); masked positions
    and empty chunks never do (they enter as exact zeros).
    """
    i = tl.arange(0, FIN_C)
    c_in = NC - 1 - i  # column i computes the carry into chunk c_in ...
    c_src = NC - i  # ... so it scans the maps of chunks NC-1 .. c_in+1 (shifted by one column)
    acc_n = 0.0
    acc_mean = 0.0  # in units of acc_s
    acc_m2 = 0.0  # in units of acc_s ** 2
    acc_s = 1.0
    for r0 in range(0, B, FIN_B):
        rows = r0 + tl.arange(0, FIN_B)
        row_ok = rows < B
        in_ok = row_ok[:, None] & (c_in >= 0)[None, :]
        base = rows[:, None] * NC + tl.maximum(c_in, 0)[None, :]
        n = tl.load(ws_ptr + _N * P + base, mask=in_ok, other=0.0, cache_modifier=".cg")
        has = n > 0.0
        mp = tl.load(ws_ptr + _MP * P + base, mask=in_ok, other=0.0, cache_modifier=".cg")
        sp = tl.load(ws_ptr + _SP * P + base, mask=in_ok, other=1.0, cache_modifier=".cg")
        cpp = tl.load(ws_ptr + _CPP * P + base, mask=in_ok, other=0.0, cache_modifier=".cg")
        if MODE == 2:
            mean_a = tl.where(has, mp, 0.0)
            mag = _fmax(tl.abs(mean_a), sp)
        else:
            src_ok = row_ok[:, None] & (c_src < NC)[None, :] & (c_src >= 0)[None, :]
            src = rows[:, None] * NC + tl.minimum(tl.maximum(c_src, 0), NC - 1)[None, :]
            u = tl.load(ws_ptr + _U * P + src, mask=src_ok, other=0.0, cache_modifier=".cg")
            v = tl.load(ws_ptr + _V * P + src, mask=src_ok, other=1.0, cache_modifier=".cg")
            U, V = tl.associative_scan((u, v), 1, _affine_combine)
            if MODE == 0:
                x_end = tl.load(score_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
                X = U + V * x_end[:, None]
            else:
                X = U
            # A chunk with no valid position contributes nothing, whatever its carry holds
            # (e.g. the NaN score of a row without a valid token).
            X = tl.where(has, X, 0.0)
            mw = tl.load(ws_ptr + _MW * P + base, mask=in_ok, other=0.0, cache_modifier=".cg")
            mean_a = tl.where(has, mp + X * mw, 0.0)
            # S covers |mean A|, sp and |X|; |w - mean w| <= 1 (w is a product of gamma * lam <= 1),
            # so every scaled term below stays O(CHUNK).
            mag = _fmax(_fmax(tl.abs(mean_a), sp), tl.abs(X))
        mag = tl.where(has, mag, 0.0)
        s_tile = _pow2_scale(tl.reduce(tl.reduce(mag, 1, _max_nan_combine), 0, _max_nan_combine)) * 2.0
        s_new = _fmax(s_tile, acc_s)
        rescale = acc_s / s_new
        acc_mean = acc_mean * rescale
        acc_m2 = acc_m2 * (rescale * rescale)
        acc_s = s_new
        q = sp / s_new
        mean_s = mean_a / s_new
        if MODE == 2:
            m2_a = tl.where(has, q * q * cpp, 0.0)
        else:
            cpw = tl.load(ws_ptr + _CPW * P + base, mask=in_ok, other=0.0, cache_modifier=".cg")
            cww = tl.load(ws_ptr + _CWW * P + base, mask=in_ok, other=0.0, cache_modifier=".cg")
            xs = X / s_new
            m2_a = q * q * cpp + xs * (2.0 * q * cpw + xs * cww)
            # Rounding can leave a tiny negative sum; a NaN must stay NaN (a select, not a max).
            m2_a = tl.where(has, tl.where(m2_a < 0.0, 0.0, m2_a), 0.0)
        # Exact parallel combination of the tile's chunks, then Chan's update of the running total.
        tn = tl.sum(tl.sum(n, axis=1), axis=0)
        tmean = tl.sum(tl.sum(n * mean_s, axis=1), axis=0) / _fmax(tn, 1.0)
        dev = tl.where(has, mean_s - tmean, 0.0)
        tm2 = tl.sum(tl.sum(m2_a + n * dev * dev, axis=1), axis=0)
        tot = acc_n + tn
        delta = tmean - acc_mean
        frac = tn / _fmax(tot, 1.0)
        acc_mean = acc_mean + delta * frac
        acc_m2 = acc_m2 + tm2 + delta * delta * acc_n * frac
        acc_n = tot
    var_s = acc_m2 / _fmax(acc_n - 1.0, 1.0)
    # var = var_s * S^2 may overflow float32 (|x| > ~1e19): then 1 / sqrt(var + eps) is taken as
    # 1 / (S * sqrt(var_s + eps / S^2)); otherwise directly, so that var = 0 gives 1 / sqrt(eps).
    var = (var_s * acc_s) * acc_s
    direct = 1.0 / tl.sqrt(var + eps)
    scaled = 1.0 / (acc_s * tl.sqrt(var_s + (eps / acc_s) / acc_s))
    inv_std = tl.where(var < 1e30, direct, scaled)
    # Fewer than two valid positions: no variance, so no scaling (DESIGN.md).
    scale = tl.where(acc_n >= 2.0, inv_std, 1.0)
    mean = tl.where(acc_n > 0.0, acc_mean * acc_s, 0.0)
    tl.store(ws_ptr + _PLANES * P, mean)
    tl.store(ws_ptr + _PLANES * P + 1, scale)
    tl.store(ws_ptr + _PLANES * P + 2, acc_n)


@triton.jit
def _summary_kernel(
    a_ptr, b_ptr, val_ptr, mask_ptr, score_ptr, ws_ptr, counter_ptr,
    B, T, NC, P, n_programs,
    stride_a, stride_b, stride_v, stride_m,
    kl_coef, gamma, c, clamp_val, eps,
    MODE: tl.constexpr, EST: tl.constexpr, CLAMP: tl.constexpr, STATS: tl.constexpr,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, FIN_B: tl.constexpr, FIN_C: tl.constexpr,
):
    """Launch 1: per (row, chunk) summary; with STATS, the last program reduces them globally.

    Writes the planes of ``ws`` ([9, B * NC] float32): valid count, chunk map (u, v), and for
    STATS the mean of p and w, the power of two sp of max |p - mean p| and the centred sums
    pp / sp^2, pw / sp, ww over the chunk's valid positions (A = p + w * X_in). The finisher
    writes (mean, scale, count) at ``ws[9 * B * NC:]``.
    """
    c_idx, rows, row_ok, t, inb = _tile_coords(B, T, NC, BLOCK_B, CHUNK)
    valid = _load_valid(mask_ptr, rows, t, stride_m, inb)
    n = tl.sum(valid.to(tl.float32), axis=1)
    entry = rows * NC + c_idx
    tl.store(ws_ptr + _N * P + entry, n, mask=row_ok)
    if MODE == 0 or MODE == 1:
        r, kl = _rewards_tile(a_ptr, b_ptr, rows, t, stride_a, stride_b, inb, valid, kl_coef, clamp_val, MODE, EST, CLAMP)
        val = _load_tile(val_ptr, rows, t, stride_v, inb)
        p, w, u, v = _scan_tile(r, val, valid, gamma, c)
        last = (tl.arange(0, CHUNK) == CHUNK - 1)[None, :]
        tl.store(ws_ptr + _U * P + entry, tl.sum(tl.where(last, u, 0.0), axis=1), mask=row_ok)
        tl.store(ws_ptr + _V * P + entry, tl.sum(tl.where(last, v, 0.0), axis=1), mask=row_ok)
    elif MODE == 2:
        p = _load_tile(a_ptr, rows, t, stride_a, inb)
        w = p
    if STATS:
        # Two passes over registers: centred sums, never sum-of-squares minus squared sum. The
        # centred values are divided by a power of two sp (exact) before squaring, so that
        # |x| ~ 1e30 cannot overflow; the finisher multiplies sp back.
        n1 = _fmax(n, 1.0)
        mp = tl.sum(tl.where(valid, p, 0.0), axis=1) / n1
        cp = tl.where(valid, p - mp[:, None], 0.0)
        sp = _pow2_scale(tl.reduce(tl.abs(cp), 1, _max_nan_combine))
        cps = cp / sp[:, None]
        tl.store(ws_ptr + _MP * P + entry, mp, mask=row_ok)
        tl.store(ws_ptr + _SP * P + entry, sp, mask=row_ok)
        tl.store(ws_ptr + _CPP * P + entry, tl.sum(cps * cps, axis=1), mask=row_ok)
        if MODE != 2:
            mw = tl.sum(tl.where(valid, w, 0.0), axis=1) / n1
            cw = tl.where(valid, w - mw[:, None], 0.0)
            tl.store(ws_ptr + _MW * P + entry, mw, mask=row_ok)
            tl.store(ws_ptr + _CPW * P + entry, tl.sum(cps * cw, axis=1), mask=row_ok)
            tl.store(ws_ptr + _CWW * P + entry, tl.sum(cw * cw, axis=1), mask=row_ok)
        # Make every thread's stores visible before taking a ticket; the last ticket reduces.
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == n_programs - 1:
            _finish_stats(ws_ptr, score_ptr, B, NC, P, eps, MODE, FIN_B, FIN_C)
            # Reset for the next launch on this stream: the counter lives across calls.
            tl.atomic_xchg(counter_ptr, 0, sem="acq_rel")


@triton.jit
def _finalize_kernel(
    a_ptr, b_ptr, val_ptr, mask_ptr, score_ptr, ws_ptr,
    out0_ptr, out1_ptr, out2_ptr, out3_ptr,
    B, T, NC, P,
    stride_a, stride_b, stride_v, stride_m,
    kl_coef, gamma, c, clamp_val,
    MODE: tl.constexpr, EST: tl.constexpr, CLAMP: tl.constexpr, WHITEN: tl.constexpr, SHIFT_MEAN: tl.constexpr,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, NCB: tl.constexpr,
):
    """Launch 2: write the outputs of the tile from the chunk summaries of launch 1.

    MODE_ADV: out0..3 = advantages, returns, rewards, kl; MODE_GAE: advantages, returns;
    MODE_WHITEN: out0 = whitened x; MODE_SHAPE: out0, out1 = rewards, kl. All [B, T] float32,
    contiguous.
    """
    c_idx, rows, row_ok, t, inb = _tile_coords(B, T, NC, BLOCK_B, CHUNK)
    if MODE == 2:
        x = _load_tile(a_ptr, rows, t, stride_a, inb)
        mean = tl.load(ws_ptr + _PLANES * P)
        scale = tl.load(ws_ptr + _PLANES * P + 1)
        count = tl.load(ws_ptr + _PLANES * P + 2)
        valid = _load_valid(mask_ptr, rows, t, stride_m, inb)
        y = (x - mean) * scale
        if not SHIFT_MEAN:
            y = y + mean
        # Masked positions are 0 whatever x holds there (NaN and inf included).
        _store_tile(out0_ptr, rows, t, T, tl.where(valid, tl.where(count > 0.0, y, 0.0), 0.0), inb)
    else:
        valid = _load_valid(mask_ptr, rows, t, stride_m, inb)
        r, kl = _rewards_tile(a_ptr, b_ptr, rows, t, stride_a, stride_b, inb, valid, kl_coef, clamp_val, MODE, EST, CLAMP)
        base, later_ok, i = _later_chunks(rows, row_ok, c_idx, NC, NCB)
        score = tl.load(score_ptr + rows, mask=row_ok & (MODE != 1), other=0.0).to(tl.float32)
        if MODE == 0 or MODE == 3:
            # The score lands on the row's last valid token: the last valid one of this chunk
            # when no later chunk has a valid position.
            later_n = tl.sum(tl.load(ws_ptr + _N * P + base, mask=later_ok, other=0.0), axis=1)
            t_last = tl.max(tl.where(valid, t[None, :], -1), axis=1)
            at_end = (t[None, :] == t_last[:, None]) & (later_n == 0.0)[:, None] & valid
            out_r = tl.where(at_end, r + score[:, None], r)
            if MODE == 0:
                _store_tile(out2_ptr, rows, t, T, out_r, inb)
                _store_tile(out3_ptr, rows, t, T, kl, inb)
            else:
                _store_tile(out0_ptr, rows, t, T, out_r, inb)
                _store_tile(out1_ptr, rows, t, T, kl, inb)
        if MODE == 0 or MODE == 1:
            u = tl.load(ws_ptr + _U * P + base, mask=later_ok, other=0.0)
            v = tl.load(ws_ptr + _V * P + base, mask=later_ok, other=1.0)
            U, V = tl.associative_scan((u, v), 1, _affine_combine)
            last_c = (i == NCB - 1)[None, :]
            x_in = tl.sum(tl.where(last_c, U, 0.0), axis=1)
            if MODE == 0:
                x_in = x_in + tl.sum(tl.where(last_c, V, 0.0), axis=1) * score
            val = _load_tile(val_ptr, rows, t, stride_v, inb)
            f, d, _u, _v = _scan_tile(r, val, valid, gamma, c)
            adv = tl.where(valid, f + d * x_in[:, None], 0.0)
            ret = tl.where(valid, adv + val, 0.0)
            if WHITEN:
                mean = tl.load(ws_ptr + _PLANES * P)
                scale = tl.load(ws_ptr + _PLANES * P + 1)
                adv = tl.where(valid, (adv - mean) * scale, 0.0)
            _store_tile(out0_ptr, rows, t, T, adv, inb)
            _store_tile(out1_ptr, rows, t, T, ret, inb)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# One ticket counter per (device, stream); the finishing program resets it to 0, so a launch
# needs no memset (no extra kernel) and consecutive launches on one stream never overlap.
_COUNTERS: dict[tuple, torch.Tensor] = {}

# Elements per program tile: enough bytes in flight per SM, few registers per thread for the
# five-value scan.
_TILE = 2048
# Upper bound on chunks per row: the finisher and every finalize program hold one row of
# chunk summaries in registers.
_MAX_CHUNKS = 2048


def _counter(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index, 0)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = torch.zeros(1, dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [B, T] tensor with unit stride along T (a view when possible, else a copy)."""
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def pick_blocks(B: int, T: int, chunk: int | None = None, rows: int | None = None) -> tuple[int, int]:
    """(CHUNK, BLOCK_B) of the chunked pass for a [B, T] problem.

    ``chunk`` forces the chunk length (rounded up to a power of two, at least 2); by default rows
    are split until there are about a thousand programs, so that few long rows fill a GPU.
    ``rows`` forces the number of rows per program.
    """
    if chunk is None:
        chunk = min(max(triton.next_power_of_2(T), 16), 1024)
        while chunk > 256 and B * triton.cdiv(T, chunk) < 1024:
            chunk //= 2
    else:
        chunk = max(2, triton.next_power_of_2(int(chunk)))
    while triton.cdiv(T, chunk) > _MAX_CHUNKS:
        chunk *= 2
    if rows is None:
        rows = max(1, min(triton.next_power_of_2(B), _TILE // chunk))
    else:
        rows = max(1, triton.next_power_of_2(int(rows)))
    return chunk, rows


def _num_warps(elements: int) -> int:
    return 4 if elements <= 1024 else 8


def chunked_pass(
    mode: int,
    a: torch.Tensor,
    b: torch.Tensor | None,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    scores: torch.Tensor | None,
    *,
    kl_coef: float = 0.0,
    estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
    shift_mean: bool = True,
    eps: float = 1e-8,
    chunk: int | None = None,
    rows: int | None = None,
) -> list[torch.Tensor]:
    """Both launches of the chunked pass on [B, T] inputs; returns the mode's float32 outputs.

    a: logprobs (ADV, SHAPE), rewards (GAE) or x (WHITEN); b: ref_logprobs (ADV, SHAPE);
    values: [B, T] (ADV, GAE); mask: [B, T] bool or numbers (nonzero = valid); scores: [B]
    (ADV, SHAPE). Every input may be float32/bfloat16/float16 and strided along B.
    """
    if a.dim() != 2 or mask.shape != a.shape:
        raise ValueError(f"expected [B, T] inputs and a mask of the same shape, got {tuple(a.shape)} and {tuple(mask.shape)}")
    B, T = a.shape
    device = a.device
    n_out = {MODE_ADV: 4, MODE_GAE: 2, MODE_WHITEN: 1, MODE_SHAPE: 2}[mode]
    outs = [new_output((B, T), torch.float32, device) for _ in range(n_out)]
    if B == 0 or T == 0:
        return outs
    stats = whiten if mode != MODE_WHITEN else True
    CHUNK, BLOCK_B = pick_blocks(B, T, chunk, rows)
    NC = triton.cdiv(T, CHUNK)
    n_programs = triton.cdiv(B, BLOCK_B) * NC
    P = B * NC
    if P * _N_PLANES + 4 >= 2**31:
        raise ValueError(f"[B, T] = [{B}, {T}] is too large for one chunked pass")
    NCB = max(2, triton.next_power_of_2(NC))
    FIN_C = NCB
    # The finisher shares the summary kernel's registers: keep its tile no larger than the main one.
    FIN_B = max(1, min(triton.next_power_of_2(B), 512 // FIN_C))

    a = _as_rows(a)
    b = _as_rows(b) if b is not None else a
    values = _as_rows(values) if values is not None else a
    mask = _as_rows(mask)
    scores = scores.contiguous() if scores is not None else a
    ws = torch.empty(P * _N_PLANES + 4, dtype=torch.float32, device=device)
    counter = _counter(device)
    est = ESTIMATOR_IDS[estimator]
    strides = (_row_stride(a), _row_stride(b), _row_stride(values), _row_stride(mask))
    scalars = (float(kl_coef), float(gamma), float(gamma) * float(lam), 0.0)
    warps = _num_warps(BLOCK_B * CHUNK)

    # Launch 1 carries information only across chunks or into the whitening statistics: with
    # one chunk per row and no whitening, the pass is a single launch.
    if stats or NC > 1:
        _summary_kernel[(n_programs,)](
            a, b, values, mask, scores, ws, counter,
            B, T, NC, P, n_programs,
            *strides,
            *scalars, float(eps),
            MODE=mode, EST=est, CLAMP=False, STATS=stats,
            BLOCK_B=BLOCK_B, CHUNK=CHUNK, FIN_B=FIN_B, FIN_C=FIN_C,
            num_warps=warps,
        )
    padded = outs + [outs[0]] * (4 - n_out)
    _finalize_kernel[(n_programs,)](
        a, b, values, mask, scores, ws,
        *padded,
        B, T, NC, P,
        *strides,
        *scalars,
        MODE=mode, EST=est, CLAMP=False, WHITEN=bool(whiten), SHIFT_MEAN=bool(shift_mean),
        BLOCK_B=BLOCK_B, CHUNK=CHUNK, NCB=NCB,
        num_warps=warps,
    )
    return outs


def kl_penalty_launch(logprobs, ref_logprobs, estimator="k1", *, clamp=None, block: int = 1024):
    """Elementwise KL estimate; any shape, float32/bf16/fp16 in, float32 out of the same shape."""
    lp = logprobs.contiguous()
    ref = ref_logprobs.contiguous()
    out = new_output(lp.shape, torch.float32, lp.device)
    n = lp.numel()
    if n == 0:
        return out
    block = triton.next_power_of_2(int(block))
    _kl_kernel[(triton.cdiv(n, block),)](
        lp, ref, out, n, float(clamp) if clamp is not None else 0.0,
        EST=ESTIMATOR_IDS[estimator], CLAMP=clamp is not None, BLOCK=block, num_warps=4,
    )
    return out


def kl_penalty_backward_launch(logprobs, ref_logprobs, grad_out, estimator="k1", *, clamp=None,
                               grad_logprobs=True, grad_ref=True, block: int = 1024):
    """Gradients (d/dlogprobs, d/dref_logprobs) of ``kl_penalty``, each in its input's dtype, or None."""
    lp = logprobs.contiguous()
    ref = ref_logprobs.contiguous()
    g = grad_out.contiguous()
    glp = new_output(lp.shape, lp.dtype, lp.device) if grad_logprobs else None
    gref = new_output(ref.shape, ref.dtype, ref.device) if grad_ref else None
    n = lp.numel()
    if n == 0 or not (grad_logprobs or grad_ref):
        return glp, gref
    block = triton.next_power_of_2(int(block))
    _kl_bwd_kernel[(triton.cdiv(n, block),)](
        lp, ref, g, glp if glp is not None else g, gref if gref is not None else g,
        n, float(clamp) if clamp is not None else 0.0,
        EST=ESTIMATOR_IDS[estimator], CLAMP=clamp is not None,
        GRAD_LP=bool(grad_logprobs), GRAD_REF=bool(grad_ref), BLOCK=block, num_warps=4,
    )
    return glp, gref


class _KLPenalty(torch.autograd.Function):
    """kl_penalty with a Triton backward: differentiable in logprobs and ref_logprobs."""

    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, estimator, clamp):
        ctx.save_for_backward(logprobs, ref_logprobs)
        ctx.estimator = estimator
        ctx.clamp = clamp
        return kl_penalty_launch(logprobs, ref_logprobs, estimator, clamp=clamp)

    @staticmethod
    def backward(ctx, grad_out):
        logprobs, ref_logprobs = ctx.saved_tensors
        need_lp, need_ref = ctx.needs_input_grad[:2]
        glp, gref = kl_penalty_backward_launch(
            logprobs, ref_logprobs, grad_out, ctx.estimator, clamp=ctx.clamp,
            grad_logprobs=need_lp, grad_ref=need_ref,
        )
        return glp, gref, None, None


def advantages_launch(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, estimator="k1",
                      gamma=1.0, lam=0.95, whiten=True, chunk=None, rows=None):
    """compute_advantages in two launches; returns (advantages, returns, rewards, kl) float32 [B, T]."""
    adv, ret, rew, kl = chunked_pass(
        MODE_ADV, logprobs, ref_logprobs, values, mask, scores, kl_coef=kl_coef, estimator=estimator,
        gamma=gamma, lam=lam, whiten=whiten, chunk=chunk, rows=rows,
    )
    return adv, ret, rew, kl


def gae_launch(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=False, chunk=None, rows=None):
    """GAE in two launches; returns (advantages, returns) float32 [B, T]."""
    adv, ret = chunked_pass(MODE_GAE, rewards, None, values, mask, None, gamma=gamma, lam=lam,
                            whiten=whiten, chunk=chunk, rows=rows)
    return adv, ret


def shape_rewards_launch(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1", chunk=None, rows=None):
    """Reward shaping in two launches (valid counts per chunk, then outputs); (rewards, kl) float32 [B, T]."""
    rew, kl = chunked_pass(MODE_SHAPE, logprobs, ref_logprobs, None, mask, scores, kl_coef=kl_coef,
                           estimator=estimator, chunk=chunk, rows=rows)
    return rew, kl


def masked_whiten_launch(x, mask, *, shift_mean=True, eps=1e-8, chunk=None, rows=None):
    """Masked whitening of any-shaped x in two launches (statistics, then apply); float32 out."""
    shape = x.shape
    if x.dim() == 2:
        x2, m2 = x, mask
    else:
        cols = shape[-1] if x.dim() >= 1 else 1
        cols = max(cols, 1)
        x2 = x.reshape(-1, cols)
        m2 = mask.reshape(-1, cols)
    (out,) = chunked_pass(MODE_WHITEN, x2, None, None, m2, None, shift_mean=shift_mean, eps=eps, chunk=chunk, rows=rows)
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------
# Public ops (the reference signatures; inputs already validated by fastppo.ops)
# --------------------------------------------------------------------------------------------


def _is_f64(*tensors) -> bool:
    return output_dtype(*tensors) == torch.float64


def _empty_outputs(n: int, like: torch.Tensor, *tensors) -> list[torch.Tensor] | None:
    """Zero-filled outputs when [B, T] has no element (T = 0 or B = 0): nothing to launch."""
    if like.numel() != 0:
        return None
    return [torch.zeros(like.shape, dtype=output_dtype(*tensors), device=like.device) for _ in range(n)]


# These four ops run on rollout data: their outputs never carry a gradient, on either backend,
# whether or not the inputs require one (the float64 path runs the reference under no_grad).


def kl_penalty(logprobs, ref_logprobs, estimator="k1", *, clamp=None):
    """Per-token KL estimate, float32 of the input shape; see ``fastppo.reference.kl_penalty``.

    Differentiable in both inputs (a Triton backward kernel through ``_KLPenalty``).
    """
    if _is_f64(logprobs, ref_logprobs):
        return reference.kl_penalty.raw(logprobs, ref_logprobs, estimator, clamp=clamp)
    if torch.is_grad_enabled() and (logprobs.requires_grad or ref_logprobs.requires_grad):
        return _KLPenalty.apply(logprobs, ref_logprobs, estimator, clamp)
    return kl_penalty_launch(logprobs, ref_logprobs, estimator, clamp=clamp)


@torch.no_grad()
def shape_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1"):
    """(rewards, kl), float32 [B, T]; see ``fastppo.reference.shape_rewards``. No gradient."""
    empty = _empty_outputs(2, logprobs, scores, logprobs, ref_logprobs)
    if empty is not None:
        return tuple(empty)
    if _is_f64(scores, logprobs, ref_logprobs):
        return reference.shape_rewards.raw(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)
    return shape_rewards_launch(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)


@torch.no_grad()
def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=False):
    """(advantages, returns), float32 [B, T]; see ``fastppo.reference.gae``. No gradient."""
    empty = _empty_outputs(2, rewards, rewards, values)
    if empty is not None:
        return tuple(empty)
    if _is_f64(rewards, values):
        return reference.gae.raw(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    return gae_launch(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)


@torch.no_grad()
def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    """Whitened x, float32 of x's shape; see ``fastppo.reference.masked_whiten``. No gradient."""
    empty = _empty_outputs(1, x, x)
    if empty is not None:
        return empty[0]
    if _is_f64(x):
        return reference.masked_whiten.raw(x, mask, shift_mean=shift_mean, eps=eps)
    return masked_whiten_launch(x, mask, shift_mean=shift_mean, eps=eps)


@torch.no_grad()
def compute_advantages(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, estimator="k1",
                       gamma=1.0, lam=0.95, whiten=True):
    """(advantages, returns, rewards, kl), float32 [B, T]; see ``fastppo.reference.compute_advantages``.

    No gradient.
    """
    empty = _empty_outputs(4, logprobs, scores, logprobs, ref_logprobs, values)
    if empty is not None:
        return tuple(empty)
    if _is_f64(scores, logprobs, ref_logprobs, values):
        return reference.compute_advantages.raw(
            scores, logprobs, ref_logprobs, values, mask, kl_coef=kl_coef, estimator=estimator,
            gamma=gamma, lam=lam, whiten=whiten,
        )
    return advantages_launch(scores, logprobs, ref_logprobs, values, mask, kl_coef=kl_coef,
                             estimator=estimator, gamma=gamma, lam=lam, whiten=whiten)
