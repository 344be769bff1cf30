"""Issue 9 (TRUST_SPEC.md) for the advantage kernels: kl_penalty backward, no-grad outputs, NaN in
NaN out at valid positions, nothing out of masked ones, masks meaning ``mask != 0``, empty
shapes, whitening at |x| ~ 1e30, extreme magnitudes, and the sm_90 PTX of every kernel.

The expected values come from the float64 ground truth written below, straight from the formulas
of DESIGN.md (never from ``fastppo.reference`` nor from another backend), evaluated on the very
same (already rounded) inputs upcast to float64. ``check`` is NaN-aware: NaN is expected exactly
where the ground truth is NaN, inf exactly where its float32 rounding is inf, and the rest must
be within tolerance. Shapes stay small (Triton's interpreter on 2 shared cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastppo.kernels import advantage as K
from fastppo.testing import random_mask

NAN, INF = float("nan"), float("inf")
ESTIMATORS = ("k1", "abs", "k2", "k3")
ELEMENTWISE = (2e-5, 2e-5)
SCAN = (1e-4, 1e-4)
BF16_GRAD = (1e-6, 8e-3)  # gradients are stored in the input dtype: one bf16 rounding


# --------------------------------------------------------------------------------------------
# float64 ground truth, from the formulas
# --------------------------------------------------------------------------------------------


def valid_of(mask: torch.Tensor) -> torch.Tensor:
    return mask != 0  # NaN != 0 is True: a NaN mask entry is valid


def gt_kl(lp, ref, estimator="k1", clamp=None):
    """Differentiable float64 KL estimate (the inputs are upcast; gradients flow to them)."""
    d = lp.double() - ref.double()
    if estimator == "k1":
        kl = d
    elif estimator == "abs":
        kl = d.abs()
    elif estimator == "k2":
        kl = 0.5 * d * d
    else:
        r = -d
        kl = torch.exp(r) - r - 1.0
    if clamp is not None:
        kl = torch.clamp(kl, -clamp, clamp)
    return kl


def gt_shape_rewards(scores, lp, ref, mask, *, kl_coef, estimator="k1"):
    valid = valid_of(mask)
    kl = torch.where(valid, gt_kl(lp, ref, estimator).detach(), 0.0)
    rewards = -kl_coef * kl
    for b in range(valid.shape[0]):
        idx = valid[b].nonzero()
        if len(idx):
            rewards[b, int(idx[-1])] += float(scores[b])
    return rewards, kl


def gt_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    x = x.double()
    valid = valid_of(mask)
    n = int(valid.sum())
    if n == 0:
        return torch.zeros_like(x)
    mean = torch.where(valid, x, 0.0).sum() / n
    out = x - mean
    if n >= 2:
        var = torch.where(valid, (x - mean) ** 2, 0.0).sum() / (n - 1)
        out = out / torch.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0)


def gt_gae(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=False):
    r, v = rewards.double(), values.double()
    valid = valid_of(mask)
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(T)):
            if not valid[b, t]:
                continue
            a = float(r[b, t]) + gamma * next_v - float(v[b, t]) + gamma * lam * next_a
            adv[b, t] = a
            next_v, next_a = float(v[b, t]), a
    ret = torch.where(valid, adv + v, 0.0)
    if whiten:
        adv = gt_whiten(adv, valid)
    return adv, ret


def gt_advantages(scores, lp, ref, values, mask, *, kl_coef, estimator="k1", gamma=1.0, lam=0.95, whiten=True):
    rewards, kl = gt_shape_rewards(scores, lp, ref, mask, kl_coef=kl_coef, estimator=estimator)
    adv, ret = gt_gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    return adv, ret, rewards, kl


def check(actual, expected, tol, what=""):
    """NaN exactly where expected; inf where expected rounds to inf in float32; else within tol."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN at {nan_a.nonzero().tolist()[:8]}, expected NaN at {nan_e.nonzero().tolist()[:8]}"
    )
    e32 = e.float().double()
    inf = torch.isinf(e32) & ~nan_e
    assert torch.equal(a[inf], e32[inf]), f"{what}: got {a[inf].tolist()[:8]}, expected {e32[inf].tolist()[:8]}"
    fin = ~nan_e & ~inf
    atol, rtol = tol
    err = (a[fin] - e[fin]).abs()
    bad = ~(err <= atol + rtol * e[fin].abs())
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {fin.sum()} off (max abs err {float(err.max()):.3e}); "
            f"got {float(a[fin][i])!r}, expected {float(e[fin][i])!r}"
        )


def check_all(got, want, tol, names):
    assert len(got) == len(want)
    for g, w, name in zip(got, want, names):
        assert g.dtype == torch.float32, f"{name}: dtype {g.dtype}"
        check(g, w, tol, name)


def _randn(shape, gen, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


# --------------------------------------------------------------------------------------------
# 1. kl_penalty backward
# --------------------------------------------------------------------------------------------


def _kl_grads(run_kernel, device, lp, ref, estimator, clamp, g):
    lp_k = lp.detach().clone().to(device).requires_grad_(True)
    ref_k = ref.detach().clone().to(device).requires_grad_(True)
    out = run_kernel(K.kl_penalty, lp_k, ref_k, estimator, clamp=clamp)
    assert out.requires_grad and out.dtype == torch.float32
    out.backward(g.to(device))
    lp64 = lp.detach().double().requires_grad_(True)
    ref64 = ref.detach().double().requires_grad_(True)
    want = gt_kl(lp64, ref64, estimator, clamp)
    want.backward(g.double())
    assert lp_k.grad.dtype == lp.dtype and ref_k.grad.dtype == ref.dtype
    return out, want, (lp_k.grad, ref_k.grad), (lp64.grad, ref64.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_backward(rng, run_kernel, kernel_device, estimator, clamp, dtype):
    lp = _randn((3, 37), rng, dtype, scale=1.5, shift=-1.0)
    ref = _randn((3, 37), rng, dtype, scale=1.5, shift=-1.0)
    lp[0, :3] = ref[0, :3]  # d = 0: abs has gradient 0 there, as torch.abs
    g = _randn((3, 37), rng)
    out, want, got_g, want_g = _kl_grads(run_kernel, kernel_device, lp, ref, estimator, clamp, g)
    check(out, want, ELEMENTWISE, "kl")
    tol = ELEMENTWISE if dtype == torch.float32 else BF16_GRAD
    check(got_g[0], want_g[0], tol, "d/dlogprobs")
    check(got_g[1], want_g[1], tol, "d/dref_logprobs")
    if clamp is not None:
        outside = gt_kl(lp, ref, estimator).abs() > clamp
        assert bool(outside.any()) and bool((got_g[0].cpu()[outside] == 0).all())


@pytest.mark.parametrize("clamp", [None, 1.0])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_backward_nan_inf_and_one_input(rng, run_kernel, kernel_device, estimator, clamp):
    """NaN/inf inputs and gradients give what float64 autograd gives; grad for one input only."""
    lp = torch.tensor([[NAN, 0.5, -INF, INF, 1.0, -0.3, 2.0, 0.0]])
    ref = torch.tensor([[0.0, NAN, 0.0, 0.0, INF, -0.2, 2.0, -30.0]])
    g = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, NAN, 0.0, 1.0]])
    out, want, got_g, want_g = _kl_grads(run_kernel, kernel_device, lp, ref, estimator, clamp, g)
    check(out, want, ELEMENTWISE, "kl")
    check(got_g[0], want_g[0], ELEMENTWISE, "d/dlogprobs")
    check(got_g[1], want_g[1], ELEMENTWISE, "d/dref_logprobs")
    # Only ref_logprobs requires grad (a strided view): the launcher writes that gradient alone.
    base = _randn((4, 10), rng)
    lp2, ref2 = base[:, :9], base[:, 1:].clone().requires_grad_(True)
    ref2_k = ref2.detach().to(kernel_device).requires_grad_(True)
    run_kernel(K.kl_penalty, lp2.to(kernel_device), ref2_k, estimator, clamp=clamp).sum().backward()
    gt_kl(lp2, ref2, estimator, clamp).sum().backward()
    check(ref2_k.grad, ref2.grad, ELEMENTWISE, "d/dref_logprobs only")


def test_kl_penalty_clamp_nan_forward(run_kernel, kernel_device):
    """kl_penalty(NaN, x, clamp=1) is NaN, as torch.clamp(NaN) (never -1 or 1)."""
    lp = torch.tensor([NAN, 5.0, -5.0, 0.3, NAN])
    ref = torch.tensor([0.0, 0.0, 0.0, 0.0, NAN])
    for est in ESTIMATORS:
        got = run_kernel(K.kl_penalty, *_to(kernel_device, lp, ref), est, clamp=1.0)
        check(got, gt_kl(lp, ref, est, 1.0), ELEMENTWISE, f"kl {est} clamp")


def test_kl_penalty_backward_empty(run_kernel, kernel_device):
    lp = torch.zeros(3, 0, device=kernel_device, requires_grad=True)
    ref = torch.zeros(3, 0, device=kernel_device, requires_grad=True)
    out = run_kernel(K.kl_penalty, lp, ref, "k3", clamp=1.0)
    out.sum().backward()
    assert lp.grad.shape == (3, 0) and ref.grad.shape == (3, 0)


# --------------------------------------------------------------------------------------------
# 2. the advantage ops carry no gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_advantage_ops_return_no_grad(rng, run_kernel, kernel_device, dtype):
    B, T = 3, 6
    s, lp, ref, v, x = (_randn((B,) if i == 0 else (B, T), rng, dtype).to(kernel_device).requires_grad_(True)
                        for i in range(5))
    mask = random_mask(B, T, rng).to(kernel_device)
    outs = [
        *run_kernel(K.shape_rewards, s, lp, ref, mask, kl_coef=0.1),
        *run_kernel(K.gae, x, v, mask, whiten=True),
        run_kernel(K.masked_whiten, x, mask),
        *run_kernel(K.compute_advantages, s, lp, ref, v, mask, kl_coef=0.1),
    ]
    assert [o.requires_grad for o in outs] == [False] * len(outs)
    assert all(o.grad_fn is None for o in outs)


# --------------------------------------------------------------------------------------------
# 3. NaN at valid positions propagates; nothing leaks from masked ones
# --------------------------------------------------------------------------------------------


def _nan_mask(B, T):
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 7:] = False  # right padding
    mask[1, :4] = False  # left padding
    mask[2, 3:9] = False  # a gap across chunk borders
    mask[3] = False  # no valid position
    return mask


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("whiten", [False, True])
def test_gae_nan_at_valid_propagates(rng, run_kernel, kernel_device, whiten, chunk):
    B, T = 5, 14
    mask = _nan_mask(B, T)
    r, v = _randn((B, T), rng), _randn((B, T), rng)
    r[0, 4] = NAN  # row 0: NaN at and before position 4 (not after)
    v[2, 11] = NAN  # row 2: a NaN value after the gap reaches the positions before the gap
    r[4, 13] = NAN  # row 4: the whole row
    r[1, 2] = NAN  # masked: no effect
    v[3, 5] = INF
    launch = {} if chunk is None else {"chunk": chunk, "rows": 2}
    fn = K.gae_launch if launch else K.gae
    got = run_kernel(fn, *_to(kernel_device, r, v, mask), gamma=0.9, lam=0.8, whiten=whiten, **launch)
    want = gt_gae(r, v, mask, gamma=0.9, lam=0.8, whiten=whiten)
    check_all(got, want, SCAN, ["advantages", "returns"])
    if not whiten:
        assert bool(torch.isnan(got[0][0, :5].cpu()).all()) and bool(torch.isfinite(got[0][0, 5:].cpu()).all())
    for out in got:
        assert bool((out.cpu()[~mask] == 0).all())


@pytest.mark.parametrize("whiten", [False, True])
def test_compute_advantages_nan_at_valid_propagates(rng, run_kernel, kernel_device, whiten):
    B, T = 5, 14
    mask = _nan_mask(B, T)
    lp, ref, v = _randn((B, T), rng, shift=-1.0), _randn((B, T), rng, shift=-1.0), _randn((B, T), rng)
    scores = _randn((B,), rng)
    scores[1] = NAN  # a valid row: its every advantage
    scores[3] = NAN  # a row with no valid position: nothing
    lp[0, 2] = NAN  # at a valid position
    ref[2, 5] = NAN  # masked
    got = run_kernel(K.advantages_launch, *_to(kernel_device, scores, lp, ref, v, mask), kl_coef=0.1,
                     estimator="k3", gamma=1.0, lam=0.95, whiten=whiten, chunk=4, rows=2)
    want = gt_advantages(scores, lp, ref, v, mask, kl_coef=0.1, estimator="k3", gamma=1.0, lam=0.95, whiten=whiten)
    check_all(got, want, SCAN, ["advantages", "returns", "rewards", "kl"])
    got = run_kernel(K.shape_rewards_launch, *_to(kernel_device, scores, lp, ref, mask), kl_coef=0.1, estimator="k3", chunk=4)
    check_all(got, want[2:], ELEMENTWISE, ["rewards", "kl"])


@pytest.mark.parametrize("bad", [NAN, INF, -INF, 1e38])
def test_masked_garbage_never_leaks(rng, run_kernel, kernel_device, bad):
    """Whatever masked positions hold, outputs there are exactly 0 and the rest is unaffected."""
    B, T = 4, 13
    mask = _nan_mask(B, T)
    clean = [_randn((B, T), rng, shift=-1.0) for _ in range(4)]
    dirty = [torch.where(mask, c, bad) for c in clean]
    scores = _randn((B,), rng)
    scores_dirty = scores.clone()
    scores_dirty[3] = bad  # row 3 has no valid position
    lp, ref, v, x = dirty
    for chunk in (None, 4):
        launch = {} if chunk is None else {"chunk": chunk}
        got = run_kernel(K.advantages_launch, *_to(kernel_device, scores_dirty, lp, ref, v, mask), kl_coef=0.1, whiten=True, **launch)
        check_all(got, gt_advantages(scores, *clean[:3], mask, kl_coef=0.1), SCAN, ["advantages", "returns", "rewards", "kl"])
        got = run_kernel(K.gae_launch, *_to(kernel_device, x, v, mask), whiten=True, **launch)
        check_all(got, gt_gae(clean[3], clean[2], mask, whiten=True), SCAN, ["advantages", "returns"])
        got = run_kernel(K.masked_whiten_launch, *_to(kernel_device, x, mask), **launch)
        check(got, gt_whiten(clean[3], mask), SCAN, "whitened")
        assert bool((got.cpu()[~mask] == 0).all())
        got = run_kernel(K.shape_rewards_launch, *_to(kernel_device, scores_dirty, lp, ref, mask), kl_coef=0.1, **launch)
        check_all(got, gt_shape_rewards(scores, *clean[:2], mask, kl_coef=0.1), ELEMENTWISE, ["rewards", "kl"])


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_nan_at_valid(rng, run_kernel, kernel_device, shift_mean):
    x = _randn((3, 9), rng)
    mask = random_mask(3, 9, rng)
    mask[1, 4] = True
    x[1, 4] = NAN
    got = run_kernel(K.masked_whiten_launch, *_to(kernel_device, x, mask), shift_mean=shift_mean, chunk=4)
    check(got, gt_whiten(x, mask, shift_mean=shift_mean), SCAN, "whitened")
    # One valid position holding NaN: x - mean = NaN there, 0 elsewhere.
    one = torch.zeros(3, 9, dtype=torch.bool)
    one[2, 2] = True
    got = run_kernel(K.masked_whiten_launch, *_to(kernel_device, x.index_put((torch.tensor([2]), torch.tensor([2])), torch.tensor(NAN)), one))
    assert bool(torch.isnan(got[2, 2]).cpu()) and bool((got.cpu()[~one] == 0).all())


# --------------------------------------------------------------------------------------------
# 4. masked_whiten at |x| ~ 1e20 .. 1e30 and with fewer than two valid positions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e20, 1e25, 1e30])
@pytest.mark.parametrize("chunk", [None, 4])
def test_masked_whiten_huge_magnitudes(rng, run_kernel, kernel_device, scale, chunk):
    x = _randn((5, 11), rng, scale=scale, shift=0.5 * scale)
    mask = random_mask(5, 11, rng)
    mask[0, :3] = True
    launch = {} if chunk is None else {"chunk": chunk, "rows": 2}
    for shift_mean in (True, False):
        got = run_kernel(K.masked_whiten_launch, *_to(kernel_device, x, mask), shift_mean=shift_mean, **launch)
        want = gt_whiten(x, mask, shift_mean=shift_mean)
        check(got, want, (1e-4, 1e-4) if shift_mean else (0.0, 1e-4), f"whitened at {scale:g}")
        assert bool(torch.isfinite(got.cpu()).all())
    # Fewer than two valid positions: x - mean, unscaled: exactly 0 at the one valid position.
    for n_valid in (0, 1):
        m = torch.zeros(5, 11, dtype=torch.bool)
        m[3, 7] = n_valid == 1
        got = run_kernel(K.masked_whiten_launch, *_to(kernel_device, x, m), **launch)
        assert bool((got.cpu() == 0).all()), got
        got = run_kernel(K.masked_whiten_launch, *_to(kernel_device, x, m), shift_mean=False, **launch)
        check(got, gt_whiten(x, m, shift_mean=False), (0.0, 0.0), "x itself")


def test_gae_whiten_huge_rewards(rng, run_kernel, kernel_device):
    """GAE's whitening shares the scaled statistics: rewards of 1e20 whiten correctly."""
    B, T = 4, 10
    r, v = _randn((B, T), rng, scale=1e20), _randn((B, T), rng, scale=1e20)
    mask = random_mask(B, T, rng)
    got = run_kernel(K.gae_launch, *_to(kernel_device, r, v, mask), gamma=0.99, lam=0.95, whiten=True, chunk=4, rows=2)
    want = gt_gae(r, v, mask, gamma=0.99, lam=0.95, whiten=True)
    check(got[0], want[0], (1e-4, 1e-4), "advantages")
    check(got[1], want[1], (0.0, 1e-4), "returns")


# --------------------------------------------------------------------------------------------
# 5. a mask means mask != 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["float", "int"])
def test_mask_values_other_than_one(rng, run_kernel, kernel_device, kind):
    B, T = 3, 9
    pattern = torch.tensor([2.0, 0.5, -1.0, NAN, 0.0, 1.0, 3.0, 0.0, -0.25])
    if kind == "int":
        pattern = torch.tensor([2, -1, 7, 0, 0, 1, -3, 0, 5])
    mask = torch.stack([pattern, pattern.roll(2), pattern.roll(5)])
    lp, ref, v, x = (_randn((B, T), rng, shift=-1.0) for _ in range(4))
    scores = _randn((B,), rng)
    m = _to(kernel_device, mask)[0]
    got = run_kernel(K.compute_advantages, *_to(kernel_device, scores, lp, ref, v), m, kl_coef=0.1)
    check_all(got, gt_advantages(scores, lp, ref, v, mask, kl_coef=0.1), SCAN, ["advantages", "returns", "rewards", "kl"])
    got = run_kernel(K.shape_rewards, *_to(kernel_device, scores, lp, ref), m, kl_coef=0.1)
    check_all(got, gt_shape_rewards(scores, lp, ref, mask, kl_coef=0.1), ELEMENTWISE, ["rewards", "kl"])
    got = run_kernel(K.gae, *_to(kernel_device, x, v), m, whiten=True)
    check_all(got, gt_gae(x, v, mask, whiten=True), SCAN, ["advantages", "returns"])
    got = run_kernel(K.masked_whiten, *_to(kernel_device, x), m)
    check(got, gt_whiten(x, mask), SCAN, "whitened")


# --------------------------------------------------------------------------------------------
# 6. T = 0 and B = 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T", [(3, 0), (0, 5), (0, 0)])
def test_empty_shapes(run_kernel, kernel_device, B, T, dtype):
    z = torch.zeros(B, T, dtype=dtype, device=kernel_device)
    s = torch.zeros(B, dtype=dtype, device=kernel_device)
    m = torch.zeros(B, T, dtype=torch.bool, device=kernel_device)
    want_dtype = dtype
    outs = [
        run_kernel(K.kl_penalty, z, z, "k3", clamp=1.0),
        *run_kernel(K.shape_rewards, s, z, z, m, kl_coef=0.1),
        *run_kernel(K.gae, z, z, m, whiten=True),
        run_kernel(K.masked_whiten, z, m),
        *run_kernel(K.compute_advantages, s, z, z, z, m, kl_coef=0.1),
    ]
    assert [tuple(o.shape) for o in outs] == [(B, T)] * len(outs)
    assert all(o.dtype == want_dtype for o in outs)


# --------------------------------------------------------------------------------------------
# float32 and bf16 inputs of magnitude 1e4 against the float64 ground truth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_1e4(rng, run_kernel, kernel_device, dtype):
    B, T = 4, 11
    lp = _randn((B, T), rng, dtype, scale=1e4)
    ref = (lp.double() + _randn((B, T), rng, scale=3.0, dtype=torch.float64)).to(dtype)  # k3 stays finite
    v, x = _randn((B, T), rng, dtype, scale=1e4), _randn((B, T), rng, dtype, scale=1e4, shift=1e4)
    scores = _randn((B,), rng, dtype, scale=1e4)
    mask = random_mask(B, T, rng)
    args = _to(kernel_device, scores, lp, ref, v, mask)
    for est in ESTIMATORS:
        got = run_kernel(K.kl_penalty, *args[1:3], est)
        check(got, gt_kl(lp, ref, est), (1e-5, 1e-5), f"kl {est}")
        got = run_kernel(K.shape_rewards, *args[:3], args[4], kl_coef=0.1, estimator=est)
        check_all(got, gt_shape_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator=est), (1e-3, 1e-5), ["rewards", "kl"])
    # Sums over a row of 1e4-sized terms: float32 keeps ~1e-7 of 1e4 * T.
    big = (1e-1, 1e-5)
    got = run_kernel(K.compute_advantages, *args, kl_coef=0.1, whiten=False)
    check_all(got, gt_advantages(scores, lp, ref, v, mask, kl_coef=0.1, whiten=False), big, ["advantages", "returns", "rewards", "kl"])
    got = run_kernel(K.compute_advantages, *args, kl_coef=0.1, gamma=0.99, whiten=True)
    want = gt_advantages(scores, lp, ref, v, mask, kl_coef=0.1, gamma=0.99, whiten=True)
    check(got[0], want[0], SCAN, "whitened advantages")
    got = run_kernel(K.gae, *_to(kernel_device, x, v, mask), gamma=0.97, lam=0.9, whiten=True)
    want = gt_gae(x, v, mask, gamma=0.97, lam=0.9, whiten=True)
    check(got[0], want[0], SCAN, "advantages")
    check(got[1], want[1], big, "returns")
    got = run_kernel(K.masked_whiten, *_to(kernel_device, x, mask), shift_mean=False)
    check(got, gt_whiten(x, mask, shift_mean=False), (1e-2, 1e-5), "whitened")


# --------------------------------------------------------------------------------------------
# sm_90 PTX: every float max/min propagates NaN; masks are tested with an unordered !=
# --------------------------------------------------------------------------------------------

_COMPILE = r"""
import json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from fastppo.kernels import advantage as K

INTS = {"N", "B", "T", "NC", "P", "n_programs", "stride_a", "stride_b", "stride_v", "stride_m"}
PTRS = {"mask_ptr": "*fp32", "counter_ptr": "*i32"}

def ptx(fn, consts, warps):
    sig = {a: "constexpr" if a in consts else PTRS.get(a, "*fp32") if a.endswith("_ptr") else "i32" if a in INTS else "fp32"
           for a in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]

out = {}
for est in range(4):
    out[f"kl{est}"] = ptx(K._kl_kernel, dict(EST=est, CLAMP=True, BLOCK=1024), 4)
    out[f"kl_bwd{est}"] = ptx(K._kl_bwd_kernel, dict(EST=est, CLAMP=True, GRAD_LP=True, GRAD_REF=True, BLOCK=1024), 4)
for mode in (0, 2):
    out[f"summary{mode}"] = ptx(K._summary_kernel, dict(MODE=mode, EST=3, CLAMP=False, STATS=True, BLOCK_B=2, CHUNK=16, FIN_B=4, FIN_C=4), 4)
    out[f"finalize{mode}"] = ptx(K._finalize_kernel, dict(MODE=mode, EST=3, CLAMP=False, WHITEN=True, SHIFT_MEAN=True, BLOCK_B=2, CHUNK=16, NCB=4), 4)
res = {k: dict(plain=re.findall(r"\b(?:max|min)(?:\.ftz)?\.f32\b", p), nan=len(re.findall(r"(?:max|min)(?:\.ftz)?\.NaN\.f32", p)),
               setp_ne=len(re.findall(r"setp\.ne\.f32\s+%p\d+, %r\d+, 0f00000000;", p)), setp_neu=len(re.findall(r"setp\.neu\.f32", p))) for k, p in out.items()}
print(json.dumps(res))
"""


def test_sm90_ptx_has_no_nan_dropping_min_max():
    """Offline sm_90 compile (no GPU needed): PTX max/min.f32 drop NaN, so none may remain."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas for an offline sm_90 compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    plain = {k: v["plain"] for k, v in res.items() if v["plain"]}
    assert not plain, f"NaN-dropping max/min.f32 in {plain}"
    assert all(v["nan"] > 0 for k, v in res.items() if k.startswith("summary")), res
    # The float mask test m != 0 must be unordered (NaN != 0 is True: a NaN mask entry is valid).
    # (Only tests against 0 count: the overflow fallbacks' |x| < inf is an ordered != inf on
    # purpose, a NaN takes the fallback, which propagates it.)
    assert all(v["setp_ne"] == 0 for k, v in res.items() if k.startswith(("summary", "finalize"))), res
