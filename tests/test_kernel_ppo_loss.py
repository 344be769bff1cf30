"""Triton kernels of the PPO losses (``fastppo.kernels.ppo_loss``) against the float64 reference.

The kernel gets inputs in fp32 / bf16 / fp16; the reference gets the very same (already rounded)
values upcast to float64, and gradients are compared with autograd of that float64 reference.

Tolerances (atol, rtol):
* loss and statistics: float32 whatever the input dtype, so FWD_TOL = (2e-5, 2e-5) for every
  input dtype (float32 rounding grown by the reductions);
* gradients: stored in the input's dtype, so ``TOL[dtype]`` of fastppo.testing
  (fp32 2e-5, bf16 2e-2, fp16 5e-3).

Random inputs are nudged away from the few measure-zero places where float32 and float64 may
legitimately disagree about a comparison (a ratio within 1e-4 of a clip bound, a value step
within 1e-4 of the value clip, ...): there the reference's gradient itself jumps.
Kernels run natively on a GPU when there is one, else in Triton's interpreter (small shapes).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import reference
from fastppo.kernels import ppo_loss as K
from helpers import TOL, assert_close, random_mask

AGGS = list(K.AGG_CODES)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FWD_TOL = (2e-5, 2e-5)
TINY = dict(block_r=2, block_t=4, block_p=2, block_rb=2)  # many programs, rows split across them


def _d(x):
    return None if x is None else x.detach().double()


def _near(x: torch.Tensor, points, eps=1e-4) -> torch.Tensor:
    near = torch.zeros_like(x, dtype=torch.bool)
    for p in points:
        near |= (x - p).abs() < eps
    return near


def _policy_inputs(B, T, gen, dtype, device, *, clip_low=0.2, clip_high=0.2, dual_clip=None, spread=0.5):
    old = (torch.randn(B, T, generator=gen) - 2.0).to(dtype)
    lp = (old.double() + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)).to(dtype)
    bounds = [math.log(1 - clip_low), math.log(1 + clip_high)] + ([math.log(dual_clip)] if dual_clip else [])
    for _ in range(10):  # bf16 rounding can land the nudged value near a bound again
        near = _near(lp.double() - old.double(), bounds)
        if not near.any():
            break
        lp = torch.where(near, lp.double() + 0.05, lp.double()).to(dtype)
    adv = torch.randn(B, T, generator=gen).to(dtype)
    return lp.to(device), old.to(device), adv.to(device)


def _value_inputs(B, T, gen, dtype, device, *, clip=0.2):
    old = torch.randn(B, T, generator=gen).to(dtype)
    v = (old.double() + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).to(dtype)
    ret = torch.randn(B, T, generator=gen).to(dtype)
    if clip is not None:
        for _ in range(10):
            step = v.double() - old.double()
            near = _near(step, [-clip, clip])
            vc = old.double() + step.clamp(-clip, clip)
            e, ec = (v.double() - ret.double()) ** 2, (vc - ret.double()) ** 2
            near |= (e - ec).abs() < 1e-4 * (e + ec + 1e-3)
            near &= (e - ec).abs() > 0  # an exact tie is fine: both sides split it equally
            if not near.any():
                break
            v = torch.where(near, v.double() + 0.05, v.double()).to(dtype)
    return v.to(device), old.to(device), ret.to(device)


def _check(run_kernel, kernel_fn, ref_fn, args, kwargs, grad_idx, gen, *, ref_args=None, ref_kwargs=None):
    """Run the kernel (forward + backward, outputs poisoned) and the float64 reference; compare.

    grad_idx: positions in ``args`` or names in ``kwargs`` of the differentiable inputs.
    Returns the kernel's (loss, stats) for extra checks.
    """
    args = list(args)
    ref_args = [_d(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in (ref_args or args)]
    ref_kwargs = {k: _d(v) if isinstance(v, torch.Tensor) else v for k, v in (ref_kwargs or kwargs).items()}

    def leaves(a, kw):
        return [a[i] if isinstance(i, int) else kw[i] for i in grad_idx]

    for x in leaves(args, kwargs):
        x.requires_grad_(True)
    for x in leaves(ref_args, ref_kwargs):
        x.requires_grad_(True)
    upstream = float(torch.randn((), generator=gen)) + 1.5  # not 1: the kernel must read it

    def run():
        out = kernel_fn(*args, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(loss, leaves(args, kwargs), torch.tensor(upstream, device=loss.device))
        return out, grads

    out, grads = run_kernel(run)
    want = ref_fn(*ref_args, **ref_kwargs)
    want_grads = torch.autograd.grad(
        want[0] if isinstance(want, tuple) else want, leaves(ref_args, ref_kwargs), torch.tensor(upstream, dtype=torch.float64)
    )
    got_loss, got_stats = (out if isinstance(out, tuple) else (out, {}))
    want_loss, want_stats = (want if isinstance(want, tuple) else (want, {}))
    assert got_loss.dtype == torch.float32 and got_loss.dim() == 0
    assert_close(got_loss, want_loss, FWD_TOL, "loss")
    assert set(got_stats) == set(want_stats)
    for name in want_stats:
        s = got_stats[name]
        assert s.dtype == torch.float32 and s.dim() == 0 and not s.requires_grad, name
        assert_close(s, want_stats[name], FWD_TOL, f"stats[{name}]")
    for i, (leaf, g, w) in enumerate(zip(leaves(args, kwargs), grads, want_grads)):
        assert g.dtype == leaf.dtype, f"grad {grad_idx[i]} dtype {g.dtype} != {leaf.dtype}"
        assert_close(g, w, TOL[leaf.dtype], f"d loss / d {grad_idx[i]}")
    return out


def _shape(gen):
    shapes = [(1, 1), (5, 1), (1, 37), (6, 37), (9, 20), (3, 64)]
    return shapes[int(torch.randint(len(shapes), (1,), generator=gen))]


# --------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------


LOG_RATIOS = [math.log(0.5), math.log(0.9), 0.0, math.log(1.1), math.log(1.25), math.log(1.6), 20.0, 25.0, -25.0, -20.0]


def _hand_policy_grad(a, lr, lo, hi):
    """d/d lp of max(-A r, -A clamp(r, lo, hi)) for one token, worked out by hand."""
    if lr > 20 or lr < -20:
        return 0.0  # the log-ratio clamp blocks it
    r = math.exp(lr)
    if lo <= r <= hi:
        return -a * r  # both terms are equal; the halves add up to the unclipped gradient
    unclipped_wins = (a > 0 and r < lo) or (a < 0 and r > hi)
    return -a * r if unclipped_wins else 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_clip_quadrants(run_kernel, kernel_device, dtype, rng):
    """A > 0 and A < 0 against ratios below, inside, above the asymmetric range, and at +-20."""
    lo, hi = 0.8, 1.28
    # fp16 cannot hold a gradient of e^20: the +-20 clamp edges are checked in fp32 and bf16.
    lrs = LOG_RATIOS[:6] if dtype == torch.float16 else LOG_RATIOS
    adv = torch.tensor([[1.5] * len(lrs), [-0.75] * len(lrs)])
    lp = torch.tensor([lrs, lrs]).to(dtype)
    old = torch.zeros_like(lp)
    mask = torch.ones(2, len(lrs), dtype=torch.bool)
    args = [lp.to(kernel_device), old.to(kernel_device), adv.to(dtype).to(kernel_device), mask.to(kernel_device)]
    kwargs = dict(clip_low=0.2, clip_high=0.28, agg="token-sum")
    _, stats = _check(run_kernel, K.policy_loss, reference.policy_loss.raw, args, kwargs, [0], rng)

    # And the hand-worked table: which side of each max() takes the gradient.
    lpk = args[0].detach().clone().requires_grad_(True)
    loss, _ = run_kernel(K.policy_loss, lpk, *args[1:], **kwargs)
    (g,) = torch.autograd.grad(loss, lpk)
    lr = (lpk.detach().double() - args[1].double()).cpu()
    a = args[2].double().cpu()
    want = torch.tensor([[_hand_policy_grad(a[i, j].item(), lr[i, j].item(), lo, hi) for j in range(lr.shape[1])] for i in range(2)])
    assert_close(g.cpu(), want, TOL[dtype], "hand-worked gradient")
    # clipped strictly larger: A > 0 above the range (1.6, e^20, e^25), A < 0 below (0.5, e^-25, e^-20)
    r = lr.exp()
    n_clipped = int((r[0] > hi).sum() + (r[1] < lo).sum())
    assert n_clipped == (2 if dtype == torch.float16 else 6)
    assert_close(stats["clipfrac"], torch.tensor(n_clipped / r.numel()), FWD_TOL, "clipfrac")


def test_policy_dual_clip_quadrants(run_kernel, kernel_device, rng):
    """A < 0 with ratio below and above the dual-clip bound c = 3; A > 0 is never dual-clipped."""
    lr = torch.tensor([[math.log(2.0), math.log(5.0), 0.0, math.log(0.5)]] * 2)
    adv = torch.tensor([[-1.0] * 4, [1.0] * 4])
    mask = torch.ones(2, 4, dtype=torch.bool)
    args = [lr.to(kernel_device), torch.zeros(2, 4, device=kernel_device), adv.to(kernel_device), mask.to(kernel_device)]
    kwargs = dict(dual_clip=3.0, agg="token-sum")
    _, stats = _check(run_kernel, K.policy_loss, reference.policy_loss.raw, args, kwargs, [0], rng)
    assert_close(stats["clipfrac_lower"], torch.tensor(1 / 8), FWD_TOL, "clipfrac_lower")  # A = -1, ratio 5


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "asym-dual-weights"])
def test_policy_loss_random(run_kernel, kernel_device, rng, agg, dtype, variant):
    B, T = _shape(rng)
    if variant == "plain":
        opts, tiles = dict(clip_low=0.2), {}
    else:
        opts, tiles = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0), TINY
    lp, old, adv = _policy_inputs(B, T, rng, dtype, kernel_device, clip_high=opts.get("clip_high", 0.2), dual_clip=opts.get("dual_clip"))
    kwargs = dict(opts, agg=agg)
    if variant != "plain":
        kwargs["is_weights"] = (torch.rand(B, T, generator=rng) * 2).to(dtype).to(kernel_device)
    mask = random_mask(B, T, rng).to(kernel_device)
    with K.block_sizes(**tiles):
        _check(run_kernel, K.policy_loss, reference.policy_loss.raw, [lp, old, adv, mask], kwargs, [0], rng)


# --------------------------------------------------------------------------------------------
# Value loss and aggregate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_loss_random(run_kernel, kernel_device, rng, agg, clip, dtype):
    B, T = _shape(rng)
    v, old, ret = _value_inputs(B, T, rng, dtype, kernel_device, clip=clip)
    mask = random_mask(B, T, rng).to(kernel_device)
    with K.block_sizes(**(TINY if clip is None else {})):
        _check(run_kernel, K.value_loss, reference.value_loss.raw, [v, old, ret, mask], dict(clip=clip, agg=agg), [0], rng)


def test_value_loss_fp16_and_clip_regions(run_kernel, kernel_device, rng):
    """Steps inside, below and above the value clip, returns on either side, fp16 inputs."""
    old = torch.zeros(3, 4)
    v = torch.tensor([[0.1, -0.1, 0.5, -0.5]] * 3)
    ret = torch.tensor([[1.0] * 4, [-1.0] * 4, [0.3, -0.3, 0.1, -0.1]])
    args = [t.to(torch.float16).to(kernel_device) for t in (v, old, ret)] + [torch.ones(3, 4, dtype=torch.bool, device=kernel_device)]
    _check(run_kernel, K.value_loss, reference.value_loss.raw, args, dict(clip=0.2, agg="token-sum"), [0], rng)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_random(run_kernel, kernel_device, rng, agg, dtype):
    B, T = _shape(rng)
    x = torch.randn(B, T, generator=rng).to(dtype).to(kernel_device)
    mask = random_mask(B, T, rng).to(kernel_device)
    with K.block_sizes(**(TINY if dtype == torch.float32 else {})):
        _check(run_kernel, K.aggregate, reference.aggregate.raw, [x, mask, agg], {}, [0], rng)


# --------------------------------------------------------------------------------------------
# The whole objective
# --------------------------------------------------------------------------------------------


def _ppo_args(B, T, gen, dtype, device, *, entropy: bool, weights: bool):
    lp, old, adv = _policy_inputs(B, T, gen, dtype, device, clip_high=0.28, dual_clip=3.0)
    v, oldv, ret = _value_inputs(B, T, gen, dtype, device, clip=0.2)
    mask = random_mask(B, T, gen).to(device)
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, value_clip=0.2, vf_coef=0.7, ent_coef=0.01)
    if entropy:
        kwargs["entropy"] = (torch.rand(B, T, generator=gen) * 3).to(dtype).to(device)
    if weights:
        kwargs["is_weights"] = torch.rand(B, T, generator=gen).to(dtype).to(device)
    return [lp, old, adv, v, oldv, ret, mask], kwargs


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("entropy", [True, False])
def test_ppo_loss_random(run_kernel, kernel_device, rng, agg, entropy):
    dtype = [torch.float32, torch.bfloat16, torch.float16][AGGS.index(agg) % 3]
    B, T = _shape(rng)
    args, kwargs = _ppo_args(B, T, rng, dtype, kernel_device, entropy=entropy, weights=entropy)
    kwargs["agg"] = agg
    grads = [0, 3] + (["entropy"] if entropy else [])
    with K.block_sizes(**(TINY if entropy else {})):
        _check(run_kernel, K.ppo_loss, reference.ppo_loss.raw, args, kwargs, grads, rng)


def test_ppo_loss_value_clip_off_and_zero_ent_coef(run_kernel, kernel_device, rng):
    args, kwargs = _ppo_args(6, 37, rng, torch.float32, kernel_device, entropy=True, weights=False)
    kwargs.update(value_clip=None, ent_coef=0.0, dual_clip=None, agg="seq-mean-token-mean")
    _check(run_kernel, K.ppo_loss, reference.ppo_loss.raw, args, kwargs, [0, 3, "entropy"], rng)


# --------------------------------------------------------------------------------------------
# Empty masks, garbage at masked positions, mask dtypes, fallbacks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
def test_all_empty_mask_gives_zero(run_kernel, kernel_device, rng, agg):
    args, kwargs = _ppo_args(4, 9, rng, torch.float32, kernel_device, entropy=True, weights=True)
    args[6] = torch.zeros(4, 9, dtype=torch.bool, device=kernel_device)
    for i in (0, 1, 2, 3, 4, 5):  # garbage everywhere: nothing is valid
        args[i] = torch.where(torch.rand(4, 9, generator=rng).to(kernel_device) < 0.5, float("nan"), float("inf")).to(args[i].dtype)
    kwargs["agg"] = agg
    lp, v, ent = args[0].requires_grad_(True), args[3].requires_grad_(True), kwargs["entropy"].requires_grad_(True)

    def run():
        loss, stats = K.ppo_loss(*args, **kwargs)
        return loss, stats, torch.autograd.grad(loss, [lp, v, ent])

    loss, stats, grads = run_kernel(run)
    assert loss.item() == 0.0
    assert all(s.item() == 0.0 for s in stats.values()), stats
    assert all(bool((g == 0).all()) for g in grads)


def test_empty_rows_with_split_tiles(run_kernel, kernel_device, rng):
    """Rows with no valid token must not count as rows in the seq-mean modes, whatever the tiling."""
    mask = random_mask(8, 13, rng, kinds=("empty", "right", "empty", "single")).to(kernel_device)
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        for tiles in ({}, TINY, dict(block_r=1, block_t=16)):
            args, kwargs = _ppo_args(8, 13, rng, torch.float32, kernel_device, entropy=True, weights=False)
            args[6] = mask
            with K.block_sizes(**tiles):
                _check(run_kernel, K.ppo_loss, reference.ppo_loss.raw, args, dict(kwargs, agg=agg), [0, 3, "entropy"], rng)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_garbage_at_masked_positions_does_not_leak(run_kernel, kernel_device, rng, agg):
    """inf / NaN where mask = 0: the kernel must give the reference's numbers on clean inputs."""
    B, T = 6, 23
    args, kwargs = _ppo_args(B, T, rng, torch.bfloat16, kernel_device, entropy=True, weights=True)
    mask = args[6]
    clean_args, clean_kwargs = list(args), dict(kwargs, agg=agg)
    dirty_args, dirty_kwargs = list(args), dict(kwargs, agg=agg)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    pick = torch.randint(0, 4, (B, T), generator=rng)
    for i in (0, 1, 2, 3, 4, 5):
        dirty_args[i] = torch.where(mask, args[i], garbage[pick].to(kernel_device).to(args[i].dtype))
    for name in ("entropy", "is_weights"):
        dirty_kwargs[name] = torch.where(mask, kwargs[name], garbage[pick].to(kernel_device).to(kwargs[name].dtype))
    out = _check(
        run_kernel, K.ppo_loss, reference.ppo_loss.raw, dirty_args, dirty_kwargs, [0, 3, "entropy"], rng,
        ref_args=clean_args, ref_kwargs=clean_kwargs,
    )
    assert torch.isfinite(out[0])


def test_numeric_masks_match_bool(run_kernel, kernel_device, rng):
    args, kwargs = _ppo_args(5, 17, rng, torch.float32, kernel_device, entropy=True, weights=False)
    want, want_stats = run_kernel(K.ppo_loss, *args, **kwargs)
    for dtype in (torch.float32, torch.int64, torch.uint8):
        args2 = list(args)
        args2[6] = args[6].to(dtype)
        got, got_stats = run_kernel(K.ppo_loss, *args2, **kwargs)
        assert_close(got, want, (0, 0), f"mask {dtype}")
        for k in want_stats:
            assert_close(got_stats[k], want_stats[k], (0, 0), f"mask {dtype} stats[{k}]")


def test_non_contiguous_inputs(run_kernel, kernel_device, rng):
    args, kwargs = _ppo_args(6, 12, rng, torch.float32, kernel_device, entropy=True, weights=True)
    strided = [a.t().contiguous().t() if a.dim() == 2 else a for a in args]  # same values, column-major
    want, _ = run_kernel(K.ppo_loss, *args, **kwargs)
    got, _ = run_kernel(K.ppo_loss, *strided, **kwargs)
    assert_close(got, want, (0, 0), "column-major inputs")


def test_float64_falls_back_to_reference(kernel_device, rng):
    lp, old, adv = _policy_inputs(4, 7, rng, torch.float64, kernel_device)
    mask = random_mask(4, 7, rng).to(kernel_device)
    got, _ = K.policy_loss(lp, old, adv, mask, agg="seq-mean-token-mean")
    want, _ = reference.policy_loss.raw(lp, old, adv, mask, agg="seq-mean-token-mean")
    assert got.dtype == torch.float64 and got.item() == want.item()


def test_public_dispatch_reaches_the_kernel(run_kernel, kernel_device, rng):
    """fastppo.ppo_loss on the triton backend gives exactly the kernel module's numbers."""
    args, kwargs = _ppo_args(5, 11, rng, torch.float32, kernel_device, entropy=True, weights=True)
    want, _ = run_kernel(K.ppo_loss, *args, **kwargs)
    got, _ = run_kernel(fastppo.ppo_loss, *args, **kwargs)
    assert_close(got, want, (0, 0), "fastppo.ppo_loss")



@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["clipped", "dual-clipped"])
@pytest.mark.parametrize("tiles", [dict(block_r=1, block_t=2048), dict(block_r=2048, block_t=1)], ids=["row", "column"])
def test_packed_counts_at_the_largest_tile(run_kernel, kernel_device, tiles, sign):
    """The forward sums its integer counts in pairs in one float each (valid + 4096 clipped,
    dual-clipped + 4096 value-clipped): at the largest tile the launcher allows (2048 tokens)
    with every count at its maximum, each must come back exact (an error is >= 1/2047).

    Hand-worked per token (lp - old = 1, ratio e; clip 0.2; dual clip 1.5; v = 1, old v = 0,
    R = 2, value clip 0.2): A = +1: unclipped -e < clipped -1.2, so clipped, term -1.2. A = -1:
    max(e, 1.2) = e > 1.5, so dual-clipped, term 1.5. Value: clamp(1, -0.2, 0.2) = 0.2,
    (0.2 - 2)^2 = 3.24 > (1 - 2)^2 = 1, so value-clipped, term 0.5 * 3.24 = 1.62.
    """
    B, T = (1, 2048) if tiles["block_r"] == 1 else (2048, 1)
    f = dict(dtype=torch.float32, device=kernel_device)
    lp, old, adv = torch.ones(B, T, **f), torch.zeros(B, T, **f), torch.full((B, T), sign, **f)
    v, oldv, ret = torch.ones(B, T, **f), torch.zeros(B, T, **f), torch.full((B, T), 2.0, **f)
    mask = torch.ones(B, T, dtype=torch.bool, device=kernel_device)
    mask.view(-1)[0] = False  # 2047 valid tokens: odd low fields
    n = 2047
    term_p = -1.2 if sign > 0 else 1.5
    with K.block_sizes(**tiles):
        for agg in ("token-sum", "seq-mean-token-sum"):
            loss, stats = run_kernel(K.ppo_loss, lp, old, adv, v, oldv, ret, mask, clip_low=0.2, dual_clip=1.5,
                                     value_clip=0.2, vf_coef=1.0, agg=agg)
            assert stats["clipfrac"].item() == pytest.approx(1.0 if sign > 0 else 0.0, abs=1e-6)
            assert stats["clipfrac_lower"].item() == pytest.approx(0.0 if sign > 0 else 1.0, abs=1e-6)
            assert stats["value_clipfrac"].item() == pytest.approx(1.0, abs=1e-6)
            assert stats["approx_kl"].item() == pytest.approx(-1.0, abs=1e-6)
            rows = 1 if B == 1 else n  # seq-mean: over rows with a valid token
            scale = 1.0 if agg == "token-sum" else 1.0 / rows
            # 1e-4: the interpreter sums a joined tensor along a strided axis one float32 add at a
            # time (2047 terms, ~3e-5 relative seen); a GPU reduces it as a tree.
            assert stats["policy_loss"].item() == pytest.approx(term_p * n * scale, rel=1e-4)
            assert stats["value_loss"].item() == pytest.approx(1.62 * n * scale, rel=1e-4)
            assert loss.item() == pytest.approx((stats["policy_loss"] + stats["value_loss"]).item(), rel=1e-6)


def test_a_dead_launch_cannot_skip_a_later_finisher(run_kernel, kernel_device, rng, monkeypatch):
    """The loss and statistics come from the last-ticket finisher: a ticket counter left
    non-zero by an earlier launch (one that died midway, a CUDA graph replay) must not change
    a later result. Each launch now gets its own zeroed counter (on CUDA it used to be cached per
    stream; the CPU path already allocated one per launch)."""
    from test_kernel_advantage import _DiesAfterTickets
    from test_trust_ppo_loss import FULL, _compare, _inputs

    monkeypatch.setattr(K, "_ppo_fwd_kernel", _DiesAfterTickets(K._ppo_fwd_kernel))
    with K.block_sizes(**TINY):
        for _ in range(2):
            t = _inputs(3, 9, rng, torch.float32, kernel_device)
            mask = random_mask(3, 9, rng).to(kernel_device)
            _compare(run_kernel, t, mask, agg="seq-mean-token-mean", **FULL)
