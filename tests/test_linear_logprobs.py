"""``fastppo.linear_logprobs`` (issue 10) on all three backends against a float64 ground truth.

Backends: ``reference`` (the full-logits formula, ``FASTPPO_BACKEND=torch``), ``chunked`` (the
PyTorch path that ``auto`` takes on CPU tensors, ``fastppo/linear.py``) and ``triton`` (cuBLAS or
torch matmuls plus the Triton chunk kernels of ``kernels/linear_logprob.py``, through the
interpreter without a GPU, with poisoned outputs).

The ground truth is written here, independently of fastppo: the logits ``h @ W.T + b`` in float64
from the very same (already rounded) inputs, the row max subtracted, then log-softmax and entropy,
with autograd in float64 for the gradients. Comparisons are NaN-aware: NaN exactly where the
ground truth is NaN, within tolerance elsewhere.

Sizes stay tiny (the interpreter is slow): small chunks, blocks of 32 columns and small row tiles
make every call take several chunks, several blocks per chunk and several row tiles.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch

import fastppo
from fastppo import linear, reference
from fastppo.kernels._common import poisoned_outputs

from helpers import TOL, TOL_FP32_OUT, assert_close, random_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["reference", "chunked", "triton"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _name(d):
    return str(d).replace("torch.", "")


HEADS = ["trainable", "frozen"]


@pytest.fixture(params=HEADS)
def head(request):
    """Which backward runs: ``trainable`` (the weight and bias require grad: the backward
    recomputes each logits tile) or ``frozen`` (they do not: the forward accumulates d hidden's
    per-row vectors and the backward does no vocabulary matmul)."""
    return request.param


@pytest.fixture
def small_tiles(monkeypatch):
    """Blocks of 32 columns and row tiles of (256 // chunk) rows, so tiny inputs take every loop."""
    from fastppo.kernels import linear_logprob as K

    monkeypatch.setattr(K, "MAX_BLOCK", 32)
    monkeypatch.setitem(linear.WORKSPACE_ELEMENTS, "cpu", 256)
    monkeypatch.setitem(linear.WORKSPACE_ELEMENTS, "cuda", 256)


# --------------------------------------------------------------------------------------------
# Ground truth and the three backends
# --------------------------------------------------------------------------------------------


def truth_logits(hidden, weight, bias=None, mask=None):
    """float64 ``[N, V]`` logits; masked rows never enter the matmul."""
    h = hidden.reshape(-1, hidden.shape[-1]).double()
    if mask is not None:
        h = torch.where((mask.reshape(-1) != 0)[:, None], h, torch.zeros((), dtype=torch.float64))
    z = h @ weight.double().T
    return z if bias is None else z + bias.double()


def truth_from_logits(z, labels, *, temperature=1.0, mask=None):
    V = z.shape[-1]
    lab = labels.reshape(-1).long().clamp(0, V - 1)
    z = (z - z.detach().max(dim=-1, keepdim=True).values) / temperature
    lse = torch.log(torch.exp(z).sum(-1))
    lp = z.gather(1, lab[:, None]).squeeze(1) - lse
    p = torch.exp(z - lse[:, None])
    ent = lse - (p * torch.where(torch.isneginf(z), 0.0, z)).sum(-1)
    if mask is not None:
        valid = mask.reshape(-1) != 0
        lp = torch.where(valid, lp, 0.0)
        ent = torch.where(valid, ent, 0.0)
    return lp.reshape(labels.shape), ent.reshape(labels.shape)


def truth(hidden, weight, labels, *, bias=None, temperature=1.0, mask=None):
    """float64 (logprobs, entropy) of ``softmax((h @ W.T + b) / T)``, differentiable."""
    return truth_from_logits(truth_logits(hidden, weight, bias, mask), labels, temperature=temperature, mask=mask)


def call(backend, run_kernel, hidden, weight, labels, **kwargs):
    """The op on ``backend``; the chunked and reference paths on CPU tensors, Triton on DEV."""
    if backend == "reference":
        with fastppo.use_backend("torch"):
            return fastppo.linear_logprobs(hidden, weight, labels, **kwargs)
    if backend == "chunked":
        with fastppo.use_backend("auto"):
            return fastppo.linear_logprobs(hidden, weight, labels, **kwargs)
    return run_kernel(fastppo.linear_logprobs, hidden, weight, labels, **kwargs)


def _to(backend, *tensors):
    dev = DEV if backend == "triton" else "cpu"
    return [None if t is None else t.to(dev) for t in tensors]


def nan_aware_close(actual, expected, tol, what):
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    assert tuple(a.shape) == tuple(e.shape), f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(e)), (
        f"{what}: NaN at {torch.isnan(a).nonzero().tolist()[:5]}, expected at {torch.isnan(e).nonzero().tolist()[:5]}"
    )
    keep = ~torch.isnan(e)
    if isinstance(tol[0], torch.Tensor):  # an elementwise atol
        tol = (tol[0].expand(e.shape)[keep], tol[1])
    assert_close(a[keep], e[keep], tol, what)


def check(backend, run_kernel, gen, hidden, weight, labels, *, bias=None, temperature=1.0, mask=None,
          chunk_size=None, cot_nan_at_masked=False, grads=("logprob", "entropy"), head="trainable"):
    """Forward and d hidden / d weight / d bias against :func:`truth`; returns the outputs.

    ``head="frozen"``: the weight and bias need no gradient, only d hidden is compared, and the
    recomputing backward (``linear.backward_pass``) must not run."""
    dtype = hidden.dtype
    h, w, b, lab, m = _to(backend, hidden, weight, bias, labels, mask)
    h = h.detach().requires_grad_(True)
    frozen = head == "frozen"
    w = w.detach().requires_grad_(not frozen)
    leaves = [h] if frozen else [h, w]
    if b is not None:
        b = b.detach().requires_grad_(not frozen)
        if not frozen:
            leaves.append(b)
    lp, ent = call(backend, run_kernel, h, w, lab, bias=b, temperature=temperature, return_entropy=True,
                   mask=m, chunk_size=chunk_size)
    t_leaves = [x.detach().double().requires_grad_(True) for x in (hidden, weight) + ((bias,) if bias is not None else ())]
    t_logits = truth_logits(t_leaves[0], t_leaves[1], t_leaves[2] if bias is not None else None, mask)
    t_z = t_logits.detach().requires_grad_(True)
    t_lp, t_ent = truth_from_logits(t_z, labels, temperature=temperature, mask=mask)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == labels.shape and ent.shape == labels.shape
    nan_aware_close(lp, t_lp, TOL_FP32_OUT[dtype], f"{backend} logprobs")
    nan_aware_close(ent, t_ent, TOL_FP32_OUT[dtype], f"{backend} entropy")
    if mask is not None:
        off = (mask == 0).to(lp.device)
        assert bool((lp[off] == 0).all()) and bool((ent[off] == 0).all()), "masked rows must output exactly 0"
    if not grads:
        return lp, ent
    outs = {"logprob": (lp, t_lp), "entropy": (ent, t_ent)}
    got, want, cots = [], [], []
    for name in grads:
        cot = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
        t_cot = cot.clone()
        if cot_nan_at_masked and mask is not None:
            cot[mask == 0] = float("nan")  # a masked row's incoming gradient must never be read
            t_cot[mask == 0] = 0.0
        got.append(outs[name][0])
        want.append(outs[name][1])
        cots.append((cot.float().to(lp.device), t_cot))
    no_recompute = mock.patch.object(linear, "backward_pass", side_effect=AssertionError("recomputed")) if frozen \
        else contextlib.nullcontext()
    with poisoned_outputs(), no_recompute:
        got_grads = torch.autograd.grad(got, leaves, [c for c, _ in cots])
    (d_logits,) = torch.autograd.grad(want, t_z, [c for _, c in cots])
    want_grads = torch.autograd.grad(t_logits, t_leaves, d_logits)
    atol, rtol = TOL[dtype]
    # Every path forms d logits G in some dtype before the gradient matmuls; rounding G (unit u,
    # a few ulps in float32, one rounding to bf16/fp16 for the Triton path's cuBLAS operand, as
    # in the full-logits path) moves d hidden by up to u * |G| @ |W|, d weight by u * |G|.T @ |h|
    # and d bias by u * sum |G|. With a large common logit offset (a weight column of 100) these
    # exceed the elementwise tolerance where the exact gradient cancels to ~0 (sum_v G = 0).
    if backend == "triton" and dtype in (torch.bfloat16, torch.float16):
        u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    else:
        u = 8 * 2.0**-24
    G = d_logits.abs().nan_to_num(0.0)
    h64 = hidden.reshape(-1, hidden.shape[-1]).double().abs()
    if mask is not None:
        h64 = torch.where((mask.reshape(-1) != 0)[:, None], h64, 0.0)
    h64 = h64.nan_to_num(0.0)
    extra = [u * (G @ weight.double().abs()).reshape(hidden.shape), u * (G.T @ h64), u * G.sum(0)]
    for name, g, wg, leaf, ex in zip(("d hidden", "d weight", "d bias"), got_grads, want_grads, leaves, extra):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        nan_aware_close(g, wg, (atol + ex, rtol), f"{backend} {name}")
    if mask is not None:
        off = (mask == 0).to(got_grads[0].device)
        assert bool((got_grads[0][off] == 0).all()), "masked rows must get an exactly zero gradient"
    return lp, ent


def _inputs(gen, shape, H, V, dtype, *, bias=True, w_scale=0.4):
    hidden = torch.randn(*shape, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * w_scale).to(dtype)
    b = (torch.randn(V, generator=gen)).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, generator=gen)
    return hidden, weight, b, labels


# --------------------------------------------------------------------------------------------
# Random inputs: odd sizes, chunks that do not divide V, bias, temperature, masks, dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_masked_3d_with_bias_and_temperature(run_kernel, rng, small_tiles, backend, dtype, head):
    """[B, T, H] hidden (a strided view), H = 33, V = 203 in chunks of 64, bias, T = 0.7, a mask
    with every row layout including an empty row, rows in tiles of 4."""
    B, T, H, V = 4, 5, 33, 203
    full, weight, bias, _ = _inputs(rng, (B, T + 1), H, V, dtype)
    hidden = full[:, :-1]
    assert not hidden.is_contiguous()
    labels = torch.randint(0, V, (B, T), generator=rng)
    mask = random_mask(B, T, rng)
    assert not mask.any(dim=1).all(), "random_mask gives an empty row"
    check(backend, run_kernel, rng, hidden, weight, labels, bias=bias, temperature=0.7, mask=mask, chunk_size=64, head=head)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_2d_without_bias_default_chunk(run_kernel, rng, backend, dtype, head):
    """[N, H] hidden, H = 17, V = 150, no bias, no mask, the default chunk and tile."""
    hidden, weight, _, labels = _inputs(rng, (13,), 17, 150, dtype, bias=False)
    check(backend, run_kernel, rng, hidden, weight, labels, temperature=1.3, head=head)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("grads", [("logprob",), ("entropy",)], ids=["logprob-only", "entropy-only"])
def test_gradient_of_one_output(run_kernel, rng, small_tiles, backend, grads, head):
    hidden, weight, bias, labels = _inputs(rng, (9,), 20, 97, torch.float32)
    check(backend, run_kernel, rng, hidden, weight, labels, bias=bias, chunk_size=40, grads=grads, head=head)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_logprobs_without_entropy(run_kernel, rng, small_tiles, backend, head):
    hidden, weight, bias, labels = _inputs(rng, (2, 4), 11, 70, torch.float32)
    h, w, b, lab = _to(backend, hidden, weight, bias, labels)
    h.requires_grad_(True)
    if head == "trainable":
        w.requires_grad_(True)
    lp = call(backend, run_kernel, h, w, lab, bias=b, chunk_size=32)
    assert isinstance(lp, torch.Tensor) and lp.shape == (2, 4)
    h64 = hidden.double().requires_grad_(True)
    t_lp = truth(h64, weight, labels, bias=bias)[0]
    nan_aware_close(lp, t_lp, TOL_FP32_OUT[torch.float32], "logprobs")
    cot = torch.randn(2, 4, generator=rng, dtype=torch.float64)
    (dh,) = torch.autograd.grad(lp, h, cot.float().to(lp.device))
    (t_dh,) = torch.autograd.grad(t_lp, h64, cot)
    nan_aware_close(dh, t_dh, TOL[torch.float32], "d hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_are_exact(run_kernel, rng, small_tiles, backend, head):
    hidden, weight, bias, labels = _inputs(rng, (7,), 9, 61, torch.float64)
    h, w, b, lab = _to(backend, hidden, weight, bias, labels)
    h.requires_grad_(True)
    if head == "trainable":
        w.requires_grad_(True)
    lp, ent = call(backend, run_kernel, h, w, lab, bias=b, return_entropy=True, chunk_size=16)
    assert lp.dtype == torch.float64
    h64 = hidden.clone().requires_grad_(True)
    t_lp, t_ent = truth(h64, weight, labels, bias=bias)
    nan_aware_close(lp, t_lp, TOL[torch.float64], "logprobs")
    nan_aware_close(ent, t_ent, TOL[torch.float64], "entropy")
    cot = torch.randn(2, 7, generator=rng, dtype=torch.float64)
    (dh,) = torch.autograd.grad((lp, ent), h, (cot[0].to(lp.device), cot[1].to(lp.device)))
    (t_dh,) = torch.autograd.grad((t_lp, t_ent), h64, (cot[0], cot[1]))
    nan_aware_close(dh, t_dh, TOL[torch.float64], "d hidden")


# --------------------------------------------------------------------------------------------
# Extreme values: logits of magnitude 1e4, -inf entries, NaN
# --------------------------------------------------------------------------------------------


def _exact_1e4_inputs(gen, N, V, dtype, sign):
    """Integer hidden and weight whose logits (+-1e4 plus -24..24) are exact in float32.

    Column 0 of hidden is 100 and of weight +-100, so every logit carries +-1e4; the other eight
    columns are small integers. Every product and partial sum is an integer below 2^24, so the
    float32 (and bf16-operand) matmul is exact and the only error left is the softmax's.
    """
    H = 9
    hidden = torch.randint(-3, 4, (N, H), generator=gen).float()
    weight = torch.randint(-1, 2, (V, H), generator=gen).float()
    hidden[:, 0] = 100.0
    weight[:, 0] = 100.0 * sign
    bias = torch.zeros(V)
    bias[3] = bias[V - 2] = float("-inf")  # -inf entries, not a whole row
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[(labels == 3) | (labels == V - 2)] = 4
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("sign", [1, -1], ids=["plus", "minus"])
def test_logits_of_magnitude_1e4_and_neg_inf_bias(run_kernel, rng, small_tiles, backend, dtype, sign, head):
    hidden, weight, bias, labels = _exact_1e4_inputs(rng, 10, 77, dtype, sign)
    lp, ent = check(backend, run_kernel, rng, hidden, weight, labels, bias=bias, temperature=0.7, chunk_size=24, head=head)
    assert bool(torch.isfinite(lp).all()) and bool(torch.isfinite(ent).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_at_a_valid_row_propagates(run_kernel, rng, small_tiles, backend, head):
    """A NaN hidden state at a valid row: that row's outputs are NaN (not a finite number), the
    other rows are untouched, and the gradients are NaN exactly where float64 autograd has them."""
    hidden, weight, bias, labels = _inputs(rng, (3, 4), 10, 90, torch.float32)
    hidden[1, 2, 5] = float("nan")
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 3] = False
    lp, ent = check(backend, run_kernel, rng, hidden, weight, labels, bias=bias, mask=mask, chunk_size=32, head=head)
    assert bool(lp[1, 2].isnan()) and bool(ent[1, 2].isnan())
    assert int(lp.isnan().sum()) == 1 and int(ent.isnan().sum()) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
def test_masked_rows_leak_nothing(run_kernel, rng, small_tiles, backend, dtype, head):
    """Masked rows hold NaN / inf hidden states, out-of-range labels and NaN incoming gradients:
    outputs there are 0, every gradient is finite, and d hidden there is exactly 0."""
    B, T, V = 4, 5, 80
    hidden, weight, bias, labels = _inputs(rng, (B, T), 12, V, dtype)
    mask = random_mask(B, T, rng).float() * 2.5  # a float mask: valid where != 0
    off = mask == 0
    hidden[off] = float("nan")
    b0, t0 = off.nonzero()[0].tolist()
    hidden[b0, t0] = float("inf")
    labels[off] = V + 1000
    labels[b0, t0] = -5
    lp, ent = check(backend, run_kernel, rng, hidden, weight, labels, bias=bias, mask=mask, chunk_size=32,
                    cot_nan_at_masked=True, head=head)
    assert bool(torch.isfinite(lp).all()) and bool(torch.isfinite(ent).all())


# --------------------------------------------------------------------------------------------
# Empty inputs, tied embeddings, a frozen head, labels without value checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["T=0", "N=0", "all-masked"])
def test_empty_inputs(run_kernel, backend, case, head):
    H, V = 6, 11
    shape = {"T=0": (2, 0), "N=0": (0,), "all-masked": (2, 3)}[case]
    hidden = torch.randn(*shape, H)
    weight = torch.randn(V, H)
    bias = torch.randn(V)
    labels = torch.zeros(shape, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.bool) if case == "all-masked" else None
    h, w, b, lab, m = _to(backend, hidden, weight, bias, labels, mask)
    leaves = [x.requires_grad_(True) for x in ((h, w, b) if head == "trainable" else (h,))]
    lp, ent = call(backend, run_kernel, h, w, lab, bias=b, return_entropy=True, mask=m)
    assert lp.shape == shape and ent.shape == shape
    assert bool((lp == 0).all()) and bool((ent == 0).all())
    (lp.sum() + ent.sum()).backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and bool((leaf.grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embeddings(run_kernel, rng, small_tiles, backend):
    """The head is the input embedding's weight: its gradient is the sum of both uses."""
    V, H = 57, 14
    dev = DEV if backend == "triton" else "cpu"
    emb_w = torch.randn(V, H, generator=rng) * 0.5
    ids = torch.randint(0, V, (2, 6), generator=rng)
    labels = torch.randint(0, V, (2, 6), generator=rng)
    mix = torch.randn(H, H, generator=rng) / math.sqrt(H)

    def model(w, op):
        hidden = torch.tanh(torch.nn.functional.embedding(ids.to(w.device), w) @ mix.to(w.device, w.dtype))
        lp, ent = op(hidden, w, labels.to(w.device))
        return lp.sum() + 0.3 * ent.sum()

    w = emb_w.clone().to(dev).requires_grad_(True)
    model(w, lambda h, ww, lab: call(backend, run_kernel, h, ww, lab, return_entropy=True, chunk_size=20)).backward()
    w64 = emb_w.double().requires_grad_(True)
    mix = mix.double()
    model(w64, lambda h, ww, lab: truth(h, ww, lab)).backward()
    nan_aware_close(w.grad, w64.grad, TOL[torch.float32], "d embedding (tied)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen_path", [True, False], ids=["frozen-path", "recompute-path"])
def test_frozen_head_gives_hidden_gradient_only(run_kernel, rng, small_tiles, backend, frozen_path, monkeypatch):
    """LoRA-style: the head does not require grad. The frozen-head path (the default) does all its
    vocabulary matmuls in the forward (one logits tile and one e @ W_c product per chunk and row
    tile, two with entropy) and none in the backward; with it switched off the recomputing
    backward skips every d weight matmul."""
    monkeypatch.setattr(linear, "FROZEN_HEAD_PATH", frozen_path)
    hidden, weight, _, labels = _inputs(rng, (8,), 16, 45, torch.float32, bias=False)
    h, w, lab = _to(backend, hidden, weight, labels)
    h.requires_grad_(True)
    asked, products = [], []
    real, real_mm = linear.backward_pass, linear.mm_acc

    def spy(*args, **kwargs):
        asked.append(args[-3:])  # (need_h, need_w, need_b)
        return real(*args, **kwargs)

    def mm_spy(a, b, acc=None):
        products.append(tuple(a.shape))  # every matmul of the loops is a [rows, chunk]-sized one
        return real_mm(a, b, acc)

    monkeypatch.setattr(linear, "backward_pass", spy)
    monkeypatch.setattr(linear, "mm_acc", mm_spy)
    lp, ent = call(backend, run_kernel, h, w, lab, return_entropy=True, chunk_size=16)
    n_fwd = len(products)
    (lp.sum() - ent.sum()).backward()
    if backend != "reference":
        chunks = math.ceil(45 / 16) * math.ceil(8 / (256 // 16))
        if frozen_path:
            assert asked == [] and n_fwd == 3 * chunks and len(products) == n_fwd
        else:
            assert asked == [(True, False, False)] and n_fwd == chunks and len(products) == 3 * chunks
    assert w.grad is None
    h64 = hidden.detach().double().requires_grad_(True)
    t_lp, t_ent = truth(h64, weight, labels)
    (t_lp.sum() - t_ent.sum()).backward()
    nan_aware_close(h.grad, h64.grad, TOL[torch.float32], "d hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_are_clamped_without_value_checks(run_kernel, rng, backend, monkeypatch):
    hidden, weight, bias, labels = _inputs(rng, (6,), 8, 30, torch.float32)
    labels[0], labels[1], labels[2] = -4, 30, 10**6
    h, w, b, lab = _to(backend, hidden, weight, bias, labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 30\)"):
        call(backend, run_kernel, h, w, lab, bias=b)
    monkeypatch.setenv("FASTPPO_VALUE_CHECKS", "0")
    lp = call(backend, run_kernel, h, w, lab, bias=b)  # memory-safe; the value is documented as meaningless
    nan_aware_close(lp, truth(hidden, weight, labels.clamp(0, 29), bias=bias)[0], TOL_FP32_OUT[torch.float32], "clamped")


# --------------------------------------------------------------------------------------------
# Validation, dispatch, workspace
# --------------------------------------------------------------------------------------------

_H = torch.zeros(2, 3, 4)
_W = torch.zeros(5, 4)
_L = torch.zeros(2, 3, dtype=torch.long)
BAD = [
    (lambda op: op.linear_logprobs(None, _W, _L), "hidden is required"),
    (lambda op: op.linear_logprobs(_H, None, _L), "weight is required"),
    (lambda op: op.linear_logprobs(_H, _W, None), "labels is required"),
    (lambda op: op.linear_logprobs(torch.zeros(4), _W, _L), "hidden must be [B, T, H] or [N, H]"),
    (lambda op: op.linear_logprobs(_H, torch.zeros(5, 3), _L), "expected weight of shape [V, 4]"),
    (lambda op: op.linear_logprobs(_H, torch.zeros(5, 4, 1), _L), "weight must be [V, H]"),
    (lambda op: op.linear_logprobs(_H, torch.zeros(0, 4), _L[:, :0]), "V >= 1"),
    (lambda op: op.linear_logprobs(_H, _W, _L[:, :2]), "needs labels of shape [2, 3]"),
    (lambda op: op.linear_logprobs(_H, _W, _L.float()), "labels must be an integer tensor"),
    (lambda op: op.linear_logprobs(_H, _W, _L, bias=torch.zeros(4)), "bias must be [V] = [5]"),
    (lambda op: op.linear_logprobs(_H, _W.bfloat16(), _L), "weight has dtype torch.bfloat16"),
    (lambda op: op.linear_logprobs(_H, _W, _L, mask=torch.ones(2, 4)), "mask has shape [2, 4]"),
    (lambda op: op.linear_logprobs(_H, _W, _L, temperature=0.0), "temperature must be > 0.0"),
    (lambda op: op.linear_logprobs(_H, _W, _L, chunk_size=0), "chunk_size must be None or an integer >= 1"),
    (lambda op: op.linear_logprobs(_H, _W, _L, chunk_size=2.5), "chunk_size must be None or an integer >= 1"),
    (lambda op: op.linear_logprobs(_H, _W, _L, return_entropy=1), "return_entropy must be True or False"),
    (lambda op: op.linear_logprobs(_H, _W, _L + 5), "labels must lie in [0, 5)"),
]


@pytest.mark.parametrize("module", [fastppo, reference], ids=["fastppo", "reference"])
@pytest.mark.parametrize("bad, fragment", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_raises_value_error(module, bad, fragment):
    with pytest.raises(ValueError) as info:
        bad(module)
    assert fragment in str(info.value)


def test_signatures_match_the_reference():
    from fastppo.kernels import linear_logprob as K

    ref = list(inspect.signature(reference.linear_logprobs.raw).parameters.items())
    for fn in (fastppo.linear_logprobs, linear.linear_logprobs, K.linear_logprobs):
        params = list(inspect.signature(fn).parameters.items())
        assert [n for n, _ in params] == [n for n, _ in ref], fn
        assert [p.default for _, p in params] == [p.default for _, p in ref], fn


def test_auto_on_cpu_is_chunked_and_skips_masked_rows(rng, monkeypatch, head):
    """auto on CPU never calls the reference and never builds more than a [rows, chunk] tile;
    masked rows reach no matmul (a frozen head: no tile at all in the backward)."""

    def no_reference(*a, **k):
        raise AssertionError("auto on CPU must not use the full-logits reference")

    monkeypatch.setattr(reference.linear_logprobs, "raw", no_reference)
    monkeypatch.setitem(linear.WORKSPACE_ELEMENTS, "cpu", 64 * 8)
    tiles = []
    real = linear._tile_logits

    def spy(h_t, w_c, b_c, bias_in_mm):
        z = real(h_t, w_c, b_c, bias_in_mm)
        tiles.append(tuple(z.shape))
        return z

    monkeypatch.setattr(linear, "_tile_logits", spy)
    N, H, V = 40, 8, 300
    hidden = torch.randn(N, H, generator=rng).requires_grad_(True)
    weight = torch.randn(V, H, generator=rng).requires_grad_(head == "trainable")
    labels = torch.randint(0, V, (N,), generator=rng)
    mask = torch.rand(N, generator=rng) < 0.5
    lp, ent = fastppo.linear_logprobs(hidden, weight, labels, mask=mask, return_entropy=True, chunk_size=64)
    fwd = list(tiles)
    assert max(r * c for r, c in fwd) <= 64 * 8
    chunks = math.ceil(V / 64)
    assert sum(r for r, _ in fwd) == int(mask.sum()) * chunks, "only the valid rows reach the matmuls"
    (lp.sum() + ent.sum()).backward()
    assert sum(r for r, _ in tiles[len(fwd):]) == (int(mask.sum()) * chunks if head == "trainable" else 0)


# --------------------------------------------------------------------------------------------
# GPU readiness: the Triton kernels compile for sm_90 offline
# --------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, os, re, subprocess, sys, tempfile, triton
    import triton.backends.nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastppo.kernels import linear_logprob as K

    target = GPUTarget("cuda", 90, 32)
    CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")

    def aligned(sig):
        # What the launcher specialises at run time for a full chunk: 16-byte aligned tensors, and
        # a chunk width and row strides that are multiples of 16 (chunk widths are powers of two).
        return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig)
                if name.endswith("_ptr") or name.startswith("stride") or name == "n_cols"}

    def usage(kernel):
        # CompiledKernel.n_regs / n_spills are read when the module loads on a GPU; offline, the
        # cubin's resource table gives registers and local memory (spills live there).
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            open(path, "wb").write(kernel.asm["cubin"])
            out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
        regs = int(re.search(r"REG:(\\d+)", out.stdout).group(1))
        local = int(re.search(r"LOCAL:(\\d+)", out.stdout).group(1)) + int(re.search(r"STACK:(\\d+)", out.stdout).group(1))
        return regs, local
    rows = []
    for block in (4096, 1024):
        warps = max(1, min(8, block // 512))
        for bias in (True, False):
            for ent in (True, False):
                sig = {"z_ptr": "*fp32", "stride_z": "i64", "bias_ptr": "*fp32", "labels_ptr": "*i64",
                       "m_ptr": "*fp32", "s_ptr": "*fp32", "t_ptr": "*fp32", "zl_ptr": "*fp32",
                       "c0": "i32", "n_cols": "i32", "V": "i32", "scale2": "fp32",
                       "HAS_BIAS": "constexpr", "WITH_ENTROPY": "constexpr", "BLOCK": "constexpr"}
                k = triton.compile(ASTSource(fn=K._fold_fwd_kernel, signature=sig,
                                             constexprs={"HAS_BIAS": bias, "WITH_ENTROPY": ent, "BLOCK": block},
                                             attrs=aligned(sig)),
                                   target=target, options={"num_warps": warps})
                ptx = k.asm["ptx"]
                rows.append({"kernel": "fold_fwd", "block": block, "bias": bias, "entropy": ent,
                             "regs": usage(k)[0], "spills": usage(k)[1],
                             "max_nan": len(re.findall(r"max\\.NaN\\.f32", ptx)),
                             "max_plain": len(re.findall(r"max(\\.ftz)?\\.f32", ptx)),
                             "ld_v4": len(re.findall(r"ld\\.global[.a-z0-9]*\\.v4", ptx))})
        for gdt in ("*bf16", "*fp32"):
            for glp, gent in ((True, True), (True, False), (False, True)):
                sig = {"z_ptr": "*fp32", "stride_z": "i64", "g_ptr": gdt, "stride_g": "i64",
                       "bias_ptr": "*fp32", "labels_ptr": "*i64", "m_ptr": "*fp32", "logs_ptr": "*fp32",
                       "ent_ptr": "*fp32", "glp_ptr": "*fp32", "gent_ptr": "*fp32", "c0": "i32",
                       "n_cols": "i32", "V": "i32", "inv_temp": "fp32", "HAS_BIAS": "constexpr",
                       "HAS_GLP": "constexpr", "HAS_GENT": "constexpr", "BLOCK": "constexpr"}
                k = triton.compile(ASTSource(fn=K._dlogits_kernel, signature=sig,
                                             constexprs={"HAS_BIAS": True, "HAS_GLP": glp, "HAS_GENT": gent,
                                                         "BLOCK": block},
                                             attrs=aligned(sig)),
                                   target=target, options={"num_warps": warps})
                ptx = k.asm["ptx"]
                rows.append({"kernel": "dlogits", "block": block, "g": gdt, "glp": glp, "gent": gent,
                             "regs": usage(k)[0], "spills": usage(k)[1],
                             "max_nan": len(re.findall(r"max\\.NaN\\.f32", ptx)),
                             "max_plain": len(re.findall(r"max(\\.ftz)?\\.f32", ptx)),
                             "ld_v4": len(re.findall(r"ld\\.global[.a-z0-9]*\\.v4", ptx))})
    print(json.dumps(rows))
    print(triton.__version__, file=sys.stderr)
    """
)


def compile_for_sm90() -> list[dict]:
    """Compile every launcher configuration for sm_90 in a fresh interpreter-free process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_sm90_without_spills():
    rows = compile_for_sm90()
    for row in rows:
        print(row)  # registers, spills, NaN-propagating max count, 16-byte loads (pytest -s)
    assert len(rows) == 2 * (4 + 6)
    for row in rows:
        assert row["spills"] == 0, row
        # Every float max in these kernels must propagate NaN (no plain max.f32, which drops it).
        assert row["max_plain"] == 0, row
        assert row["ld_v4"] > 0, row  # 16-byte loads of the float32 logits tile
    assert any(r["max_nan"] > 0 for r in rows if r["kernel"] == "fold_fwd")
