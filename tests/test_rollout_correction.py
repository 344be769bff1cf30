"""fastppo.rollout_correction against verl 0.9.1's own rollout_corr_helper and the float64 truth.

verl computes in the input dtype and multiplies masked positions by 0 (a NaN there leaks into its
weights), so verl is handed the float32 upcast of our inputs with finite garbage at masked
positions; the NaN / inf / 1e4 / T = 0 cases are checked against ``fastppo.groundtruth``.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import groundtruth as gt
from fastppo.rollout_correction import RS_OPTIONS, parse_rs
from helpers import assert_close, random_mask

PREFIX = "rollout_corr/"
# verl and fastppo sum in other orders (and fastppo's k3 is the accurate form): last digits.
VERL_TOL = (2e-6, 2e-5)
GT_TOL = (2e-6, 2e-5)
# sqrt(E[c^2] - E[c]^2) cancels in float32 when the spread is tiny: ~sqrt(eps) absolute.
STD_TOL = (2e-3, 1e-3)

IS_CASES = [  # (level, mode, upper, lower, verl's rollout_is_threshold)
    ("token", "truncate", 2.0, None, 2.0),
    ("token", "truncate", 1.3, None, "1.3"),
    ("sequence", "truncate", 3.0, None, 3.0),
    ("token", "mask", 1.5, 0.6, "0.6_1.5"),
    ("sequence", "mask", 4.0, 0.3, "0.3_4.0"),
]
RS_THRESHOLD = {
    "token_k1": "0.7_1.4", "token_k2": 0.05, "token_k3": 0.04,
    "seq_sum_k1": "0.3_3.0", "seq_sum_k2": 0.4, "seq_sum_k3": 0.3,
    "seq_mean_k1": 1.2, "seq_mean_k2": 0.05, "seq_mean_k3": 0.04,
    "seq_max_k2": 0.2, "seq_max_k3": 0.15,
}  # fmt: skip


def inputs(rng, B=7, T=11, dtype=torch.float32, spread=0.3, garbage=None):
    old = (torch.randn(B, T, generator=rng, dtype=torch.float64) * 0.5 - 1.5).to(dtype)
    roll = (old.double() + torch.randn(B, T, generator=rng, dtype=torch.float64) * spread).to(dtype)
    mask = random_mask(B, T, rng)
    if garbage is not None:
        old = old.masked_fill(~mask, garbage)
        roll = roll.masked_fill(~mask, -garbage if math.isfinite(garbage) else garbage)
    return old, roll, mask


@pytest.fixture(scope="module")
def verl_rc():
    return pytest.importorskip("verl.trainer.ppo.rollout_corr_helper", reason="verl is not installed")


def verl_run(verl_rc, old, roll, mask, **kw):
    weights, vmask, metrics = verl_rc.compute_rollout_correction_and_rejection_mask(
        old_log_prob=old.float(), rollout_log_prob=roll.float(), response_mask=mask.float(), **kw
    )
    return (None if weights is None else weights.batch["rollout_is_weights"]), vmask, metrics


def check_metrics(ours: dict, expected: dict, tol, what: str):
    assert set(ours) == set(expected), f"{what}: metric names differ: {sorted(set(ours) ^ set(expected))}"
    for key, value in expected.items():
        t = STD_TOL if key.endswith("_std") else tol
        assert_close(ours[key].reshape(()), torch.as_tensor(value, dtype=torch.float64), t, f"{what} {key}")


# --------------------------------------------------------------------------------------------
# verl's own functions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", IS_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}")
@pytest.mark.parametrize("batch_normalize", [False, True])
def test_is_weights_match_verl(verl_rc, rng, dtype, case, batch_normalize):
    level, mode, upper, lower, spec = case
    old, roll, mask = inputs(rng, dtype=dtype, spread=0.4 if level == "token" else 0.15, garbage=7.0)
    w, keep, metrics = fastppo.rollout_correction(old, roll, mask, level=level, mode=mode, upper=upper,
                                                  lower=lower, batch_normalize=batch_normalize)
    vw, vmask, vmetrics = verl_run(verl_rc, old, roll, mask, rollout_is=level, rollout_is_threshold=spec,
                                   rollout_is_batch_normalize=batch_normalize)
    assert w.dtype == torch.float32 and not w.requires_grad
    assert_close(w, vw, VERL_TOL, "weights")
    assert torch.equal(keep, vmask.bool())
    check_metrics(metrics, vmetrics, VERL_TOL, f"{level}/{mode}")


@pytest.mark.parametrize("option", RS_OPTIONS)
def test_each_rejection_option_matches_verl(verl_rc, rng, option):
    dtype = torch.bfloat16 if option.endswith("k2") else torch.float32
    old, roll, mask = inputs(rng, B=9, T=10, dtype=dtype, spread=0.25, garbage=-3.0)
    thr = RS_THRESHOLD[option]
    w, keep, metrics = fastppo.rollout_correction(old, roll, mask, level=None, rs=option, rs_threshold=thr)
    vw, vmask, vmetrics = verl_run(verl_rc, old, roll, mask, rollout_is=None, rollout_rs=option,
                                   rollout_rs_threshold=thr)
    assert w is None and vw is None
    assert torch.equal(keep, vmask.bool()), f"{option}: keep mask differs"
    check_metrics(metrics, vmetrics, VERL_TOL, option)


def test_chained_options_and_is_match_verl(verl_rc, rng):
    old, roll, mask = inputs(rng, B=10, T=9, spread=0.2, garbage=5.0)
    rs = "token_k1,seq_sum_k2,seq_mean_k3,seq_max_k2,seq_mean_k1,token_k1"  # a duplicate too
    thr = "0.6_1.6,1.0,0.05,0.3,1.1,0.6_1.6"
    with pytest.raises(ValueError):
        parse_rs(rs, thr)  # six specs, five distinct options: verl refuses too
    thr = "0.6_1.6,1.0,0.05,0.3,1.1"
    ours = fastppo.rollout_correction(old, roll, mask, level="sequence", upper=2.0, rs=rs, rs_threshold=thr)
    theirs = verl_run(verl_rc, old, roll, mask, rollout_is="sequence", rollout_is_threshold=2.0,
                      rollout_rs=rs, rollout_rs_threshold=thr)
    assert_close(ours[0], theirs[0], VERL_TOL, "weights")
    assert torch.equal(ours[1], theirs[1].bool())
    check_metrics(ours[2], theirs[2], VERL_TOL, "chained")


def test_large_magnitudes_match_verl(verl_rc, rng):
    old, roll, mask = inputs(rng, B=6, T=8, garbage=1.0)
    old = old * 1e4
    ours = fastppo.rollout_correction(old, roll, mask, level="token", upper=2.0, rs="token_k1,seq_max_k3",
                                      rs_threshold="0.5_2.0,5.0")
    theirs = verl_run(verl_rc, old, roll, mask, rollout_is="token", rollout_is_threshold=2.0,
                      rollout_rs="token_k1,seq_max_k3", rollout_rs_threshold="0.5_2.0,5.0")
    assert_close(ours[0], theirs[0], VERL_TOL, "weights")
    assert torch.equal(ours[1], theirs[1].bool())
    check_metrics(ours[2], theirs[2], VERL_TOL, "1e4")


# --------------------------------------------------------------------------------------------
# Float64 ground truth
# --------------------------------------------------------------------------------------------


def against_truth(old, roll, mask, **kw):
    w, keep, metrics = fastppo.rollout_correction(old, roll, mask, **kw)
    gw, gkeep, gmetrics = gt.rollout_correction(old, roll, mask, **kw)
    if gw is None:
        assert w is None
    else:
        assert_close(w, gw, GT_TOL, "weights")
    assert torch.equal(keep, gkeep)
    check_metrics(metrics, {PREFIX + k: v for k, v in gmetrics.items()}, GT_TOL, str(kw))
    return w, keep, metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_levels_and_modes_match_ground_truth(rng, dtype, level, mode):
    old, roll, mask = inputs(rng, dtype=dtype, spread=0.4 if level == "token" else 0.15)
    against_truth(old, roll, mask, level=level, mode=mode, upper=1.8, lower=0.5 if mode == "mask" else None,
                  batch_normalize=True, rs="geometric,token_k3,seq_max_k2", rs_threshold="1.3,0.1,0.4",
                  veto=0.4)


def test_edge_inputs_match_ground_truth(rng):
    old, roll, mask = inputs(rng, B=8, T=9, spread=0.3)
    clean = fastppo.rollout_correction(old, roll, mask, level="sequence", rs="seq_mean_k3,token_k1",
                                       rs_threshold="0.2,0.5_2.0")
    # Masked positions hold NaN, inf and -inf: nothing changes.
    poison = torch.tensor([math.nan, math.inf, -math.inf])
    idx = (~mask).nonzero()
    old_p, roll_p = old.clone(), roll.clone()
    for i, (b, t) in enumerate(idx.tolist()):
        old_p[b, t] = poison[i % 3]
        roll_p[b, t] = poison[(i + 1) % 3]
    dirty = fastppo.rollout_correction(old_p, roll_p, mask, level="sequence", rs="seq_mean_k3,token_k1",
                                       rs_threshold="0.2,0.5_2.0")
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
    for k in clean[2]:
        assert torch.equal(clean[2][k], dirty[2][k]), k
    # A NaN at a valid position: NaN weight (the row's, at sequence level), that row rejected.
    b, t = mask.nonzero()[0].tolist()
    old_p[b, t] = math.nan
    w, keep, metrics = against_truth(old_p, roll_p, mask, level="sequence", rs="seq_mean_k3,token_k1",
                                     rs_threshold="0.2,0.5_2.0")
    assert torch.isnan(w[b][mask[b]]).all() and not keep[b].any()
    assert torch.isnan(metrics[PREFIX + "kl"])
    # A -inf rollout log-prob (a token the sampler gave probability 0): the ratio is clamped at e^20.
    old2, roll2, mask2 = inputs(rng, B=5, T=6)
    b, t = mask2.nonzero()[-1].tolist()
    roll2[b, t] = -math.inf
    w, _, _ = against_truth(old2, roll2, mask2, level="token", mode="truncate", upper=3.0)
    assert w[b, t] == 3.0


@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (4, 6)])
def test_empty_masks(shape):
    old = torch.randn(shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    w, keep, metrics = against_truth(old, old - 0.1, mask, level="token", rs="token_k2", rs_threshold=0.1)
    assert w.shape == shape and not w.any() and not keep.any()


def test_worked_example():
    # Row 0: log r = [ln 3, ln 0.5]; row 1: log r = [0.1] then padding.
    old = torch.tensor([[math.log(3.0), math.log(0.5)], [0.1, 9.0]])
    roll = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    w, keep, m = fastppo.rollout_correction(old, roll, mask, level="token", upper=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5], [math.exp(0.1), 0.0]]))
    assert torch.equal(keep, mask.bool())
    assert math.isclose(m[PREFIX + "rollout_is_ratio_fraction_high"].item(), 1 / 3, rel_tol=1e-6)
    assert math.isclose(m[PREFIX + "rollout_is_mean"].item(), (2.5 + math.exp(0.1)) / 3, rel_tol=1e-6)
    # Sequence level: row 0's product is 1.5, row 1's e^0.1; IcePop on [0.5, 1.2] zeroes row 0.
    w, _, m = fastppo.rollout_correction(old, roll, mask, level="sequence", mode="mask", upper=1.2, lower=0.5)
    assert torch.allclose(w, torch.tensor([[0.0, 0.0], [math.exp(0.1), 0.0]]))
    assert m[PREFIX + "rollout_is_oob_ratio"].item() == pytest.approx(2 / 3)
    # Geometric: row 0 exp((ln 3 + ln 0.5) / 2) = sqrt(1.5).
    w, _, _ = fastppo.rollout_correction(old, roll, mask, level="geometric", upper=2.0)
    assert w[0, 0].item() == pytest.approx(math.sqrt(1.5))
    # token_k1 keeps ratios in [0.6, 2.5] (k1 = -log r in [ln 0.6, ln 2.5]): r = 3 fails... as
    # verl writes it, -log r is compared with log-bounds, so r = 0.5 (k1 = ln 2) passes, r = 3 fails.
    _, keep, m = fastppo.rollout_correction(old, roll, mask, level=None, rs="token", rs_threshold="0.6_2.5")
    assert keep.tolist() == [[False, True], [True, False]]
    assert m[PREFIX + "rollout_rs_token_k1_masked_fraction"].item() == pytest.approx(1 / 3)
    # veto 0.6: row 0 has r = 0.5 < 0.6, so the whole row goes.
    _, keep, m = fastppo.rollout_correction(old, roll, mask, level=None, veto=0.6)
    assert keep.tolist() == [[False, False], [True, False]]
    assert m[PREFIX + "rollout_is_veto_fraction"].item() == pytest.approx(0.5)


def test_bad_inputs():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    rc = fastppo.rollout_correction
    for kw, match in [
        (dict(level="tok"), "unknown level"),
        (dict(mode="clip"), "unknown mode"),
        (dict(upper=0.0), "upper"),
        (dict(upper=True), "upper"),
        (dict(upper=2.0, lower=3.0), "lower"),
        (dict(rs="token_k4", rs_threshold=1.0), "unknown rejection option"),
        (dict(rs="token_k1"), "needs rs_threshold"),
        (dict(rs="token_k2", rs_threshold="0.5_1.5"), "one upper bound"),
        (dict(rs="token_k1,token_k2", rs_threshold="1,2,3"), "one spec"),
        (dict(rs="token_k1", rs_threshold="2_1"), "lower bound"),
        (dict(veto=-1.0), "veto"),
    ]:
        with pytest.raises(ValueError, match=match):
            rc(x, x, m, **kw)
    with pytest.raises(ValueError, match="shape"):
        rc(x, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        rc(torch.zeros(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="torch.Tensor"):
        rc(x, None, m)
