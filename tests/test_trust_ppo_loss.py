"""Trust contract (issue 9) for the Triton PPO losses: NaN, masks, None, value clip, empty inputs.

Ground truth: ``_truth`` below, the loss formulas written out in float64 PyTorch from the (already
rounded) kernel inputs, with autograd for the gradients. It is independent of both backends and
follows TRUST_SPEC.md: masked positions are replaced by 0 before any arithmetic, a mask means
``mask != 0`` (a count, never a weight), value clipping is ``clamp(v, old - c, old + c)``, and
an empty mask (T = 0 included) gives 0 for every aggregation.

Comparisons are NaN-aware: NaN exactly where the ground truth has NaN, within tolerance elsewhere.

The last tests compile the kernels for sm_90 offline (no GPU needed) in a subprocess without
``TRITON_INTERPRET`` and read the PTX: every max/min on data must be ``max.NaN.f32`` /
``min.NaN.f32`` (PTX ``max.f32`` returns the non-NaN operand and would hide a NaN on a GPU).
``python tests/test_trust_ppo_loss.py sweep`` compiles every flag combination the launchers can
pick and prints registers and spills (see the __main__ block).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import TOL, assert_close, random_mask

from fastppo.kernels import ppo_loss as K

AGGS = list(K.AGG_CODES)
FWD_TOL = (2e-5, 2e-5)
TINY = dict(block_r=2, block_t=4, block_p=2, block_rb=2)
INPUTS = ("logprobs", "old_logprobs", "advantages", "values", "old_values", "returns", "entropy", "is_weights")
STAT_NAMES = K.STAT_NAMES


# --------------------------------------------------------------------------------------------
# Ground truth (float64, written from the formulas)
# --------------------------------------------------------------------------------------------


def _agg64(L, valid, agg):
    B, T = L.shape
    Lm = torch.where(valid, L, 0.0)
    count = valid.sum().double()
    if agg == "token-mean":
        return Lm.sum() / count.clamp(min=1)
    if agg == "token-sum":
        return Lm.sum()
    row_count = valid.sum(1).double()
    has = row_count > 0
    n_rows = has.sum().double().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return torch.where(has, Lm.sum(1) / row_count.clamp(min=1), 0.0).sum() / n_rows
    if agg == "seq-mean-token-sum":
        return Lm.sum() / n_rows
    return Lm.sum() / n_rows / max(T, 1)  # seq-mean-token-sum-norm


def _truth(t: dict, mask, *, clip_low=0.2, clip_high=None, dual_clip=None, value_clip=0.2,
           vf_coef=0.5, ent_coef=0.0, agg="token-mean", parts=("p", "v", "x")):
    """(loss, stats, leaves): float64 loss and stats of the PPO objective; leaves are the
    float64 leaf tensors (requires_grad) of logprobs / values / entropy for autograd."""
    valid = mask != 0
    leaves = {}

    def get(name, grad=False):
        x = t.get(name)
        if x is None:
            return None
        x = x.detach().cpu().double()
        if grad:
            x.requires_grad_(True)
            leaves[name] = x
        return torch.where(valid, x, 0.0)  # before any arithmetic: masked garbage never enters

    count = valid.sum().double().clamp(min=1)
    zero = torch.zeros((), dtype=torch.float64)
    stats = {k: zero for k in STAT_NAMES}
    loss = zero
    if "p" in parts:
        lp, old, adv = get("logprobs", True), get("old_logprobs"), get("advantages")
        w = get("is_weights")
        ch = clip_low if clip_high is None else clip_high
        lr = torch.clamp(lp - old, -20.0, 20.0)
        r = torch.exp(lr)
        unc = -adv * r
        clp = -adv * torch.clamp(r, 1.0 - clip_low, 1.0 + ch)
        pt = torch.maximum(unc, clp)
        stats["clipfrac"] = (valid & (clp > unc)).sum() / count
        if dual_clip is not None:
            lower = -adv * dual_clip
            neg = adv < 0
            stats["clipfrac_lower"] = (valid & neg & (pt > lower)).sum() / count
            pt = torch.where(neg, torch.minimum(pt, lower), pt)
        if w is not None:
            pt = pt * w
        stats["policy_loss"] = _agg64(pt, valid, agg)
        stats["approx_kl"] = torch.where(valid, -lr, 0.0).detach().sum() / count
        loss = loss + stats["policy_loss"]
    if "v" in parts:
        v, oldv, R = get("values", True), get("old_values"), get("returns")
        e = (v - R).square()
        if value_clip is not None:
            vc = torch.clamp(v, oldv - value_clip, oldv + value_clip)
            ec = (vc - R).square()
            stats["value_clipfrac"] = (valid & (ec > e)).sum() / count
            e = torch.maximum(e, ec)
        stats["value_loss"] = 0.5 * _agg64(e, valid, agg)
        loss = loss + vf_coef * stats["value_loss"]
    if "x" in parts and t.get("entropy") is not None:
        stats["entropy"] = _agg64(get("entropy", True), valid, agg)
        loss = loss - ent_coef * stats["entropy"]
    return loss, {k: s.detach() for k, s in stats.items()}, leaves


# --------------------------------------------------------------------------------------------
# NaN-aware comparison and the kernel runner
# --------------------------------------------------------------------------------------------


def _close(actual, expected, tol, what):
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    assert tuple(a.shape) == tuple(e.shape), f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    an, en = torch.isnan(a), torch.isnan(e)
    if not torch.equal(an, en):
        idx = (an != en).nonzero()[0].tolist()
        raise AssertionError(f"{what}: NaN pattern differs; first at {idx}: got {a[tuple(idx)].item()!r}, "
                             f"expected {e[tuple(idx)].item()!r}")
    assert_close(a[~en], e[~en], tol, what)


OP_GRADS = {"ppo": ("logprobs", "values", "entropy"), "policy": ("logprobs",), "value": ("values",),
            "aggregate": ("entropy",)}


def _run(run_kernel, t: dict, mask, grads=None, op="ppo", upstream=1.75, **kw):
    """Kernel forward + backward (outputs poisoned): (loss, stats dict, {name: grad})."""
    grads = OP_GRADS[op] if grads is None else grads
    t = {k: (None if x is None else x.detach().clone()) for k, x in t.items()}
    names = [n for n in grads if t.get(n) is not None]
    for n in names:
        t[n].requires_grad_(True)

    def go():
        if op == "ppo":
            loss, stats = K.ppo_loss(t["logprobs"], t["old_logprobs"], t["advantages"], t["values"],
                                     t["old_values"], t["returns"], mask, entropy=t.get("entropy"),
                                     is_weights=t.get("is_weights"), **kw)
        elif op == "policy":
            loss, stats = K.policy_loss(t["logprobs"], t["old_logprobs"], t["advantages"], mask,
                                        is_weights=t.get("is_weights"), **kw)
        elif op == "value":
            loss, stats = K.value_loss(t["values"], t["old_values"], t["returns"], mask, **kw)
        else:
            loss, stats = K.aggregate(t["entropy"], mask, **kw), {}
        if not names:
            return loss, stats, {}
        g = torch.autograd.grad(loss, [t[n] for n in names], torch.tensor(upstream, device=loss.device))
        return loss, stats, dict(zip(names, g))

    return run_kernel(go)


_KW_TRUTH = {"clip": "value_clip"}


def _compare(run_kernel, t, mask, *, op="ppo", grads=None, tol_grad=None, tol_fwd=FWD_TOL, **kw):
    """Kernel vs _truth: loss, stats, gradients (NaN-aware). Returns the kernel's outputs."""
    upstream = 1.75
    loss, stats, g = _run(run_kernel, t, mask, grads=grads, op=op, upstream=upstream, **kw)
    parts = {"ppo": ("p", "v", "x"), "policy": ("p",), "value": ("v",), "aggregate": ("x",)}[op]
    tkw = {_KW_TRUTH.get(k, k): v for k, v in kw.items()}
    if op == "value":
        tkw.setdefault("value_clip", 0.2)
        tkw["vf_coef"] = 1.0
    if op == "aggregate":
        tkw["ent_coef"] = -1.0
    want, want_stats, leaves = _truth(t, mask.cpu(), parts=parts, **tkw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _close(loss, want, tol_fwd, "loss")
    for name, s in stats.items():
        _close(s, want_stats[{"clipfrac": "value_clipfrac"}.get(name, name) if op == "value" else name],
               tol_fwd, f"stats[{name}]")
    names = [n for n in g if n in leaves]
    if names:
        want_g = torch.autograd.grad(want, [leaves[n] for n in names], torch.tensor(upstream, dtype=torch.float64),
                                     allow_unused=True)
        for n, wg in zip(names, want_g):
            wg = torch.zeros_like(leaves[n]) if wg is None else wg
            assert g[n].dtype == t[n].dtype and g[n].shape == t[n].shape
            _close(g[n], wg, tol_grad or TOL[t[n].dtype], f"d loss / d {n}")
    return loss, stats, g


def _inputs(B, T, gen, dtype, device, *, scale=1.0, entropy=True, weights=True):
    """Random PPO inputs away from the measure-zero clip boundaries (where float32 and float64
    may disagree about a comparison and the gradient itself jumps)."""
    old = (torch.randn(B, T, generator=gen) * scale - 2.0 * scale).to(dtype)
    lp = (old.double() + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)).to(dtype)
    for _ in range(10):
        lr = lp.double() - old.double()
        near = torch.zeros_like(lr, dtype=torch.bool)
        for b in (math.log(0.8), math.log(1.28), math.log(3.0)):
            near |= (lr - b).abs() < 1e-4
        if not near.any():
            break
        lp = torch.where(near, lp.double() + 0.05, lp.double()).to(dtype)
    oldv = (torch.randn(B, T, generator=gen) * scale).to(dtype)
    v = (oldv.double() + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).to(dtype)
    R = (oldv.double() + torch.randn(B, T, generator=gen, dtype=torch.float64)).to(dtype)
    for _ in range(10):
        step = v.double() - oldv.double()
        near = ((step.abs() - 0.2).abs() < 1e-4)
        vc = torch.clamp(v.double(), oldv.double() - 0.2, oldv.double() + 0.2)
        e, ec = (v.double() - R.double()) ** 2, (vc - R.double()) ** 2
        near |= ((e - ec).abs() < 1e-4 * (e + ec + 1e-3)) & ((e - ec).abs() > 0)
        if not near.any():
            break
        v = torch.where(near, v.double() + 0.05, v.double()).to(dtype)
    t = {
        "logprobs": lp, "old_logprobs": old, "advantages": (torch.randn(B, T, generator=gen) * scale).to(dtype),
        "values": v, "old_values": oldv, "returns": R,
        "entropy": (torch.rand(B, T, generator=gen) * 3).to(dtype) if entropy else None,
        "is_weights": (torch.rand(B, T, generator=gen) * 2).to(dtype) if weights else None,
    }
    return {k: (None if x is None else x.to(device)) for k, x in t.items()}


FULL = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, value_clip=0.2, vf_coef=0.7, ent_coef=0.01)
PLAIN = dict(clip_low=0.2, value_clip=None, vf_coef=0.5)


# --------------------------------------------------------------------------------------------
# 1. Garbage at masked positions never reaches loss, stats or gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", INPUTS)
def test_masked_garbage_in_one_input_never_leaks(run_kernel, kernel_device, rng, name):
    B, T = 5, 11
    t = _inputs(B, T, rng, torch.float32, kernel_device)
    mask = random_mask(B, T, rng).to(kernel_device)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38])[torch.randint(0, 4, (B, T), generator=rng)]
    t[name] = torch.where(mask, t[name], garbage.to(kernel_device))
    for agg, tiles in (("token-mean", {}), ("seq-mean-token-mean", TINY)):
        with K.block_sizes(**tiles):
            loss, stats, g = _compare(run_kernel, t, mask, agg=agg, **FULL)
        assert torch.isfinite(loss)
        assert all(bool(torch.isfinite(s)) for s in stats.values()), stats
        for n, gr in g.items():
            assert bool((gr[~mask] == 0).all()), f"d/d {n} is not exactly 0 at masked positions"


@pytest.mark.parametrize("op", ["policy", "value", "aggregate"])
def test_masked_garbage_single_ops(run_kernel, kernel_device, rng, op):
    B, T = 4, 9
    t = _inputs(B, T, rng, torch.bfloat16, kernel_device)
    mask = random_mask(B, T, rng).to(kernel_device)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, (B, T), generator=rng)]
    for name in INPUTS:
        t[name] = torch.where(mask, t[name], garbage.to(kernel_device).to(t[name].dtype))
    kw = {"policy": dict(clip_low=0.2, dual_clip=3.0), "value": dict(clip=0.2), "aggregate": {}}[op]
    grads = {"policy": ("logprobs",), "value": ("values",), "aggregate": ("entropy",)}[op]
    _, _, g = _compare(run_kernel, t, mask, op=op, grads=grads, agg="seq-mean-token-sum", **kw)
    for n, gr in g.items():
        assert bool((gr[~mask] == 0).all()), n


# --------------------------------------------------------------------------------------------
# 2. NaN / inf at a valid position propagate as float64 PyTorch gives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "variant, name",
    [("full", n) for n in INPUTS] + [("plain", n) for n in INPUTS if n not in ("entropy", "is_weights")],
)
def test_special_at_a_valid_position_propagates(run_kernel, kernel_device, rng, name, special, variant):
    """One NaN / inf / -inf at a valid position of one input: loss, stats and gradients are what
    float64 PyTorch autograd of the formula gives (NaN exactly where it gives NaN)."""
    B, T = 3, 6
    t = _inputs(B, T, rng, torch.float32, kernel_device, entropy=variant == "full", weights=variant == "full")
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 4:] = False
    mask = mask.to(kernel_device)
    t[name] = t[name].clone()
    t[name][1, 2] = special
    kw = FULL if variant == "full" else PLAIN
    loss, _, g = _compare(run_kernel, t, mask, agg="seq-mean-token-mean", **kw)
    if math.isnan(special) and name not in ("old_values",) + (("entropy",) if variant == "plain" else ()):
        assert torch.isnan(loss), "a NaN at a valid position must make the loss NaN"


def test_nan_advantage_gives_nan_loss_and_nan_token_gradient(run_kernel, kernel_device, rng):
    """The issue's example: NaN advantage at a valid token -> NaN loss, NaN gradient at that token
    only, NaN approx_kl not (it does not read advantages)."""
    t = _inputs(2, 5, rng, torch.float32, kernel_device)
    t["advantages"][0, 3] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool, device=kernel_device)
    loss, stats, g = _run(run_kernel, t, mask, grads=("logprobs",), op="policy", dual_clip=3.0)
    assert torch.isnan(loss)
    nan_at = torch.isnan(g["logprobs"].cpu())
    assert nan_at[0, 3] and int(nan_at.sum()) == 1
    assert torch.isfinite(stats["approx_kl"]) and torch.isfinite(stats["clipfrac"])


def test_nan_logprob_gives_nan_loss_and_kl(run_kernel, kernel_device, rng):
    """lp NaN: clamp(NaN, -20, 20) is NaN (not -20), so loss and approx_kl are NaN."""
    t = _inputs(2, 5, rng, torch.float32, kernel_device)
    t["logprobs"][1, 0] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool, device=kernel_device)
    loss, stats, _ = _run(run_kernel, t, mask, grads=(), op="policy")
    assert torch.isnan(loss) and torch.isnan(stats["approx_kl"])


# --------------------------------------------------------------------------------------------
# 3. A required tensor given as None raises ValueError (never reads another tensor's memory)
# --------------------------------------------------------------------------------------------


PPO_REQUIRED = ("logprobs", "old_logprobs", "advantages", "values", "old_values", "returns", "mask")


@pytest.mark.parametrize("missing", PPO_REQUIRED)
def test_none_required_raises(kernel_device, rng, missing):
    t = _inputs(3, 4, rng, torch.float32, kernel_device)
    t["mask"] = torch.ones(3, 4, dtype=torch.bool, device=kernel_device)
    t[missing] = None
    ppo = [t[n] for n in PPO_REQUIRED]
    with pytest.raises(ValueError, match=missing):
        K.ppo_loss(*ppo)
    if missing in ("logprobs", "old_logprobs", "advantages", "mask"):
        with pytest.raises(ValueError, match=missing):
            K.policy_loss(t["logprobs"], t["old_logprobs"], t["advantages"], t["mask"])
    if missing in ("values", "old_values", "returns", "mask"):
        for clip in (0.2, None):
            with pytest.raises(ValueError, match=missing):
                K.value_loss(t["values"], t["old_values"], t["returns"], t["mask"], clip=clip)
    if missing == "mask":
        with pytest.raises(ValueError, match="mask"):
            K.aggregate(t["values"], None)
    with pytest.raises(ValueError):
        K.aggregate(None, torch.ones(3, 4, dtype=torch.bool, device=kernel_device))


@pytest.mark.parametrize("missing", ["old", "adv", "oldv", "ret", "w", "x"])
def test_launcher_refuses_none_for_an_input_it_reads(kernel_device, rng, missing):
    """Defence in depth below the public functions: the fused launcher itself."""
    t = _inputs(3, 4, rng, torch.float32, kernel_device)
    mask = torch.ones(3, 4, dtype=torch.bool, device=kernel_device)
    cfg = K.Config(has_p=True, has_w=True, dual=False, has_v=True, vclip=True, has_x=True, agg=0, vf_coef=0.5)
    kw = dict(old=t["old_logprobs"], adv=t["advantages"], w=t["is_weights"], oldv=t["old_values"], ret=t["returns"])
    kw[missing] = None
    x = None if missing == "x" else t["entropy"]
    with pytest.raises(ValueError, match="None"):
        K._fused(t["logprobs"], t["values"], x, mask=mask, cfg=cfg, **{k: v for k, v in kw.items() if k != "x"})


# --------------------------------------------------------------------------------------------
# 4. A mask means mask != 0: counts, never weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mdtype", [torch.float32, torch.bfloat16, torch.int64, torch.int8])
def test_mask_is_nonzero_not_a_weight(run_kernel, kernel_device, rng, mdtype):
    B, T = 4, 7
    t = _inputs(B, T, rng, torch.float32, kernel_device)
    if mdtype.is_floating_point:
        values = torch.tensor([2.0, 0.5, -1.0, float("nan"), 0.0, -0.0, 1.0])
    else:
        values = torch.tensor([2, -1, 0, 1, 3, 0, 1])
    mask = values[torch.randint(0, len(values), (B, T), generator=rng)].to(mdtype)
    mask[3] = 0  # an empty row
    mask = mask.to(kernel_device)
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, stats, _ = _compare(run_kernel, t, mask, agg=agg, **FULL)
        # the same numbers as the bool mask, bit for bit
        loss_b, stats_b, _ = _run(run_kernel, t, mask != 0, agg=agg, **FULL)
        assert loss.item() == loss_b.item() or (math.isnan(loss) and math.isnan(loss_b))
        for k in stats:
            assert stats[k].item() == stats_b[k].item(), k


def test_mask_of_twos_token_mean(run_kernel, kernel_device):
    """The issue's case: a mask of 2s is a mask of 1s (token-mean divides by the count)."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=kernel_device)
    for m in (2.0, 0.5, -1.0, float("nan")):
        mask = torch.full((2, 3), m, device=kernel_device)
        mask[1, 2] = 0.0
        got = run_kernel(K.aggregate, x, mask, "token-mean")
        assert got.item() == pytest.approx(15.0 / 5)


# --------------------------------------------------------------------------------------------
# 5. Value clipping: clamp(v, old - c, old + c), strict clipfrac, gradient ties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_clip_is_a_clamp_into_the_band(run_kernel, kernel_device, rng, dtype):
    """At value scale 0.1 inside the band v_clipped is v itself: no rounding tie is counted."""
    B, T = 6, 40
    old = (0.1 * torch.randn(B, T, generator=rng)).to(dtype)
    # Noise bounded well inside the band (0.05 * randn alone exceeds 0.2 on about one draw in 70).
    v = (old.double() + (0.05 * torch.randn(B, T, generator=rng, dtype=torch.float64)).clamp(-0.15, 0.15)).to(dtype)
    R = (0.1 * torch.randn(B, T, generator=rng)).to(dtype)
    t = {"values": v.to(kernel_device), "old_values": old.to(kernel_device), "returns": R.to(kernel_device)}
    mask = torch.ones(B, T, dtype=torch.bool, device=kernel_device)
    _, stats, _ = _compare(run_kernel, t, mask, op="value", grads=("values",), clip=0.2, agg="token-sum")
    assert stats["clipfrac"].item() == 0.0  # |v - old| < 0.2 everywhere


def test_value_clip_ties_and_band_edges(run_kernel, kernel_device, rng):
    """Hand-worked tokens (clip 0.25, exact in binary): on the band edge (closed interval: the
    clamp passes the gradient), outside with an exact tie of the two errors (half the gradient),
    outside with the clipped error larger (0), outside with the unclipped larger (all)."""
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    v = torch.tensor([[0.25, -0.25, 1.0, 1.0, 1.0, 0.125]])
    R = torch.tensor([[1.0, -1.0, 0.625, 2.0, -1.0, 0.125]])
    t = {"values": v.to(kernel_device), "old_values": old.to(kernel_device), "returns": R.to(kernel_device)}
    mask = torch.ones(1, 6, dtype=torch.bool, device=kernel_device)
    loss, stats, g = _compare(run_kernel, t, mask, op="value", grads=("values",), clip=0.25, agg="token-sum")
    # d/dv = upstream (1.75) * [v - R (edge), v - R (edge), 0.5 (v - R) (tie: 0.375^2 both),
    #                           0 (clipped larger), v - R (unclipped larger), 0 (v = R)]
    want = 1.75 * torch.tensor([[-0.75, 0.75, 0.5 * 0.375, 0.0, 2.0, 0.0]])
    assert_close(g["values"].cpu(), want, (1e-6, 1e-6), "hand-worked value gradient")
    assert stats["clipfrac"].item() == pytest.approx(1 / 6)  # only the clipped-larger token


def test_value_clip_with_equal_infinities_and_nans(run_kernel, kernel_device, rng):
    """v = old = +-inf (v - old is NaN; torch.clamp(inf, inf, inf) = inf), v NaN, old NaN."""
    inf, nan = float("inf"), float("nan")
    v = torch.tensor([[inf, -inf, nan, 0.5, 0.5, 0.5]])
    old = torch.tensor([[inf, -inf, 0.0, nan, inf, -inf]])
    R = torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    t = {"values": v.to(kernel_device), "old_values": old.to(kernel_device), "returns": R.to(kernel_device)}
    mask = torch.ones(1, 6, dtype=torch.bool, device=kernel_device)
    _compare(run_kernel, t, mask, op="value", grads=("values",), clip=0.25, agg="token-sum")


# --------------------------------------------------------------------------------------------
# 6. Empty inputs: T = 0 and B = 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (0, 0)])
@pytest.mark.parametrize("agg", AGGS)
def test_empty_inputs_give_zero(run_kernel, kernel_device, rng, shape, agg):
    B, T = shape
    for dtype in (torch.float32, torch.bfloat16):
        t = {n: torch.empty(B, T, dtype=dtype, device=kernel_device) for n in INPUTS}
        mask = torch.empty(B, T, dtype=torch.bool, device=kernel_device)
        for op, kw in (("ppo", dict(FULL, agg=agg)), ("policy", dict(dual_clip=3.0, agg=agg)),
                       ("value", dict(clip=0.2, agg=agg)), ("aggregate", dict(agg=agg))):
            loss, stats, g = _run(run_kernel, t, mask, op=op, **kw)
            assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() == 0.0, (op, agg)
            assert all(s.item() == 0.0 and s.dtype == torch.float32 for s in stats.values()), (op, stats)
            for n, gr in g.items():
                assert gr.shape == (B, T) and gr.dtype == dtype, (op, n)


# --------------------------------------------------------------------------------------------
# Extreme magnitudes: fp32 and bf16 inputs of size 1e4 against the float64 ground truth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_magnitude_1e4(run_kernel, kernel_device, rng, dtype, agg):
    B, T = 5, 13
    t = _inputs(B, T, rng, dtype, kernel_device, scale=1e4)
    mask = random_mask(B, T, rng).to(kernel_device)
    # Terms of 1e4 of either sign can sum to a loss near 0: float32 sums them with an absolute
    # error of a few ulps of the largest term, not of the result (ratio <= 3 with dual clip,
    # importance weights < 2).
    term = lambda x: float(x.detach().double().abs().max())  # noqa: E731
    big = 6 * term(t["advantages"]) + term(t["values"].double() - t["returns"].double()) ** 2 + term(t["entropy"])
    tol = (FWD_TOL[0] + 1e-6 * big, FWD_TOL[1])
    with K.block_sizes(**(TINY if dtype == torch.bfloat16 else {})):
        _compare(run_kernel, t, mask, agg=agg, tol_fwd=tol, **FULL)
        _compare(run_kernel, t, mask, op="policy", grads=("logprobs",), agg=agg, tol_fwd=tol, clip_low=0.2, dual_clip=3.0)
        _compare(run_kernel, t, mask, op="value", grads=("values",), agg=agg, tol_fwd=tol, clip=0.2)


# --------------------------------------------------------------------------------------------
# The GPU build: sm_90 PTX of every data max/min is NaN-propagating (offline, no GPU needed)
# --------------------------------------------------------------------------------------------


def _fwd_signature(dt, mdt):
    sig = {n: "*" + dt for n in ("lp_ptr", "old_ptr", "adv_ptr", "w_ptr", "v_ptr", "oldv_ptr", "ret_ptr", "x_ptr")}
    sig["mask_ptr"] = "*" + mdt
    sig.update({n: "*fp32" for n in ("part_ptr", "row_part_ptr", "row_inv_ptr")})
    sig["ticket_ptr"] = "*i32"
    sig.update({n: "*fp32" for n in ("loss_ptr", "stats_ptr", "scale_ptr")})
    sig.update({n: "i32" for n in ("B", "T", "NCB")})
    sig.update({n: "fp32" for n in ("clip_lo", "clip_hi", "dual_c", "vclip", "vf_coef", "x_coef", "inv_T")})
    return sig


def _bwd_signature(dt, mdt):
    sig = {n: "*" + dt for n in ("lp_ptr", "old_ptr", "adv_ptr", "w_ptr", "v_ptr", "oldv_ptr", "ret_ptr")}
    sig["mask_ptr"] = "*" + mdt
    sig.update({n: "*fp32" for n in ("grad_ptr", "scale_ptr", "row_inv_ptr")})
    sig.update({n: "*" + dt for n in ("dlp_ptr", "dv_ptr", "dx_ptr")})
    sig.update({n: "i32" for n in ("B", "T")})
    sig.update({n: "fp32" for n in ("clip_lo", "clip_hi", "dual_c", "vclip", "vf_coef", "x_coef")})
    return sig


FLAG_NAMES = ("HAS_P", "HAS_W", "DUAL", "HAS_V", "VCLIP", "HAS_X")


def _op_flags():
    """Every (HAS_P, HAS_W, DUAL, HAS_V, VCLIP, HAS_X) the public functions can produce."""
    import itertools

    out = [("policy", (1, w, d, 0, 0, 0)) for w, d in itertools.product((0, 1), (0, 1))]
    out += [("value", (0, 0, 0, 1, c, 0)) for c in (0, 1)]
    out += [("aggregate", (0, 0, 0, 0, 0, 1))]
    out += [("ppo", (1, w, d, 1, c, x)) for w, d, c, x in itertools.product((0, 1), (0, 1), (0, 1), (0, 1))]
    return out


def _compile(fn, sig, consts, num_warps):
    """Compile for sm_90 offline; returns (ptx, registers, spill bytes) from the cubin."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        use = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = int(re.search(r"REG:(\d+)", use).group(1))
    spill = int(re.search(r"STACK:(\d+)", use).group(1)) + int(re.search(r"LOCAL:(\d+)", use).group(1))
    return k.asm["ptx"], regs, spill


def _minmax(ptx):
    return sorted(set(m.group(0) for m in re.finditer(r"\b(max|min)(\.NaN)?(\.xorsign\.abs)?\.f32\b", ptx)))


def _ptx_check():
    """Subprocess body: compile the fullest configurations and print the PTX facts as lines."""
    fwd = dict(zip(FLAG_NAMES, (1, 1, 1, 1, 1, 1)), AGG=2, SPLIT=1, BLOCK_R=16, BLOCK_T=256, BLOCK_P=256, BLOCK_RB=1024)
    bwd = dict(zip(FLAG_NAMES, (1, 1, 1, 1, 1, 1)), AGG=2, BLOCK_R=16, BLOCK_T=256)
    ptx, r, s = _compile(K._ppo_fwd_kernel, _fwd_signature("fp32", "fp32"), fwd, 8)
    # A float mask's `m != 0` (an unordered compare) compiles to an integer test of the bits
    # without the sign: (bits & 0x7fffffff) != 0, so NaN is valid and -0.0 is not.
    mask_test = "setp.neu.f32" in ptx or bool(re.search(r"and\.b32\s+%r\d+, %r\d+, 2147483647;", ptx))
    print(f"fwd|{r}|{s}|{','.join(_minmax(ptx))}|{mask_test}")
    ptx, r, s = _compile(K._ppo_bwd_kernel, _bwd_signature("bf16", "u8"), bwd, 8)
    print(f"bwd|{r}|{s}|{','.join(_minmax(ptx))}|")


def _no_interpreter_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_sm90_ptx_max_min_propagate_nan():
    """Compile the fused forward (float mask) and backward for sm_90; every f32 max/min in the
    PTX is the NaN-propagating form, no spills, and the float mask test `m != 0` keeps NaN valid."""
    pytest.importorskip("triton.backends.compiler")
    out = subprocess.run([sys.executable, __file__, "ptx"], env=_no_interpreter_env(), capture_output=True,
                         text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    facts = {ln.split("|")[0]: ln.split("|")[1:] for ln in out.stdout.splitlines() if "|" in ln}
    print(out.stdout)
    for kind in ("fwd", "bwd"):
        regs, spill, minmax, _ = facts[kind]
        ops = minmax.split(",")
        assert minmax and all(".NaN." in op for op in ops), f"{kind}: non-propagating max/min in the PTX: {ops}"
        assert int(spill) == 0, f"{kind}: {spill} bytes of spills ({regs} registers)"
    assert facts["fwd"][3] == "True", "float mask test is neither setp.neu.f32 nor a sign-less bit test"


if __name__ == "__main__":
    if sys.argv[1:] == ["ptx"]:
        _ptx_check()
    elif sys.argv[1:2] == ["sweep"]:
        # Registers / spills of every flag combination x agg x split the launchers can pick, at
        # the tile shapes named on the command line as R,T,WARPS (default 16,256,8).
        tiles = [tuple(int(x) for x in a.split(",")) for a in sys.argv[2:]] or [(16, 256, 8)]
        for name, flags in _op_flags():
            consts = dict(zip(FLAG_NAMES, flags))
            for agg in range(5):
                for br, bt, nw in tiles:
                    for split in (0, 1):
                        c = dict(consts, AGG=agg, SPLIT=split, BLOCK_R=br, BLOCK_T=bt, BLOCK_P=256, BLOCK_RB=1024)
                        ptx, r, s = _compile(K._ppo_fwd_kernel, _fwd_signature("bf16", "u8"), c, nw)
                        print("fwd", name, *flags, agg, split, br, bt, nw, r, s, ",".join(_minmax(ptx)), flush=True)
                    if agg in (0, 2):  # the backward only distinguishes AGG == 2
                        c = dict(consts, AGG=agg, BLOCK_R=br, BLOCK_T=bt)
                        ptx, r, s = _compile(K._ppo_bwd_kernel, _bwd_signature("bf16", "u8"), c, nw)
                        print("bwd", name, *flags, agg, "-", br, bt, nw, r, s, ",".join(_minmax(ptx)), flush=True)
