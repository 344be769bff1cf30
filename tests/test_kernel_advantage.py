"""Triton kernels of the advantage pass (kernels/advantage.py) against a float64 ground truth.

Every kernel output is compared with the float64 ground truth of ``test_trust_advantage.py``
(written from DESIGN.md's formulas, independent of ``fastppo.reference``) on the very same
(already rounded) inputs, NaN-aware, outputs poisoned with NaN so that an element the kernel never
writes fails. Tolerances (atol, rtol), the same for fp32 and bf16 inputs since the kernels read
the rounded inputs exactly and compute and store in float32:

* ELEMENTWISE = (2e-5, 2e-5): kl_penalty and shape_rewards (one or two float32 roundings; k3's
  exp carries the relative rounding of a number up to ~e^4);
* SCAN = (1e-4, 1e-4): GAE, whitening and compute_advantages (float32 sums over a row, whitening
  statistics over the batch), the tolerance ``fastppo verify`` uses for reductions.

Shapes stay small: without a GPU every kernel runs through Triton's interpreter, whose scans
call the combine function once per element in Python.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo.kernels import advantage as K
from fastppo.testing import assert_close, random_mask
from test_trust_advantage import check, gt_advantages, gt_gae, gt_kl, gt_shape_rewards, gt_whiten

ELEMENTWISE = (2e-5, 2e-5)
SCAN = (1e-4, 1e-4)
ESTIMATORS = ("k1", "abs", "k2", "k3")


def _randn(shape, gen, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype)


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


def _check_all(got, want, tol, names):
    assert len(got) == len(want)
    for g, w, name in zip(got, want, names):
        assert g.dtype == torch.float32, f"{name}: dtype {g.dtype}"
        check(g.cpu(), w, tol, name)


def _chunked_mask(B, T, gen):
    """Rows whose gaps straddle chunk borders of length 4, including whole empty chunks."""
    m = random_mask(B, T, gen)
    if T >= 16:
        m[0] = True
        m[0, 3:10] = False  # from inside chunk 0 across all of chunk 1 into chunk 2
        m[1 % B] = False
        m[1 % B, [0, 5, T - 1]] = True  # isolated tokens, far apart
    return m


# --------------------------------------------------------------------------------------------
# kl_penalty
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty(rng, run_kernel, kernel_device, dtype, estimator):
    lp = _randn((3, 5, 7), rng, dtype, shift=-1.0)
    ref = _randn((3, 5, 7), rng, dtype, shift=-1.0)
    got = run_kernel(fastppo.kl_penalty, *_to(kernel_device, lp, ref), estimator)
    want = gt_kl(lp.double(), ref.double(), estimator)
    _check_all([got], [want], ELEMENTWISE, [f"kl {estimator}"])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_clamp_and_odd_block(rng, run_kernel, kernel_device, estimator):
    lp = _randn((2, 37), rng, scale=3.0)
    ref = _randn((2, 37), rng, scale=3.0)
    got = run_kernel(K.kl_penalty_launch, *_to(kernel_device, lp, ref), estimator, clamp=0.5, block=16)
    want = gt_kl(lp.double(), ref.double(), estimator, clamp=0.5)
    _check_all([got], [want], ELEMENTWISE, ["kl clamp"])


def test_kl_penalty_strided_and_empty(rng, run_kernel, kernel_device):
    full = _randn((4, 9), rng)
    lp, ref = full[:, :-1], full[:, 1:]  # non-contiguous views
    got = run_kernel(fastppo.kl_penalty, *_to(kernel_device, lp, ref), "k2")
    _check_all([got], [gt_kl(lp.double(), ref.double(), "k2")], ELEMENTWISE, ["kl strided"])
    empty = torch.zeros(3, 0)
    got = run_kernel(fastppo.kl_penalty, *_to(kernel_device, empty, empty))
    assert got.shape == (3, 0) and got.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# shape_rewards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shape_rewards(rng, run_kernel, kernel_device, dtype, estimator):
    B, T = 7, 9
    lp, ref = _randn((B, T), rng, dtype), _randn((B, T), rng, dtype)
    scores = _randn((B,), rng, dtype)
    mask = random_mask(B, T, rng)
    args = _to(kernel_device, scores, lp, ref, mask)
    got = run_kernel(fastppo.shape_rewards, *args, kl_coef=0.1, estimator=estimator)
    want = gt_shape_rewards(scores.double(), lp.double(), ref.double(), mask, kl_coef=0.1, estimator=estimator)
    _check_all(got, want, ELEMENTWISE, ["rewards", "kl"])


@pytest.mark.parametrize("float_mask", [False, True])
def test_shape_rewards_last_token_across_chunks(rng, run_kernel, kernel_device, float_mask):
    """The score lands on the last valid token even when later chunks are entirely masked."""
    B, T = 5, 18
    lp, ref = _randn((B, T), rng), _randn((B, T), rng)
    scores = _randn((B,), rng)
    mask = _chunked_mask(B, T, rng)
    mask[2] = False
    mask[2, 1] = True  # last valid token in chunk 0 of 5
    mask[3] = False  # no valid position: no score anywhere
    m = mask.float() if float_mask else mask
    got = run_kernel(K.shape_rewards_launch, *_to(kernel_device, scores, lp, ref, m), kl_coef=0.05, estimator="k3", chunk=4, rows=2)
    want = gt_shape_rewards(scores.double(), lp.double(), ref.double(), mask, kl_coef=0.05, estimator="k3")
    _check_all(got, want, ELEMENTWISE, ["rewards", "kl"])
    assert bool((got[0][3].cpu() == 0).all())


# --------------------------------------------------------------------------------------------
# gae
# --------------------------------------------------------------------------------------------


def _gae_case(rng, run_kernel, kernel_device, B, T, *, gamma, lam, whiten, mask=None, dtype=torch.float32, **launch):
    r, v = _randn((B, T), rng, dtype), _randn((B, T), rng, dtype)
    if mask is None:
        mask = random_mask(B, T, rng)
    fn = K.gae_launch if launch else fastppo.gae
    got = run_kernel(fn, *_to(kernel_device, r, v, mask), gamma=gamma, lam=lam, whiten=whiten, **launch)
    want = gt_gae(r.double(), v.double(), mask, gamma=gamma, lam=lam, whiten=whiten)
    _check_all(got, want, SCAN, ["advantages", "returns"])
    return got


@pytest.mark.parametrize(
    "gamma,lam",
    [(1.0, 0.95), (1.0, 0.0), (1.0, 1.0), (0.9, 0.8), (0.0, 0.5)],
    ids=["default", "td-error", "return-to-go", "gamma<1", "gamma=0"],
)
@pytest.mark.parametrize("whiten", [False, True])
def test_gae(rng, run_kernel, kernel_device, gamma, lam, whiten):
    _gae_case(rng, run_kernel, kernel_device, 7, 11, gamma=gamma, lam=lam, whiten=whiten)


def test_gae_bf16_inputs(rng, run_kernel, kernel_device):
    _gae_case(rng, run_kernel, kernel_device, 5, 8, gamma=0.99, lam=0.95, whiten=True, dtype=torch.bfloat16)


@pytest.mark.parametrize("chunk,rows", [(4, 1), (4, 4), (2, 2)])
@pytest.mark.parametrize("gamma,lam,whiten", [(1.0, 1.0, False), (0.95, 0.9, True), (0.9, 0.0, True)])
def test_gae_many_chunks(rng, run_kernel, kernel_device, chunk, rows, gamma, lam, whiten):
    """T spans several chunks; gaps and empty chunks straddle the chunk borders."""
    B, T = 5, 18
    mask = _chunked_mask(B, T, rng)
    _gae_case(rng, run_kernel, kernel_device, B, T, gamma=gamma, lam=lam, whiten=whiten, mask=mask, chunk=chunk, rows=rows)


def test_gae_padding_layouts(rng, run_kernel, kernel_device):
    """Right and left padding, a middle gap, single tokens, empty and full rows, float 0/1 mask."""
    B, T = 8, 10
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :6] = True  # right padding
    mask[1, 3:] = True  # left padding
    mask[2] = True
    mask[2, 2:7] = False  # gap
    mask[3, 0] = True  # single token, first
    mask[4, T - 1] = True  # single token, last
    mask[6] = True  # full; row 5 and 7 empty
    r, v = _randn((B, T), rng), _randn((B, T), rng)
    got = run_kernel(K.gae_launch, *_to(kernel_device, r, v, mask.to(torch.float16)), gamma=0.97, lam=0.9, chunk=4)
    want = gt_gae(r.double(), v.double(), mask, gamma=0.97, lam=0.9)
    _check_all(got, want, SCAN, ["advantages", "returns"])
    for out in got:
        assert bool((out.cpu()[~mask] == 0).all())


def test_gae_right_padding_equals_unpadded(rng, run_kernel, kernel_device):
    """Right padding gives the same numbers as the same rows without padding (verl's equivalence)."""
    B, T, n = 3, 12, 7
    r, v = _randn((B, T), rng), _randn((B, T), rng)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, :n] = True
    padded = run_kernel(K.gae_launch, *_to(kernel_device, r, v, mask), gamma=0.99, lam=0.95, chunk=4)
    short = run_kernel(K.gae_launch, *_to(kernel_device, r[:, :n], v[:, :n], mask[:, :n]), gamma=0.99, lam=0.95, chunk=4)
    for p, s in zip(padded, short):
        assert_close(p[:, :n].cpu(), s.cpu().double(), SCAN, "padded vs unpadded")


@pytest.mark.parametrize("whiten", [False, True])
def test_gae_tiny_shapes(rng, run_kernel, kernel_device, whiten):
    """T = 1, a single row, and rows with no valid position."""
    _gae_case(rng, run_kernel, kernel_device, 4, 1, gamma=0.9, lam=0.9, whiten=whiten,
              mask=torch.tensor([[True], [False], [True], [False]]))
    _gae_case(rng, run_kernel, kernel_device, 1, 5, gamma=1.0, lam=0.95, whiten=whiten)
    got = _gae_case(rng, run_kernel, kernel_device, 3, 4, gamma=1.0, lam=0.95, whiten=whiten,
                    mask=torch.zeros(3, 4, dtype=torch.bool))
    assert all(bool((g.cpu() == 0).all()) for g in got)


def test_gae_masked_garbage_does_not_leak(rng, run_kernel, kernel_device):
    B, T = 4, 9
    mask = random_mask(B, T, rng, kinds=("gap", "left", "right", "scatter"))
    r, v = _randn((B, T), rng), _randn((B, T), rng)
    r_bad = torch.where(mask, r, float("nan"))
    v_bad = torch.where(mask, v, float("inf"))
    got = run_kernel(K.gae_launch, *_to(kernel_device, r_bad, v_bad, mask), gamma=0.99, lam=0.95, whiten=True, chunk=4)
    want = gt_gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95, whiten=True)
    _check_all(got, want, SCAN, ["advantages", "returns"])


def test_gae_hand_worked_example(run_kernel, kernel_device):
    """gamma = lam = 1, final reward 2, critic V(S3) = 1.2 at the last token: A3 = 0.8, R3 = 2."""
    values = torch.tensor([[0.5, 0.7, 1.0, 1.2]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv, ret = run_kernel(fastppo.gae, *_to(kernel_device, rewards, values, mask), gamma=1.0, lam=1.0)
    assert_close(adv.cpu(), torch.tensor([[1.5, 1.3, 1.0, 0.8]], dtype=torch.float64), SCAN, "A")
    assert_close(ret.cpu(), torch.full((1, 4), 2.0, dtype=torch.float64), SCAN, "R")
    # The same through the whole pass: the score 2 lands on the last token, no KL (lp == ref).
    lp = torch.zeros(1, 4)
    adv, ret, rew, kl = run_kernel(
        fastppo.compute_advantages, *_to(kernel_device, torch.tensor([2.0]), lp, lp, values, mask),
        kl_coef=0.1, gamma=1.0, lam=1.0, whiten=False,
    )
    assert abs(float(adv[0, 3]) - 0.8) < 1e-6 and abs(float(ret[0, 3]) - 2.0) < 1e-6
    assert_close(rew.cpu(), rewards.double(), SCAN, "rewards")
    assert_close(kl.cpu(), torch.zeros(1, 4, dtype=torch.float64), SCAN, "kl")


# --------------------------------------------------------------------------------------------
# The segmented scan: rows split over programs along T, packed masks, the launch grid
# --------------------------------------------------------------------------------------------


def _boundary_mask(B, T, chunk, gen):
    """Gaps that open and close exactly at chunk and segment (8-position) borders, whole masked
    chunks, and one valid token per chunk; the other rows cycle through random_mask's layouts."""
    m = random_mask(B, T, gen)
    m[0] = True
    m[0, chunk - 1 : 2 * chunk + 1] = False  # last of chunk 0 .. first of chunk 2: chunk 1 empty
    m[1] = False
    m[1, ::chunk] = True  # the first position of every chunk only
    m[2] = True
    m[2, 8:16] = False  # exactly one segment
    m[2, T - 8 :] = False  # right padding of a whole segment
    return m


@pytest.mark.parametrize("chunk,rows", [(8, 1), (16, 2), (32, 4)])
@pytest.mark.parametrize("gamma,lam,whiten", [(0.99, 0.95, False), (1.0, 1.0, True)])
def test_gae_rows_split_across_programs(rng, run_kernel, kernel_device, chunk, rows, gamma, lam, whiten):
    """4-8 programs per row: the carry crosses program borders through masked gaps, with NaN/inf
    at every masked position (never read into a number), packed bool mask (T % 8 == 0)."""
    B, T = 5, 64
    mask = _boundary_mask(B, T, chunk, rng)
    r, v = _randn((B, T), rng), _randn((B, T), rng)
    r_bad = torch.where(mask, r, float("nan"))
    v_bad = torch.where(mask, v, float("-inf"))
    got = run_kernel(K.gae_launch, *_to(kernel_device, r_bad, v_bad, mask), gamma=gamma, lam=lam, whiten=whiten,
                     chunk=chunk, rows=rows)
    want = gt_gae(r.double(), v.double(), mask, gamma=gamma, lam=lam, whiten=whiten)
    _check_all(got, want, SCAN, ["advantages", "returns"])


@pytest.mark.parametrize("whiten", [False, True])
def test_compute_advantages_rows_split_across_programs(rng, run_kernel, kernel_device, whiten):
    """The score is carried from the row's end through empty chunks; it lands on the last valid
    token, which is the first position of the row's last non-empty chunk in row 1."""
    B, T, chunk = 4, 48, 8
    mask = _boundary_mask(B, T, chunk, rng)
    mask[3] = False
    mask[3, 3] = True  # the score crosses five empty chunks
    got = _advantages_case(rng, run_kernel, kernel_device, B, T, mask=mask, kl_coef=0.05, estimator="k2",
                           gamma=0.97, lam=0.9, whiten=whiten, chunk=chunk, rows=1)
    assert float(got[2][3, 3].cpu()) != 0.0 and bool((got[2][3, 4:].cpu() == 0).all())


def test_long_rows_default_grid(rng, run_kernel, kernel_device):
    """Two 1536-token rows: the launcher itself splits each row over several 1-warp programs."""
    B, T = 2, 1536
    chunk, rows = K.pick_blocks(B, T)
    assert rows == 1 and chunk == 256 and triton_cdiv(T, chunk) == 6
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1000:] = False  # right padding
    mask[1, :700] = False  # left padding
    mask[1, 900:1100] = False  # and a gap across a chunk border
    _gae_case(rng, run_kernel, kernel_device, B, T, gamma=0.999, lam=0.95, whiten=True, mask=mask)
    _advantages_case(rng, run_kernel, kernel_device, B, T, mask=mask, kl_coef=0.02, whiten=True)


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("T", [1, 7, 13, 37, 40])
def test_odd_lengths_and_padding(rng, run_kernel, kernel_device, T):
    """T not a multiple of a segment (partial vectors, unpacked mask) and multiples of 8 (packed),
    with left and right padding, one chunk and several."""
    B = 4
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, : max(1, T - 3)] = True  # right padding
    mask[1, T // 2 :] = True  # left padding
    mask[2, T - 1] = True  # the last position only
    for kw in ({}, {"chunk": 8, "rows": 2}):
        _gae_case(rng, run_kernel, kernel_device, B, T, gamma=0.95, lam=0.9, whiten=True, mask=mask, **kw)
        _advantages_case(rng, run_kernel, kernel_device, B, T, mask=mask, kl_coef=0.1, whiten=False, **kw)


def test_tiny_single_row(rng, run_kernel, kernel_device):
    """[1, 1] and [1, 8] (one segment, packed mask): the smallest tiles the grid has."""
    for T in (1, 8):
        mask = torch.ones(1, T, dtype=torch.bool)
        _gae_case(rng, run_kernel, kernel_device, 1, T, gamma=0.9, lam=0.8, whiten=False, mask=mask)
        _advantages_case(rng, run_kernel, kernel_device, 1, T, mask=mask, kl_coef=0.1, whiten=True)


def test_mask_packing(rng, run_kernel, kernel_device):
    """Bool/uint8 masks with T % 8 == 0 are read as packed uint16 words; a mask given as uint16 is
    never taken for packed bytes: it is turned into bytes first (256 is "valid", as mask != 0 says)."""
    m = random_mask(3, 16, rng)
    assert K._mask_rows(m).dtype == torch.uint16 and K._mask_rows(m).shape == (3, 8)
    assert K._mask_rows(m[:, :12]).dtype == torch.uint8  # T % 8 != 0
    assert K._mask_rows(torch.zeros(3, 24, dtype=torch.bool)[:, 1:17]).dtype == torch.uint8  # misaligned rows
    assert K._mask_rows(m.float()).dtype == torch.float32
    as_u16 = m.to(torch.uint16) * 256
    packed = K._mask_rows(as_u16)  # turned into bytes first (then packed again, as bool would be)
    assert packed.dtype == torch.uint16 and torch.equal(packed.view(torch.uint8).bool(), m)
    r, v = _randn((3, 16), rng), _randn((3, 16), rng)
    got = run_kernel(K.gae_launch, *_to(kernel_device, r, v, as_u16), gamma=0.9, lam=0.9)
    _check_all(got, gt_gae(r.double(), v.double(), m, gamma=0.9, lam=0.9), SCAN, ["advantages", "returns"])


@pytest.mark.parametrize("B,T,programs,warps", [(512, 4096, 512, 16), (2048, 1024, 1024, 8), (8, 262144, 1024, 8),
                                                (8, 32768, 1024, 1), (8192, 128, 1024, 4), (1, 1 << 20, 1024, 4)])
def test_grid_fills_an_h100(B, T, programs, warps):
    """Every issue shape (and the CI sweep's) fills an H100's 132 SMs, counted as the launch counts
    programs (row tiles x chunks; 8 x 32768 used to get 128): >= 4 CTAs per SM of <= 8 warps, or
    one 16-warp program per row (512 x 4096: one chunk per row, so one launch without whitening)."""
    chunk, rows = K.pick_blocks(B, T)
    got = triton_cdiv(B, rows) * triton_cdiv(T, chunk)
    assert got == programs and K._num_warps(rows, chunk) == warps == rows * chunk // 256
    assert got >= 4 * 132 or (warps == 16 and got >= 2 * 132)
    assert triton_cdiv(T, chunk) <= K._MAX_CHUNKS


def test_one_chunk_rows(rng, run_kernel, kernel_device):
    """The 16-warp one-chunk-per-row tile of 512 x 4096 (forced here on two rows): every carry is
    in the tile, with left and right padding and a gap."""
    B, T = 2, 4096
    assert K.pick_blocks(512, T) == (4096, 1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3001:] = False
    mask[1, :517] = False
    mask[1, 2040:2100] = False
    _gae_case(rng, run_kernel, kernel_device, B, T, gamma=0.99, lam=0.95, whiten=False, mask=mask, chunk=T, rows=1)
    _advantages_case(rng, run_kernel, kernel_device, B, T, mask=mask, kl_coef=0.05, whiten=False, chunk=T, rows=1)


def test_pick_blocks_small_and_forced():
    assert K.pick_blocks(7, 11) == (16, 8)  # one program: too small to split
    assert K.pick_blocks(5, 18, chunk=4, rows=2) == (8, 2)  # chunks are whole segments
    assert K.pick_blocks(3, 100, chunk=16) == (16, 4)
    assert K._num_warps(1, 8) == 1 and K._num_warps(1, 8192) == 32
    with pytest.raises(ValueError, match="too long"):
        K.pick_blocks(1, 2048 * 8192 + 1)


# --------------------------------------------------------------------------------------------
# masked_whiten
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(rng, run_kernel, kernel_device, dtype, shift_mean):
    x = _randn((6, 13), rng, dtype, scale=3.0, shift=2.0)
    mask = random_mask(6, 13, rng)
    got = run_kernel(fastppo.masked_whiten, *_to(kernel_device, x, mask), shift_mean=shift_mean)
    want = gt_whiten(x.double(), mask, shift_mean=shift_mean)
    _check_all([got], [want], SCAN, ["whitened"])


@pytest.mark.parametrize("n_valid", [0, 1, 2])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_few_valid(rng, run_kernel, kernel_device, n_valid, shift_mean):
    """Fewer than two valid positions: x - mean unscaled (0 everywhere with none), never NaN.
    Two valid values whiten to +-1/sqrt(2) whatever they are, but float32 loses the answer as they
    approach each other (a - mean has relative error 2^-24 |a| / |a - b|): keep them 0.4 apart."""
    x = _randn((3, 7), rng)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask.view(-1)[torch.randperm(21, generator=rng)[:n_valid]] = True
    if n_valid == 2:
        a, b = x[mask].tolist()
        if abs(a - b) < 0.4:
            x[mask] = torch.tensor([a, a + (0.4 if b >= a else -0.4)])
    got = run_kernel(fastppo.masked_whiten, *_to(kernel_device, x, mask.int()), shift_mean=shift_mean)
    want = gt_whiten(x.double(), mask, shift_mean=shift_mean)
    _check_all([got], [want], SCAN, ["whitened"])
    assert bool(torch.isfinite(got.cpu()).all())


@pytest.mark.parametrize("shape", [(17,), (2, 3, 5), (1, 1)])
def test_masked_whiten_shapes_and_chunks(rng, run_kernel, kernel_device, shape):
    x = _randn(shape, rng, scale=2.0)
    mask = torch.rand(shape, generator=rng) < 0.7
    got = run_kernel(K.masked_whiten_launch, *_to(kernel_device, x, mask), eps=1e-6, chunk=4, rows=2)
    want = gt_whiten(x.double(), mask, eps=1e-6)
    _check_all([got], [want], SCAN, ["whitened"])


def test_masked_whiten_large_offset_is_stable(rng, run_kernel, kernel_device):
    """A mean of 1e3 and a spread of 1: centred per-chunk moments keep float32 accurate."""
    x = _randn((4, 24), rng, shift=1000.0)
    mask = _chunked_mask(4, 24, rng)
    got = run_kernel(K.masked_whiten_launch, *_to(kernel_device, x, mask), chunk=4)
    want = gt_whiten(x.double(), mask)
    # The inputs' own float32 rounding (6e-5 at 1e3) bounds what any float32 kernel can reach.
    _check_all([got], [want], (3e-4, 3e-4), ["whitened"])


# --------------------------------------------------------------------------------------------
# compute_advantages
# --------------------------------------------------------------------------------------------


def _advantages_case(rng, run_kernel, kernel_device, B, T, *, dtype=torch.float32, mask=None, **kwargs):
    lp, ref, v = _randn((B, T), rng, dtype, shift=-1.0), _randn((B, T), rng, dtype, shift=-1.0), _randn((B, T), rng, dtype)
    scores = _randn((B,), rng, dtype, scale=2.0)
    if mask is None:
        mask = random_mask(B, T, rng)
    launch = {k: kwargs.pop(k) for k in ("chunk", "rows") if k in kwargs}
    fn = K.advantages_launch if launch else fastppo.compute_advantages
    got = run_kernel(fn, *_to(kernel_device, scores, lp, ref, v, mask), **kwargs, **launch)
    want = gt_advantages(scores.double(), lp.double(), ref.double(), v.double(), mask, **kwargs)
    _check_all(got, want, SCAN, ["advantages", "returns", "rewards", "kl"])
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_compute_advantages(rng, run_kernel, kernel_device, dtype, estimator):
    _advantages_case(rng, run_kernel, kernel_device, 7, 9, dtype=dtype, kl_coef=0.1, estimator=estimator)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (1.0, 0.0)])
def test_compute_advantages_many_chunks(rng, run_kernel, kernel_device, whiten, gamma, lam):
    B, T = 5, 18
    mask = _chunked_mask(B, T, rng)
    mask[2] = False
    mask[2, :2] = True  # score carried through four empty chunks
    _advantages_case(rng, run_kernel, kernel_device, B, T, mask=mask, kl_coef=0.05, estimator="k3",
                     gamma=gamma, lam=lam, whiten=whiten, chunk=4, rows=2)


def test_compute_advantages_tiny(rng, run_kernel, kernel_device):
    _advantages_case(rng, run_kernel, kernel_device, 3, 1, mask=torch.tensor([[True], [False], [True]]), kl_coef=0.1)
    got = _advantages_case(rng, run_kernel, kernel_device, 2, 3, mask=torch.zeros(2, 3, dtype=torch.bool), kl_coef=0.1)
    assert all(bool((g.cpu() == 0).all()) for g in got)
    got = run_kernel(fastppo.compute_advantages, *[torch.zeros(s, device=kernel_device) for s in ((2,), (2, 0), (2, 0), (2, 0))],
                     torch.zeros(2, 0, dtype=torch.bool, device=kernel_device), kl_coef=0.1)
    assert [tuple(g.shape) for g in got] == [(2, 0)] * 4


def test_compute_advantages_one_valid_token_whitened(rng, run_kernel, kernel_device):
    """One valid position in the whole batch: whitening subtracts the mean only (A = 0 there)."""
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 4] = True
    got = _advantages_case(rng, run_kernel, kernel_device, 3, 6, mask=mask, kl_coef=0.1, whiten=True, chunk=2)
    assert bool((got[0].cpu() == 0).all())


def test_no_host_sync_in_kernel_path(rng, run_kernel, kernel_device, monkeypatch):
    """No .item(), .tolist(), nonzero() or tensor truth value on the way to the kernels."""
    B, T = 3, 10
    args = _to(kernel_device, _randn((B,), rng), _randn((B, T), rng), _randn((B, T), rng), _randn((B, T), rng),
               random_mask(B, T, rng))

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation in the kernel path")

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "nonzero", "__bool__", "cpu", "numpy"):
            mp.setattr(torch.Tensor, name, forbidden)
        mp.setattr(torch, "nonzero", forbidden)
        run_kernel(fastppo.compute_advantages, *args, kl_coef=0.1, whiten=True)
        run_kernel(fastppo.masked_whiten, args[1], args[4])
        run_kernel(fastppo.shape_rewards, *args[:3], args[4], kl_coef=0.1)


@pytest.mark.gpu
def test_compute_advantages_never_syncs_on_gpu(rng):
    """Native GPU run: any host synchronisation raises under sync debug mode "error"."""
    B, T = 64, 1500
    lp, ref, v = (torch.randn(B, T, generator=rng) for _ in range(3))
    scores = torch.randn(B, generator=rng)
    mask = random_mask(B, T, rng)
    dev = [t.cuda() for t in (scores, lp, ref, v, mask)]
    fastppo.compute_advantages(*dev, kl_coef=0.05)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with fastppo.use_backend("triton"):
            got = fastppo.compute_advantages(*dev, kl_coef=0.05)
            got_gae = fastppo.gae(*dev[3:4], dev[3], dev[4], whiten=True)
            got_w = fastppo.masked_whiten(dev[1], dev[4])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = gt_advantages(scores.double(), lp.double(), ref.double(), v.double(), mask, kl_coef=0.05)
    _check_all(got, want, SCAN, ["advantages", "returns", "rewards", "kl"])
    _check_all(got_gae, gt_gae(v.double(), v.double(), mask, whiten=True), SCAN, ["advantages", "returns"])
    _check_all([got_w], [gt_whiten(lp.double(), mask)], SCAN, ["whitened"])


class _DiesAfterTickets:
    """Stands in for a ``@triton.jit`` kernel: launches it, then writes 1000 into every
    1-element int32 argument (a ticket counter), as a launch that died after some programs took
    their tickets would leave it."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            for a in args:
                if isinstance(a, torch.Tensor) and a.dtype == torch.int32 and a.numel() == 1:
                    a.fill_(1000)

        return launch


def test_a_dead_launch_cannot_skip_a_later_finisher(rng, run_kernel, kernel_device, monkeypatch):
    """The whitening statistics come from the summary launch's last-ticket finisher: a counter
    left non-zero by an earlier launch (one that died midway, a CUDA graph replay) must not
    change a later result. Each launch now gets its own zeroed counter."""
    monkeypatch.setattr(K, "_summary_kernel", _DiesAfterTickets(K._summary_kernel))
    for _ in range(2):
        _advantages_case(rng, run_kernel, kernel_device, 5, 18, kl_coef=0.05, whiten=True, chunk=4, rows=2)
