"""The fused log-prob / entropy kernel (kernels/logprob.py) against a float64 ground truth.

Every case draws fresh random inputs from ``rng``, runs the kernel through the public op on the
Triton backend with its outputs poisoned (``run_kernel``), and compares with
``test_trust_logprob.ground_truth``: the formula written out in float64 on the very same (already
rounded) inputs, with its analytic gradient; never another backend.

Tolerances (``tests/helpers.py``): forward outputs are float32 whatever the input dtype, so they
are held to ``TOL_FP32_OUT`` (2e-5 abs + 2e-5 rel); the gradient of the logits is stored in the
logits' dtype and is held to ``TOL[dtype]`` (fp32 2e-5, bf16 2e-2, fp16 5e-3).

Without a GPU the kernels run in Triton's interpreter, which is slow, so shapes stay small and
``MAX_BLOCK`` forces blocks of 32-64 columns: rows of a few hundred columns then span several
blocks, which is the path real vocabularies take.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import reference
from fastppo.kernels import logprob as K

from helpers import TOL, TOL_FP32_OUT, assert_close, random_mask
from test_trust_logprob import assert_same, ground_truth

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Natively on a GPU when there is one, else on the CPU through the interpreter (conftest.py).
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 64 columns, so that V = 257 or 1000 needs several per row."""
    monkeypatch.setattr(K, "MAX_BLOCK", 64)
    return 64


def _randn(shape, gen, dtype, scale=4.0):
    return (torch.randn(shape, generator=gen) * scale).to(DEV, dtype)


def _make_logits(layout, B, T, V, gen, dtype):
    """[B, T, V], [B*T, V], or the strided view full[:, :-1] of a [B, T+1, V] tensor."""
    if layout == "btv":
        return _randn((B, T, V), gen, dtype)
    if layout == "nv":
        return _randn((B * T, V), gen, dtype)
    full = _randn((B, T + 1, V), gen, dtype)
    view = full[:, :-1]
    assert not view.is_contiguous()
    return view


def _check(run_kernel, logits, labels, gen, *, mask=None, temperature=1.0, grads=("logprob", "entropy")):
    """Kernel vs float64 ground truth: both outputs, then d logits for the outputs in ``grads``."""
    dtype = logits.dtype
    leaf = logits.detach().requires_grad_(True)
    got_lp, got_ent = run_kernel(
        fastppo.logprobs_from_logits, leaf, labels, temperature=temperature, return_entropy=True, mask=mask
    )
    cots = {name: torch.randn(got_lp.shape, generator=gen).to(DEV) for name in grads}
    want_lp, want_ent, want_grad = ground_truth(
        logits, labels, temperature=temperature, mask=mask, g_lp=cots.get("logprob"), g_ent=cots.get("entropy")
    )
    assert got_lp.dtype == torch.float32 and got_ent.dtype == torch.float32
    assert_same(got_lp, want_lp, TOL_FP32_OUT[dtype], "logprobs")
    assert_same(got_ent, want_ent, TOL_FP32_OUT[dtype], "entropy")
    if mask is not None:
        off = mask == 0
        assert bool((got_lp[off] == 0).all()) and bool((got_ent[off] == 0).all())
    if not grads:
        return
    pairs = {"logprob": got_lp, "entropy": got_ent}
    with poisoned():
        (got_grad,) = torch.autograd.grad([pairs[n] for n in grads], leaf, [cots[n] for n in grads])
    assert got_grad.dtype == dtype and got_grad.shape == logits.shape
    assert_same(got_grad, want_grad, TOL[dtype], f"d logits ({'+'.join(grads)})")
    if mask is not None:
        assert bool((got_grad[mask == 0] == 0).all()), "masked rows must get a zero gradient"


def poisoned():
    """The backward runs outside ``run_kernel``'s block; poison its outputs too."""
    from fastppo.kernels._common import poisoned_outputs

    return poisoned_outputs()


# --------------------------------------------------------------------------------------------
# Forward and both gradients over dtypes, layouts and vocabulary sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout,temperature", [("btv", 1.0), ("nv", 1.6), ("strided", 0.7)])
@pytest.mark.parametrize("V", [1000, 257, 1])
def test_matches_ground_truth(run_kernel, rng, small_blocks, dtype, layout, temperature, V):
    B, T = 2, 3
    logits = _make_logits(layout, B, T, V, rng, dtype)
    labels = torch.randint(0, V, logits.shape[:-1], generator=rng).to(DEV)
    if V > 1:
        # More than one block per row (the last one partial): the path full vocabularies take.
        block, _ = K._block_and_warps(V, logits.element_size())
        assert block < V and V % block != 0
    _check(run_kernel, logits, labels, rng, temperature=temperature)


def test_default_blocks_span_several_per_row(run_kernel, rng):
    """No block cap: V = 20000 bf16 takes three launcher-sized (8192) blocks per row."""
    V = 20000
    block, _ = K._block_and_warps(V, 2)
    assert block == 8192 and block < V
    logits = _randn((2, V), rng, torch.bfloat16)
    labels = torch.randint(0, V, (2,), generator=rng).to(DEV)
    _check(run_kernel, logits, labels, rng, temperature=0.9)


# --------------------------------------------------------------------------------------------
# Masks, odd shapes, extreme values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_masked_rows_are_not_read(run_kernel, rng, small_blocks, dtype, strided):
    """Masked rows hold NaN and out-of-range labels: outputs and gradient rows must be exactly 0."""
    B, T, V = 7, 5, 200
    logits = _make_logits("strided" if strided else "btv", B, T, V, rng, dtype)
    mask = random_mask(B, T, rng).to(DEV)  # every layout, including an empty row
    labels = torch.randint(0, V, (B, T), generator=rng).to(DEV)
    labels[~mask] = V + 12345  # a read of these would be out of bounds
    logits[~mask] = float("nan")
    _check(run_kernel, logits, labels, rng, mask=mask, temperature=1.3)


def test_numeric_mask_and_t_equals_1(run_kernel, rng, small_blocks):
    """T = 1 with a 0/1 float mask (the contract allows bool or 0/1 numbers)."""
    B, T, V = 6, 1, 300
    logits = _randn((B, T, V), rng, torch.float32)
    labels = torch.randint(0, V, (B, T), generator=rng).to(DEV)
    mask = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [1.0]], device=DEV)
    _check(run_kernel, logits, labels, rng, mask=mask.bool())
    got = run_kernel(fastppo.logprobs_from_logits, logits, labels, mask=mask)
    want, _, _ = ground_truth(logits, labels, mask=mask)
    assert_close(got, want, TOL_FP32_OUT[torch.float32], "logprobs with a 0/1 float mask")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_label_at_last_vocab_index(run_kernel, rng, small_blocks, dtype):
    """V = 257 with blocks of 64: the label sits alone in the last, one-column block."""
    V = 257
    logits = _randn((3, 4, V), rng, dtype)
    # int32 labels in one of the two cases: any integer dtype is accepted.
    label_dtype = torch.int32 if dtype == torch.bfloat16 else torch.long
    labels = torch.full((3, 4), V - 1, dtype=label_dtype, device=DEV)
    _check(run_kernel, logits, labels, rng, temperature=0.8)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_logits_of_magnitude_1e4(run_kernel, rng, small_blocks, dtype):
    """+-1e4 logits: exp overflows without the running max, and lse - sum(p z) would cancel."""
    N, V = 6, 300
    logits = (torch.randint(-1, 2, (N, V), generator=rng) * 1e4 + torch.randn(N, V, generator=rng) * 50).to(DEV, dtype)
    # Ties at the top, a row whose maximum comes in the last block, and an all-negative row.
    logits[0, 10] = logits[0, 250] = 1e4
    logits[1, :] = -1e4
    logits[1, V - 1] = 1e4
    logits[2] = -1e4 + torch.randn(V, generator=rng).to(DEV, dtype)
    labels = torch.randint(0, V, (N,), generator=rng).to(DEV)
    labels[1] = V - 1
    _check(run_kernel, logits, labels, rng, temperature=0.7)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_negative_infinity_entries(run_kernel, rng, small_blocks, dtype):
    """-inf logits (masked vocabulary): p = 0, no NaN from 0 * -inf, forward or backward."""
    N, V = 5, 400
    logits = _randn((N, V), rng, dtype)
    logits[torch.rand(N, V, generator=rng).to(DEV) < 0.3] = float("-inf")
    logits[0, :200] = float("-inf")  # three whole blocks of -inf before the first finite value
    logits[0, 300] = 2.5
    logits[1, 1:] = float("-inf")  # a single finite entry: log-prob 0, entropy 0
    logits[1, 0] = -3.0
    logits[2, :-1] = float("-inf")  # ... in the last column
    logits[2, -1] = 7.0
    labels = torch.randint(0, V, (N,), generator=rng).to(DEV)
    finite = torch.isfinite(logits.float())
    for n in range(N):  # labels on finite entries, except row 4 whose label is a -inf logit
        if n != 4:
            labels[n] = int(finite[n].nonzero()[int(torch.randint(0, int(finite[n].sum()), (1,), generator=rng))])
    labels[4] = int((~finite[4]).nonzero()[0])
    _check(run_kernel, logits, labels, rng, temperature=1.0)


def test_empty_batch(run_kernel):
    logits = torch.randn(2, 0, 50, device=DEV)
    labels = torch.zeros(2, 0, dtype=torch.long, device=DEV)
    lp, ent = run_kernel(fastppo.logprobs_from_logits, logits, labels, return_entropy=True)
    assert lp.shape == (2, 0) and ent.shape == (2, 0)


# --------------------------------------------------------------------------------------------
# Which outputs get a gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("grads", [("logprob",), ("entropy",)], ids=["logprob-only", "entropy-only"])
def test_gradient_of_one_output(run_kernel, rng, small_blocks, dtype, grads):
    B, T, V = 3, 4, 300
    logits = _make_logits("strided", B, T, V, rng, dtype)
    labels = torch.randint(0, V, (B, T), generator=rng).to(DEV)
    mask = random_mask(B, T, rng).to(DEV)
    _check(run_kernel, logits, labels, rng, mask=mask, temperature=1.4, grads=grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_logprobs_without_entropy(run_kernel, rng, small_blocks, dtype):
    """return_entropy=False: a single output and the kernel's entropy-free specialisation."""
    logits = _randn((4, 5, 333), rng, dtype)
    labels = torch.randint(0, 333, (4, 5), generator=rng).to(DEV)
    leaf = logits.detach().requires_grad_(True)
    got = run_kernel(fastppo.logprobs_from_logits, leaf, labels, temperature=0.6)
    cot = torch.randn(got.shape, generator=rng).to(DEV)
    want, _, w = ground_truth(logits, labels, temperature=0.6, g_lp=cot)
    assert isinstance(got, torch.Tensor)
    assert_close(got, want, TOL_FP32_OUT[dtype], "logprobs")
    with poisoned():
        (g,) = torch.autograd.grad(got, leaf, cot)
    assert_close(g, w, TOL[dtype], "d logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["btv", "strided", "nv"])
def test_entropy_from_logits(run_kernel, rng, small_blocks, dtype, layout):
    logits = _make_logits(layout, 2, 5, 300, rng, dtype)
    leaf = logits.detach().requires_grad_(True)
    got = run_kernel(fastppo.entropy_from_logits, leaf, temperature=1.3)
    cot = torch.randn(got.shape, generator=rng).to(DEV)
    _, want, w = ground_truth(logits, temperature=1.3, g_ent=cot)
    assert got.dtype == torch.float32
    assert_close(got, want, TOL_FP32_OUT[dtype], "entropy")
    with poisoned():
        (g,) = torch.autograd.grad(got, leaf, cot)
    assert g.dtype == dtype
    assert_close(g, w, TOL[dtype], "d logits")


# --------------------------------------------------------------------------------------------
# inplace_backward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_inplace_backward(run_kernel, rng, small_blocks, dtype, strided):
    """The gradient is right and lives in the logits' own storage (which now holds it)."""
    B, T, V = 3, 4, 300
    full = _randn((B, T + 1, V), rng, dtype)
    logits = full[:, :-1] if strided else full
    labels = torch.randint(0, V, logits.shape[:-1], generator=rng).to(DEV)
    mask = random_mask(B, logits.shape[1], rng).to(DEV)
    cots = [torch.randn(labels.shape, generator=rng).to(DEV), torch.randn(labels.shape, generator=rng).to(DEV)]
    # Taken before the backward overwrites the logits.
    want_lp, want_ent, w = ground_truth(logits, labels, mask=mask, g_lp=cots[0], g_ent=cots[1])
    leaf = logits.requires_grad_(True)
    lp, ent = run_kernel(
        fastppo.logprobs_from_logits, leaf, labels, return_entropy=True, mask=mask, inplace_backward=True
    )
    assert_close(lp, want_lp, TOL_FP32_OUT[dtype], "logprobs")
    assert_close(ent, want_ent, TOL_FP32_OUT[dtype], "entropy")
    (g,) = torch.autograd.grad([lp, ent], leaf, cots)
    assert_close(g, w, TOL[dtype], "d logits (inplace)")
    assert g.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    assert g.data_ptr() == logits.data_ptr() and g.stride() == logits.stride()
    assert torch.equal(logits.detach(), g)


def test_inplace_backward_entropy_only(run_kernel, rng, small_blocks):
    logits = _randn((6, 300), rng, torch.float16)
    cot = torch.randn(6, generator=rng).to(DEV)
    _, want, w = ground_truth(logits, g_ent=cot)
    leaf = logits.requires_grad_(True)
    got = run_kernel(fastppo.entropy_from_logits, leaf, inplace_backward=True)
    assert_close(got, want, TOL_FP32_OUT[torch.float16], "entropy")
    (g,) = torch.autograd.grad(got, leaf, cot)
    assert_close(g, w, TOL[torch.float16], "d logits (inplace)")
    assert g.data_ptr() == logits.data_ptr()


# --------------------------------------------------------------------------------------------
# Peeled rows: V or a stride not a multiple of 16 bytes (GPT-2's 50257), misaligned data pointers
# --------------------------------------------------------------------------------------------


def _vec(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def _rows_at_every_offset(gen, dtype, V, shift):
    """``[vec + 1, V]`` rows at stride V (odd) from a buffer ``shift`` elements past a 16-byte
    boundary: the row starts cover every element offset modulo 16 bytes."""
    vec = _vec(dtype)
    n = vec + 1
    flat = _randn((shift + n * V,), gen, dtype)
    logits = flat[shift:].view(n, V)
    assert logits.data_ptr() % 16 == shift * logits.element_size() % 16
    assert sorted({(shift + r * V) % vec for r in range(n)}) == list(range(vec))
    vec_k, ptr_off, peel = K._alignment(logits, 0, logits.stride(0), V)
    assert peel and vec_k == vec and ptr_off == shift % vec
    return logits


def _head_and_tail_labels(logits, gen):
    """Labels in each row's head (column 0), tail (V - 1) and body."""
    n, V = logits.shape
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[0::3] = 0
    labels[1::3] = V - 1
    return labels.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("V,shift", [(257, 0), (1001, 3), (13, 1)])
def test_peeled_rows_at_every_start_offset(run_kernel, rng, small_blocks, dtype, V, shift):
    """Rows starting at each element offset modulo 16 bytes (head 0 .. vec - 1 columns), with a
    tail, through several 64-column body blocks (V = 13: a row shorter than head + tail)."""
    logits = _rows_at_every_offset(rng, dtype, V, shift)
    _check(run_kernel, logits, _head_and_tail_labels(logits, rng), rng, temperature=0.8)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_peeled_rows_masked(run_kernel, rng, small_blocks, dtype):
    """Masked peeled rows hold NaN and out-of-range labels: never read, 0 out, zero gradient."""
    logits = _rows_at_every_offset(rng, dtype, 257, 1)
    n = logits.shape[0]
    mask = torch.arange(n) % 2 == 1
    labels = _head_and_tail_labels(logits, rng)
    labels[~mask.to(DEV)] = 257 + 999
    logits[~mask] = float("nan")
    _check(run_kernel, logits, labels, rng, mask=mask.to(DEV), temperature=1.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
def test_peeled_strided_view(run_kernel, rng, small_blocks, dtype, inplace):
    """``full[:, :-1]`` with V = 1001: logits and gradient rows misaligned differently (new
    buffer: scalar stores) or alike (inplace: 16-byte stores), masked rows included."""
    B, T, V = 2, 5, 1001
    full = _randn((B, T + 1, V), rng, dtype)
    logits = full[:, :-1]
    labels = torch.randint(0, V, (B, T), generator=rng).to(DEV)
    labels[:, 0], labels[:, 1] = 0, V - 1
    mask = random_mask(B, T, rng).to(DEV)
    if not inplace:
        _check(run_kernel, logits, labels, rng, mask=mask, temperature=0.9)
        return
    cots = [torch.randn(labels.shape, generator=rng).to(DEV) for _ in range(2)]
    want_lp, want_ent, w = ground_truth(logits, labels, mask=mask, g_lp=cots[0], g_ent=cots[1])
    leaf = logits.requires_grad_(True)
    lp, ent = run_kernel(
        fastppo.logprobs_from_logits, leaf, labels, return_entropy=True, mask=mask, inplace_backward=True
    )
    assert_same(lp, want_lp, TOL_FP32_OUT[dtype], "logprobs")
    assert_same(ent, want_ent, TOL_FP32_OUT[dtype], "entropy")
    with poisoned():
        (g,) = torch.autograd.grad([lp, ent], leaf, cots)
    assert_same(g, w, TOL[dtype], "d logits (inplace, peeled)")
    assert g.data_ptr() == logits.data_ptr()


class _Launches:
    """Stands in for ``_logprob_bwd_kernel``: records each launch's keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("start", [0, 1], ids=["[:, :-1]", "[:, 1:]"])
def test_new_gradient_of_a_sliced_view_shares_the_logits_alignment(run_kernel, rng, small_blocks, monkeypatch,
                                                                   dtype, start):
    """``full[:, :-1]`` (and ``[:, 1:]``, whose data pointer is off a 16-byte boundary) at
    V = 1001, odd like GPT-2's 50257: a contiguous new gradient would put row b at b * V elements
    from the logits' row, so the backward could only store element by element. The new gradient's
    rows start at the logits' offsets modulo 16 bytes (and its strides are congruent modulo 16
    elements, Triton's divisibility unit), so the launch gets 16-byte stores (GRAD_ALIGNED).
    Autograd takes that gradient for the view as a leaf and through the slice into the base's
    gradient; both against float64, outputs poisoned."""
    B, T, V = 2, 4, 1001
    full = _randn((B, T + 1, V), rng, dtype)
    labels = torch.randint(0, V, (B, T), generator=rng).to(DEV)
    labels[:, 0], labels[:, 1] = 0, V - 1
    mask = random_mask(B, T, rng).to(DEV)
    cots = [torch.randn(labels.shape, generator=rng).to(DEV) for _ in range(2)]
    launches = _Launches(K._logprob_bwd_kernel)
    monkeypatch.setattr(K, "_logprob_bwd_kernel", launches)

    # The view itself as the leaf: torch.autograd.grad hands back the kernel's tensor as it is.
    leaf = full[:, start:start + T].detach().requires_grad_(True)
    assert not leaf.is_contiguous()
    want_lp, want_ent, want_grad = ground_truth(leaf, labels, mask=mask, g_lp=cots[0], g_ent=cots[1])
    lp, ent = run_kernel(fastppo.logprobs_from_logits, leaf, labels, return_entropy=True, mask=mask)
    assert_same(lp, want_lp, TOL_FP32_OUT[dtype], "logprobs")
    assert_same(ent, want_ent, TOL_FP32_OUT[dtype], "entropy")
    with poisoned():
        (g,) = torch.autograd.grad([lp, ent], leaf, cots)
    assert g.shape == leaf.shape and g.dtype == dtype
    assert_same(g, want_grad, TOL[dtype], "d logits (new gradient of a view)")
    assert [s % 16 for s in g.stride()] == [s % 16 for s in leaf.stride()]
    for b in range(B):
        for t in range(T):
            assert g[b, t].data_ptr() % 16 == leaf[b, t].data_ptr() % 16, (b, t)
    (kw,) = launches.kwargs
    assert kw["PEEL"] and kw["GRAD_ALIGNED"]

    # The slice of a base that requires grad: the base's gradient, zero outside the slice.
    base = full.detach().requires_grad_(True)
    lp, ent = run_kernel(fastppo.logprobs_from_logits, base[:, start:start + T], labels, return_entropy=True,
                         mask=mask)
    with poisoned():
        (g_base,) = torch.autograd.grad([lp, ent], base, cots)
    want_base = torch.zeros(full.shape, dtype=torch.float64, device=DEV)
    want_base[:, start:start + T] = want_grad
    assert_same(g_base, want_base, TOL[dtype], "d base through the slice")


def test_peeled_nan_and_inf_in_head_and_tail(run_kernel, rng, small_blocks):
    """A NaN in a row's head or tail (not its body) makes that row's outputs and gradient NaN;
    -inf in a head is p = 0."""
    logits = _rows_at_every_offset(rng, torch.bfloat16, 257, 0)
    logits[1, 0] = float("nan")  # row 1 starts 1 element past a boundary: column 0 is its head
    logits[2, 256] = float("nan")  # row 2's last column: its tail
    logits[3, :5] = float("-inf")  # row 3's head
    labels = torch.full((logits.shape[0],), 100, dtype=torch.long).to(DEV)
    _check(run_kernel, logits, labels, rng)


# --------------------------------------------------------------------------------------------
# The forward's per-lane pipelined loop (issue 12: no CTA barrier per block, next block prefetched)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def lane_blocks(monkeypatch):
    """Blocks of 256 fp32 / 512 bf16 columns on one warp: the [K, LANES, CV] view is [2, 32, 4]
    or [2, 32, 8], so every lane folds two 16-byte chunks per block, as on a GPU (K = 2-4)."""
    def blocks(dtype):
        size = torch.empty((), dtype=dtype).element_size()
        monkeypatch.setattr(K, "MAX_BLOCK", 1024 // size)
        block, warps = K._block_and_warps(100000, size)
        k, lanes, cv = K._lane_blocks(block, 16 // size, warps)
        assert (k, lanes, cv * size) == (2, 32, 16)
        return block

    return blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("extra", [0, 3], ids=["aligned", "peeled"])
def test_pipelined_rows(run_kernel, rng, lane_blocks, dtype, extra):
    """Rows of 3 blocks plus a partial one (V = 3.25 blocks, +3 columns: peeled head/tail): each
    lane's running max moves between blocks (growing logits), the max sits in the prefetched last
    block or in one lane only, a masked NaN row is never read, a valid NaN row is NaN."""
    block = lane_blocks(dtype)
    V = 3 * block + block // 4 + extra
    N = 6
    logits = _randn((N, V), rng, dtype)
    logits[0] += torch.linspace(-20, 20, V).to(DEV, dtype)  # every block raises every lane's max
    logits[1, -1] = 40.0  # the max in the last (partial, prefetched) block's last column
    logits[2, 5] = 40.0  # one lane of the first block holds the max; the others never see it
    logits[3] = float("nan")  # masked below
    labels = torch.randint(0, V, (N,), generator=rng).to(DEV)
    labels[1] = V - 1
    mask = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool).to(DEV)
    _check(run_kernel, logits, labels, rng, mask=mask, temperature=0.9)


def test_pipelined_nan_row_propagates(run_kernel, rng, lane_blocks):
    """A NaN in one lane of one middle block makes the whole row NaN (log-prob, entropy and its
    gradient row): the per-lane maxima and the final merge propagate NaN."""
    block = lane_blocks(torch.float32)
    V = 3 * block + 40
    logits = _randn((3, V), rng, torch.float32)
    logits[1, block + 77] = float("nan")
    labels = torch.tensor([0, 5, V - 1]).to(DEV)
    _check(run_kernel, logits, labels, rng)
    lp, ent = fastppo.logprobs_from_logits(logits, labels, return_entropy=True)
    assert bool(lp[1].isnan()) and bool(ent[1].isnan())
    assert bool(torch.isfinite(lp[[0, 2]]).all()) and bool(torch.isfinite(ent[[0, 2]]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_pipelined_inf_and_1e4(run_kernel, rng, lane_blocks, dtype):
    """-inf entries (whole lanes and whole blocks of them, a row finite in one column only) and
    logits of +-1e4 whose max is in a later block than most of the mass."""
    block = lane_blocks(dtype)
    V = 3 * block + 32
    N = 5
    logits = _randn((N, V), rng, dtype)
    logits[0, : 2 * block] = float("-inf")  # two whole blocks of -inf: lanes start at -inf
    logits[1, :] = float("-inf")
    logits[1, block + 3] = 1.5  # one finite column in one lane
    logits[2] = (torch.randint(-1, 2, (V,), generator=rng) * 1e4).to(DEV, dtype)
    logits[2, -2] = 1e4 + 8
    logits[3, torch.rand(V, generator=rng) < 0.5] = float("-inf")
    logits[4] = (-1e4 + torch.randn(V, generator=rng)).to(DEV, dtype)
    labels = torch.tensor([2 * block + 1, block + 3, V - 2, 0, 7]).to(DEV)
    labels[3] = int(torch.isfinite(logits[3].float()).nonzero()[0])
    _check(run_kernel, logits, labels, rng, temperature=0.7)


# --------------------------------------------------------------------------------------------
# The harness itself, dispatch, fallbacks
# --------------------------------------------------------------------------------------------


class _NoLaunch:
    """Stands in for a kernel that never runs: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_unwritten_outputs_fail(run_kernel, rng, monkeypatch):
    """Poisoning works: a forward or backward that writes nothing is caught as NaN."""
    logits = _randn((4, 100), rng, torch.float32)
    labels = torch.randint(0, 100, (4,), generator=rng).to(DEV)
    want, _, _ = ground_truth(logits, labels)
    monkeypatch.setattr(K, "_logprob_fwd_kernel", _NoLaunch())
    got = run_kernel(fastppo.logprobs_from_logits, logits, labels)
    assert bool(torch.isnan(got).all())
    with pytest.raises(AssertionError, match="elements off"):
        assert_close(got, want, TOL_FP32_OUT[torch.float32], "logprobs")
    monkeypatch.undo()

    monkeypatch.setattr(K, "_logprob_bwd_kernel", _NoLaunch())
    leaf = logits.detach().requires_grad_(True)
    lp = run_kernel(fastppo.logprobs_from_logits, leaf, labels)
    with poisoned():
        (g,) = torch.autograd.grad(lp.sum(), leaf)
    assert bool(torch.isnan(g).all())


def test_dispatch_uses_the_kernel():
    from fastppo import _dispatch

    with fastppo.use_backend("triton"):
        assert _dispatch.pick("logprobs_from_logits", torch.device(DEV)) is K.logprobs_from_logits
        assert _dispatch.pick("entropy_from_logits", torch.device(DEV)) is K.entropy_from_logits


def test_float64_falls_back_to_reference(run_kernel, rng):
    logits = torch.randn(3, 4, 50, generator=rng, dtype=torch.float64).to(DEV)
    labels = torch.randint(0, 50, (3, 4), generator=rng).to(DEV)
    lp, ent = run_kernel(fastppo.logprobs_from_logits, logits, labels, return_entropy=True, temperature=0.5)
    want_lp, want_ent = reference.logprobs_from_logits.raw(logits, labels, return_entropy=True, temperature=0.5)
    assert lp.dtype == torch.float64
    assert torch.equal(lp, want_lp) and torch.equal(ent, want_ent)


def test_transposed_last_dim_is_copied(run_kernel, rng, small_blocks):
    """A last dimension with stride != 1 is made contiguous once, then handled as usual."""
    logits = _randn((300, 5), rng, torch.float32).t()
    assert logits.stride(-1) != 1
    labels = torch.randint(0, 300, (5,), generator=rng).to(DEV)
    _check(run_kernel, logits, labels, rng, temperature=1.1)


# --------------------------------------------------------------------------------------------
# GPU only: the real size, past 2^31 elements
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_size_past_int32_offsets(rng):
    """16384 x 152064 bf16 (N * V = 2.49e9 > 2^31): forward against a chunked float64 ground truth,
    backward on the first and last rows, and no memory beyond the outputs in forward."""
    N, V = 16384, 152064
    assert N * V > 2**31
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    logits = torch.empty(N, V, dtype=torch.bfloat16, device=device)
    for i in range(0, N, 1024):
        logits[i : i + 1024].normal_(0, 4, generator=gen)
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    labels[-1] = V - 1

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with fastppo.use_backend("triton"):
        lp, ent = fastppo.logprobs_from_logits(logits, labels, return_entropy=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 64 * N + (1 << 20), f"forward allocated {extra} bytes beyond its inputs"

    tol = TOL_FP32_OUT[torch.bfloat16]
    for i in range(0, N, 256):  # float64 ground truth on the GPU, 256 rows (311 MB) at a time
        want_lp, want_ent, _ = ground_truth(logits[i : i + 256], labels[i : i + 256])
        assert_close(lp[i : i + 256], want_lp, tol, f"logprobs rows {i}..")
        assert_close(ent[i : i + 256], want_ent, tol, f"entropy rows {i}..")

    leaf = logits.requires_grad_(True)
    with fastppo.use_backend("triton"):
        lp, ent = fastppo.logprobs_from_logits(leaf, labels, return_entropy=True)
    (g,) = torch.autograd.grad([lp, ent], leaf, [torch.ones_like(lp), torch.ones_like(ent)])
    for rows in (slice(0, 256), slice(N - 256, N)):
        ones = torch.ones(256, device=device)
        _, _, w = ground_truth(logits[rows], labels[rows], g_lp=ones, g_ent=ones)
        assert_close(g[rows], w, TOL[torch.bfloat16], f"d logits rows {rows}")
