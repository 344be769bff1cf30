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
by one chunk, so that few long rows (8 x 262144) and many short rows (8192 x 128) both give the
GPU about a thousand programs (``pick_blocks``). With c = gamma * lam and the quantity handed
from a valid position to the previous valid one

    X = gamma * V(next valid) + c * A(next valid),

a valid position t computes A[t] = (r[t] - V[t]) + X_in and hands on X_out = u[t] + v[t] * X_in,
with u[t] = gamma * V[t] + c * (r[t] - V[t]) and v[t] = c; a masked position is the identity
(u = 0, v = 1), which is exactly verl's rule that values and advantages carry across a gap.
These affine maps compose associatively, at three levels:

* in a thread: every thread owns one segment of 8 consecutive positions of one row, loaded in
  time order as two 4-vectors (16-byte fp32 loads; the mask as one 8-byte load of packed
  bytes), and composes the segment's map sequentially in registers, latest position first;
* in a tile: the segments lie along axis 1 latest first (segment j starts 8 * (G - 1 - j)
  after the chunk start, its positions forward), so one forward ``tl.associative_scan`` over
  j of the (P, L) pairs below is the reverse scan over time; it gives every segment the map of
  all later segments of the chunk (an exclusive scan); a second sequential pass per thread
  then yields A at every position. No index is reversed inside a vector, and
  ``reverse=True`` is avoided on purpose (triton-lang/triton#4362 gives wrong results for
  this kind of combine);
* across programs, two launches:

  - launch 1 (``_summary_kernel``) scans each chunk with X_in unknown and keeps, per chunk, its
    composite map (u, v); for whitening, also the moments of A over the chunk as a function of
    X_in (A[t] = p[t] + w[t] * X_in, so mean(A) and M2(A) follow from centred moments of p, w);
    the last program to finish (atomic ticket, no host sync) composes the chunk maps of every
    row and reduces the global mean and variance with Chan's formula;
  - launch 2 (``_finalize_kernel``) composes the maps of the chunks to the right of its own (a
    short scan over at most ``T / CHUNK`` summaries), rescans its chunk with the true X_in and
    writes the outputs, whitened with the global statistics.

The sequence score enters as the X_in of the row's end (X past the last valid token is
``score``), so shaping never needs to know in launch 1 where the last valid token is.
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


# ln 2 split so that k * _LN2_HI is exact for |k| < 2^12 (its low 12 mantissa bits are zero).
_LN2_HI = tl.constexpr(0.693115234375)
_LN2_LO = tl.constexpr(3.194618329871446e-05)


@triton.jit
def _exp_f32(r):
    """exp(r) of float32 r to about 1 ulp; inf past r = 88.72, exp(-80) (~2e-35) below r = -80.

    Not tl.exp: on NVIDIA it is ex2.approx(r * log2(e)), whose rounded argument costs about |r|
    ulps (20 at r = 20). Here r = k ln2 + f with |f| <= ln2 / 2 (Cody-Waite: k ln2_hi and
    r - k ln2_hi are exact), exp(f) - 1 by its Taylor series to f^8 (the next term is 2e-10
    relative) and 2^k from its exponent bits: the same float32 operations in the interpreter and
    on every GPU. The bottom is only ever added to 1: below r = -80 its value does not matter.
    NaN in gives NaN out.
    """
    # r limited to [-80, 89], NaN to -80 (k below stays a number; the NaN comes back at the end).
    # One select on both bounds, not nested ones: Triton 3.9 turns a nested select into a
    # NaN-dropping min.f32, which no kernel may hold (tests/test_inspect.py).
    x = tl.where((r > -80.0) & (r < 89.0), r, tl.where(r >= 89.0, 89.0, -80.0))
    k = tl.floor(x * 1.4426950408889634 + 0.5)
    f = (x - k * _LN2_HI) - k * _LN2_LO
    q = f * 2.48015873015873e-05 + 0.0001984126984126984
    q = q * f + 0.001388888888888889
    q = q * f + 0.008333333333333333
    q = q * f + 0.041666666666666664
    q = q * f + 0.16666666666666666
    q = q * f + 0.5
    q = q * f + 1.0
    q = q * f
    # 2^(k-1) * 2, not 2^k: k reaches 128 just below the overflow threshold (and 2^-116 is normal).
    half = ((k.to(tl.int32) + 126) << 23).to(tl.float32, bitcast=True)
    e = (1.0 + q) * half * 2.0
    return tl.where(r == r, e, r)


@triton.jit
def _k3_expm1(r):
    """(exp(r) - r - 1, exp(r) - 1) of float32 r, each to about 1 ulp (the k3 estimate, r = -d,
    and minus its derivative in d).

    For -1 < r < 2 both come from k3 = r^2 (1/2! + r/3! + ... + r^12/14!) (the next term is
    < 1e-8 relative) and expm1 = r + k3: the naive exp(r) - r - 1 loses every digit as r -> 0
    (0 in float32 at |r| = 1e-4), and even expm1(r) - r loses log2(2 / |r|) bits. Outside,
    exp(r) - 1 - r cancels at most a factor 2.7 (at r = -1). NaN gives NaN, r = -inf gives (inf, -1), r = +inf gives (NaN, inf)
    as exp(r) - r - 1 does, and r past 88.72 overflows to inf as exp does.
    """
    small = (r > -1.0) & (r < 2.0)
    s = tl.where(small, r, 0.0)  # the series only ever sees |s| < 2
    p = s * 1.1470745597729725e-11 + 1.6059043836821613e-10
    p = p * s + 2.08767569878681e-09
    p = p * s + 2.505210838544172e-08
    p = p * s + 2.755731922398589e-07
    p = p * s + 2.7557319223985893e-06
    p = p * s + 2.48015873015873e-05
    p = p * s + 0.0001984126984126984
    p = p * s + 0.001388888888888889
    p = p * s + 0.008333333333333333
    p = p * s + 0.041666666666666664
    p = p * s + 0.16666666666666666
    p = p * s + 0.5
    k3_small = s * s * p
    em1 = _exp_f32(r) - 1.0
    k3 = tl.where(small, k3_small, em1 - r)
    em1 = tl.where(small, s + k3_small, em1)
    return k3, em1


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
        kl, _ = _k3_expm1(-d)
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
def _centre_scale(x, mean, scale):
    """(x - mean) * scale, also where x - mean overflows float32 (|x| near 3.4e38 and a mean of the
    other sign): there x * scale - mean * scale, whose terms stay finite. Elsewhere the plain form,
    one rounding fewer. NaN stays NaN (it fails the test and NaN * scale is NaN)."""
    d = x - mean
    return tl.where(tl.abs(d) < float("inf"), d * scale, x * scale - mean * scale)


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
    """Gradients of kl_penalty, with the special values PyTorch autograd of the reference gives.

    With d = lp - ref and g the incoming gradient: clamp passes g where -c <= kl <= c (0 elsewhere,
    NaN kl included, as torch.clamp's backward); then dkl/dd is 1 (k1), sign(d) (abs; 0 at 0 and
    at NaN, as torch.sign), d (k2) or 1 - exp(-d) (k3, as -g * expm1(-d): 1 - exp(-d) itself loses
    every digit as d -> 0). d/dref = -d/dlp.
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
        _, em1 = _k3_expm1(-d)
        gd = -(g * em1)
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
def _excl_combine(pu1, pv1, lu1, lv1, pu2, pv2, lu2, lv2):
    # Exclusive scan of affine maps as an inclusive scan of pairs (P, L): P composes every map
    # before the element's own, L is the element's own map. Element 1 lies later in time, so
    # its maps apply first: P = P2 o L1 o P1, L = L2.
    qu = lu1 + lv1 * pu1
    qv = lv1 * pv1
    return pu2 + pv2 * qu, pv2 * qv, lu2, lv2


@triton.jit
def _excl_combine_h(pu1, pv1, lu1, lv1, ph1, lh1, pu2, pv2, lu2, lv2, ph2, lh2):
    # _excl_combine plus a flag pair: ph = some later segment has a valid position.
    qu = lu1 + lv1 * pu1
    qv = lv1 * pv1
    return pu2 + pv2 * qu, pv2 * qv, lu2, lv2, ph2 | lh1 | ph1, lh2


@triton.jit
def _excl_flag_combine(ph1, lh1, ph2, lh2):
    return ph2 | lh1 | ph1, lh2


@triton.jit
def _sum3_max_combine(a1, b1, c1, m1, a2, b2, c2, m2):
    return a1 + a2, b1 + b2, c1 + c2, _fmax(m1, m2)


@triton.jit
def _sum4_max_combine(a1, b1, c1, d1, m1, a2, b2, c2, d2, m2):
    return a1 + a2, b1 + b2, c1 + c2, d1 + d2, _fmax(m1, m2)


@triton.jit
def _sum3_combine(a1, b1, c1, a2, b2, c2):
    return a1 + a2, b1 + b2, c1 + c2


@triton.jit
def _seg_coords(B, T, NC, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr):
    """This program's tile: BLOCK_B rows x one chunk, as [BLOCK_B, G, 4] halves of segments.

    A thread owns one segment of 8 consecutive positions (two 4-vectors, t_lo and t_hi = t_lo + 4,
    loaded in time order, so 16-byte fp32 / 8-byte bf16 loads). Segment j along axis 1 starts
    at c * CHUNK + (G - 1 - j) * 8: j counts segments from the chunk's end, so a forward scan
    over j is the reverse scan over time, and no index within a vector is reversed.
    """
    G: tl.constexpr = CHUNK // 8
    pid = tl.program_id(0)
    c = pid % NC
    rows = (pid // NC) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    j = tl.arange(0, G)
    t0 = c * CHUNK + (G - 1 - j) * 8
    t_lo = t0[None, :, None] + tl.arange(0, 4)[None, None, :]
    t_hi = t_lo + 4
    in_lo = row_ok[:, None, None] & (t_lo < T)
    in_hi = row_ok[:, None, None] & (t_hi < T)
    return c, rows, row_ok, j, t_lo, t_hi, in_lo, in_hi


@triton.jit
def _ld(ptr, rows, t, stride, inb):
    offs = rows.to(tl.int64)[:, None, None] * stride + t
    return tl.load(ptr + offs, mask=inb, other=0.0).to(tl.float32)


@triton.jit
def _ld_valid(mask_ptr, rows, t, stride, inb):
    offs = rows.to(tl.int64)[:, None, None] * stride + t
    return (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb


@triton.jit
def _st(ptr, rows, t, T, val, inb):
    offs = rows.to(tl.int64)[:, None, None] * T + t
    tl.store(ptr + offs, val, mask=inb)


@triton.jit
def _split4(x):
    """The four [R, G] planes of a [R, G, 4] tensor (register renaming: the 4 lie in one thread)."""
    a, b = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))
    x0, x2 = tl.split(a)
    x1, x3 = tl.split(b)
    return x0, x1, x2, x3


@triton.jit
def _join4(x0, x1, x2, x3):
    y = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    return tl.reshape(y, [x0.shape[0], x0.shape[1], 4])


@triton.jit
def _valid_pair(mask_ptr, rows, c_idx, j, t_lo, t_hi, in_lo, in_hi, stride_m, CHUNK: tl.constexpr):
    """valid (mask != 0, in bounds) at t_lo and t_hi, each [R, G, 4].

    A bool/uint8 mask with rows of a multiple of 8 bytes comes as uint16 words (the launcher's
    view): a thread then loads its segment's 8 mask bytes with one 8-byte load, the 4 words
    holding positions (2i, 2i + 1) of the segment in their (low, high) bytes.
    """
    if mask_ptr.dtype.element_ty == tl.uint16:
        G: tl.constexpr = CHUNK // 8
        w = c_idx * (CHUNK // 2) + (G - 1 - j) * 4
        offs = rows.to(tl.int64)[:, None, None] * stride_m + w[None, :, None] + tl.arange(0, 4)[None, None, :]
        h = tl.load(mask_ptr + offs, mask=in_lo, other=0)
        e0, e2, e4, e6 = _split4((h & 0xFF) != 0)
        o1, o3, o5, o7 = _split4((h & 0xFF00) != 0)
        mL = _join4(e0, o1, e2, o3) & in_lo
        mH = _join4(e4, o5, e6, o7) & in_hi
    else:
        mL = _ld_valid(mask_ptr, rows, t_lo, stride_m, in_lo)
        mH = _ld_valid(mask_ptr, rows, t_hi, stride_m, in_hi)
    return mL, mH


@triton.jit
def _half_inputs(a_ptr, b_ptr, val_ptr, valid, rows, t, inb, stride_a, stride_b, stride_v,
                 kl_coef, clamp_val, MODE: tl.constexpr, EST: tl.constexpr, CLAMP: tl.constexpr):
    """rewards without the score and kl (both 0 at masked positions), values of a half."""
    if MODE == 1:
        r = tl.where(valid, _ld(a_ptr, rows, t, stride_a, inb), 0.0)
        kl = r
    else:
        lp = _ld(a_ptr, rows, t, stride_a, inb)
        ref = _ld(b_ptr, rows, t, stride_b, inb)
        kl = tl.where(valid, _kl_estimate(lp, ref, clamp_val, EST, CLAMP), 0.0)
        r = -kl_coef * kl
    if MODE == 3:
        val = r
    else:
        val = _ld(val_ptr, rows, t, stride_v, inb)
    return r, kl, val


@triton.jit
def _step(u, v, m, rv, gv, c):
    # One valid position hands X_out = gamma V + c (r - V + X_in) to the previous one; a masked
    # position hands X_in on unchanged (a select: whatever it holds never enters the arithmetic).
    return tl.where(m, gv + c * (rv + u), u), tl.where(m, c * v, v)


@triton.jit
def _last_step(seen, m):
    # m at the latest valid position of the segment seen so far (scanning backwards in time).
    return m & (seen == 0), seen | m.to(tl.int32)


@triton.jit
def _astep(x, m, q, g, c):
    # A = r - V + X_in at a position, and the X it hands to the previous one (X_in if masked).
    a = q + x
    return a, tl.where(m, g + c * a, x)


@triton.jit
def _pstep(xu, xv, m, q, g, c):
    # _astep with X_in unknown: A = p + w X_in, and the affine carry (xu, xv) handed on.
    p = q + xu
    return p, xv, tl.where(m, g + c * p, xu), tl.where(m, c * xv, xv)


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
        p2 = _pow2_scale(tl.reduce(tl.reduce(mag, 1, _max_nan_combine), 0, _max_nan_combine))
        # 2 * p2 keeps every scaled magnitude below 1; at p2 = 2^127 it would be inf, so there
        # the scale stays 2^127 and scaled magnitudes stay below 2 (still far from overflow).
        s_tile = tl.where(p2 < 1.7014118346046923e38, p2 * 2.0, p2)
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
def _chunk_moments(ws_ptr, P, entry, row_ok, mL, mH, pL, pH, wL, wH, HAS_W: tl.constexpr):
    """Count, means and centred (co)moments of p (and w) over each row's valid positions of the tile.

    p and w are 0 at masked positions. Two reductions over the row: (n, sum p, sum w, max |p|),
    then the centred sums, with p - mean p divided by sp = 2^floor(log2 max |p|) (exact) before
    squaring, so that |x| ~ 1e30 cannot overflow float32; the finisher multiplies sp back.
    NaN at a valid position reaches the sums and the max (max.NaN), never from a masked one.
    """
    n_t = tl.sum(mL.to(tl.float32), axis=2) + tl.sum(mH.to(tl.float32), axis=2)
    sp_t = tl.sum(pL, axis=2) + tl.sum(pH, axis=2)
    # The same sum in units of 2^14 (exact: a power of two), which cannot overflow for a chunk of
    # at most _MAX_CHUNK = 2^13 values; used only where the plain sum overflowed (|p| ~ 1e35 and up).
    ps_t = tl.sum(pL * 0.00006103515625, axis=2) + tl.sum(pH * 0.00006103515625, axis=2)
    mx_t = _fmax(tl.reduce(tl.abs(pL), 2, _max_nan_combine), tl.reduce(tl.abs(pH), 2, _max_nan_combine))
    if HAS_W:
        sw_t = tl.sum(wL, axis=2) + tl.sum(wH, axis=2)
        n, s_p, s_w, s_ps, mx = tl.reduce((n_t, sp_t, sw_t, ps_t, mx_t), 1, _sum4_max_combine)
    else:
        n, s_p, s_ps, mx = tl.reduce((n_t, sp_t, ps_t, mx_t), 1, _sum3_max_combine)
        s_w = s_p
    n1 = _fmax(n, 1.0)
    # A NaN at a valid position makes both sums NaN, so the select keeps it.
    mp = tl.where(tl.abs(s_p) < float("inf"), s_p / n1, (s_ps / n1) * 16384.0)
    sp = _pow2_scale(mx)
    inv = 1.0 / sp
    # inv is a power of two: p * inv - mp * inv equals (p - mp) * inv exactly, and cannot overflow
    # where p - mp would (|p| near float32's max, a mean of the other sign).
    cpL = tl.where(mL, pL * inv[:, None, None] - mp[:, None, None] * inv[:, None, None], 0.0)
    cpH = tl.where(mH, pH * inv[:, None, None] - mp[:, None, None] * inv[:, None, None], 0.0)
    tl.store(ws_ptr + _N * P + entry, n, mask=row_ok)
    tl.store(ws_ptr + _MP * P + entry, mp, mask=row_ok)
    tl.store(ws_ptr + _SP * P + entry, sp, mask=row_ok)
    if HAS_W:
        mw = s_w / n1
        cwL = tl.where(mL, wL - mw[:, None, None], 0.0)
        cwH = tl.where(mH, wH - mw[:, None, None], 0.0)
        a_t = tl.sum(cpL * cpL, axis=2) + tl.sum(cpH * cpH, axis=2)
        b_t = tl.sum(cpL * cwL, axis=2) + tl.sum(cpH * cwH, axis=2)
        d_t = tl.sum(cwL * cwL, axis=2) + tl.sum(cwH * cwH, axis=2)
        cpp, cpw, cww = tl.reduce((a_t, b_t, d_t), 1, _sum3_combine)
        tl.store(ws_ptr + _MW * P + entry, mw, mask=row_ok)
        tl.store(ws_ptr + _CPP * P + entry, cpp, mask=row_ok)
        tl.store(ws_ptr + _CPW * P + entry, cpw, mask=row_ok)
        tl.store(ws_ptr + _CWW * P + entry, cww, mask=row_ok)
    else:
        a_t = tl.sum(cpL * cpL, axis=2) + tl.sum(cpH * cpH, axis=2)
        tl.store(ws_ptr + _CPP * P + entry, tl.sum(a_t, axis=1), mask=row_ok)


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
    STATS the mean of p and w, the power of two sp of max |p| and the centred sums
    pp / sp^2, pw / sp, ww over the chunk's valid positions (A = p + w * X_in). The finisher
    writes (mean, scale, count) at ``ws[9 * B * NC:]``.
    """
    G: tl.constexpr = CHUNK // 8
    c_idx, rows, row_ok, j, t_lo, t_hi, in_lo, in_hi = _seg_coords(B, T, NC, BLOCK_B, CHUNK)
    entry = rows * NC + c_idx
    if MODE == 0 or MODE == 1:
        mL, mH = _valid_pair(mask_ptr, rows, c_idx, j, t_lo, t_hi, in_lo, in_hi, stride_m, CHUNK)
        rL, klL, vL = _half_inputs(a_ptr, b_ptr, val_ptr, mL, rows, t_lo, in_lo, stride_a, stride_b, stride_v,
                                   kl_coef, clamp_val, MODE, EST, CLAMP)
        rH, klH, vH = _half_inputs(a_ptr, b_ptr, val_ptr, mH, rows, t_hi, in_hi, stride_a, stride_b, stride_v,
                                   kl_coef, clamp_val, MODE, EST, CLAMP)
        m0, m1, m2, m3 = _split4(mL)
        m4, m5, m6, m7 = _split4(mH)
        q0, q1, q2, q3 = _split4(rL - vL)
        q4, q5, q6, q7 = _split4(rH - vH)
        g0, g1, g2, g3 = _split4(gamma * vL)
        g4, g5, g6, g7 = _split4(gamma * vH)
        # The segment's map X -> u + v X, latest position first, sequentially in registers.
        u = tl.zeros([BLOCK_B, G], dtype=tl.float32)
        v = u + 1.0
        u, v = _step(u, v, m7, q7, g7, c)
        u, v = _step(u, v, m6, q6, g6, c)
        u, v = _step(u, v, m5, q5, g5, c)
        u, v = _step(u, v, m4, q4, g4, c)
        u, v = _step(u, v, m3, q3, g3, c)
        u, v = _step(u, v, m2, q2, g2, c)
        u, v = _step(u, v, m1, q1, g1, c)
        u, v = _step(u, v, m0, q0, g0, c)
        # Carry into each segment as a map of the chunk's X_in: one scan of [R, G] per tile.
        zero = tl.zeros([BLOCK_B, G], dtype=tl.float32)
        pu, pv, lu, lv = tl.associative_scan((zero, zero + 1.0, u, v), 1, _excl_combine)
        # The chunk's own map: held by the thread of its earliest segment (j = G - 1).
        first = row_ok[:, None] & (j == G - 1)[None, :]
        slot = entry[:, None] + j[None, :] * 0
        tl.store(ws_ptr + _U * P + slot, lu + lv * pu, mask=first)
        tl.store(ws_ptr + _V * P + slot, lv * pv, mask=first)
        if STATS:
            # A = p + w * X_in at every valid position, again sequentially from the carry.
            xu, xv = pu, pv
            p7, w7, xu, xv = _pstep(xu, xv, m7, q7, g7, c)
            p6, w6, xu, xv = _pstep(xu, xv, m6, q6, g6, c)
            p5, w5, xu, xv = _pstep(xu, xv, m5, q5, g5, c)
            p4, w4, xu, xv = _pstep(xu, xv, m4, q4, g4, c)
            p3, w3, xu, xv = _pstep(xu, xv, m3, q3, g3, c)
            p2, w2, xu, xv = _pstep(xu, xv, m2, q2, g2, c)
            p1, w1, xu, xv = _pstep(xu, xv, m1, q1, g1, c)
            p0 = q0 + xu
            w0 = xv
            pL = tl.where(mL, _join4(p0, p1, p2, p3), 0.0)
            pH = tl.where(mH, _join4(p4, p5, p6, p7), 0.0)
            wL = tl.where(mL, _join4(w0, w1, w2, w3), 0.0)
            wH = tl.where(mH, _join4(w4, w5, w6, w7), 0.0)
            _chunk_moments(ws_ptr, P, entry, row_ok, mL, mH, pL, pH, wL, wH, True)
    elif MODE == 2:
        mL, mH = _valid_pair(mask_ptr, rows, c_idx, j, t_lo, t_hi, in_lo, in_hi, stride_m, CHUNK)
        pL = tl.where(mL, _ld(a_ptr, rows, t_lo, stride_a, in_lo), 0.0)
        pH = tl.where(mH, _ld(a_ptr, rows, t_hi, stride_a, in_hi), 0.0)
        _chunk_moments(ws_ptr, P, entry, row_ok, mL, mH, pL, pH, pL, pH, False)
    if not STATS:
        if MODE == 0 or MODE == 3:
            # Launch 2 places the score on the last valid token: it needs to know which later
            # chunks have one.
            if MODE == 3:
                mL, mH = _valid_pair(mask_ptr, rows, c_idx, j, t_lo, t_hi, in_lo, in_hi, stride_m, CHUNK)
            cnt = tl.sum(mL.to(tl.float32), axis=2) + tl.sum(mH.to(tl.float32), axis=2)
            tl.store(ws_ptr + _N * P + entry, tl.sum(cnt, axis=1), mask=row_ok)
    else:
        # Make every thread's stores visible before taking a ticket; the last ticket reduces.
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        # The counter is this launch's own (zeroed by the launcher), so the condition does not
        # depend on what an earlier launch left behind, and there is nothing to reset.
        if ticket == n_programs - 1:
            _finish_stats(ws_ptr, score_ptr, B, NC, P, eps, MODE, FIN_B, FIN_C)


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
    G: tl.constexpr = CHUNK // 8
    c_idx, rows, row_ok, j, t_lo, t_hi, in_lo, in_hi = _seg_coords(B, T, NC, BLOCK_B, CHUNK)
    if MODE == 2:
        mean = tl.load(ws_ptr + _PLANES * P)
        scale = tl.load(ws_ptr + _PLANES * P + 1)
        count = tl.load(ws_ptr + _PLANES * P + 2)
        xL = _ld(a_ptr, rows, t_lo, stride_a, in_lo)
        xH = _ld(a_ptr, rows, t_hi, stride_a, in_hi)
        okL, okH = _valid_pair(mask_ptr, rows, c_idx, j, t_lo, t_hi, in_lo, in_hi, stride_m, CHUNK)
        yL = _centre_scale(xL, mean, scale)
        yH = _centre_scale(xH, mean, scale)
        if not SHIFT_MEAN:
            yL = yL + mean
            yH = yH + mean
        # Masked positions are 0 whatever x holds there (NaN and inf included).
        _st(out0_ptr, rows, t_lo, T, tl.where(okL, tl.where(count > 0.0, yL, 0.0), 0.0), in_lo)
        _st(out0_ptr, rows, t_hi, T, tl.where(okH, tl.where(count > 0.0, yH, 0.0), 0.0), in_hi)
    else:
        mL, mH = _valid_pair(mask_ptr, rows, c_idx, j, t_lo, t_hi, in_lo, in_hi, stride_m, CHUNK)
        rL, klL, vL = _half_inputs(a_ptr, b_ptr, val_ptr, mL, rows, t_lo, in_lo, stride_a, stride_b, stride_v,
                                   kl_coef, clamp_val, MODE, EST, CLAMP)
        rH, klH, vH = _half_inputs(a_ptr, b_ptr, val_ptr, mH, rows, t_hi, in_hi, stride_a, stride_b, stride_v,
                                   kl_coef, clamp_val, MODE, EST, CLAMP)
        m0, m1, m2, m3 = _split4(mL)
        m4, m5, m6, m7 = _split4(mH)
        base, later_ok, i = _later_chunks(rows, row_ok, c_idx, NC, NCB)
        if MODE == 0 or MODE == 3:
            score = tl.load(score_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            # The score lands on the row's last valid token: the latest valid one of this chunk
            # when no later chunk has a valid position.
            later_n = tl.sum(tl.load(ws_ptr + _N * P + base, mask=later_ok, other=0.0), axis=1)
            s = tl.zeros([BLOCK_B, G], dtype=tl.int32)
            e7, s = _last_step(s, m7)
            e6, s = _last_step(s, m6)
            e5, s = _last_step(s, m5)
            e4, s = _last_step(s, m4)
            e3, s = _last_step(s, m3)
            e2, s = _last_step(s, m2)
            e1, s = _last_step(s, m1)
            e0, s = _last_step(s, m0)
        if MODE == 0 or MODE == 1:
            q0, q1, q2, q3 = _split4(rL - vL)
            q4, q5, q6, q7 = _split4(rH - vH)
            g0, g1, g2, g3 = _split4(gamma * vL)
            g4, g5, g6, g7 = _split4(gamma * vH)
            u = tl.zeros([BLOCK_B, G], dtype=tl.float32)
            v = u + 1.0
            u, v = _step(u, v, m7, q7, g7, c)
            u, v = _step(u, v, m6, q6, g6, c)
            u, v = _step(u, v, m5, q5, g5, c)
            u, v = _step(u, v, m4, q4, g4, c)
            u, v = _step(u, v, m3, q3, g3, c)
            u, v = _step(u, v, m2, q2, g2, c)
            u, v = _step(u, v, m1, q1, g1, c)
            u, v = _step(u, v, m0, q0, g0, c)
            zero = tl.zeros([BLOCK_B, G], dtype=tl.float32)
            if MODE == 0:
                pu, pv, lu, lv, ph, lh = tl.associative_scan((zero, zero + 1.0, u, v, s * 0, s), 1, _excl_combine_h)
            else:
                pu, pv, lu, lv = tl.associative_scan((zero, zero + 1.0, u, v), 1, _excl_combine)
            # X handed into this chunk's latest valid position: the maps of the later chunks
            # (latest first) applied to X past the row's end (the score, or 0 for gae).
            uc = tl.load(ws_ptr + _U * P + base, mask=later_ok, other=0.0)
            vc = tl.load(ws_ptr + _V * P + base, mask=later_ok, other=1.0)
            U, V = tl.associative_scan((uc, vc), 1, _affine_combine)
            last_c = (i == NCB - 1)[None, :]
            x_in = tl.sum(tl.where(last_c, U, 0.0), axis=1)
            if MODE == 0:
                x_in = x_in + tl.sum(tl.where(last_c, V, 0.0), axis=1) * score
            xu = pu + pv * x_in[:, None]
            # A at every position of the segment, latest first, from the true carry.
            a7, xu = _astep(xu, m7, q7, g7, c)
            a6, xu = _astep(xu, m6, q6, g6, c)
            a5, xu = _astep(xu, m5, q5, g5, c)
            a4, xu = _astep(xu, m4, q4, g4, c)
            a3, xu = _astep(xu, m3, q3, g3, c)
            a2, xu = _astep(xu, m2, q2, g2, c)
            a1, xu = _astep(xu, m1, q1, g1, c)
            a0 = q0 + xu
            advL = _join4(a0, a1, a2, a3)
            advH = _join4(a4, a5, a6, a7)
            retL = tl.where(mL, advL + vL, 0.0)
            retH = tl.where(mH, advH + vH, 0.0)
            if WHITEN:
                mean = tl.load(ws_ptr + _PLANES * P)
                scale = tl.load(ws_ptr + _PLANES * P + 1)
                advL = _centre_scale(advL, mean, scale)
                advH = _centre_scale(advH, mean, scale)
            _st(out0_ptr, rows, t_lo, T, tl.where(mL, advL, 0.0), in_lo)
            _st(out0_ptr, rows, t_hi, T, tl.where(mH, advH, 0.0), in_hi)
            _st(out1_ptr, rows, t_lo, T, retL, in_lo)
            _st(out1_ptr, rows, t_hi, T, retH, in_hi)
        else:
            ph, lh = tl.associative_scan((s * 0, s), 1, _excl_flag_combine)
        if MODE == 0 or MODE == 3:
            end = (ph == 0) & (later_n == 0.0)[:, None]
            bonus = tl.where(end, score[:, None], 0.0)
            zero = tl.zeros([BLOCK_B, G], dtype=tl.float32)
            sL = _join4(tl.where(e0, bonus, zero), tl.where(e1, bonus, zero), tl.where(e2, bonus, zero),
                        tl.where(e3, bonus, zero))
            sH = _join4(tl.where(e4, bonus, zero), tl.where(e5, bonus, zero), tl.where(e6, bonus, zero),
                        tl.where(e7, bonus, zero))
            if MODE == 0:
                _st(out2_ptr, rows, t_lo, T, rL + sL, in_lo)
                _st(out2_ptr, rows, t_hi, T, rH + sH, in_hi)
                _st(out3_ptr, rows, t_lo, T, klL, in_lo)
                _st(out3_ptr, rows, t_hi, T, klH, in_hi)
            else:
                _st(out0_ptr, rows, t_lo, T, rL + sL, in_lo)
                _st(out0_ptr, rows, t_hi, T, rH + sH, in_hi)
                _st(out1_ptr, rows, t_lo, T, klL, in_lo)
                _st(out1_ptr, rows, t_hi, T, klH, in_hi)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Tokens per program tile (one segment of _SEG positions per thread, 8 warps): few registers,
# 2 x 16 bytes in flight per input per thread.
_TILE = 2048
# The smallest tile the grid is split down to (one warp), and the grid it tries to reach: about
# four CTAs per SM on 132 SMs (an H100), so that at least one full wave runs at every issue shape.
_MIN_TILE = 256
# Rows up to this long are one chunk (one 16-warp program per row) when B alone fills the GPU.
_ONE_CHUNK_T = 4096
_MIN_PROGRAMS = 4 * 132
# Time positions per thread: two 4-vectors, scanned sequentially in registers.
_SEG = 8
# Upper bound on chunks per row: the finisher and every finalize program hold one row of
# chunk summaries in registers; and on the chunk (32 warps of one segment per thread).
_MAX_CHUNKS = 2048
_MAX_CHUNK = 32 * 32 * _SEG


def _counter(device: torch.device) -> torch.Tensor:
    """The summary launch's ticket counter: a fresh int32 zero per launch, never cached.

    A counter kept across calls (reset by the finishing program) is only right if every earlier
    launch ran to its end: one that died midway, or a CUDA graph replayed around it, leaves a
    non-zero count and every later launch silently skips its finisher. The zero fill is one
    small stream-ordered kernel that a CUDA graph captures and replays with the launch.
    """
    return torch.zeros(1, dtype=torch.int32, device=device)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [B, T] tensor with unit stride along T (a view when possible, else a copy)."""
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


def _mask_rows(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels read it: bytes packed in uint16 words where rows allow, else [B, T].

    The kernels take a uint16 mask as packed bytes (8-byte loads of a segment's 8 positions):
    that needs a 1-byte mask, T a multiple of 8 and rows starting 8-byte aligned. A mask given
    as uint16 (or any other unsigned type wider than a byte) is first turned into bytes, so it can
    never be mistaken for packed bytes.
    """
    if mask.dtype in (torch.uint16, torch.uint32, torch.uint64):
        mask = mask != 0
    mask = _as_rows(mask)
    B, T = mask.shape
    if (mask.dtype == torch.uint8 and T % 8 == 0 and (B == 1 or mask.stride(0) % 8 == 0)
            and mask.data_ptr() % 8 == 0):
        return mask.view(torch.uint16)
    return mask


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def pick_blocks(B: int, T: int, chunk: int | None = None, rows: int | None = None) -> tuple[int, int]:
    """(CHUNK, BLOCK_B) of the chunked pass for a [B, T] problem.

    By default a program owns BLOCK_B rows x CHUNK positions, _TILE tokens, with CHUNK up to
    _TILE (long chunks keep the carry composition of launch 2 short); while the grid has fewer
    than _MIN_PROGRAMS programs, the tile is split, first by rows, then along T, down to
    _MIN_TILE tokens. Rows of _TILE < T <= _ONE_CHUNK_T positions are one chunk each (one
    16-warp program per row) when B >= _MIN_PROGRAMS / 2. ``chunk`` forces the chunk length
    (rounded up to a power of two, at least _SEG), ``rows`` the number of rows per program
    (rounded up to a power of two). Raises ValueError for T > _MAX_CHUNKS * _MAX_CHUNK (16.7M).
    """
    auto_chunk = chunk is None
    if auto_chunk:
        chunk = min(max(triton.next_power_of_2(T), _SEG), _TILE)
    else:
        chunk = max(_SEG, triton.next_power_of_2(int(chunk)))
    while triton.cdiv(T, chunk) > _MAX_CHUNKS:
        chunk *= 2
    if chunk > _MAX_CHUNK:
        raise ValueError(f"T = {T} is too long for the chunked pass (at most {_MAX_CHUNKS * _MAX_CHUNK})")
    if rows is not None:
        return chunk, max(1, triton.next_power_of_2(int(rows)))
    rows = max(1, min(triton.next_power_of_2(B), _TILE // chunk))
    if auto_chunk and _TILE < T <= _ONE_CHUNK_T and B >= _MIN_PROGRAMS // 2:
        # One chunk per row (a 16-warp tile) while there are rows enough for two CTAs per SM:
        # without whitening the pass is then a single launch at the byte floor (512 x 4096:
        # 29 instead of 42 bytes per token for compute_advantages).
        return triton.next_power_of_2(T), 1
    # Count programs as the launch does (row tiles x chunks), not rows x chunks.
    while triton.cdiv(B, rows) * triton.cdiv(T, chunk) < _MIN_PROGRAMS and rows * chunk > _MIN_TILE:
        if rows > 1:
            rows //= 2
        elif auto_chunk and chunk > _SEG:
            chunk //= 2
        else:
            break
    return chunk, rows


def _num_warps(block_b: int, chunk: int) -> int:
    """One warp per 32 segments: every thread owns one segment of _SEG positions."""
    return max(1, min(32, block_b * chunk // (32 * _SEG)))


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
    warps = _num_warps(BLOCK_B, CHUNK)
    # The finisher shares the summary kernel's registers: at most 4 summaries per thread (a
    # 512-entry tile on one warp took 238 registers, and so 8 warps per SM, at 8 x 32768).
    FIN_B = max(1, min(triton.next_power_of_2(B), min(512, 128 * warps) // FIN_C))

    a = _as_rows(a)
    b = _as_rows(b) if b is not None else a
    values = _as_rows(values) if values is not None else a
    mask = _mask_rows(mask)
    scores = scores.contiguous() if scores is not None else a
    ws = torch.empty(P * _N_PLANES + 4, dtype=torch.float32, device=device)
    counter = _counter(device)
    est = ESTIMATOR_IDS[estimator]
    strides = (_row_stride(a), _row_stride(b), _row_stride(values), _row_stride(mask))
    scalars = (float(kl_coef), float(gamma), float(gamma) * float(lam), 0.0)

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
