"""Critic-free advantages (issue 11, item 5): group_advantages (grpo, dr_grpo, rloo) and
reinforce_pp_advantages, on both backends.

* hand-worked numbers (the docstrings' examples);
* against verl 0.9.1's real estimators on random inputs with masks (skipped without verl);
* NaN at a valid position spreads to its own group only; NaN at a masked position (a row with no
  valid token, a masked reward) never reaches an output; a mask of 2 / 0.5 / NaN is "valid";
* T = 0 and B = 0; bad arguments are ValueErrors; the kernels compile for sm_90 offline.

Group layout: rows g*K .. g*K+K-1 (consecutive) are the K responses to prompt g.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastppo
from fastppo import groundtruth as gt
from fastppo.testing import assert_close, random_mask
from helpers import backend_caller

BACKENDS = ("torch", "triton")
TOL = (1e-5, 1e-5)
ESTIMATORS = ("grpo", "dr_grpo", "rloo")


@pytest.fixture(params=BACKENDS)
def call(request, run_kernel):
    """Run a fastppo op on one backend (Triton through the interpreter, outputs poisoned)."""
    return backend_caller(request.param, run_kernel)


def full_mask(B, T):
    return torch.ones(B, T, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Hand-worked numbers
# --------------------------------------------------------------------------------------------


def test_worked_example_one_group_of_four(call):
    """Scores 1, 0, 0, 1: mean 0.5, unbiased std sqrt(1/3) = 0.577.
    grpo: +-0.5 / 0.577 = +-0.866; dr_grpo: +-0.5; rloo: baselines (mean of the other three)
    1/3, 2/3, 2/3, 1/3, advantages +-2/3."""
    s = torch.tensor([1.0, 0.0, 0.0, 1.0])
    m = full_mask(4, 3)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0]).unsqueeze(1).expand(4, 3)
    grpo = call(fastppo.group_advantages, s, 4, m)
    assert grpo.dtype == torch.float32 and grpo.shape == (4, 3) and not grpo.requires_grad
    assert_close(grpo, sign * (0.5 / (math.sqrt(1 / 3) + 1e-6)), TOL, "grpo")
    assert_close(call(fastppo.group_advantages, s, 4, m, estimator="grpo", norm_by_std=False), sign * 0.5, TOL, "grpo no std")
    assert_close(call(fastppo.group_advantages, s, 4, m, estimator="dr_grpo"), sign * 0.5, TOL, "dr_grpo")
    assert_close(call(fastppo.group_advantages, s, 4, m, estimator="rloo"), sign * (2 / 3), TOL, "rloo")


def test_worked_example_two_groups_masks_and_a_lone_member(call):
    """K = 2, groups {0, 1} and {2, 3}. Group 0: scores 3, 1 -> mean 2, std sqrt(2) = 1.414, grpo
    +-0.707, rloo +-2. Group 1: row 3 has no valid token, so row 2 (score 5) is alone: verl's rule
    mean 0, std 1, so grpo 5 / (1 + eps), dr_grpo and rloo 5; row 3 is 0 everywhere."""
    s = torch.tensor([3.0, 1.0, 5.0, 7.0])
    m = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    for est, a0, a2 in (("grpo", 1 / math.sqrt(2), 5 / (1 + 1e-6)), ("dr_grpo", 1.0, 5.0), ("rloo", 2.0, 5.0)):
        want = torch.tensor([[a0, a0, 0], [0, -a0, -a0], [a2, 0, 0], [0, 0, 0]])
        assert_close(call(fastppo.group_advantages, s, 2, m, estimator=est), want, (1e-5, 1e-6), est)


def test_worked_example_reinforce_pp(call):
    """gamma = 1: rewards [0, 1] and [0, 3] give returns [1, 1] and [3, 3]; mean 2, unbiased std
    sqrt(4/3) = 1.155: advantages -0.866 and +0.866. gamma = 0.5 with a masked gap: row
    [1, (masked 9), 2] has returns [1 + 0.5 * 2, 0, 2] (the gap is not discounted)."""
    adv, ret = call(fastppo.reinforce_pp_advantages, torch.tensor([[0.0, 1.0], [0.0, 3.0]]), full_mask(2, 2))
    assert_close(ret, torch.tensor([[1.0, 1.0], [3.0, 3.0]]), TOL, "returns")
    k = 1 / math.sqrt(4 / 3 + 1e-8)
    assert_close(adv, torch.tensor([[-k, -k], [k, k]]), TOL, "advantages")
    r = torch.tensor([[1.0, 9.0, 2.0]])
    _, ret = call(fastppo.reinforce_pp_advantages, r, torch.tensor([[1, 0, 1]]), gamma=0.5)
    assert_close(ret, torch.tensor([[2.0, 0.0, 2.0]]), TOL, "returns across a gap")


# --------------------------------------------------------------------------------------------
# Against the float64 ground truth, several groups and block sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_ground_truth(call, estimator, K, rng):
    B, T = 24, 7
    m = random_mask(B, T, rng)
    s = torch.randn(B, generator=rng) * 3
    for norm in (True, False):
        got = call(fastppo.group_advantages, s, K, m, estimator=estimator, norm_by_std=norm, eps=1e-4)
        want = gt.group_advantages(s.double(), K, m, estimator=estimator, norm_by_std=norm, eps=1e-4)
        assert_close(got, want, TOL, f"{estimator} K={K} norm={norm}")


def test_group_stats_chunked_over_k(rng):
    """A group larger than the stats kernel's block (BLOCK_K = 4, K = 11): three chunked passes."""
    from fastppo.kernels.group_advantage import group_advantages_launch

    B, T = 22, 3
    m = random_mask(B, T, rng)
    s = torch.randn(B, generator=rng)
    for est in ESTIMATORS:
        with fastppo.use_backend("triton"):
            got = group_advantages_launch(s, 11, m, estimator=est, block_k=4)
        assert_close(got, gt.group_advantages(s.double(), 11, m, estimator=est), TOL, est)


# --------------------------------------------------------------------------------------------
# verl 0.9.1's real estimators
# --------------------------------------------------------------------------------------------


def load_verl():
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:
        pytest.skip(f"verl's core_algos cannot be imported here: {exc}")
    return core_algos


def verl_case(rng, B, T, K, dead_rows):
    """Scores and a mask; returns the rows with no valid token too (the chosen dead rows, and a
    scatter row that drew none). Scores within a group are kept 0.1 apart: two members a hair
    apart have a std near eps, where float32's rounding of the difference dominates the answer."""
    m = random_mask(B, T, rng, kinds=("right", "left", "gap", "full", "single", "scatter"))
    for b in dead_rows:
        m[b] = False
    while True:
        s = torch.randn(B, generator=rng) * 2
        groups = s.reshape(-1, K)
        gaps = (groups.unsqueeze(-1) - groups.unsqueeze(-2)).abs() + torch.eye(K) * 1e9
        if bool((gaps >= 0.1).all()):
            break
    dead = [b for b in range(B) if not bool(m[b].any())]
    return s, m, dead


def token_rewards(s, m):
    """verl's input: the score at the last valid token (verl sums the row)."""
    r = torch.zeros(m.shape)
    for b in range(m.shape[0]):
        idx = m[b].nonzero().flatten()
        if len(idx):
            r[b, idx[-1]] = s[b]
    return r


@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_verl(call, estimator, K, rng):
    """Equal to verl's compute_grpo_outcome_advantage (norm_adv_by_std_in_grpo False for dr_grpo)
    and compute_rloo_outcome_advantage with index = row // K. A row with no valid token is no
    member of its group: fastppo equals verl run on the other rows."""
    ca = load_verl()
    B, T = 20, 6
    dead = [3, 7] if K > 1 else []
    s, m, dead = verl_case(rng, B, T, K, dead)
    got = call(fastppo.group_advantages, s, K, m, estimator=estimator)
    live = [b for b in range(B) if b not in dead]
    index = np.array([b // K for b in live])
    r, mf = token_rewards(s, m)[live], m[live].float()
    if estimator == "rloo":
        want, _ = ca.compute_rloo_outcome_advantage(r, mf, index)
    else:
        want, _ = ca.compute_grpo_outcome_advantage(r, mf, index, norm_adv_by_std_in_grpo=estimator == "grpo")
    assert_close(got[live], want, (2e-6, 2e-6), f"verl {estimator}")
    assert bool((got[dead] == 0).all())


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_verl(call, gamma, rng):
    ca = load_verl()
    B, T = 6, 9
    m = random_mask(B, T, rng, kinds=("right", "left", "gap", "full", "scatter"))
    r = torch.randn(B, T, generator=rng)
    adv, ret = call(fastppo.reinforce_pp_advantages, r, m, gamma=gamma)
    want_adv, want_ret = ca.compute_reinforce_plus_plus_outcome_advantage(r, m.float(), config=SimpleNamespace(gamma=gamma))
    assert_close(adv, want_adv, (2e-6, 2e-6), "advantages")
    assert_close(ret, want_ret, (2e-6, 2e-6), "returns")


# --------------------------------------------------------------------------------------------
# NaN, masks, empty inputs, bad arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nan_score_spreads_to_its_group_only_and_dead_rows_never_leak(call, estimator, rng):
    B, T, K = 12, 5, 4
    m = full_mask(B, T)
    m[0, 3:] = False
    s = torch.randn(B, generator=rng)
    s[1] = float("nan")  # a member of group 0
    m[6] = False
    s[6] = float("nan")  # group 1: a row with no valid token, its NaN score is ignored
    s[9] = float("inf")  # group 2: the mean is inf, so no member stays finite (inf - inf is NaN)
    got = call(fastppo.group_advantages, s, K, m, estimator=estimator)
    assert bool(got[0:4][m[0:4]].isnan().all()) and bool((got[0:4][~m[0:4]] == 0).all())
    assert bool(torch.isfinite(got[4:8]).all()) and bool((got[6] == 0).all())
    assert not bool(torch.isfinite(got[8:12]).any()) and bool(got[9].isnan().all())
    assert_close(got, gt.group_advantages(s.double(), K, m, estimator=estimator), TOL, "ground truth")


def test_reinforce_pp_nan_valid_propagates_masked_never_leaks(call, rng):
    B, T = 4, 6
    m = full_mask(B, T)
    m[:, 4:] = False
    r = torch.randn(B, T, generator=rng)
    r[:, 4] = float("nan")
    r[:, 5] = float("inf")
    adv, ret = call(fastppo.reinforce_pp_advantages, r, m)
    assert bool(torch.isfinite(adv).all()) and bool(torch.isfinite(ret).all())
    assert bool((adv[~m] == 0).all()) and bool((ret[~m] == 0).all())
    r[2, 1] = float("nan")  # valid: row 2's returns at t <= 1 are NaN, the batch whitening NaN
    adv, ret = call(fastppo.reinforce_pp_advantages, r, m)
    assert bool(ret[2, :2].isnan().all()) and bool(torch.isfinite(ret[2, 2:]).all())
    assert bool(adv[m].isnan().all()) and bool((adv[~m] == 0).all())


def test_mask_values_mean_nonzero(call, rng):
    B, T = 8, 5
    mb = random_mask(B, T, rng)
    values = torch.tensor([2.0, 0.5, float("nan"), -1.0])[torch.randint(0, 4, (B, T), generator=rng)]
    mf = torch.where(mb, values, 0.0)
    s = torch.randn(B, generator=rng)
    r = torch.randn(B, T, generator=rng)
    for est in ESTIMATORS:
        assert_close(call(fastppo.group_advantages, s, 4, mf, estimator=est), call(fastppo.group_advantages, s, 4, mb, estimator=est), (0, 0), est)
    for a, b in zip(call(fastppo.reinforce_pp_advantages, r, mf), call(fastppo.reinforce_pp_advantages, r, mb)):
        assert_close(a, b, (0, 0), "reinforce_pp")


@pytest.mark.parametrize("shape", [(4, 0), (0, 5), (0, 0)])
def test_empty(call, shape):
    B, T = shape
    out = call(fastppo.group_advantages, torch.randn(B), 2 if B else 3, torch.ones(B, T))
    assert out.shape == (B, T) and out.dtype == torch.float32
    adv, ret = call(fastppo.reinforce_pp_advantages, torch.randn(B, T), torch.ones(B, T))
    assert adv.shape == ret.shape == (B, T)


def test_bf16_scores_float64_in_float64_out(call, rng):
    s = torch.randn(8, generator=rng).bfloat16()
    m = random_mask(8, 4, rng)
    out = call(fastppo.group_advantages, s, 4, m)
    assert out.dtype == torch.float32
    assert_close(out, gt.group_advantages(s.double(), 4, m), TOL, "bf16")
    assert call(fastppo.group_advantages, s.double(), 4, m).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(group_size=3), "group_size must divide the batch"),
        (dict(group_size=0), "group_size must be a positive integer"),
        (dict(group_size=2.0), "group_size must be a positive integer"),
        (dict(group_size=True), "group_size must be a positive integer"),
        (dict(estimator="ppo"), "unknown group estimator 'ppo'; expected one of grpo, dr_grpo, rloo"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(eps=float("nan")), "eps must be finite"),
        (dict(norm_by_std=1), "norm_by_std must be True or False"),
        (dict(scores=torch.zeros(4, 1)), r"scores must be \[B\] = \[4\]"),
        (dict(scores=torch.zeros(4, dtype=torch.long)), "scores must be a floating tensor"),
        (dict(mask=torch.ones(4)), r"mask must be \[B, T\]"),
        (dict(mask=None), "mask is required"),
        (dict(scores=None), "scores is required"),
    ],
)
@pytest.mark.parametrize("module", ["fastppo", "reference"])
def test_bad_arguments_group(module, kwargs, match):
    fn = fastppo.group_advantages if module == "fastppo" else fastppo.reference.group_advantages
    args = dict(scores=torch.zeros(4), group_size=2, mask=torch.ones(4, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fn(args.pop("scores"), args.pop("group_size"), args.pop("mask"), **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=1.5), "gamma must be <= 1"),
        (dict(gamma=-0.1), "gamma must be >= 0"),
        (dict(gamma=float("nan")), "gamma must be finite"),
        (dict(mask=torch.ones(2, 4)), "mask has shape"),
        (dict(rewards=torch.zeros(6)), r"rewards must be \[B, T\]"),
        (dict(rewards=None), "rewards is required"),
    ],
)
@pytest.mark.parametrize("module", ["fastppo", "reference"])
def test_bad_arguments_reinforce_pp(module, kwargs, match):
    fn = fastppo.reinforce_pp_advantages if module == "fastppo" else fastppo.reference.reinforce_pp_advantages
    args = dict(rewards=torch.zeros(2, 3), mask=torch.ones(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fn(args.pop("rewards"), args.pop("mask"), **args)


# --------------------------------------------------------------------------------------------
# sm_90 offline compile: registers, spills, and no NaN-dropping max/min or ordered mask test
# --------------------------------------------------------------------------------------------

_COMPILE = r"""
import json, os, re
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from fastppo.kernels import group_advantage as G
from fastppo.inspect import _resource_usage

INTS = {"B", "T", "K", "stride_m"}
PTRS = {"member_ptr": "*i32"}

def build(fn, consts, warps, mask="*fp32"):
    sig = {a: "constexpr" if a in consts else (mask if a == "mask_ptr" else PTRS.get(a, "*fp32")) if a.endswith("_ptr")
           else "i32" if a in INTS else "fp32" for a in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

res = {}
for mask in ("*fp32", "*u8"):
    res[f"member {mask}"] = build(G._row_member_kernel, dict(BLOCK_B=4, BLOCK_T=1024), 8, mask)
    res[f"broadcast {mask}"] = build(G._broadcast_kernel, dict(BLOCK_B=4, BLOCK_T=1024), 8, mask)
for est in range(3):
    res[f"stats est={est}"] = build(G._group_stats_kernel, dict(EST=est, BLOCK_K=64), 4)
out = {}
for k, c in res.items():
    p = c.asm["ptx"]
    use = _resource_usage(c.asm["cubin"])
    out[k] = dict(regs=use.get("REG"), spills=use.get("STACK", 0) + use.get("LOCAL", 0), plain=len(re.findall(r"\b(?:max|min)(?:\.ftz)?\.f32\b", p)),
                  setp_ne=len(re.findall(r"setp\.ne\.f32", p)))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_offline():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas for an offline sm_90 compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(res)
    assert all(v["spills"] == 0 for v in res.values()), res
    assert all(v["plain"] == 0 for v in res.values()), res
    # A float mask is tested with an unordered != (NaN != 0 is True: a NaN mask entry is valid).
    assert all(v["setp_ne"] == 0 for v in res.values()), res
