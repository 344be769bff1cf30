"""``linear_logprobs`` on CUDA: cuBLAS matmuls per vocabulary chunk plus two Triton chunk kernels.

The algorithm and its loops live in ``fastppo.linear`` (shared with the CPU path); this file
supplies the two per-chunk steps as Triton kernels:

* ``_fold_fwd_kernel``: one program per row of a ``[rows, chunk]`` float32 logits tile (the
  output of one cuBLAS matmul with float32 accumulation). It adds the bias chunk, picks the
  label's logit if the label falls in this chunk, and folds the tile into the row's running max
  ``m``, sum ``s`` of exp((z - m) / T) and entropy sum ``t`` of exp(d) * d with d = (z - m) / T,
  all float32, read and written back per chunk (16 bytes per row per chunk).
* ``_dlogits_kernel``: one program per row of the recomputed tile; from the saved (m, log s, H)
  it writes d logits = ((onehot - p) g_lp - p (log p + H) g_ent) / T in the operand dtype of
  the next two matmuls (d hidden += d z @ W_c, d W_c = d z.T @ h).

Masked rows never reach a kernel: the rows are compacted before the first matmul. The matmuls
are plain torch, so under ``TRITON_INTERPRET=1`` the whole path runs on CPU tensors.

Numerics as in ``kernels/logprob.py`` (base-2 exponents, the max subtracted before the
temperature, -inf floored to a finite exponent). NaN: the block max is a NaN-propagating
reduction and the floor is an explicit select (``d < floor``), never ``max.f32``, which would
return the non-NaN operand on a GPU; a NaN logit therefore makes its row's m, s and t NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastppo import linear

from ._common import new_output

__all__ = ["linear_logprobs", "linear_ppo_loss", "MAX_BLOCK", "TritonFolds"]

# Cap on the block width, for tests (the interpreter is slow; small blocks give several blocks
# per chunk at small V). None: the launcher's own choice.
MAX_BLOCK: int | None = None
# float32 elements per block: 16 KB per program per iteration, as in kernels/logprob.py.
_BLOCK_ELEMENTS = 4096

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _fold_fwd_kernel(
    z_ptr,
    stride_z,
    bias_ptr,
    labels_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    zl_ptr,
    c0,
    n_cols,
    V,
    scale2,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: fold columns [c0, c0 + n_cols) of the row into (m, s, t, z_label)."""
    row = tl.program_id(0).to(tl.int64)
    zrow = z_ptr + row * stride_z
    neg_inf = float("-inf")
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    # t is kept in natural units between chunks and in base-2 units (sum e * d2) inside.
    t = tl.load(t_ptr + row) * 1.4426950408889634
    # The label's logit, if the label lies in this chunk (clamped: labels are never read out of
    # bounds, even with FASTPPO_VALUE_CHECKS=0).
    label = tl.load(labels_ptr + row).to(tl.int64)
    label = tl.where(label < 0, 0, tl.where(label >= V, V - 1, label))
    local = label - c0
    inside = (local >= 0) & (local < n_cols)
    x_label = tl.load(zrow + local, mask=inside, other=0.0)
    if HAS_BIAS:
        x_label += tl.load(bias_ptr + local, mask=inside, other=0.0).to(tl.float32)
    tl.store(zl_ptr + row, x_label, mask=inside)

    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        in_row = cols < n_cols
        x = tl.load(zrow + cols, mask=in_row, other=neg_inf)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        m_new = _nan_max(m, tl.reduce(x, 0, _nan_max))
        # An all -inf prefix keeps m = -inf; shifting by 0 then avoids exp(-inf - -inf) = NaN.
        shift = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp2((m - shift) * scale2)
        # The max first, then 1/T. The floor turns -inf (a -inf bias, a padded lane) into an
        # exponent whose 2^d is 0, so e * d is 0, not NaN; a select, so a NaN stays NaN.
        d = (x - shift) * scale2
        d = tl.where(d < -256.0, -256.0, d)
        e = tl.exp2(d)
        if WITH_ENTROPY:
            step = tl.where(m == neg_inf, 0.0, (shift - m) * scale2)
            t = alpha * (t - s * step) + tl.sum(e * d, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    if WITH_ENTROPY:
        tl.store(t_ptr + row, t * 0.6931471805599453)


@triton.jit
def _dlogits_kernel(
    z_ptr,
    stride_z,
    g_ptr,
    stride_g,
    bias_ptr,
    labels_ptr,
    m_ptr,
    logs_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    c0,
    n_cols,
    V,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_GLP: tl.constexpr,
    HAS_GENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: d logits of columns [c0, c0 + n_cols), in the dtype of ``g_ptr``."""
    row = tl.program_id(0).to(tl.int64)
    zrow = z_ptr + row * stride_z
    grow = g_ptr + row * stride_g
    m = tl.load(m_ptr + row)
    scale2 = inv_temp * 1.4426950408889634
    log2_s = tl.load(logs_ptr + row) * 1.4426950408889634
    # 1 / T of d z / d logits is folded into the per-row coefficients.
    if HAS_GLP:
        label = tl.load(labels_ptr + row).to(tl.int64)
        label = tl.where(label < 0, 0, tl.where(label >= V, V - 1, label))
        local = label - c0
        g_lp = tl.load(glp_ptr + row) * inv_temp
    if HAS_GENT:
        # log p + H = ln 2 * (log2 p + H / ln 2): the ln 2 goes into the row coefficient.
        g_ent2 = tl.load(gent_ptr + row) * inv_temp * 0.6931471805599453
        entropy2 = tl.load(ent_ptr + row) * 1.4426950408889634
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        in_row = cols < n_cols
        x = tl.load(zrow + cols, mask=in_row, other=float("-inf"))
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        log2_p = (x - m) * scale2 - log2_s
        log2_p = tl.where(log2_p < -256.0, -256.0, log2_p)
        p = tl.exp2(log2_p)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_GLP:
            g += (tl.where(cols == local, 1.0, 0.0) - p) * g_lp
        if HAS_GENT:
            g -= p * (log2_p + entropy2) * g_ent2
        tl.store(grow + cols, g.to(g_ptr.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    """Block width (a power of two) and num_warps for a chunk of ``n_cols`` float32 columns."""
    block = min(_BLOCK_ELEMENTS, max(16, triton.next_power_of_2(n_cols)))
    if MAX_BLOCK is not None:
        block = max(16, min(block, MAX_BLOCK))
    num_warps = max(1, min(8, block // 512))
    return block, num_warps


def _fold_fwd(z, labels, c0, V, m, s, t, zl, bias_c, inv_temp, with_entropy, floor):
    """Fold the float32 tile ``z`` [rows, n] (columns c0..c0+n) into the rows' running sums."""
    rows, n_cols = z.shape
    if rows == 0:
        return
    if z.stride(1) != 1:
        z = z.contiguous()
    block, num_warps = _block_and_warps(n_cols)
    _fold_fwd_kernel[(rows,)](
        z,
        z.stride(0),
        bias_c if bias_c is not None else z,
        labels,
        m,
        s,
        t,
        zl,
        c0,
        n_cols,
        V,
        inv_temp * _LOG2E,
        HAS_BIAS=bias_c is not None,
        WITH_ENTROPY=with_entropy,
        BLOCK=block,
        num_warps=num_warps,
    )


def _dlogits(z, labels, c0, V, m, logs, ent, glp, gent, bias_c, inv_temp, floor, out_dtype):
    """d logits of the tile, a new ``[rows, n]`` tensor of ``out_dtype`` (the matmul operand)."""
    rows, n_cols = z.shape
    g = new_output((rows, n_cols), out_dtype, z.device)
    if rows == 0:
        return g
    if z.stride(1) != 1:
        z = z.contiguous()
    block, num_warps = _block_and_warps(n_cols)
    _dlogits_kernel[(rows,)](
        z,
        z.stride(0),
        g,
        g.stride(0),
        bias_c if bias_c is not None else z,
        labels,
        m,
        logs,
        ent if ent is not None else m,
        glp if glp is not None else m,
        gent if gent is not None else m,
        c0,
        n_cols,
        V,
        inv_temp,
        HAS_BIAS=bias_c is not None,
        HAS_GLP=glp is not None,
        HAS_GENT=gent is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return g


class TritonFolds:
    """The per-chunk steps of ``fastppo.linear``'s loops, as Triton kernels."""

    bias_in_mm = False  # the kernels add the (float32) bias chunk themselves
    half_dlogits = True  # bf16/fp16: d logits in the weight's dtype, for cuBLAS
    floor_always = True  # the kernels floor -inf for free (no host check of the bias)

    @staticmethod
    def fold_fwd(z, labels, c0, V, m, s, t, zl, bias_c, inv_temp, with_entropy, floor):
        _fold_fwd(z, labels, c0, V, m, s, t, zl, bias_c, inv_temp, with_entropy, floor)

    @staticmethod
    def dlogits(z, labels, c0, V, m, logs, ent, glp, gent, bias_c, inv_temp, floor, out_dtype):
        return _dlogits(z, labels, c0, V, m, logs, ent, glp, gent, bias_c, inv_temp, floor, out_dtype)


# --------------------------------------------------------------------------------------------
# Autograd and the public op (arguments already validated by fastppo.ops)
# --------------------------------------------------------------------------------------------


def linear_logprobs(
    hidden, weight, labels, *, bias=None, temperature=1.0, return_entropy=False, mask=None, chunk_size=None
):
    """``fastppo.linear_logprobs`` on the Triton backend.

    The autograd.Function is ``fastppo.linear.LinearLogprob`` with :class:`TritonFolds` as its
    chunk steps: per vocabulary chunk and row tile one cuBLAS matmul (float32 accumulation and
    output) and one Triton kernel, forward; backward one matmul to recompute the tile, one
    Triton kernel for d logits and two matmuls for d hidden and d weight. float64 inputs take
    the same loops with the PyTorch chunk steps.
    """
    folds = linear.TorchFolds if hidden.dtype == torch.float64 else TritonFolds
    return linear.run(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy,
                      mask=mask, chunk_size=chunk_size, folds=folds)


def linear_ppo_loss(
    hidden, weight, labels, *, old_logprobs, advantages, mask, bias=None, temperature=1.0, clip_low=0.2,
    clip_high=None, dual_clip=None, agg="token-mean", is_weights=None, ent_coef=0.0, ref_logprobs=None,
    kl_coef=0.0, kl_estimator="k3", chunk_size=None,
):
    """``fastppo.linear_ppo_loss`` on the Triton backend: the log-probs as in :func:`linear_logprobs`
    (a frozen head: ``fastppo.linear``'s frozen-head pass), the ``[B, T]`` loss by the Triton
    ``policy_loss``, ``aggregate`` and ``kl_penalty`` kernels."""
    from fastppo import _dispatch

    folds = linear.TorchFolds if hidden.dtype == torch.float64 else TritonFolds
    return linear.ppo_loss_run(
        hidden, weight, labels, old_logprobs=old_logprobs, advantages=advantages, mask=mask, bias=bias,
        temperature=temperature, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
        is_weights=is_weights, ent_coef=ent_coef, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
        kl_estimator=kl_estimator, chunk_size=chunk_size, folds=folds, ops=_dispatch.load_kernel,
    )
