"""Advantage estimators (issue 19, item 2): verl 0.9.1's estimators as fastppo ops, on both
backends, against the independent float64 ground truth (``fastppo.groundtruth``).

* group statistics in the kernel (``group_advantages`` estimator = grpo_passk, opo, gpg);
* compositions (REINFORCE++-baseline, GDPO, GPG's f_norm, ReMax) and the PyTorch optimal token
  baseline (position-aligned and multi-turn);
* worked numbers from the docstrings / papers; edge inputs: NaN at valid and masked positions,
  magnitudes 1e4, groups of one, T = 0; the registry of verl's fourteen names.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import estimators as E
from fastppo import groundtruth as gt
from fastppo.testing import assert_close
from helpers import backend_caller

BACKENDS = ("torch", "triton")
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-5)}  # inputs are rounded first: same data
GROUP_NEW = ("grpo_passk", "opo", "gpg")
VERL_NAMES = ("gae", "grpo", "grpo_vectorized", "gdpo", "grpo_passk", "reinforce_plus_plus_baseline", "rloo", "opo",
              "reinforce_plus_plus", "remax", "gpg", "rloo_vectorized", "optimal_token_baseline",
              "tir_optimal_token_baseline")


@pytest.fixture(params=BACKENDS)
def call(request, run_kernel):
    return backend_caller(request.param, run_kernel)


def ragged(B, T, rng, *, empty_rows=()):
    """Right-padded rows of random length >= 1, plus a masked hole; ``empty_rows`` have none."""
    lengths = torch.randint(1, T + 1, (B,), generator=rng)
    m = torch.arange(T)[None, :] < lengths[:, None]
    if T > 2:
        m[0, 1] = False  # a gap inside a row
    for b in empty_rows:
        m[b] = False
    return m


def scores_with_ties(B, rng, dtype):
    s = torch.randint(-2, 3, (B,), generator=rng).to(torch.float32) + 0.25 * torch.randn(B, generator=rng).round()
    return s.to(dtype)


# --------------------------------------------------------------------------------------------
# Worked numbers
# --------------------------------------------------------------------------------------------


def test_worked_examples_group_statistics(call):
    """One group, scores 1, 0, 0, 1: gpg alpha = 4 / 2 nonzero = 2 -> +1, -1, -1, +1; grpo_passk:
    the first best (row 0) ties with row 3 -> 0 everywhere. Scores 3, 1, 0, 0: std(3,1,0,0) =
    sqrt(2) -> passk row 0 = (3 - 1) / 1.414 = 1.414, raw 2. opo with lengths 1, 3, 1, 3 on scores
    1, 0, 0, 1: baseline (1*1 + 3*1) / 8 = 0.5 -> +-0.5."""
    m = torch.ones(4, 3, dtype=torch.bool)
    s = torch.tensor([1.0, 0.0, 0.0, 1.0])
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])[:, None].expand(4, 3)
    assert_close(call(fastppo.group_advantages, s, 4, m, estimator="gpg"), sign, (1e-6, 1e-6), "gpg")
    assert_close(call(fastppo.group_advantages, s, 4, m, estimator="grpo_passk"), torch.zeros(4, 3), (0, 0), "tie")
    s2 = torch.tensor([3.0, 1.0, 0.0, 0.0])
    want = torch.zeros(4, 3)
    want[0] = 2 / (math.sqrt(2) + 1e-6)
    assert_close(call(fastppo.group_advantages, s2, 4, m, estimator="grpo_passk"), want, (1e-6, 1e-6), "passk")
    want[0] = 2.0
    got = call(fastppo.group_advantages, s2, 4, m, estimator="grpo_passk", norm_by_std=False)
    assert_close(got, want, (0, 0), "passk raw")
    lm = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert_close(call(fastppo.group_advantages, s, 4, lm, estimator="opo"), torch.where(lm, sign * 0.5, 0.0),
                 (1e-6, 1e-6), "opo")


def test_worked_examples_compositions(call):
    """REINFORCE++-baseline, K = 2, scores (1, 0), (3, 3), one token each: centred +-0.5, 0, 0;
    unbiased std sqrt(1/6) -> +-1.2247. ReMax: rewards [0, 1], baseline 0.25 -> returns [1, 1],
    advantages [0.75, 0.75]. OTB: two rows of one token, rewards 1 and 0, pi = 0.5,
    sum pi^2 = 0.5 (w = 0.5): B = 0.5 -> +-0.5."""
    m = torch.ones(4, 1, dtype=torch.bool)
    got = call(E.reinforce_pp_baseline_advantages, torch.tensor([1.0, 0.0, 3.0, 3.0]), 2, m)
    assert_close(got[:, 0], torch.tensor([1.0, -1.0, 0.0, 0.0]) * (0.5 / math.sqrt(1 / 6 + 1e-8)), (1e-6, 1e-6), "rpp")
    adv, ret = call(E.remax_advantages, torch.tensor([[0.0, 1.0]]), torch.tensor([0.25]), torch.ones(1, 2))
    assert_close(ret, torch.tensor([[1.0, 1.0]]), (0, 0), "remax returns")
    assert_close(adv, torch.tensor([[0.75, 0.75]]), (0, 0), "remax")
    one = torch.ones(2, 1)
    adv, ret = E.optimal_token_baseline_advantages(torch.tensor([[1.0], [0.0]]), one, 2, math.log(0.5) * one,
                                                   0.5 * one, eps=0.0)
    assert_close(adv, torch.tensor([[0.5], [-0.5]]), (1e-6, 1e-6), "otb")
    # GDPO: two components that cancel.
    comp = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert_close(call(E.gdpo_advantages, comp, 2, torch.ones(2, 1)), torch.zeros(2, 1), (1e-6, 1e-6), "gdpo")


# --------------------------------------------------------------------------------------------
# Random inputs against the float64 ground truth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", GROUP_NEW)
def test_group_estimators_match_ground_truth(call, rng, dtype, estimator):
    K, G, T = 4, 3, 7
    B = K * G
    s = scores_with_ties(B, rng, dtype)
    m = ragged(B, T, rng, empty_rows=(5, 9, 10, 11))  # group 2 has a lone member (row 8)
    for norm in (True, False):
        got = call(fastppo.group_advantages, s, K, m, estimator=estimator, norm_by_std=norm)
        assert got.dtype == torch.float32 and not got.requires_grad
        want = gt.group_advantages(s, K, m, estimator=estimator, norm_by_std=norm)
        assert_close(got, want, TOL[dtype], f"{estimator} norm={norm}")
    # A group of one everywhere (K = 1): passk 0, opo the score, gpg alpha * score.
    got = call(fastppo.group_advantages, s, 1, m, estimator=estimator)
    assert_close(got, gt.group_advantages(s, 1, m, estimator=estimator), TOL[dtype], f"{estimator} K=1")


def test_compositions_match_ground_truth(call, rng):
    K, B, T = 3, 9, 6
    m = ragged(B, T, rng, empty_rows=(4,))
    s = torch.randn(B, generator=rng) * 1e4  # magnitudes 1e4
    assert_close(call(E.reinforce_pp_baseline_advantages, s, K, m), gt.reinforce_pp_baseline_advantages(s, K, m),
                 (1e-5, 1e-5), "rpp baseline")
    comp = torch.randn(B, 3, generator=rng)
    w = [1.0, 0.5, -2.0]
    assert_close(call(E.gdpo_advantages, comp, K, m, weights=w), gt.gdpo_advantages(comp, K, m, weights=w),
                 (1e-5, 1e-5), "gdpo")
    assert_close(call(E.gpg_advantages, s, K, m, f_norm=3.0), gt.gpg_advantages(s, K, m, f_norm=3.0), (1e-5, 1e-5),
                 "gpg f_norm")
    r, base = torch.randn(B, T, generator=rng), torch.randn(B, generator=rng)
    r[~m] = float("nan")  # masked rewards never leak
    adv, ret = call(E.remax_advantages, r, base, m)
    want_adv, want_ret = gt.remax_advantages(r, base, m)
    assert_close(adv, want_adv, (1e-5, 1e-5), "remax adv")
    assert_close(ret, want_ret, (1e-5, 1e-5), "remax returns")


@pytest.mark.parametrize("multi_turn", [False, True])
def test_optimal_token_baseline_matches_ground_truth(rng, multi_turn):
    K, B, T = 4, 8, 6
    m = ragged(B, T, rng, empty_rows=(7,))
    if multi_turn:
        m = m & (torch.rand(B, T, generator=rng) > 0.25)  # tool tokens masked between turns
        m[:7, 0] = True
    r = torch.randn(B, T, generator=rng)
    lp = -torch.rand(B, T, generator=rng) * 3
    spp = torch.rand(B, T, generator=rng) * 0.6
    iw = torch.rand(B, T, generator=rng) + 0.5
    r[~m] = float("nan")
    lp[~m] = float("nan")
    for tail in (True, False):
        adv, ret = E.optimal_token_baseline_advantages(r, m, K, lp, spp, is_weights=iw, handle_zero_tail=tail,
                                                       multi_turn=multi_turn)
        want_adv, want_ret = gt.optimal_token_baseline_advantages(r, m, K, lp, spp, is_weights=iw,
                                                                  handle_zero_tail=tail, multi_turn=multi_turn)
        assert_close(adv, want_adv, (1e-5, 1e-5), f"otb tail={tail}")
        assert_close(ret, want_ret, (1e-5, 1e-5), "otb returns")


# --------------------------------------------------------------------------------------------
# NaN, T = 0, bad input, the registry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", GROUP_NEW)
def test_nan_stays_in_its_group(call, estimator):
    """A NaN score of a member: its group NaN (gpg: alpha counts NaN as nonzero, finite elsewhere);
    a NaN score of a row with no valid token: ignored."""
    s = torch.tensor([1.0, float("nan"), 0.0, 2.0, 5.0, float("nan")])
    m = torch.ones(6, 2, dtype=torch.bool)
    m[5] = False
    out = call(fastppo.group_advantages, s, 2, m, estimator=estimator)
    assert torch.isnan(out[:2]).all()
    assert torch.isfinite(out[2:]).all() and (out[5] == 0).all()
    assert_close(out, gt.group_advantages(s, 2, m, estimator=estimator), (1e-6, 1e-6), estimator)


def test_empty_time_axis(call):
    m = torch.zeros(4, 0, dtype=torch.bool)
    for est in GROUP_NEW:
        assert call(fastppo.group_advantages, torch.ones(4), 2, m, estimator=est).shape == (4, 0)
    assert call(E.reinforce_pp_baseline_advantages, torch.ones(4), 2, m).shape == (4, 0)
    adv, ret = call(E.remax_advantages, torch.zeros(4, 0), torch.ones(4), m)
    assert adv.shape == ret.shape == (4, 0)
    z = torch.zeros(4, 0)
    adv, _ = E.optimal_token_baseline_advantages(z, m, 2, z, z, multi_turn=True)
    assert adv.shape == (4, 0)


def test_bad_input_is_value_error():
    m = torch.ones(4, 2)
    with pytest.raises(ValueError, match="group estimator"):
        fastppo.group_advantages(torch.ones(4), 2, m, estimator="passk")
    with pytest.raises(ValueError, match="f_norm"):
        E.gpg_advantages(torch.ones(4), 2, m, f_norm=0.0)
    with pytest.raises(ValueError, match="baselines"):
        E.remax_advantages(torch.ones(4, 2), torch.ones(3), m)
    with pytest.raises(ValueError, match="weights"):
        E.gdpo_advantages(torch.ones(4, 2), 2, m, weights=[1.0])
    with pytest.raises(ValueError, match="sum_pi_squared"):
        E.optimal_token_baseline_advantages(torch.ones(4, 2), m, 2, torch.ones(4, 2), torch.ones(4, 3))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        fastppo.get_advantage_estimator("ppo")


def test_registry_has_verls_names(rng):
    assert set(fastppo.ADVANTAGE_ESTIMATORS) == set(VERL_NAMES)
    B, T = 4, 3
    r = torch.randn(B, T, generator=rng)
    m = torch.ones(B, T)
    extra = {"values": torch.randn(B, T, generator=rng), "baselines": torch.randn(B, generator=rng),
             "old_logprobs": -torch.rand(B, T, generator=rng), "sum_pi_squared": torch.rand(B, T, generator=rng)}
    for name in VERL_NAMES:
        fn = fastppo.get_advantage_estimator(name)
        kw = {k: extra[k] for k in E.ESTIMATOR_INPUTS[name]}
        adv, ret = fn(r, m, group_size=2, **kw)
        assert adv.shape == ret.shape == (B, T) and adv.dtype == torch.float32, name
    # The outcome estimators score a row by its summed token rewards.
    adv, _ = fastppo.get_advantage_estimator("grpo")(r, m, group_size=2)
    assert_close(adv, fastppo.group_advantages(r.sum(-1), 2, m), (1e-6, 1e-6), "grpo via registry")


def test_new_estimators_compile_fullgraph():
    """The new estimator names go through group_advantages' custom op; the compositions trace whole."""
    s, m = torch.tensor([3.0, 1.0, 0.0, 0.0]), torch.ones(4, 2)
    for est in GROUP_NEW:
        fn = torch.compile(lambda s, m, est=est: fastppo.group_advantages(s, 4, m, estimator=est), fullgraph=True)
        assert_close(fn(s, m), fastppo.group_advantages(s, 4, m, estimator=est), (0, 0), est)
    fn = torch.compile(lambda s, m: E.reinforce_pp_baseline_advantages(s, 2, m), fullgraph=True)
    assert_close(fn(s, m), E.reinforce_pp_baseline_advantages(s, 2, m), (1e-6, 1e-6), "rpp baseline compiled")
