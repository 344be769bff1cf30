"""Fused log-softmax gather + entropy: ``logprobs_from_logits`` and ``entropy_from_logits``.

The logits of a PPO batch are the largest tensor in the step (16384 tokens x 152k vocabulary in
bf16 is 5 GB), and the math on them is trivially memory bound, so both kernels are built around
touching the logits as few times as possible:

* forward: one program per row streams the row once in blocks, keeping an online log-sum-exp
  (running max ``m`` of the raw logits x, running sum ``s`` of exp(d) with d = (x - m) / T)
  and, for the entropy, the running sum ``t`` of exp(d) * d, all in float32. It writes the
  label's log-prob, the entropy, and two float32 numbers per row for the backward (``m`` and
  ``log s``). No float32 copy of the logits exists at any point.
* backward: one program per row reads the row once more, recomputes log p = (x - m) / T - log s
  from those saved numbers (no saved probabilities) and writes d logits once, in the logits'
  dtype (z = x / T):

      d z = (onehot(label) - p) * g_logprob - p * (log p + H) * g_entropy,   d logits = d z / T

Layout: rows are addressed as ``(row // T) * stride_b + (row % T) * stride_t`` with 64-bit
arithmetic, so ``[B, T, V]`` views such as ``logits[:, :-1]`` are read in place (only the last
dimension must be contiguous) and N * V may pass 2^31. Masked rows are never read: their loop
runs zero iterations, their outputs are 0 and their gradient rows are written as zeros.

Numerics: the entropy is accumulated relative to the running max (H = log s - t / s) instead of
as lse - sum p z, which would cancel catastrophically for logits of magnitude 1e4; for the same
reason log p is formed as (x - m) / T - log s rather than z - lse, and the max is subtracted
before the temperature is applied (x - m is exact near the max, x / T at 1e4 is not). -inf logits have p = 0 and are
kept out of every product where 0 * -inf would make a NaN.

NaN in, NaN out: a NaN logit in a valid row (or a +inf one, as in float64 ``log_softmax``) makes
that row's log-prob, entropy and gradient row NaN. Every float max in both kernels is
NaN-propagating (``_max_nan``, PTX ``max.NaN.f32``): a plain ``tl.maximum`` / ``tl.max`` compiles
to ``max.f32``, which returns the non-NaN operand, and would report a diverged model as healthy.
Masked rows (``mask != 0`` is valid, so a NaN mask entry counts) output 0 and a zero gradient
whatever they hold. Labels are clamped into [0, V - 1] in both kernels: with
``FASTPPO_VALUE_CHECKS=0`` an out-of-range label gives a meaningless number, never an
out-of-bounds read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastppo import reference

from ._common import new_output

__all__ = ["logprobs_from_logits", "entropy_from_logits", "MAX_BLOCK"]

# Cap on the block width, for tests: the interpreter is slow, so tests force small blocks to get
# rows that span several blocks at small V. None: the launcher's own choice.
MAX_BLOCK: int | None = None

# Bytes of logits each program loads per loop iteration. 16 KB per CTA, with a few CTAs per SM,
# keeps enough loads in flight to cover HBM latency on an H100 (Little's law wants roughly
# 3.35 TB/s * ~0.6 us / 132 SMs ~ 15 KB per SM).
_BLOCK_BYTES = 16384


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _max_nan(a, b):
    """NaN-propagating maximum: PTX ``max.NaN.f32``. Plain ``tl.maximum`` / ``tl.max`` lower to
    ``max.f32``, which returns the non-NaN operand, and would turn a NaN logit into a finite
    row max (and a NaN exponent into the floor below)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _lse_update(x, m, s, t, scale2, WITH_ENTROPY: tl.constexpr):
    """One online log-sum-exp step over the float32 block ``x``: returns the new (m, s, t)."""
    neg_inf = float("-inf")
    # NaN-propagating row max: a NaN logit makes m, and with it every output of the row, NaN.
    m_new = _max_nan(m, tl.reduce(x, 0, _max_nan))
    # An all -inf prefix keeps m = -inf; shifting by 0 then avoids exp(-inf - -inf) = NaN.
    shift = tl.where(m_new == neg_inf, 0.0, m_new)
    alpha = tl.exp2((m - shift) * scale2)
    # Subtract the max before scaling by 1/T: x - shift is exact for x near the max, while
    # x * (1/T) at |x| ~ 1e4 would already carry an absolute error of ~1e-3.
    # The floor turns -inf (a -inf logit, a padded lane) into a finite exponent whose 2^d
    # is 0 in float32 anyway, so e * d below is 0 instead of 0 * -inf = NaN, with one max
    # per element rather than a compare and a select. The max propagates NaN (x NaN, or
    # x = +inf = shift, where PyTorch's log_softmax gives NaN too) into s and t.
    d = _max_nan((x - shift) * scale2, -256.0)
    e = tl.exp2(d)
    if WITH_ENTROPY:
        # t tracks sum e * d; moving the max rescales by alpha and subtracts
        # s * (m_new - m) * scale2. While m is still -inf, s = t = 0 and the step must not
        # be inf.
        step = tl.where(m == neg_inf, 0.0, (shift - m) * scale2)
        t = alpha * (t - s * step) + tl.sum(e * d, axis=0)
    s = s * alpha + tl.sum(e, axis=0)
    return m_new, s, t


@triton.jit
def _lane_update(x, m, s, t, scale2, WITH_ENTROPY: tl.constexpr):
    """Online log-sum-exp step of every lane: ``x`` is a [K, L, CV] float32 block whose axes 0
    and 2 live in one thread's registers; (m, s, t) are [L] per-lane states. No value crosses a
    thread, so the step needs no shuffle and no CTA barrier (the 1-D block's row max and sums
    cost 4-9 barriers per block, each stalling the next block's loads)."""
    neg_inf = float("-inf")
    m_new = _max_nan(m, tl.reduce(tl.reduce(x, 2, _max_nan), 0, _max_nan))
    shift = tl.where(m_new == neg_inf, 0.0, m_new)
    alpha = tl.exp2((m - shift) * scale2)
    # As in _lse_update: max subtracted before 1/T, -inf floored to an exponent whose 2^d is 0.
    d = _max_nan((x - shift[None, :, None]) * scale2, -256.0)
    e = tl.exp2(d)
    if WITH_ENTROPY:
        step = tl.where(m == neg_inf, 0.0, (shift - m) * scale2)
        t = alpha * (t - s * step) + tl.sum(tl.sum(e * d, axis=2), axis=0)
    s = s * alpha + tl.sum(tl.sum(e, axis=2), axis=0)
    return m_new, s, t


@triton.jit
def _rescaled(m, s, t, shift, scale2):
    """(s, t) of a state with max ``m`` re-expressed relative to ``shift`` >= m (t = sum e * d)."""
    alpha = tl.exp2((m - shift) * scale2)
    step = tl.where(m == float("-inf"), 0.0, (shift - m) * scale2)
    return alpha * s, alpha * (t - s * step)


@triton.jit
def _merge_lanes(m, s, t, mh, sh, th, scale2):
    """One (max, sum, entropy sum) from the [L] lane states and the scalar head state."""
    neg_inf = float("-inf")
    mm = _max_nan(tl.reduce(m, 0, _max_nan), mh)
    shift = tl.where(mm == neg_inf, 0.0, mm)
    sl, tlane = _rescaled(m, s, t, shift, scale2)
    shd, thd = _rescaled(mh, sh, th, shift, scale2)
    return mm, tl.sum(sl, axis=0) + shd, tl.sum(tlane, axis=0) + thd


# T (rows per batch) and the batch stride change with every response length (the batch stride of
# a [:, :-1] view is (T + 1) * V); specialized, each new length's 16-divisibility (and T == 1)
# would be a new compile. They only pick a row's start, whose alignment the launcher already
# proved (PEEL, ptr_off), so they stay out of the specialization.
@triton.jit(do_not_specialize=["T", "stride_b"])
def _logprob_fwd_kernel(
    logits_ptr,
    labels_ptr,
    valid_ptr,
    logprob_ptr,
    entropy_ptr,
    rowmax_ptr,
    logsum_ptr,
    T,
    stride_b,
    stride_t,
    V,
    ptr_off,
    inv_temp,
    HAS_MASK: tl.constexpr,
    WITH_LOGPROB: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
    PEEL: tl.constexpr,
    VEC: tl.constexpr,
    K: tl.constexpr = 1,
):
    """One program per row. Writes logprob / entropy (if asked) and the row's (max, log-sum).

    The body streams the row in blocks of BLOCK = K * LANES * CV columns, viewed as [K, LANES,
    CV]: CV contiguous columns (16 bytes) per load, LANES = one per thread (the launcher's K),
    K loads per thread.
    Each thread keeps its own online log-sum-exp state, merged once after the loop, and the next
    block's loads are issued before the current block is reduced (software pipelining).

    ``PEEL``: row starts are not all 16-byte aligned (V or a stride not a multiple of ``VEC`` =
    16 bytes / element size, or a misaligned data pointer: ``ptr_off`` elements past a 16-byte
    boundary). The row is then split into a head of h < VEC columns up to the next 16-byte
    boundary, a body of a multiple of VEC columns from that boundary (16-byte loads), and a tail
    of < VEC columns; head and tail go through one small masked block before the body loop.
    """
    row = tl.program_id(0).to(tl.int64)
    row_off = (row // T) * stride_b + (row % T) * stride_t
    base = logits_ptr + row_off
    n_cols = V
    if HAS_MASK:
        valid = tl.load(valid_ptr + row) != 0
        # Zero iterations for a masked row: its logits are never read (they may be garbage).
        n_cols = tl.where(valid, V, 0)
    neg_inf = float("-inf")
    # Scalar float32 state (of the peeled head and tail). Built from a reduction so that it is a tensor of the right type
    # from the first iteration on, whatever the Triton version does with Python-float carries.
    zero_vec = tl.zeros([BLOCK], dtype=tl.float32)
    # (A sum, not a max: the kernel then holds no NaN-dropping max.f32 at all, see _max_nan.)
    m = tl.sum(zero_vec, axis=0) + neg_inf
    s = tl.sum(zero_vec, axis=0)
    t = tl.sum(zero_vec, axis=0)
    # Exponents in base 2: log2(e) / T folded into one scale saves a multiply per element over
    # tl.exp (which lowers to ex2 of x * log2(e) anyway); s and t are kept in base-2 units.
    scale2 = inv_temp * 1.4426950408889634
    if PEEL:
        # Columns up to the next 16-byte boundary (ptr_off + row_off + head = 0 mod VEC).
        head = (VEC - (ptr_off + row_off) % VEC) % VEC
        head = tl.minimum(head, n_cols).to(tl.int32)
        n_body = ((n_cols - head) // VEC) * VEC
        # Truly 16-byte aligned (an element-aligned pointer plus a VEC multiple of elements).
        body = tl.multiple_of(base + head, 16)
        # Head lanes [0, VEC), tail lanes [VEC, 2 VEC); never more than n_cols columns.
        lane = tl.arange(0, 2 * VEC)
        ecol = tl.where(lane < VEC, lane, head + n_body + lane - VEC)
        emask = tl.where(lane < VEC, lane < head, ecol < n_cols)
        xe = tl.load(base + ecol, mask=emask, other=neg_inf).to(tl.float32)
        m, s, t = _lse_update(xe, m, s, t, scale2, WITH_ENTROPY)
    else:
        n_body = n_cols
        # Not peeled: the launcher found the pointer and every stride 16-aligned, which Triton
        # no longer sees in the unspecialized T and stride_b.
        body = tl.multiple_of(base, 16)
    # Column of each 16-byte chunk ([K, LANES, 1]) and of each element ([K, LANES, CV]). The
    # load mask is per chunk: n_body is a multiple of CV (VEC when peeled, V % 16 == 0 when not),
    # so a chunk is all in or all out and the loads stay 16 bytes wide.
    CV: tl.constexpr = VEC if VEC < BLOCK else BLOCK
    LANES: tl.constexpr = BLOCK // (K * CV)
    chunk = (tl.arange(0, K)[:, None, None] * (LANES * CV) + tl.arange(0, LANES)[None, :, None] * CV)
    col3 = chunk + tl.arange(0, CV)[None, None, :]
    lane_m = tl.zeros([LANES], dtype=tl.float32) + neg_inf
    lane_s = tl.zeros([LANES], dtype=tl.float32)
    lane_t = tl.zeros([LANES], dtype=tl.float32)
    x = tl.load(body + col3, mask=chunk < n_body, other=neg_inf)
    for start in range(0, n_body, BLOCK):
        # Prefetch: the next block's loads are in flight while this one is reduced.
        nxt = start + BLOCK
        x_next = tl.load(body + nxt + col3, mask=nxt + chunk < n_body, other=neg_inf)
        lane_m, lane_s, lane_t = _lane_update(x.to(tl.float32), lane_m, lane_s, lane_t, scale2, WITH_ENTROPY)
        x = x_next
    m, s, t = _merge_lanes(lane_m, lane_s, lane_t, m, s, t, scale2)

    if HAS_MASK:
        # A masked row has s = 0; its outputs are replaced below, but log(0) and 0 / 0 need not
        # be computed at all.
        s = tl.where(valid, s, 1.0)
    log2_s = tl.log2(s)
    log_s = log2_s * 0.6931471805599453
    if HAS_MASK:
        tl.store(rowmax_ptr + row, tl.where(valid, m, 0.0))
        tl.store(logsum_ptr + row, tl.where(valid, log_s, 0.0))
    else:
        tl.store(rowmax_ptr + row, m)
        tl.store(logsum_ptr + row, log_s)
    if WITH_LOGPROB:
        if HAS_MASK:
            label = tl.load(labels_ptr + row, mask=valid, other=0).to(tl.int64)
            # Clamped into [0, V - 1]: with FASTPPO_VALUE_CHECKS=0 an out-of-range label gives a
            # meaningless value but never an out-of-bounds read.
            label = tl.minimum(tl.maximum(label, 0), V - 1)
            x_label = tl.load(base + label, mask=valid, other=0.0).to(tl.float32)
            tl.store(logprob_ptr + row, tl.where(valid, (x_label - m) * inv_temp - log_s, 0.0))
        else:
            label = tl.load(labels_ptr + row).to(tl.int64)
            label = tl.minimum(tl.maximum(label, 0), V - 1)
            x_label = tl.load(base + label).to(tl.float32)
            tl.store(logprob_ptr + row, (x_label - m) * inv_temp - log_s)
    if WITH_ENTROPY:
        entropy = (log2_s - t / s) * 0.6931471805599453
        if HAS_MASK:
            entropy = tl.where(valid, entropy, 0.0)
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _dlogits(x, cols, label, m, scale2, log2_s, g_lp, g_ent2, entropy2,
             HAS_GRAD_LOGPROB: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr):
    """d logits (float32) of the block ``x`` at row columns ``cols``."""
    # Floored as in the forward: p = 0 exactly where log p = -inf, and p * log p stays 0.
    # NaN-propagating: a NaN row (NaN m or log s from the forward) gets a NaN gradient row.
    log2_p = _max_nan((x - m) * scale2 - log2_s, -256.0)
    p = tl.exp2(log2_p)
    g = tl.zeros(x.shape, dtype=tl.float32)
    if HAS_GRAD_LOGPROB:
        g += (tl.where(cols == label, 1.0, 0.0) - p) * g_lp
    if HAS_GRAD_ENTROPY:
        g -= p * (log2_p + entropy2) * g_ent2
    return g


@triton.jit(do_not_specialize=["T", "stride_b", "grad_stride_b"])
def _logprob_bwd_kernel(
    logits_ptr,
    grad_ptr,
    labels_ptr,
    valid_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    entropy_ptr,
    rowmax_ptr,
    logsum_ptr,
    T,
    stride_b,
    stride_t,
    grad_stride_b,
    grad_stride_t,
    V,
    ptr_off,
    inv_temp,
    HAS_MASK: tl.constexpr,
    HAS_GRAD_LOGPROB: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
    PEEL: tl.constexpr,
    GRAD_ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
):
    """One program per row: d logits for the row, written in the dtype of ``grad_ptr``.

    ``grad_ptr`` may alias ``logits_ptr`` (inplace backward): every block is loaded before the
    same block is stored, by the same program, and rows never overlap.

    ``PEEL`` / ``VEC`` / ``ptr_off``: as in the forward, the row is split at the logits' 16-byte
    boundary (head and tail in one small block, the body with 16-byte loads). ``GRAD_ALIGNED``:
    the launcher checked that every gradient row sits at the same offset modulo 16 bytes as its
    logits row, so the body's stores are 16 bytes wide too (else they are scalar, still correct).
    """
    row = tl.program_id(0).to(tl.int64)
    row_off = (row // T) * stride_b + (row % T) * stride_t
    base = logits_ptr + row_off
    grad_base = grad_ptr + (row // T) * grad_stride_b + (row % T) * grad_stride_t
    n_read = V
    if HAS_MASK:
        valid = tl.load(valid_ptr + row) != 0
        # A masked row is written (zeros) but never read: its load bound is 0.
        n_read = tl.where(valid, V, 0)
    m = tl.load(rowmax_ptr + row)
    # Base 2 as in the forward: one multiply and an ex2 per element.
    scale2 = inv_temp * 1.4426950408889634
    log2_s = tl.load(logsum_ptr + row) * 1.4426950408889634
    # 1 / T of d z / d logits is folded into the per-row coefficients. A masked row gets zero
    # coefficients (whatever its incoming gradient holds, even NaN), and with its logits read as
    # -inf every term below is an exact 0: no per-element select is needed for the mask.
    label = 0
    g_lp = 0.0
    g_ent2 = 0.0
    entropy2 = 0.0
    if HAS_GRAD_LOGPROB:
        if HAS_MASK:
            label = tl.load(labels_ptr + row, mask=valid, other=0).to(tl.int64)
        else:
            label = tl.load(labels_ptr + row).to(tl.int64)
        # Clamped as in the forward, so the one-hot sits where the forward read its logit.
        label = tl.minimum(tl.maximum(label, 0), V - 1)
        g_lp = tl.load(grad_logprob_ptr + row).to(tl.float32) * inv_temp
        if HAS_MASK:
            g_lp = tl.where(valid, g_lp, 0.0)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32) * inv_temp
        if HAS_MASK:
            g_ent = tl.where(valid, g_ent, 0.0)
        # log p + H = ln 2 * (log2 p + H / ln 2): the ln 2 goes into the row coefficient.
        g_ent2 = g_ent * 0.6931471805599453
        entropy2 = tl.load(entropy_ptr + row) * 1.4426950408889634
    if PEEL:
        # Columns up to the logits' next 16-byte boundary; the whole row is written, so the split
        # does not depend on the mask (n_read only bounds the loads).
        head = ((VEC - (ptr_off + row_off) % VEC) % VEC).to(tl.int32)
        head = tl.minimum(head, V)
        n_body = ((V - head) // VEC) * VEC
        n_body_read = ((n_read - tl.minimum(head, n_read)) // VEC) * VEC
        body = tl.multiple_of(base + head, 16)
        if GRAD_ALIGNED:
            grad_body = tl.multiple_of(grad_base + head, 16)
        else:
            grad_body = grad_base + head
        # Head lanes [0, VEC), tail lanes [VEC, 2 VEC), as in the forward.
        lane = tl.arange(0, 2 * VEC)
        ecol = tl.where(lane < VEC, lane, head + n_body + lane - VEC)
        emask = tl.where(lane < VEC, lane < head, ecol < V)
        xe = tl.load(base + ecol, mask=emask & (ecol < n_read), other=float("-inf")).to(tl.float32)
        ge = _dlogits(xe, ecol, label, m, scale2, log2_s, g_lp, g_ent2, entropy2,
                      HAS_GRAD_LOGPROB, HAS_GRAD_ENTROPY)
        tl.store(grad_base + ecol, ge.to(grad_ptr.dtype.element_ty), mask=emask)
        # The body's columns count from the boundary: the one-hot compares against label - head.
        body_label = label - head
    else:
        n_body = V
        n_body_read = n_read
        # Aligned rows (the launcher checked; T and the batch strides are not specialized).
        body = tl.multiple_of(base, 16)
        if GRAD_ALIGNED:
            grad_body = tl.multiple_of(grad_base, 16)
        else:
            grad_body = grad_base
        body_label = label
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_body, BLOCK):
        cols = start + offs
        x = tl.load(body + cols, mask=cols < n_body_read, other=float("-inf")).to(tl.float32)
        g = _dlogits(x, cols, body_label, m, scale2, log2_s, g_lp, g_ent2, entropy2,
                     HAS_GRAD_LOGPROB, HAS_GRAD_ENTROPY)
        tl.store(grad_body + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_body)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _block_and_warps(vocab: int, element_size: int) -> tuple[int, int]:
    """Block width (a power of two) and num_warps for rows of ``vocab`` elements."""
    block = _BLOCK_BYTES // element_size
    block = min(block, max(16, triton.next_power_of_2(vocab)))
    if MAX_BLOCK is not None:
        block = max(1, min(block, MAX_BLOCK))
    # 8 warps at the full 16 KB block: 16-32 elements per thread, i.e. 2-4 16-byte loads in flight
    # per thread without spilling the float32 temporaries.
    num_warps = max(1, min(8, block // 512))
    return block, num_warps


def _lane_blocks(block: int, vec: int, num_warps: int) -> tuple[int, int, int]:
    """(K, LANES, CV) of the forward's [K, LANES, CV] view of a block: CV columns per 16-byte
    load, one lane per thread (fewer for small blocks), K loads per thread. The kernel takes K
    and derives the other two the same way."""
    cv = min(vec, block)
    lanes = min(32 * num_warps, block // cv)
    return block // (lanes * cv), lanes, cv


def _row_layout(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """(logits with a contiguous last dim, rows per batch T, stride_b, stride_t, N)."""
    if logits.stride(-1) != 1:
        # The kernels vectorise along the vocabulary; a strided last dimension is rare enough
        # (a transposed view) that one copy is the better trade than a slow gather.
        logits = logits.contiguous()
    if logits.dim() == 3:
        B, T, _ = logits.shape
        return logits, T, logits.stride(0), logits.stride(1), B * T
    N = logits.shape[0]
    return logits, max(N, 1), 0, logits.stride(0), N



def _alignment(t: torch.Tensor, stride_b: int, stride_t: int, V: int) -> tuple[int, int, bool]:
    """(VEC, ptr_off, peel) for rows of ``t``: VEC elements make 16 bytes; ``ptr_off`` is how
    many elements the data pointer lies past a 16-byte boundary; ``peel`` is True when some row
    may start off a 16-byte boundary or hold a length that is not a multiple of VEC (V = 50257),
    or rather: when Triton cannot prove otherwise. It specializes an integer argument as aligned
    only when it is a multiple of 16 (elements, whatever the dtype: V = 1000 in bf16 is 2000 bytes,
    but unproven) and a pointer when it is 16-byte aligned. The kernels then split each row at its
    boundary so that the body still loads 16 bytes."""
    vec = max(1, 16 // t.element_size())
    ptr_off = (t.data_ptr() % 16) // t.element_size()
    peel = bool(ptr_off or V % 16 or stride_b % 16 or stride_t % 16)
    return vec, ptr_off, peel


def _grad_buffer(logits: torch.Tensor, T: int, stride_b: int, stride_t: int, N: int, ptr_off: int,
                 aligned: bool = True) -> torch.Tensor:
    """A new d logits tensor of the logits' shape and dtype whose every row starts at the same
    offset modulo 16 elements (and so modulo 16 bytes) as the logits row it belongs to.

    A contiguous gradient for a view such as ``logits[:, :-1]`` at V = 50257 would shift row b
    by b * V elements against the logits: the peeled body could not store 16 bytes at a time
    (2-byte stores, 80 registers, 4 barriers per block on Triton 3.6). Instead the strides are
    the smallest ones at least as large as a packed layout that are congruent to the logits'
    modulo 16 (at most 15 padding elements per row or per batch), and the data pointer sits
    ``ptr_off`` elements past a 16-byte boundary like the logits'. For contiguous logits that is
    the contiguous layout. Autograd takes any strides for an input's gradient (a slice's
    backward copies it into its base's gradient). ``aligned=False``: a contiguous tensor.
    """
    V = logits.shape[-1]
    if N == 0 or V == 0 or not aligned:
        return new_output(logits.shape, logits.dtype, logits.device)
    g_t = V + (stride_t - V) % 16
    if logits.dim() == 3:
        g_b = T * g_t + (stride_b - T * g_t) % 16
        strides = (g_b, g_t, 1)
        span = (logits.shape[0] - 1) * g_b + (T - 1) * g_t + V
    else:
        strides = (g_t, 1)
        span = (N - 1) * g_t + V
    # new_output's allocation (and its poisoning in tests), viewed at the logits' alignment;
    # the allocator returns 16-byte aligned blocks, so the view starts ptr_off elements past one.
    buf = new_output((ptr_off + span,), logits.dtype, logits.device)
    return buf.as_strided(logits.shape, strides, ptr_off)


def _valid_flags(mask: torch.Tensor | None, n_rows: int) -> torch.Tensor | None:
    """``[N]`` uint8 0/1 from a bool or numeric mask (a few bytes per row, never per logit)."""
    if mask is None:
        return None
    flags = mask.reshape(n_rows)
    if flags.dtype != torch.bool:
        flags = flags != 0
    return flags.contiguous().view(torch.uint8)


def _forward(logits, labels, valid, inv_temp, with_logprob, with_entropy):
    """Launch the forward kernel.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]`` fp32/bf16/fp16 with last-dim stride 1.
        labels: ``[N]`` integer (contiguous) or None when ``with_logprob`` is False.
        valid: ``[N]`` uint8 or None.
    Returns:
        (logprob ``[N]`` fp32 or None, entropy ``[N]`` fp32 or None, rowmax ``[N]`` fp32 (max of
        the raw logits), logsum ``[N]`` fp32 (log sum exp((x - rowmax) / T))); the last two are
        what the backward recomputes p from.
    """
    logits, T, stride_b, stride_t, N = _row_layout(logits)
    V = logits.shape[-1]
    device = logits.device
    rowmax = new_output((N,), torch.float32, device)
    logsum = new_output((N,), torch.float32, device)
    logprob = new_output((N,), torch.float32, device) if with_logprob else None
    entropy = new_output((N,), torch.float32, device) if with_entropy else None
    if N > 0:
        block, num_warps = _block_and_warps(V, logits.element_size())
        vec, ptr_off, peel = _alignment(logits, stride_b, stride_t, V)
        k, _, _ = _lane_blocks(block, vec, num_warps)
        # Unused pointer slots get a real tensor: every Triton version accepts that.
        _logprob_fwd_kernel[(N,)](
            logits,
            labels if labels is not None else rowmax,
            valid if valid is not None else rowmax,
            logprob if logprob is not None else rowmax,
            entropy if entropy is not None else rowmax,
            rowmax,
            logsum,
            T,
            stride_b,
            stride_t,
            V,
            ptr_off,
            inv_temp,
            HAS_MASK=valid is not None,
            WITH_LOGPROB=with_logprob,
            WITH_ENTROPY=with_entropy,
            BLOCK=block,
            PEEL=peel,
            VEC=vec,
            K=k,
            num_warps=num_warps,
        )
    return logprob, entropy, rowmax, logsum


def _backward(logits, labels, valid, rowmax, logsum, entropy, grad_logprob, grad_entropy, inv_temp, inplace,
              aligned_grad=False):
    """Launch the backward kernel; returns d logits with the shape and dtype of ``logits``.

    ``grad_logprob`` / ``grad_entropy``: ``[N]`` float tensors or None (that output got no
    gradient). With ``inplace`` the gradient is written over ``logits`` itself. Otherwise it is a
    new tensor: with ``aligned_grad`` laid out at the logits' alignment (:func:`_grad_buffer`;
    what autograd gets), else contiguous (for callers that need a contiguous result, such as the
    torch.compile custom op, whose outputs are contiguous: a strided one would cost a copy there).
    """
    logits, T, stride_b, stride_t, N = _row_layout(logits)
    V = logits.shape[-1]
    if inplace and any(st == 0 and n > 1 for st, n in zip(logits.stride(), logits.shape)):
        # Rows that share memory (an expand()) would be written by several programs at once.
        inplace = False
    vec, ptr_off, peel = _alignment(logits, stride_b, stride_t, V)
    if inplace:
        grad = logits.detach()
        grad_stride_b, grad_stride_t = stride_b, stride_t
    else:
        grad = _grad_buffer(logits, T, stride_b, stride_t, N, ptr_off, aligned_grad)
        _, _, grad_stride_b, grad_stride_t, _ = _row_layout(grad)
    if N > 0:
        block, num_warps = _block_and_warps(V, logits.element_size())
        # Gradient rows at the same offset modulo 16 bytes as the logits rows (inplace, or both
        # laid out alike): the body's stores are 16 bytes wide as well.
        g_off = (grad.data_ptr() % 16) // grad.element_size()
        grad_aligned = g_off == ptr_off and (grad_stride_b - stride_b) % vec == 0 and (grad_stride_t - stride_t) % vec == 0
        _logprob_bwd_kernel[(N,)](
            logits,
            grad,
            labels if labels is not None else rowmax,
            valid if valid is not None else rowmax,
            grad_logprob if grad_logprob is not None else rowmax,
            grad_entropy if grad_entropy is not None else rowmax,
            entropy if entropy is not None else rowmax,
            rowmax,
            logsum,
            T,
            stride_b,
            stride_t,
            grad_stride_b,
            grad_stride_t,
            V,
            ptr_off,
            inv_temp,
            HAS_MASK=valid is not None,
            HAS_GRAD_LOGPROB=grad_logprob is not None,
            HAS_GRAD_ENTROPY=grad_entropy is not None,
            BLOCK=block,
            PEEL=peel,
            GRAD_ALIGNED=grad_aligned,
            VEC=vec,
            num_warps=num_warps,
        )
    return grad


def _flat_grad(g: torch.Tensor | None, n_rows: int) -> torch.Tensor | None:
    """``[N]`` contiguous float32 view or copy of an incoming output gradient."""
    if g is None:
        return None
    return g.reshape(n_rows).to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class _LogprobEntropy(torch.autograd.Function):
    """Outputs, in this order: the log-prob (if ``with_logprob``), the entropy (if
    ``with_entropy``), each float32 ``[N]``. Either may receive no gradient."""

    @staticmethod
    def forward(ctx, logits, labels, valid, inv_temp, with_logprob, with_entropy, inplace):
        logprob, entropy, rowmax, logsum = _forward(logits, labels, valid, inv_temp, with_logprob, with_entropy)
        ctx.save_for_backward(logits, labels, valid, rowmax, logsum, entropy)
        ctx.inv_temp = inv_temp
        ctx.with_logprob = with_logprob
        ctx.inplace = inplace
        ctx.set_materialize_grads(False)
        outputs = tuple(o for o in (logprob, entropy) if o is not None)
        return outputs if len(outputs) > 1 else outputs[0]

    @staticmethod
    def backward(ctx, *grads):
        logits, labels, valid, rowmax, logsum, entropy = ctx.saved_tensors
        grads = list(grads)
        grad_logprob = grads.pop(0) if ctx.with_logprob else None
        grad_entropy = grads.pop(0) if entropy is not None else None
        n_rows = rowmax.shape[0]
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 7
        grad_logits = _backward(
            logits,
            labels,
            valid,
            rowmax,
            logsum,
            entropy,
            _flat_grad(grad_logprob, n_rows),
            _flat_grad(grad_entropy, n_rows),
            ctx.inv_temp,
            ctx.inplace,
            aligned_grad=True,
        )
        return grad_logits, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public ops (arguments already validated by fastppo.ops)
# --------------------------------------------------------------------------------------------


def logprobs_from_logits(
    logits, labels, *, temperature=1.0, return_entropy=False, mask=None, inplace_backward=False
):
    """Per-token log-probability of ``labels`` under ``softmax(logits / temperature)``.

    Same numbers as ``fastppo.reference.logprobs_from_logits``, one read of the logits forward,
    one read and one write backward.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, float32 / bfloat16 / float16; any strides as long as
            the last dimension is contiguous (otherwise it is copied once). float64 goes to the
            reference.
        labels: integer, shape ``logits.shape[:-1]``, in [0, V) (checked by fastppo.ops unless
            ``FASTPPO_VALUE_CHECKS=0``; unchecked, the kernels clamp them into [0, V - 1], so an
            out-of-range label gives a meaningless but memory-safe value).
        mask: optional, of the shape of ``labels``; ``mask != 0`` marks a valid row (bool, or any
            number: 2, 0.5, -1 and NaN are valid). Masked rows are not read, give 0 and get a zero
            gradient row.
        inplace_backward: write d logits over the logits' own storage instead of a new buffer.
            Hazard: the logits hold the gradient afterwards, so nothing else may read them after
            this backward (another op's backward on the same logits, a second backward with
            ``retain_graph``, or the caller); for logits with a strided last dimension the
            gradient lands in a private copy and no memory is saved.
    Returns:
        float32 log-probs of the shape of ``labels``, or ``(logprobs, entropy)``.
    """
    if logits.dtype == torch.float64:
        return reference.logprobs_from_logits.raw(
            logits, labels, temperature=temperature, return_entropy=return_entropy, mask=mask,
            inplace_backward=inplace_backward,
        )
    n_rows = labels.numel()
    flat_labels = labels.reshape(n_rows).contiguous()
    valid = _valid_flags(mask, n_rows)
    out = _LogprobEntropy.apply(
        logits, flat_labels, valid, 1.0 / float(temperature), True, return_entropy, inplace_backward
    )
    if return_entropy:
        logprob, entropy = out
        return logprob.view(labels.shape), entropy.view(labels.shape)
    return out.view(labels.shape)


def entropy_from_logits(logits, *, temperature=1.0, inplace_backward=False):
    """Entropy of ``softmax(logits / temperature)`` over the last dimension.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, float32 / bfloat16 / float16 (float64: reference).
        inplace_backward: as for :func:`logprobs_from_logits`, with the same hazard.
    Returns:
        float32 tensor of shape ``logits.shape[:-1]``.
    """
    if logits.dtype == torch.float64:
        return reference.entropy_from_logits.raw(logits, temperature=temperature, inplace_backward=inplace_backward)
    entropy = _LogprobEntropy.apply(logits, None, None, 1.0 / float(temperature), False, True, inplace_backward)
    return entropy.view(logits.shape[:-1])
