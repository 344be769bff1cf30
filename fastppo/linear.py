"""Chunked ``linear_logprobs``: log-probs and entropy from hidden states, never the ``[N, V]`` logits.

This module holds the algorithm shared by both fast paths, and the CPU path itself (plain
PyTorch; ``FASTPPO_BACKEND=auto`` uses it for tensors that are not on a GPU). The CUDA path
(``fastppo.kernels.linear_logprob``) runs the very same loops and swaps in Triton kernels for
the two per-chunk steps (``fold_fwd`` and ``dlogits`` below). Imports torch only, never triton.

Forward, for the valid rows only (masked rows are compacted away before any matmul):

    for each vocabulary chunk c = [c0, c1) of ``chunk`` columns:
        for each tile of at most ``WORKSPACE_ELEMENTS // chunk`` rows:
            z = h_tile @ W[c0:c1].T (+ b[c0:c1])            one matmul, float32 accumulation
            fold z into each row's running max m, sum s = sum exp((z - m) / T),
            entropy sum t = sum exp((z - m) / T) * (z - m) / T and label logit z_label

    logprob = (z_label - m) / T - log s,    entropy = log s - t / s

Backward recomputes each tile's z, forms d logits in place from the saved per-row (m, log s, H)

    d z = ((onehot(label) - p) * g_logprob - p * (log p + H) * g_entropy) / T,
    log p = (z - m) / T - log s

and accumulates d hidden += d z @ W[c0:c1] (float32, ``[N_valid, H]``), d W[c0:c1] = d z.T @ h
(written once per chunk; a float32 ``[chunk, H]`` accumulator only when the rows take several
tiles and the weight is not float32) and d b[c0:c1] = sum d z. The workspace is a few
``[rows, chunk]`` tiles, O(N * chunk + V * H), never O(N * V).

Frozen head (weight and bias need no gradient, hidden does; eager only, :class:`FrozenHeadLinearLogprob`):
the forward's fold also returns e = exp(d) of each tile and accumulates A = sum_v e_v W_v and,
with entropy, B = sum_v e_v d_v W_v (one more matmul per tile each, float32 ``[N_valid, H]``,
rescaled like s and t when the running max moves). At the end d logprob / d h =
(W[label] - A / s) / T and d entropy / d h = -(B - (t / s) A) / (s T) replace A and B; the
backward is ``g_logprob * d_lp + g_entropy * d_ent`` per row. Without entropy that is two
vocabulary matmuls instead of three; with entropy three, as before, but the backward's exp pass
is gone too. Extra memory: ``[N_valid, H]`` float32, two with entropy, held until the backward.
The registered op (``torch.compile``) keeps the recomputing backward.

Numerics as in ``kernels/logprob.py``: the row max is subtracted before the temperature, the
entropy is accumulated relative to the running max, and -inf logits (a -inf bias entry, or a
matmul that overflows float32) are floored so that 0 * -inf never makes a NaN. The backward is
not differentiable: a double backward raises ``NotImplementedError`` naming the reference. A NaN anywhere in a valid row's logits reaches its
sums, so that row's outputs are NaN; masked rows are never read.
"""

from __future__ import annotations

import math

import torch

__all__ = ["linear_logprobs", "linear_ppo_loss", "DEFAULT_CHUNK", "WORKSPACE_ELEMENTS"]

# Vocabulary columns per chunk when ``chunk_size`` is None, per device type.
DEFAULT_CHUNK = {"cuda": 4096, "cpu": 4096}
# Elements of one [rows, chunk] logits tile: rows per tile = WORKSPACE_ELEMENTS // chunk.
# CUDA: 256 MB of float32, so that 16384 tokens x 4096 columns is one tile (one cuBLAS call per
# chunk). CPU: 32 MB. Smaller, cache-sized tiles looked better on paper but lose badly in
# practice: every PyTorch op on a tile is one OpenMP fork-join, and on a loaded machine each
# join waits for a descheduled thread (2 KB-row tiles of 2 MB ran ~30x slower per element).
WORKSPACE_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 23}

# A head that needs no gradient (LoRA) takes FrozenHeadLinearLogprob when True; False forces
# the recomputing backward (benchmarks and tests compare both).
FROZEN_HEAD_PATH = True

# Floor for -inf exponents: exp(-1e30) is 0 and 0 * -1e30 is 0, not NaN; NaN stays NaN.
_FLOOR = -1e30
_HALF = (torch.bfloat16, torch.float16)


def chunk_plan(device: torch.device, V: int, chunk_size: int | None) -> tuple[int, int]:
    """(vocabulary columns per chunk, rows per tile) for this device."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    chunk = max(1, min(int(chunk_size or DEFAULT_CHUNK[kind]), V))
    rows = max(1, WORKSPACE_ELEMENTS[kind] // chunk)
    return chunk, rows


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


# --------------------------------------------------------------------------------------------
# Matmuls: float32 accumulation and a float32 (or float64) result whatever the input dtype
# --------------------------------------------------------------------------------------------

_OUT_DTYPE_MM: bool | None = None  # does torch.mm(..., out_dtype=) work on this install?


def mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` with float32 accumulation into a float32 result (``acc += a @ b`` if given).

    Operands in float32/float64 use plain mm/addmm. bf16/fp16 operands on CUDA use cuBLAS with
    an fp32 output (``torch.mm(out_dtype=...)``, torch >= 2.8); on older torch the product is
    rounded to the operand dtype first (one rounding per chunk). On CPU they are upcast (the
    products of two bf16 numbers are exact in float32, so this is the same math).
    """
    global _OUT_DTYPE_MM
    if a.dtype in _HALF:
        if a.is_cuda:
            out = None
            if _OUT_DTYPE_MM is not False:
                try:
                    out = torch.mm(a, b, out_dtype=torch.float32)
                    _OUT_DTYPE_MM = True
                except (TypeError, RuntimeError, NotImplementedError):
                    _OUT_DTYPE_MM = False
            if out is None:
                out = torch.mm(a, b).float()
        else:
            out = torch.mm(a.float(), b.float())
        if acc is None:
            return out
        return acc.add_(out)
    if acc is None:
        return torch.mm(a, b)
    return acc.addmm_(a, b)


def _tile_logits(h_t, w_c, b_c, bias_in_mm):
    """z = h_t @ w_c.T (+ b_c when ``bias_in_mm``) in the compute dtype."""
    if bias_in_mm and b_c is not None:
        return torch.addmm(b_c, h_t, w_c.t())
    return mm_acc(h_t, w_c.t())


# --------------------------------------------------------------------------------------------
# The two per-chunk steps, in PyTorch (the CPU path). The Triton module has the same two.
# --------------------------------------------------------------------------------------------


class TorchFolds:
    """Per-chunk steps of the CPU path. ``z`` is a private tile and is overwritten."""

    # The bias is added by the matmul (addmm); the Triton kernels add it themselves.
    bias_in_mm = True
    # d logits are formed in the compute dtype (the CPU matmuls run in it).
    half_dlogits = False
    # -inf logits need an extra clamp pass here; taken only where a -inf could meet a 0 (the
    # entropy's sum of p * log p, its gradient) or when the bias holds a -inf.
    floor_always = False

    @staticmethod
    def fold_fwd(z, labels, c0, V, m, s, t, zl, bias_c, inv_temp, with_entropy, floor, defer_t=False):
        """``defer_t`` (frozen head, entropy value without its gradient): the tile's own entropy
        term is left to the caller (``t`` is only rescaled) and ``e`` is formed in place in ``z``,
        so the fold holds one tile; the caller adds ``sum xlogy(e, e)`` (= sum e d) once ``e`` has
        served its matmul."""
        C = z.shape[1]
        local = labels - c0
        inside = (local >= 0) & (local < C)
        picked = z.gather(1, local.clamp(0, C - 1).unsqueeze(1)).squeeze(1)
        zl.copy_(torch.where(inside, picked, zl))
        m_new = torch.maximum(m, z.amax(1))  # torch.maximum propagates NaN
        # An all -inf prefix keeps m = -inf; shifting by 0 avoids -inf - -inf = NaN.
        shift = torch.where(m_new == -math.inf, 0.0, m_new)
        alpha = torch.exp((m - shift) * inv_temp)
        d = z.sub_(shift.unsqueeze(1))  # the max first, then the temperature
        if inv_temp != 1.0:
            d.mul_(inv_temp)
        # Finite inputs make a -inf logit too when the matmul overflows (|h . w| > 3e38): the
        # entropy sum then needs the floor whatever the bias holds.
        if floor or with_entropy:
            d.clamp_(min=_FLOOR)
        # Without entropy d is not needed again: exponentiate in place (no tile allocation).
        e = torch.exp(d) if with_entropy and not defer_t else d.exp_()
        step = None
        if with_entropy and defer_t:
            step = torch.where(m == -math.inf, 0.0, (shift - m) * inv_temp)
            t.copy_(alpha * (t - s * step))
        elif with_entropy:
            step = torch.where(m == -math.inf, 0.0, (shift - m) * inv_temp)
            # e * d in place of d (d is not needed again): vecdot(e, d) would allocate a third
            # [rows, chunk] tile for the product. d was floored, so e * d is 0 where e is.
            ed = d.mul_(e)
            t.copy_(alpha * (t - s * step) + ed.sum(1))
        s.copy_(s * alpha + e.sum(1))
        m.copy_(m_new)
        # For the frozen-head pass: the rescale of the running sums, e = exp(d) and, with entropy,
        # e * d (in ``z``; without entropy ``z`` holds e).
        return alpha, step, e, d

    @staticmethod
    def dlogits(z, labels, c0, V, m, logs, ent, glp, gent, bias_c, inv_temp, floor, out_dtype):
        """d logits of the tile (``z`` holds the tile's logits and is reused)."""
        C = z.shape[1]
        logp = z.sub_(m.unsqueeze(1))
        if inv_temp != 1.0:
            logp.mul_(inv_temp)
        logp.sub_(logs.unsqueeze(1))
        if floor or gent is not None:  # p * log p below, as in fold_fwd
            logp.clamp_(min=_FLOOR)
        p = torch.exp(logp)
        # d z / T = p * (a * log p + b) (+ g_logprob / T at the label), with
        # a = -g_entropy / T and b = -(g_logprob + g_entropy * H) / T.
        if gent is not None:
            a = gent * (-inv_temp)
            b = (gent * ent if glp is None else glp + gent * ent) * (-inv_temp)
            torch.addcmul(b.unsqueeze(1), logp, a.unsqueeze(1), out=logp)
            g = p.mul_(logp)
        else:
            g = p.mul_((glp * (-inv_temp)).unsqueeze(1))
        if glp is not None:
            local = labels - c0
            inside = (local >= 0) & (local < C)
            hit = torch.where(inside, glp * inv_temp, 0.0)
            g.scatter_add_(1, local.clamp(0, C - 1).unsqueeze(1), hit.unsqueeze(1))
        return g


# --------------------------------------------------------------------------------------------
# The shared driver: chunks over the vocabulary, tiles over the rows
# --------------------------------------------------------------------------------------------


def _operands(h, weight, bias):
    """Operands as the matmuls want them: upcast on CPU (no half matmul there), as-is on CUDA."""
    cdt = compute_dtype(h, weight, bias)
    upcast = not h.is_cuda and h.dtype != cdt
    h_mm = h.to(cdt) if upcast else h
    bias_c = None if bias is None else bias.to(cdt)
    return cdt, upcast, h_mm, bias_c


def forward_pass(h, weight, bias, labels, inv_temp, with_entropy, chunk_size, folds, floor):
    """Per-row (m, s, t, z_label) of the compacted rows ``h`` [Nv, H] (``labels`` clamped)."""
    Nv = h.shape[0]
    V = weight.shape[0]
    cdt, upcast, h_mm, bias_c = _operands(h, weight, bias)
    m = torch.full((Nv,), -math.inf, dtype=cdt, device=h.device)
    s = torch.zeros(Nv, dtype=cdt, device=h.device)
    t = torch.zeros(Nv, dtype=cdt, device=h.device)
    zl = torch.zeros(Nv, dtype=cdt, device=h.device)
    if Nv == 0:
        return m, s, t, zl
    chunk, rows = chunk_plan(h.device, V, chunk_size)
    for c0 in range(0, V, chunk):
        c1 = min(c0 + chunk, V)
        w_c = weight[c0:c1].to(cdt) if upcast else weight[c0:c1]
        b_c = None if bias_c is None else bias_c[c0:c1]
        for r0 in range(0, Nv, rows):
            r1 = min(r0 + rows, Nv)
            z = _tile_logits(h_mm[r0:r1], w_c, b_c, folds.bias_in_mm)
            folds.fold_fwd(
                z, labels[r0:r1], c0, V, m[r0:r1], s[r0:r1], t[r0:r1], zl[r0:r1], b_c, inv_temp, with_entropy, floor
            )
            del z  # before the next tile's matmul allocates its own
    return m, s, t, zl


def finalize(m, s, t, zl, inv_temp, with_entropy):
    """(logprob, entropy or None, log s) per row from the running sums."""
    log_s = torch.log(s)
    logprob = (zl - m) * inv_temp - log_s
    entropy = log_s - t / s if with_entropy else None
    return logprob, entropy, log_s


def frozen_forward_pass(h, weight, bias, labels, inv_temp, with_entropy, chunk_size, floor, entropy_grad=None):
    """:func:`forward_pass` for a frozen head, plus what the backward needs: ``(m, s, t, zl, A, B)``.

    A = sum_v e_v W_v and B = sum_v e_v d_v W_v ([Nv, H], compute dtype; B None without entropy,
    or with ``entropy_grad=False``: the entropy's value only), with e_v = exp(d_v) and
    d_v = (z_v - m) / T relative to the running max m. When m moves up by T * step, every e_v is scaled by alpha = exp(-step) and every d_v drops by step,
    so A <- alpha A and B <- alpha (B - step A) before the chunk's own terms are added: one
    matmul e @ W_c (two with entropy) per tile. The chunk steps run in PyTorch ops on every
    device (the Triton fold keeps e in registers).
    """
    Nv, H = h.shape
    V = weight.shape[0]
    entropy_grad = with_entropy if entropy_grad is None else entropy_grad
    cdt, upcast, h_mm, bias_c = _operands(h, weight, bias)
    m = torch.full((Nv,), -math.inf, dtype=cdt, device=h.device)
    s = torch.zeros(Nv, dtype=cdt, device=h.device)
    t = torch.zeros(Nv, dtype=cdt, device=h.device)
    zl = torch.zeros(Nv, dtype=cdt, device=h.device)
    A = torch.zeros(Nv, H, dtype=cdt, device=h.device)
    B = torch.zeros(Nv, H, dtype=cdt, device=h.device) if entropy_grad else None
    if Nv == 0:
        return m, s, t, zl, A, B
    chunk, rows = chunk_plan(h.device, V, chunk_size)
    in_mm = h_mm.dtype == cdt  # addmm needs one dtype; a CUDA bf16/fp16 head adds the bias after
    for c0 in range(0, V, chunk):
        c1 = min(c0 + chunk, V)
        w_c = weight[c0:c1].to(cdt) if upcast else weight[c0:c1]
        b_c = None if bias_c is None else bias_c[c0:c1]
        for r0 in range(0, Nv, rows):
            r1 = min(r0 + rows, Nv)
            z = _tile_logits(h_mm[r0:r1], w_c, b_c, in_mm)
            if b_c is not None and not in_mm:
                z.add_(b_c)
            # Entropy value without its gradient: one tile (e in place), its t term after the matmul.
            defer_t = with_entropy and B is None
            alpha, step, e, d = TorchFolds.fold_fwd(
                z, labels[r0:r1], c0, V, m[r0:r1], s[r0:r1], t[r0:r1], zl[r0:r1], b_c, inv_temp, with_entropy, floor,
                defer_t,
            )
            A_t = A[r0:r1]
            if B is not None:
                B_t = B[r0:r1]
                B_t.addcmul_(A_t, step.unsqueeze(1), value=-1.0).mul_(alpha.unsqueeze(1))
                mm_acc(_operand(d, w_c), w_c, B_t)  # d holds e * d (fold_fwd)
            A_t.mul_(alpha.unsqueeze(1))
            mm_acc(_operand(e, w_c), w_c, A_t)
            if defer_t:
                # e = exp(d), so e d = xlogy(e, e): 0 where e underflowed (d floored), NaN stays NaN.
                t[r0:r1] += torch.special.xlogy(e, e, out=e).sum(1)
            # Free this tile's e and z before the next matmul allocates its z: held by these
            # names across the loop, they kept two more [rows, chunk] tiles alive at the peak.
            del z, e, d
    return m, s, t, zl, A, B


def _operand(x, w_c):
    """``x`` (compute dtype) as the left operand of ``x @ w_c``: a CUDA bf16/fp16 head takes it in
    its own dtype (one rounding, as the trainable path rounds its d logits for cuBLAS)."""
    return x if x.dtype == w_c.dtype else x.to(w_c.dtype)


def frozen_row_gradients(weight, labels, s, t, A, B, inv_temp):
    """d logprob / d h and d entropy / d h ([Nv, H], compute dtype), in place of ``A`` and ``B``.

    With p_v = e_v / s:  d logprob / d h = (W[label] - sum_v p_v W_v) / T = (W[label] - A / s) / T
    and d entropy / d h = -sum_v p_v (log p_v + H) W_v / T = -(B - (t / s) A) / (s T), since
    log p_v + H = d_v - t / s.
    """
    inv_s = (1.0 / s).unsqueeze(1)
    d_ent = None
    if B is not None:
        d_ent = B.addcmul_(A, (t / s).unsqueeze(1), value=-1.0).mul_(inv_s * (-inv_temp))
    w_lab = weight.index_select(0, labels)
    d_lp = A.mul_(-inv_s).add_(w_lab if w_lab.dtype == A.dtype else w_lab.to(A.dtype))
    if inv_temp != 1.0:
        d_lp.mul_(inv_temp)
    return d_lp, d_ent


def backward_pass(h, weight, bias, labels, m, logs, ent, glp, gent, inv_temp, chunk_size, folds, floor,
                  need_h, need_w, need_b):
    """(d h [Nv, H] float32 or None, d weight or None, d bias float32 or None)."""
    Nv, H = h.shape
    V = weight.shape[0]
    cdt, upcast, h_mm, bias_c = _operands(h, weight, bias)
    dh = torch.zeros(Nv, H, dtype=cdt, device=h.device) if need_h else None
    dw = None
    if need_w:
        dw = (torch.zeros if Nv == 0 else torch.empty)(weight.shape, dtype=weight.dtype, device=weight.device)
    db = torch.zeros(V, dtype=cdt, device=h.device) if need_b else None
    if Nv == 0:
        return dh, dw, db
    chunk, rows = chunk_plan(h.device, V, chunk_size)
    n_tiles = -(-Nv // rows)
    # Triton path, bf16/fp16: d logits in the weight's dtype, the operand cuBLAS wants (on CPU,
    # under the interpreter, the same rounding happens and the matmuls upcast again).
    g_dtype = weight.dtype if (folds.half_dlogits and weight.dtype in _HALF) else cdt
    for c0 in range(0, V, chunk):
        c1 = min(c0 + chunk, V)
        w_c = weight[c0:c1].to(cdt) if upcast else weight[c0:c1]
        b_c = None if bias_c is None else bias_c[c0:c1]
        dw_c = None
        if need_w:
            # float32 weight: accumulate in dW itself. Otherwise one tile writes dW[c0:c1] straight
            # from the matmul; several tiles share one float32 [chunk, H] accumulator.
            direct = dw.dtype == cdt
            dw_c = dw[c0:c1] if direct else (torch.zeros(c1 - c0, H, dtype=cdt, device=h.device) if n_tiles > 1 else None)
        for i, r0 in enumerate(range(0, Nv, rows)):
            r1 = min(r0 + rows, Nv)
            h_t = h_mm[r0:r1]
            z = _tile_logits(h_t, w_c, b_c, folds.bias_in_mm)
            g = folds.dlogits(
                z, labels[r0:r1], c0, V, m[r0:r1], logs[r0:r1], None if ent is None else ent[r0:r1],
                None if glp is None else glp[r0:r1], None if gent is None else gent[r0:r1],
                b_c, inv_temp, floor, g_dtype,
            )
            if need_h:
                mm_acc(g, w_c if g.dtype == w_c.dtype else w_c.to(g.dtype), dh[r0:r1])
            if need_b:
                db[c0:c1] += g.sum(0, dtype=cdt)
            if need_w:
                h_g = h_t if h_t.dtype == g.dtype else h_t.to(g.dtype)
                if dw_c is None:  # one tile, weight not in the compute dtype: one write
                    dw[c0:c1] = torch.mm(g.t(), h_g) if g.is_cuda else mm_acc(g.t(), h_g)
                elif i == 0 and dw_c.dtype == dw.dtype:
                    torch.mm(g.t(), h_g, out=dw_c)
                else:
                    mm_acc(g.t(), h_g, dw_c)
            del z, g  # as in the forward: the next tile's z must not meet this one
        if need_w and dw_c is not None and dw_c.dtype != dw.dtype:
            dw[c0:c1] = dw_c
    return dh, dw, db


# --------------------------------------------------------------------------------------------
# Autograd glue, shared by the CPU path and the Triton path (``folds`` picks the chunk steps)
# --------------------------------------------------------------------------------------------


def _valid_index(mask, n_rows):
    if mask is None:
        return None
    idx = (mask.reshape(n_rows) != 0).nonzero().squeeze(1)
    # Every row valid: as without a mask, so that no [N, H] copy of hidden is gathered and no
    # [N, H] gradient is scattered back (the count is on the host already, from nonzero()).
    return None if idx.numel() == n_rows else idx


def _valid_rows(mask, n_rows):
    if mask is None:
        return None
    return mask.reshape(n_rows) != 0


def _has_neg_inf(bias):
    # Only a -inf bias entry makes a -inf logit in a finite row (a non-finite hidden or weight
    # makes the row NaN whatever we do, as in plain PyTorch).
    return bias is not None and bool(torch.isneginf(bias).any())


def select_rows(hidden, labels, mask, V, compact):
    """The rows the loops run on: ``(h, lab, sel)``.

    ``sel``: the valid rows' indices (``compact``), a ``[N]`` bool (full rows, see :func:`run`), or
    None without a mask. ``h``: ``[N_sel, H]`` rows of ``hidden`` (full rows: masked rows zeroed,
    since they may hold anything, NaN and inf included). ``lab``: their labels, int64 clamped into
    [0, V - 1] (out-of-range labels, with FASTPPO_VALUE_CHECKS=0 or any label under
    torch.compile, must not read out of bounds; a masked full row gets label 0).
    """
    H = hidden.shape[-1]
    flat = hidden.reshape(-1, H)
    N = flat.shape[0]
    lab = labels.reshape(N)
    sel = _valid_index(mask, N) if compact else _valid_rows(mask, N)
    return _take_rows(flat, sel, compact), _take_rows(lab, sel, compact).long().clamp(0, V - 1), sel


def _take_rows(x, sel, compact):
    """The rows of ``x`` (``[N, ...]``) selected by ``sel`` (see :func:`select_rows`): gathered
    (``compact``), or all N with the masked ones zeroed (full rows), or ``x`` itself (None)."""
    if sel is None:
        return x
    if compact:
        return x.index_select(0, sel)
    return torch.where(sel.view(-1, *(1,) * (x.dim() - 1)), x, 0)


def forward_rows(hidden, weight, bias, labels, mask, inv_temp, with_entropy, chunk_size, folds, floor, compact):
    """The forward without autograd: ``(lp, ent, lab, sel, m, logs, ent_v)``.

    ``lp`` / ``ent``: ``[N]`` in the compute dtype, 0 at masked rows (``ent`` None without
    ``with_entropy``). ``lab``, ``sel``: as from :func:`select_rows`. ``m``, ``logs``, ``ent_v``:
    the selected rows' max, log-sum and entropy (compute dtype), what :func:`backward_rows` needs
    besides the inputs; with ``compact=False`` (or no mask) they are ``[N]``, one per row.
    """
    V = weight.shape[0]
    N = labels.numel()
    h, lab, sel = select_rows(hidden, labels, mask, V, compact)
    m, s, t, zl = forward_pass(h, weight, bias, lab, inv_temp, with_entropy, chunk_size, folds, floor)
    lp_v, ent_v, logs = finalize(m, s, t, zl, inv_temp, with_entropy)
    out_dtype = compute_dtype(hidden, weight, bias)
    lp, ent = (None if x is None else _spread_rows(x, sel, compact, N, out_dtype) for x in (lp_v, ent_v))
    return lp, ent, lab, sel, m, logs, ent_v


def _spread_rows(x_v, sel, compact, N, out_dtype):
    """``[N]`` in ``out_dtype`` from the selected rows' values ``x_v``, 0 at masked rows."""
    if sel is None:
        return x_v.to(out_dtype)
    if compact:
        return torch.zeros(N, dtype=out_dtype, device=x_v.device).index_copy_(0, sel, x_v.to(out_dtype))
    return torch.where(sel, x_v, 0.0).to(out_dtype)


def frozen_forward_rows(hidden, weight, bias, labels, mask, inv_temp, with_entropy, chunk_size, floor,
                        entropy_grad=None):
    """The frozen-head forward on the compacted valid rows: ``(lp, ent, sel, lp_v, ent_v, d_lp, d_ent)``.

    ``lp`` / ``ent``: ``[N]`` as from :func:`forward_rows`; ``lp_v`` / ``ent_v``: the valid rows'
    values (compute dtype); ``d_lp`` / ``d_ent``: their ``[Nv, H]`` gradients with respect to the
    hidden state (:func:`frozen_row_gradients`; ``d_ent`` None without entropy or with
    ``entropy_grad=False``: the entropy's value without its gradient, no extra matmul).
    """
    V = weight.shape[0]
    N = labels.numel()
    h, lab, sel = select_rows(hidden, labels, mask, V, True)
    m, s, t, zl, A, B = frozen_forward_pass(h, weight, bias, lab, inv_temp, with_entropy, chunk_size, floor,
                                            entropy_grad)
    lp_v, ent_v, _ = finalize(m, s, t, zl, inv_temp, with_entropy)
    d_lp, d_ent = frozen_row_gradients(weight, lab, s, t, A, B, inv_temp)
    out_dtype = compute_dtype(hidden, weight, bias)
    lp, ent = (None if x is None else _spread_rows(x, sel, True, N, out_dtype) for x in (lp_v, ent_v))
    return lp, ent, sel, lp_v, ent_v, d_lp, d_ent


def spread_hidden_grad(dh_v, sel, hidden):
    """d hidden (``hidden``'s shape and dtype) from the valid rows' ``[Nv, H]`` gradient."""
    if sel is None:
        return dh_v.to(hidden.dtype).view(hidden.shape)
    H = hidden.shape[-1]
    out = torch.zeros(math.prod(hidden.shape[:-1]), H, dtype=hidden.dtype, device=hidden.device)
    return out.index_copy_(0, sel, dh_v.to(hidden.dtype)).view(hidden.shape)


def backward_rows(hidden, weight, bias, lab, sel, m, logs, ent, glp, gent, inv_temp, chunk_size, folds, floor,
                  compact, need_h, need_w, need_b):
    """``(d hidden, d weight, d bias)`` from the saved row statistics of :func:`forward_rows`
    (each None where not asked for). ``glp`` / ``gent``: incoming ``[N]`` gradients or None;
    masked rows' entries (even NaN) are never read. Recomputes each chunk's logits tile, not the
    forward's folds."""
    H = hidden.shape[-1]
    N = hidden.numel() // H if H else math.prod(hidden.shape[:-1])
    h = _take_rows(hidden.reshape(N, H), sel, compact)

    def pick(g):
        # Masked rows' incoming gradients (even NaN) are never read (full rows: zeroed, so
        # their d logits are 0 and they add nothing to d weight and d bias). contiguous():
        # the gradient of a .sum() arrives as an expanded (stride 0) tensor.
        return None if g is None else _take_rows(g.reshape(N), sel, compact).to(m.dtype).contiguous()

    dh, dw, db = backward_pass(
        h, weight, bias, lab, m, logs, ent, pick(glp), pick(gent), inv_temp, chunk_size, folds, floor,
        need_h, need_w, need_b,
    )
    dhidden = None
    if need_h:
        if sel is not None and compact:
            dhidden = torch.zeros(N, H, dtype=hidden.dtype, device=hidden.device)
            dhidden.index_copy_(0, sel, dh.to(hidden.dtype))
        elif sel is not None:
            dhidden = torch.where(sel.unsqueeze(1), dh, 0.0).to(hidden.dtype)
        else:
            dhidden = dh.to(hidden.dtype)
        dhidden = dhidden.view(hidden.shape)
    return dhidden, dw, None if db is None else db.to(bias.dtype)


def floor_needed(folds, bias, compact):
    """Whether the chunk steps must floor -inf logits (see :func:`run`)."""
    return folds.floor_always or (bias is not None and (not compact or _has_neg_inf(bias)))


DOUBLE_BACKWARD_MESSAGE = (
    "double backward of linear_logprobs is not supported on the chunked (CPU) and Triton paths, whose "
    "backward is a hand-written loop; for higher-order gradients use the full-logits reference "
    "(FASTPPO_BACKEND=torch, fastppo.use_backend('torch') or fastppo.reference.linear_logprobs)"
)


class _NoDoubleBackward(torch.autograd.Function):
    """``(n, *grads, *inputs) -> grads``: the first ``n`` arguments unchanged, tied to the op's
    inputs in the graph, with a backward that refuses and names the way out. Differentiating the
    gradients of :class:`LinearLogprob` again would otherwise fail deep inside the loops (an
    ``mm(out=...)`` error), or with no sign that the op was the cause."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(g.view_as(g) for g in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(DOUBLE_BACKWARD_MESSAGE)


class LinearLogprob(torch.autograd.Function):
    """Outputs: the log-probs ``[N]`` and, with ``with_entropy``, the entropy ``[N]``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, mask, inv_temp, with_entropy, chunk_size, folds, floor, compact=True):
        lp, ent, lab, sel, m, logs, ent_v = forward_rows(
            hidden, weight, bias, labels, mask, inv_temp, with_entropy, chunk_size, folds, floor, compact
        )
        # The compacted rows are gathered again in backward rather than held twice in memory.
        ctx.save_for_backward(hidden, weight, bias, lab, sel, m, logs, ent_v)
        ctx.inv_temp, ctx.with_entropy, ctx.chunk_size, ctx.folds, ctx.floor = inv_temp, with_entropy, chunk_size, folds, floor
        ctx.compact = compact
        ctx.set_materialize_grads(False)
        return (lp, ent) if with_entropy else lp

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, lab, sel, m, logs, ent = ctx.saved_tensors
        glp = grads[0]
        gent = grads[1] if ctx.with_entropy else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        nothing = (None,) * 11
        if (glp is None and gent is None) or not (need_h or need_w or need_b):
            return nothing
        # create_graph=True runs this with grad mode on; the loops are not differentiable.
        with torch.no_grad():
            dhidden, dw, db = backward_rows(
                hidden, weight, bias, lab, sel, m, logs, ent, glp, gent, ctx.inv_temp, ctx.chunk_size, ctx.folds,
                ctx.floor, ctx.compact, need_h, need_w, need_b,
            )
        inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
        if torch.is_grad_enabled() and inputs:
            got = [g for g in (dhidden, dw, db) if g is not None]
            wrapped = iter(_NoDoubleBackward.apply(len(got), *got, *inputs))
            dhidden, dw, db = (None if g is None else next(wrapped) for g in (dhidden, dw, db))
        return dhidden, dw, db, None, None, None, None, None, None, None, None


class FrozenHeadLinearLogprob(torch.autograd.Function):
    """:class:`LinearLogprob` for a frozen head (gradient for ``hidden`` only): the forward also
    accumulates d logprob / d h (and d entropy / d h), so the backward is a per-row combination
    ``g_logprob * d_lp + g_entropy * d_ent`` with no matmul over the vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, mask, inv_temp, with_entropy, chunk_size, floor):
        lp, ent, sel, _, _, d_lp, d_ent = frozen_forward_rows(
            hidden, weight, bias, labels, mask, inv_temp, with_entropy, chunk_size, floor
        )
        ctx.save_for_backward(hidden, sel, d_lp, d_ent)
        ctx.set_materialize_grads(False)
        return (lp, ent) if with_entropy else lp

    @staticmethod
    def backward(ctx, *grads):
        hidden, sel, d_lp, d_ent = ctx.saved_tensors
        glp = grads[0]
        gent = grads[1] if len(grads) > 1 else None
        nothing = (None,) * 9
        if (glp is None and gent is None) or not ctx.needs_input_grad[0]:
            return nothing
        N = d_lp.shape[0] if sel is None else None

        def pick(g):
            # Masked rows' incoming gradients (even NaN) are never read.
            g = g.reshape(-1)
            return (g if N is not None else g.index_select(0, sel)).to(d_lp.dtype).unsqueeze(1)

        with torch.no_grad():
            dh = None
            if glp is not None:
                dh = d_lp * pick(glp)
            if gent is not None:
                dh = d_ent * pick(gent) if dh is None else dh.addcmul_(d_ent, pick(gent))
            dhidden = spread_hidden_grad(dh, sel, hidden)
        if torch.is_grad_enabled():
            (dhidden,) = _NoDoubleBackward.apply(1, dhidden, hidden)
        return (dhidden,) + (None,) * 8


def frozen_head(hidden, weight, bias, compact=True):
    """Whether :func:`run` takes the frozen-head path: eager (compacted rows), a head that needs
    no gradient, and a hidden state that does."""
    return (
        FROZEN_HEAD_PATH and compact and torch.is_grad_enabled() and hidden.requires_grad
        and not weight.requires_grad and (bias is None or not bias.requires_grad)
    )


def run(hidden, weight, labels, *, bias, temperature, return_entropy, mask, chunk_size, folds, compact=True):
    """Apply :class:`LinearLogprob` and shape the outputs like ``labels``.

    ``compact=True`` (eager): the valid rows are gathered with ``nonzero()`` first, so masked rows
    cost no matmul work, at the price of one device-to-host synchronisation (the number of valid
    rows). ``compact=False`` (the registered op ``fastppo::linear_logprobs``, i.e. under
    ``torch.compile``): every row goes through the matmuls, masked rows zeroed by ``where`` and
    their outputs and gradients zeroed after; no synchronisation, same numbers.
    """
    if frozen_head(hidden, weight, bias, compact):
        out = FrozenHeadLinearLogprob.apply(
            hidden, weight, bias, labels, mask, 1.0 / float(temperature), return_entropy, chunk_size,
            floor_needed(TorchFolds, bias, compact),
        )
    else:
        out = LinearLogprob.apply(
            hidden, weight, bias, labels, mask, 1.0 / float(temperature), return_entropy, chunk_size, folds,
            floor_needed(folds, bias, compact), compact,
        )
    if return_entropy:
        lp, ent = out
        return lp.view(labels.shape), ent.view(labels.shape)
    return out.view(labels.shape)


def linear_logprobs(
    hidden, weight, labels, *, bias=None, temperature=1.0, return_entropy=False, mask=None, chunk_size=None
):
    """Chunked PyTorch ``linear_logprobs`` (arguments already validated): the CPU fast path.

    Same numbers as ``fastppo.reference.linear_logprobs`` with a workspace of a few
    ``[rows, chunk]`` tiles instead of the ``[N, V]`` logits. Works on any device. (The registered
    op ``fastppo::linear_logprobs`` calls :func:`run` with ``compact=False`` instead.)
    """
    return run(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy,
               mask=mask, chunk_size=chunk_size, folds=TorchFolds)


# --------------------------------------------------------------------------------------------
# linear_ppo_loss: the clipped PPO objective from hidden states
# --------------------------------------------------------------------------------------------

_STATS = ("policy_loss", "entropy", "kl", "clipfrac", "clipfrac_lower", "approx_kl")


class FrozenHeadPPOLoss(torch.autograd.Function):
    """``linear_ppo_loss`` for a frozen head: ``(loss, *stats)``, differentiable in ``hidden`` only.

    The forward runs :func:`frozen_forward_rows`, then the ``[B, T]`` loss with autograd on the
    log-probs (and entropy) alone: its per-token d loss / d logprob and d loss / d entropy scale
    the rows' d logprob / d h and d entropy / d h into d loss / d h right away. Only that
    ``[N_valid, H]`` tensor is kept; the backward multiplies it by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temp, chunk_size, floor, loss_args):
        (old, adv, mask, ref, kwargs, ops) = loss_args
        # The entropy is always reported; its gradient (one more matmul per tile) only when it is
        # in the loss.
        with_entropy = kwargs["ent_coef"] != 0.0
        lp, ent, sel, _, _, d_lp, d_ent = frozen_forward_rows(
            hidden, weight, bias, labels, mask, inv_temp, True, chunk_size, floor, entropy_grad=with_entropy
        )
        from . import reference

        leaves = [x.view(labels.shape).requires_grad_() for x in (lp, ent)]
        with torch.enable_grad():
            loss, stats = reference.ppo_objective(leaves[0], leaves[1], old, adv, mask, ref, ops=ops, **kwargs)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        # Masked rows' gradients are 0 (never read: the rows are compacted away).
        take = (lambda g: g.reshape(-1)) if sel is None else (lambda g: g.reshape(-1).index_select(0, sel))
        dh = d_lp.mul_(take(grads[0]).to(d_lp.dtype).unsqueeze(1))
        if with_entropy:
            dh.addcmul_(d_ent, take(grads[1]).to(d_ent.dtype).unsqueeze(1))
        ctx.save_for_backward(hidden, sel, dh)
        out = [loss.detach()] + [stats[k] for k in _STATS]
        ctx.mark_non_differentiable(*out[1:])
        return tuple(out)

    @staticmethod
    def backward(ctx, g_loss, *_):
        hidden, sel, dh = ctx.saved_tensors
        if g_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 8
        with torch.no_grad():
            dhidden = spread_hidden_grad(dh * g_loss.to(dh.dtype), sel, hidden)
        if torch.is_grad_enabled():
            (dhidden,) = _NoDoubleBackward.apply(1, dhidden, hidden)
        return (dhidden,) + (None,) * 7


def ppo_loss_run(hidden, weight, labels, *, old_logprobs, advantages, mask, bias, temperature, clip_low, clip_high,
                 dual_clip, agg, is_weights, ent_coef, ref_logprobs, kl_coef, kl_estimator, chunk_size, folds,
                 ops=None):
    """``linear_ppo_loss`` on the chunked loops (``folds``: their chunk steps; ``ops``: the
    implementations of the ``[B, T]`` loss ops, see ``reference.ppo_objective``)."""
    from . import reference

    kwargs = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, is_weights=is_weights,
                  ent_coef=ent_coef, kl_coef=kl_coef, kl_estimator=kl_estimator)
    if frozen_head(hidden, weight, bias):
        out = FrozenHeadPPOLoss.apply(
            hidden, weight, bias, labels, 1.0 / float(temperature), chunk_size, floor_needed(TorchFolds, bias, True),
            (old_logprobs, advantages, mask, ref_logprobs, kwargs, ops),
        )
        return out[0], dict(zip(_STATS, out[1:]))
    lp, ent = run(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True, mask=mask,
                  chunk_size=chunk_size, folds=folds)
    return reference.ppo_objective(lp, ent, old_logprobs, advantages, mask, ref_logprobs, ops=ops, **kwargs)


def linear_ppo_loss(
    hidden, weight, labels, *, old_logprobs, advantages, mask, bias=None, temperature=1.0, clip_low=0.2,
    clip_high=None, dual_clip=None, agg="token-mean", is_weights=None, ent_coef=0.0, ref_logprobs=None,
    kl_coef=0.0, kl_estimator="k3", chunk_size=None,
):
    """Chunked PyTorch ``linear_ppo_loss`` (arguments already validated): the CPU fast path."""
    return ppo_loss_run(hidden, weight, labels, old_logprobs=old_logprobs, advantages=advantages, mask=mask, bias=bias,
                        temperature=temperature, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
                        is_weights=is_weights, ent_coef=ent_coef, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
                        kl_estimator=kl_estimator, chunk_size=chunk_size, folds=TorchFolds)
