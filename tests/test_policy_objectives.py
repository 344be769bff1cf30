"""The token-level policy objectives of verl 0.9.1 (``dppo_tv``, ``dppo_kl``, ``sapo``, ``gpg``,
``cispo``, ``dro``): both backends against the independent float64 ground truth
(``fastppo.groundtruth``), values, stats and gradients, every aggregation mode, float32 and bf16;
worked examples from the docstrings; masked garbage, NaN / inf at valid positions, 1e4
magnitudes, empty batches; bad input; the registry; the custom op under torch.compile.
Kernel outputs are poisoned (``run_kernel``), so an element a kernel never writes is NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import groundtruth as gt
from fastppo.kernels.ppo_loss import block_sizes
from fastppo.testing import TOL, assert_close, random_mask
from helpers import backend_caller

AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
NAMES = ("dppo_tv", "dppo_kl", "sapo", "gpg", "cispo", "dro")
# Options away from the defaults, so that each objective's options are exercised.
OPTIONS = {
    "dppo_tv": dict(clip_low=0.05, clip_high=0.1, clip_ratio_c=1.5),
    "dppo_kl": dict(clip_low=0.01, clip_high=0.02, clip_ratio_c=1.5),
    "sapo": dict(tau_pos=1.0, tau_neg=2.0),
    "gpg": {},
    "cispo": dict(clip_low=0.1, clip_high=0.3),
    "dro": dict(beta=0.3),
}
# fastppo's stats names, the same three for every objective (policy_loss's).
STATS = {name: {"clipfrac", "clipfrac_lower", "approx_kl"} for name in NAMES}
LOSS_TOL = (2e-5, 2e-5)  # losses and stats are float32 whatever the input dtype


def _op(name):
    return getattr(fastppo, f"{name}_loss")


def _inputs(gen, B, T, dtype=torch.float32, weights=True):
    """Log-probs <= 0 (probabilities), old log-probs spread enough that every trust region and
    clip triggers on some tokens, advantages of both signs, a ragged mask."""
    lp = -torch.rand(B, T, generator=gen) * 3.0
    old = (lp + torch.randn(B, T, generator=gen) * 0.6).clamp(max=-1e-3)
    adv = torch.randn(B, T, generator=gen)
    w = torch.rand(B, T, generator=gen) + 0.5 if weights else None
    mask = random_mask(B, T, gen)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(lp), cast(old), cast(adv), mask, cast(w)


def _check(name, lp, old, adv, mask, w, agg, call, *, grad_tol):
    """``call(fn, *args, **kw)`` runs the op; compare value, stats and d loss / d lp with float64."""
    x = lp.detach().clone().requires_grad_()
    loss, stats = call(_op(name), x, old, adv, mask, agg=agg, is_weights=w, **OPTIONS[name])
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert set(stats) == STATS[name]
    loss.backward()
    x64 = lp.detach().to(torch.float64).requires_grad_()
    L, S = getattr(gt, f"{name}_loss")(x64, old, adv, mask, agg=agg, is_weights=w, **OPTIONS[name])
    L.backward()
    assert_close(loss, L, LOSS_TOL, f"{name} {agg} loss")
    for k in STATS[name]:
        assert stats[k].dtype == torch.float32 and not stats[k].requires_grad
        assert_close(stats[k], S[k], LOSS_TOL, f"{name} {agg} {k}")
    assert x.grad.dtype == lp.dtype
    assert_close(x.grad, x64.grad, grad_tol, f"{name} {agg} grad")


def _eager(fn, *args, **kw):
    return fn(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_float64_ground_truth(rng, name, dtype):
    lp, old, adv, mask, w = _inputs(rng, 7, 9, dtype)
    with fastppo.use_backend("torch"):
        for agg in AGGS:
            _check(name, lp, old, adv, mask, w if agg != "token-sum" else None, agg, _eager, grad_tol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_float64_ground_truth(run_kernel, kernel_device, rng, name, dtype):
    lp, old, adv, mask, w = (None if t is None else t.to(kernel_device) for t in _inputs(rng, 7, 9, dtype))
    for agg in AGGS:
        _check(name, lp, old, adv, mask, w if agg != "token-mean" else None, agg, run_kernel, grad_tol=TOL[dtype])
    # Tiny tiles: rows split over programs, several programs fold into the finisher.
    with block_sizes(block_r=2, block_t=4, block_p=2, block_rb=2):
        for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean"):
            _check(name, lp, old, adv, mask, w, agg, run_kernel, grad_tol=TOL[dtype])


def test_every_trust_region_and_clip_triggers(rng):
    """The random inputs above do reach the interesting branches (else the comparisons prove little)."""
    lp, old, adv, mask, w = _inputs(rng, 16, 32)
    with fastppo.use_backend("torch"):
        for name in ("dppo_tv", "dppo_kl", "cispo"):
            frac = float(_op(name)(lp, old, adv, mask, **OPTIONS[name])[1]["clipfrac"])
            assert 0.0 < frac < 1.0, (name, frac)
        lower = fastppo.dppo_tv_loss(lp, old, adv, mask, clip_low=10.0, clip_ratio_c=1.5)[1]["clipfrac_lower"]
        assert float(lower) > 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_worked_examples(run_kernel, kernel_device, backend):
    """The docstrings' numbers, by hand."""
    one = torch.ones(1, 1, dtype=torch.bool, device=kernel_device)

    def t(x):
        return torch.tensor([[x]], dtype=torch.float32, device=kernel_device)

    def run(fn, lp, *args, **kw):
        x = lp.clone().requires_grad_()
        if backend == "triton":
            loss, stats = run_kernel(fn, x, *args, **kw)
        else:
            with fastppo.use_backend("torch"):
                loss, stats = fn(x, *args, **kw)
        loss.backward()
        return float(loss.detach()), float(x.grad), {k: float(v) for k, v in stats.items()}

    half, four = math.log(0.5), math.log(0.4)
    # DPPO: gap 0.1 (TV) / binary KL 0.0201 inside 0.2 -> kept; ratio 1.25; L = -1.25 log 0.5.
    for fn in (fastppo.dppo_tv_loss, fastppo.dppo_kl_loss):
        loss, grad, stats = run(fn, t(half), t(four), t(1.0), one)
        assert loss == pytest.approx(-1.25 * half, rel=1e-6) and grad == pytest.approx(-1.25, rel=1e-6)
        assert stats == pytest.approx({"clipfrac": 0.0, "clipfrac_lower": 0.0, "approx_kl": -math.log(1.25)})
    # ... a clip of 0.05 drops it (gap 0.1 > 0.05; binary KL 0.0201 > 0.01): no loss, no gradient.
    loss, grad, stats = run(fastppo.dppo_tv_loss, t(half), t(four), t(1.0), one, clip_low=0.05)
    assert (loss, grad, stats["clipfrac"]) == (0.0, 0.0, 1.0)
    loss, grad, stats = run(fastppo.dppo_kl_loss, t(half), t(four), t(1.0), one, clip_low=0.01)
    assert (loss, grad, stats["clipfrac"]) == (0.0, 0.0, 1.0)
    # ratio 1.25 over clip_ratio_c = 1.1: truncated to 1.1 and counted in clipfrac_lower.
    loss, grad, stats = run(fastppo.dppo_tv_loss, t(half), t(four), t(1.0), one, clip_ratio_c=1.1)
    assert loss == pytest.approx(-1.1 * half, rel=1e-6) and stats["clipfrac_lower"] == 1.0
    # SAPO on-policy: L = -2 A / tau... with tau_pos = 1: -2; gradient -1 (PPO's on-policy gradient).
    loss, grad, stats = run(fastppo.sapo_loss, t(-1.0), t(-1.0), t(1.0), one)
    assert loss == pytest.approx(-2.0, rel=1e-6) and grad == pytest.approx(-1.0, rel=1e-6)
    # ... A < 0 takes tau_neg = 1.05: L = 2 / 1.05 * 1, gradient 1.
    loss, grad, _ = run(fastppo.sapo_loss, t(-1.0), t(-1.0), t(-1.0), one)
    assert loss == pytest.approx(2.0 / 1.05, rel=1e-6) and grad == pytest.approx(1.0, rel=1e-6)
    # GPG: L = -lp A; no clip, approx_kl = old - lp = 0.5.
    loss, grad, stats = run(fastppo.gpg_loss, t(-2.0), t(-1.5), t(0.5), one)
    assert (loss, grad) == (pytest.approx(1.0), pytest.approx(-0.5))
    assert stats == pytest.approx({"clipfrac": 0.0, "clipfrac_lower": 0.0, "approx_kl": 0.5})
    # CISPO: ratio e^0.5 = 1.6487 clipped to 1.2; L = -1.2 * 2 * (-1) = 2.4, gradient -2.4.
    loss, grad, stats = run(fastppo.cispo_loss, t(-1.0), t(-1.5), t(2.0), one)
    assert loss == pytest.approx(2.4, rel=1e-6) and grad == pytest.approx(-2.4, rel=1e-6)
    assert stats == pytest.approx({"clipfrac": 1.0, "clipfrac_lower": 0.0, "approx_kl": -0.5})
    # DRO: L = -(lp A - beta/2 (lp - old)^2) = 1 + 0.05 * 0.25; gradient -(1 - 0.1 * 0.5).
    loss, grad, stats = run(fastppo.dro_loss, t(-1.0), t(-1.5), t(1.0), one, beta=0.1)
    assert loss == pytest.approx(1.0125, rel=1e-6) and grad == pytest.approx(-0.95, rel=1e-6)
    assert stats == pytest.approx({"clipfrac": 0.0, "clipfrac_lower": 0.0, "approx_kl": -0.5})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_garbage_never_leaks_and_specials_propagate(run_kernel, kernel_device, rng, backend):
    """NaN / inf at masked positions change nothing (values and gradients); NaN and inf at valid
    positions give what float64 autograd of the formula gives (NaN in, NaN out)."""
    B, T = 4, 6
    lp, old, adv, mask, w = (t.to(kernel_device) for t in _inputs(rng, B, T))
    mask[0, :3] = True
    mask[1, :] = True
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], device=kernel_device)
    dirty = [t.clone() for t in (lp, old, adv, w)]
    for t in dirty:
        t[~mask] = garbage[torch.randint(0, 3, (int((~mask).sum()),), generator=rng)].to(kernel_device)
    special = [t.clone() for t in dirty]
    special[0][0, 0] = float("nan")     # a NaN log-prob
    special[1][0, 1] = float("inf")     # an infinite old log-prob
    special[2][1, 2] = float("-inf")    # an infinite advantage

    call = backend_caller(backend, run_kernel)

    for name in NAMES:
        for agg in ("token-mean", "seq-mean-token-mean"):
            clean = lp.clone().requires_grad_()
            l0, s0 = call(_op(name), clean, old, adv, mask, agg=agg, is_weights=w, **OPTIONS[name])
            l0.backward()
            x = dirty[0].clone().requires_grad_()
            l1, s1 = call(_op(name), x, *dirty[1:3], mask, agg=agg, is_weights=dirty[3], **OPTIONS[name])
            l1.backward()
            assert torch.isfinite(l1) and torch.equal(l0, l1), (name, agg)
            assert torch.equal(clean.grad, x.grad), (name, agg)
            assert all(torch.equal(s0[k], s1[k]) for k in s0)
            _check(name, special[0], special[1], special[2], mask, special[3], agg, call, grad_tol=TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_magnitude_1e4(run_kernel, kernel_device, rng, backend):
    B, T = 3, 8
    lp, old, adv, mask, w = (t.to(kernel_device) for t in _inputs(rng, B, T))
    lp, old, adv = lp * 1e4, old * 1e4, adv * 1e4

    call = backend_caller(backend, run_kernel)

    for name in NAMES:
        _check(name, lp, old, adv, mask, w, "seq-mean-token-sum", call, grad_tol=TOL[torch.float32])


@pytest.mark.parametrize("shape", [(3, 0), (0, 5)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_gives_zero(run_kernel, kernel_device, shape, backend):
    z = torch.zeros(shape, device=kernel_device)
    mask = torch.zeros(shape, dtype=torch.bool, device=kernel_device)
    for name in NAMES:
        for agg in AGGS:
            x = z.clone().requires_grad_()
            if backend == "triton":
                loss, stats = run_kernel(_op(name), x, z, z, mask, agg=agg, **OPTIONS[name])
            else:
                with fastppo.use_backend("torch"):
                    loss, stats = _op(name)(x, z, z, mask, agg=agg, **OPTIONS[name])
            loss.backward()
            assert float(loss) == 0.0 and all(float(v) == 0.0 for v in stats.values())
            assert x.grad.shape == shape


def test_all_masked_gives_zero_loss_and_gradient(run_kernel, kernel_device, rng):
    lp, old, adv, _, w = (t.to(kernel_device) for t in _inputs(rng, 3, 5))
    mask = torch.zeros(3, 5, device=kernel_device)
    for name in NAMES:
        x = lp.clone().requires_grad_()
        loss, _ = run_kernel(_op(name), x, old, adv, mask, agg="seq-mean-token-mean", is_weights=w, **OPTIONS[name])
        loss.backward()
        assert float(loss) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_raises_value_error(kernel_device, rng, backend):
    lp, old, adv, mask, w = (t.to(kernel_device) for t in _inputs(rng, 2, 3))
    with fastppo.use_backend(backend):
        with pytest.raises(ValueError, match="beta"):
            fastppo.dro_loss(lp, old, adv, mask)
        with pytest.raises(ValueError, match="beta"):
            fastppo.dro_loss(lp, old, adv, mask, beta=0.0)
        with pytest.raises(ValueError, match="clip_low"):
            fastppo.cispo_loss(lp, old, adv, mask, clip_low=-0.1)
        with pytest.raises(ValueError, match="clip_ratio_c"):
            fastppo.dppo_tv_loss(lp, old, adv, mask, clip_ratio_c=float("nan"))
        with pytest.raises(ValueError, match="tau_neg"):
            fastppo.sapo_loss(lp, old, adv, mask, tau_neg=0.0)
        with pytest.raises(ValueError, match="agg"):
            fastppo.gpg_loss(lp, old, adv, mask, agg="token-median")
        with pytest.raises(ValueError, match="old_logprobs"):
            fastppo.gpg_loss(lp, None, adv, mask)
        with pytest.raises(ValueError, match="dtype"):
            fastppo.cispo_loss(lp, old.double(), adv, mask)
        with pytest.raises(ValueError, match="shape"):
            fastppo.sapo_loss(lp, old[:, :2], adv, mask)


def test_registry_names_are_verls():
    for name in NAMES:
        assert fastppo.get_policy_loss(name) is _op(name)
    assert {"vanilla", *NAMES} <= set(fastppo.POLICY_LOSSES)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(fastppo.POLICY_LOSSES))
def test_every_registered_objective_reports_the_same_stats(kernel_device, rng, backend, name):
    """Every entry of ``fastppo.POLICY_LOSSES`` (token-level, sequence-level, covariance, bypass_mode,
    vanilla) reports clipfrac, clipfrac_lower and approx_kl, so the trainer and users read any
    objective's stats the same way; extra keys (bypass_mode's ``rollout_corr/``) are allowed."""
    lp, old, adv, mask, w = (t.to(kernel_device) for t in _inputs(rng, 3, 5))
    options = {"dro": dict(beta=0.1)}.get(name, {})
    x = lp.clone().requires_grad_()
    with fastppo.use_backend(backend):
        loss, stats = fastppo.get_policy_loss(name)(x, old, adv, mask, is_weights=w, **options)
    assert {"clipfrac", "clipfrac_lower", "approx_kl"} <= set(stats), (name, sorted(stats))
    for k in ("clipfrac", "clipfrac_lower", "approx_kl"):
        v = stats[k]
        assert v.shape == () and v.dtype == torch.float32 and not v.requires_grad, (name, k, v)
        assert math.isfinite(float(v)), (name, k, v)
    assert 0.0 <= float(stats["clipfrac"]) <= 1.0 and 0.0 <= float(stats["clipfrac_lower"]) <= 1.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_op_under_compile(kernel_device, rng, backend):
    """One custom op for all six: opcheck, and compiled (aot_eager, fullgraph) == eager, with grads."""
    lp, old, adv, mask, w = (t.to(kernel_device) for t in _inputs(rng, 3, 5))
    with fastppo.use_backend(backend):
        torch.library.opcheck(torch.ops.fastppo.token_policy_loss.default,
                              ("dppo_kl_loss", lp.clone().requires_grad_(), old, adv, mask, 0.2, None, 3.0,
                               "seq-mean-token-mean", w))
        for name in NAMES:
            def step(x, name=name):
                loss, stats = _op(name)(x, old, adv, mask, is_weights=w, **OPTIONS[name])
                return loss * 2.0, stats

            x = lp.clone().requires_grad_()
            got, gstats = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
            got.backward()
            y = lp.clone().requires_grad_()
            want, wstats = step(y)
            want.backward()
            assert torch.equal(got, want) and torch.equal(x.grad, y.grad), name
            assert set(gstats) == set(wstats) and all(torch.equal(gstats[k], wstats[k]) for k in wstats)
