"""Sequence-level and covariance-selection policy losses (``gspo``, ``geo_mean``, ``clip_cov``,
``kl_cov``) against the independent float64 ground truth (``fastppo.groundtruth``), on both
backends, values, statistics and gradients; worked examples by hand; the edge inputs of DESIGN.md.

The ground truth gets the very inputs the op gets (already rounded to bf16 where the op's are) and
computes in float64; gradients come back to those inputs through its autograd. Random inputs are
nudged away from the clip bounds (where float32 and float64 may disagree about a comparison and
the gradient itself jumps). Kernels run with poisoned outputs and 16-token slices, so a row spans
several slices and an unwritten element shows up as NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import groundtruth, reference
from fastppo.kernels import seq_policy_loss as K
from helpers import TOL, TOL_FP32_OUT, assert_close, random_mask

AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
OPS = ["gspo_loss", "geo_mean_loss", "clip_cov_loss", "kl_cov_loss"]
KERNEL_OPS = ["gspo_loss", "geo_mean_loss"]
FWD_TOL = (2e-5, 2e-5)
COV_OPTS = {"clip_cov_loss": dict(clip_cov_ratio=0.2), "kl_cov_loss": dict(kl_cov_ratio=0.2)}


def _inputs(op, B, T, gen, dtype, *, clip=0.2, spread=0.3):
    """(lp, old, adv, mask, w), with no sequence ratio (gspo) or token log-ratio (geo_mean) within
    2e-3 of a clip bound."""
    mask = random_mask(B, T, gen)
    old = (torch.randn(B, T, generator=gen, dtype=torch.float64) - 2.0).to(dtype)
    lp = (old.double() + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)).to(dtype)
    for _ in range(20):
        d = torch.where(mask, lp.double() - old.double(), 0.0)
        if op == "gspo_loss":
            s = d.sum(1) / mask.sum(1).clamp(min=1)
            near = ((s - math.log(1 - clip)).abs() < 2e-3) | ((s - math.log(1 + clip)).abs() < 2e-3)
            near = near.unsqueeze(1).expand(B, T)
        else:
            near = ((d + clip).abs() < 2e-3) | ((d - clip).abs() < 2e-3)
            near = near | (((torch.exp(d) - 1 - clip).abs() < 2e-3) | ((torch.exp(d) - 1 + clip).abs() < 2e-3))
        if not near.any():
            break
        lp = torch.where(near, lp.double() + 0.01, lp.double()).to(dtype)
    adv = (2 * torch.randn(B, T, generator=gen)).to(dtype)
    w = (0.5 + torch.rand(B, T, generator=gen)).to(dtype)
    return lp, old, adv, mask, w


def _call(fn, op, lp, old, adv, mask, seed, **kw):
    kw = {**COV_OPTS.get(op, {}), **kw}
    if op == "clip_cov_loss":
        kw["generator"] = torch.Generator().manual_seed(seed)
    return fn(lp, old, adv, mask, **kw)


def _check(op, lp, old, adv, mask, *, backend, run_kernel=None, seed=0, what="", **kw):
    """The op on ``backend`` against the float64 ground truth: loss, stats, d loss / d lp."""
    x = lp.clone().requires_grad_()
    if backend == "triton":
        loss, stats = run_kernel(_call, getattr(fastppo, op), op, x, old, adv, mask, seed, **kw)
    else:
        with fastppo.use_backend("torch"):
            loss, stats = _call(getattr(fastppo, op), op, x, old, adv, mask, seed, **kw)
    y = lp.clone().requires_grad_()
    exp_loss, exp_stats = _call(getattr(groundtruth, op), op, y, old, adv, mask, seed, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, exp_loss, FWD_TOL, f"{what} loss")
    assert set(stats) == set(exp_stats) == {"clipfrac", "clipfrac_lower", "approx_kl"}
    for k in stats:
        assert stats[k].dtype == torch.float32 and not stats[k].requires_grad
        assert_close(stats[k], exp_stats[k], FWD_TOL, f"{what} {k}")
    loss.backward()
    exp_loss.backward()
    assert x.grad.dtype == lp.dtype
    assert_close(x.grad, y.grad, TOL[lp.dtype] if lp.dtype != torch.float32 else (2e-5, 2e-5), f"{what} grad")
    return loss, stats, x.grad


# --------------------------------------------------------------------------------------------
# Random inputs vs float64, both backends, every agg mode
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_kernel_vs_float64(op, dtype, agg, rng, run_kernel, kernel_device):
    lp, old, adv, mask, w = (t.to(kernel_device) for t in _inputs(op, 7, 37, rng, dtype))
    with K.block_sizes(block_t=16):
        _check(op, lp, old, adv, mask, backend="triton", run_kernel=run_kernel, agg=agg,
               is_weights=w if agg == "token-mean" else None, clip_low=0.2, clip_high=0.28, what=f"{op} {agg}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("seq_grad", [False, True])
def test_gspo_dual_clip_and_sequence_gradient(seq_grad, backend, rng, run_kernel, kernel_device):
    # Token-varying advantages: the sequence form's gradient differs from the token form's here.
    for agg, weights in (("seq-mean-token-mean", False), ("token-sum", True)):
        lp, old, adv, mask, w = (t.to(kernel_device if backend == "triton" else "cpu")
                                 for t in _inputs("gspo_loss", 6, 21, rng, torch.float32))
        lp[::2] += 0.6  # even rows: sequence ratio ~ e^0.6, above 1.2 and the dual bound 1.1
        with K.block_sizes(block_t=16):
            _, stats, _ = _check("gspo_loss", lp, old, adv, mask, backend=backend, run_kernel=run_kernel, agg=agg,
                                 is_weights=w if weights else None, dual_clip=1.1, seq_grad=seq_grad,
                                 what=f"gspo dual seq_grad={seq_grad} {agg}")
        assert stats["clipfrac_lower"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_reference_vs_float64(op, dtype, rng):
    for agg in AGGS:
        lp, old, adv, mask, w = _inputs(op, 9, 23, rng, dtype)
        seed = int(torch.randint(0, 2**31, (1,), generator=rng))
        _check(op, lp, old, adv, mask, backend="torch", seed=seed, agg=agg, is_weights=w, what=f"{op} {agg}")


def test_float64_inputs_give_float64(rng):
    lp, old, adv, mask, _ = _inputs("gspo_loss", 4, 9, rng, torch.float64)
    for op in OPS:
        loss, stats = _call(getattr(fastppo, op), op, lp, old, adv, mask, 0)
        exp, _ = _call(getattr(groundtruth, op), op, lp, old, adv, mask, 0)
        assert loss.dtype == torch.float64
        assert_close(loss, exp, TOL[torch.float64], op)


# --------------------------------------------------------------------------------------------
# Worked examples
# --------------------------------------------------------------------------------------------


def _one_row(lp, old, adv):
    return (torch.tensor([lp], requires_grad=True), torch.tensor([old]), torch.tensor([adv]),
            torch.ones(1, len(lp), dtype=torch.bool))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_worked_gspo(backend, run_kernel):
    call = (lambda f, *a, **k: run_kernel(f, *a, **k)) if backend == "triton" else (lambda f, *a, **k: f(*a, **k))
    # s = mean(0.1, 0.3) = 0.2, r = e^0.2 = 1.2214 on both tokens, above 1 + 0.2.
    lp, old, adv, mask = _one_row([0.1, 0.3], [0.0, 0.0], [1.0, 1.0])
    loss, stats = call(fastppo.gspo_loss, lp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)  # A > 0: the clipped -A * 1.2 is larger
    assert stats["clipfrac"].item() == 1.0 and stats["approx_kl"].item() == pytest.approx(-0.2, abs=1e-6)
    assert lp.grad.tolist() == [[0.0, 0.0]]
    lp, old, adv, mask = _one_row([0.1, 0.3], [0.0, 0.0], [-1.0, -1.0])
    loss, stats = call(fastppo.gspo_loss, lp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(0.2), abs=1e-6)  # A < 0: -A * r, unclipped
    assert stats["clipfrac"].item() == 0.0
    # d/d lp_t = (1/2) * (-A) * r: each token's own derivative, scaled by the SEQUENCE ratio.
    assert lp.grad[0].tolist() == pytest.approx([0.5 * math.exp(0.2)] * 2, abs=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_worked_geo_mean(backend, run_kernel):
    call = (lambda f, *a, **k: run_kernel(f, *a, **k)) if backend == "triton" else (lambda f, *a, **k: f(*a, **k))
    # d = (0.1, 0.3); A > 0 clips d at +0.2: R = exp((0.1 + 0.2) / 2).
    lp, old, adv, mask = _one_row([0.1, 0.3], [0.0, 0.0], [1.0, 1.0])
    loss, stats = call(fastppo.geo_mean_loss, lp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-math.exp(0.15), abs=1e-6)
    assert stats["clipfrac"].item() == 0.5 and stats["clipfrac_lower"].item() == 0.0
    assert lp.grad[0].tolist() == pytest.approx([-0.5 * math.exp(0.15), 0.0], abs=1e-6)
    # A < 0 never clips an increase: R = exp((0.1 + 0.3) / 2), the clipped token counts as lower.
    lp, old, adv, mask = _one_row([0.1, 0.3], [0.0, 0.0], [-1.0, -1.0])
    loss, stats = call(fastppo.geo_mean_loss, lp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(0.2), abs=1e-6)
    assert stats["clipfrac"].item() == 0.0 and stats["clipfrac_lower"].item() == 0.5
    assert lp.grad[0].tolist() == pytest.approx([0.5 * math.exp(0.2)] * 2, abs=1e-6)


def test_worked_clip_cov_and_kl_cov():
    # mean A = 0, mean lp = 0: cov = A * lp = (3, 0.6, 0, 0); only token 0 lies in (1, 5).
    lp = torch.tensor([[1.0, -0.2, -0.4, -0.4]], requires_grad=True)
    adv = torch.tensor([[3.0, -3.0, 0.0, 0.0]])
    mask = torch.ones(1, 4)
    loss, stats = fastppo.clip_cov_loss(lp, lp.detach(), adv, mask, clip_cov_ratio=0.25)
    loss.backward()
    assert loss.item() == pytest.approx(3.0 / 4)  # token 0 (-3) dropped, token 1 gives 3
    assert stats["clipfrac"].item() == 0.25
    assert lp.grad[0].tolist() == pytest.approx([0.0, 0.75, 0.0, 0.0])
    # kl_cov: the top 1 covariance token (token 0, with d = 0.5) gets + 0.1 * |d|.
    lp.grad = None
    old = lp.detach() - torch.tensor([[0.5, 0.0, 0.0, 0.0]])
    loss, stats = fastppo.kl_cov_loss(lp, old, adv, mask, kl_cov_ratio=0.25)
    loss.backward()
    assert loss.item() == pytest.approx((-3 * math.exp(0.5) + 0.05 + 3.0) / 4, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(0.125)
    assert lp.grad[0].tolist() == pytest.approx([(-3 * math.exp(0.5) + 0.1) / 4, 0.75, 0.0, 0.0], abs=1e-6)


def test_geo_mean_agg_modes_worked():
    # Row losses P = (-1, -3) over 1 and 3 tokens: the seq mean is -2, the token mean -(1 + 9) / 4.
    lp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    got = {agg: fastppo.geo_mean_loss(lp, lp, adv, mask, agg=agg)[0].item() for agg in AGGS}
    assert got == pytest.approx({"token-mean": -2.5, "token-sum": -10.0, "seq-mean-token-mean": -2.0,
                                 "seq-mean-token-sum": -5.0, "seq-mean-token-sum-norm": -5.0 / 3})


# --------------------------------------------------------------------------------------------
# Edge inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_edges(op, rng, run_kernel, kernel_device):
    backends = ["torch", "triton"] if op in KERNEL_OPS else ["torch"]
    for backend in backends:
        dev = kernel_device if backend == "triton" else "cpu"
        kw = dict(backend=backend, run_kernel=run_kernel)
        lp, old, adv, mask, w = (t.to(dev) for t in _inputs(op, 6, 11, rng, torch.float32))
        # NaN / inf at masked positions: nothing leaks.
        junk = ~mask
        junk_lp = torch.where(junk, float("nan"), lp)
        junk_old = torch.where(junk, float("inf"), old)
        junk_adv = torch.where(junk, float("-inf"), adv)
        loss, stats, grad = _check(op, junk_lp, junk_old, junk_adv, mask, is_weights=torch.where(junk, float("nan"), w),
                                   what=f"{op} masked junk", **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[~mask] == 0).all()
        # Magnitudes 1e4: log-probs near -1e4 with small differences, advantages of 1e4.
        big = dict(lp=lp - 1e4, old=old - 1e4, adv=adv * 1e4)
        _check(op, big["lp"], big["old"], big["adv"], mask, what=f"{op} 1e4", **kw)
        # NaN at a valid position propagates to the loss.
        b, t = mask.nonzero()[0].tolist()
        nan_lp = lp.clone()
        nan_lp[b, t] = float("nan")
        loss, _, _ = _check(op, nan_lp, old, adv, mask, what=f"{op} NaN valid", **kw)
        assert torch.isnan(loss)
        # Non-contiguous inputs (a column slice of a wider tensor) and a float mask of 2 / 0.5.
        strided = torch.stack([lp, lp], dim=2)[:, :, 0]
        assert not strided.is_contiguous()
        _check(op, strided, old, adv, torch.where(mask, 2.0, 0.0), what=f"{op} strided", **kw)
        # T = 0 and B = 0: a zero loss and zero stats, a zero gradient of the right shape.
        for shape in ((3, 0), (0, 5)):
            e = torch.zeros(shape, device=dev)
            x = e.clone().requires_grad_()
            f = getattr(fastppo, op)
            loss, stats = run_kernel(f, x, e, e, e) if backend == "triton" else f(x, e, e, e)
            loss.backward()
            assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
            assert x.grad.shape == shape


def test_gspo_infinite_logprob_is_nan_like_torch(run_kernel, kernel_device):
    # lp = -inf at a valid token: lp - sg(lp) is NaN there (PyTorch), and s = -inf for the row.
    lp = torch.tensor([[-1.0, float("-inf"), -2.0], [-1.0, -1.5, -2.0]], device=kernel_device)
    old = torch.full_like(lp, -1.2)
    adv = torch.ones_like(lp)
    mask = torch.ones_like(lp)
    with fastppo.use_backend("torch"):
        ref, _ = fastppo.gspo_loss(lp.cpu(), old.cpu(), adv.cpu(), mask.cpu())
    got, _ = run_kernel(fastppo.gspo_loss, lp, old, adv, mask)
    exp, _ = groundtruth.gspo_loss(lp.cpu(), old.cpu(), adv.cpu(), mask.cpu())
    assert torch.isnan(exp) and torch.isnan(ref) and torch.isnan(got)


def test_clip_cov_draws_like_the_global_seed():
    # Without a generator the draw uses torch's global CPU generator, in verl's order.
    gen = torch.Generator().manual_seed(5)
    lp, old, adv, mask, _ = _inputs("clip_cov_loss", 8, 16, gen, torch.float32)
    torch.manual_seed(123)
    a, sa = fastppo.clip_cov_loss(lp, old, adv, mask, clip_cov_ratio=0.1)
    b, sb = fastppo.clip_cov_loss(lp, old, adv, mask, clip_cov_ratio=0.1, generator=torch.Generator().manual_seed(123))
    assert a.item() == b.item() and sa["clipfrac"].item() == sb["clipfrac"].item() > 0


@pytest.mark.parametrize("op", OPS)
def test_bad_inputs(op):
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    f = getattr(fastppo, op)
    with pytest.raises(ValueError, match="old_logprobs is required"):
        f(x, None, x, m)
    with pytest.raises(ValueError, match="agg"):
        f(x, x, x, m, agg="mean")
    with pytest.raises(ValueError, match="shape"):
        f(x, torch.zeros(2, 4), x, m)
    with pytest.raises(ValueError, match="2-D"):
        f(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3))
    bad = {"gspo_loss": dict(clip_low=-0.1), "geo_mean_loss": dict(clip_high=float("nan")),
           "clip_cov_loss": dict(clip_cov_ratio=0.0), "kl_cov_loss": dict(kl_cov_ratio=-1.0)}[op]
    with pytest.raises(ValueError):
        f(x, x, x, m, **bad)


def test_registry():
    for name, op in [("gspo", "gspo_loss"), ("geo_mean", "geo_mean_loss"), ("clip_cov", "clip_cov_loss"),
                     ("kl_cov", "kl_cov_loss")]:
        assert fastppo.get_policy_loss(name) is getattr(fastppo, op)
        assert getattr(reference, op).__doc__ == getattr(fastppo, op).__doc__
