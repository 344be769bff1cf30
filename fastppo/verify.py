"""``fastppo verify``: every kernel and every reference against an independent float64 ground truth.

For each op the table holds one row per (implementation, shape, dtype, direction): the maximum
absolute and relative error against ``fastppo.groundtruth`` (a second spelling of DESIGN.md's
formulas, always in float64, sharing no code with ``fastppo.reference``) computed from the same,
already rounded inputs; the tolerance; and PASS/FAIL. Both the Triton kernel (``impl`` triton)
and the PyTorch reference fed the same float32/bf16/fp16 inputs (``impl`` torch, what ``auto``
runs on CPU tensors) are under test: a reference that is wrong in float32 fails here.
Besides random inputs the grid holds extreme ones: logits of magnitude 1e4 with -inf entries,
NaN/inf at every masked position with masks of 2, 0.5, -1 and NaN, and a NaN at a valid position
(which must come out NaN). Without a GPU, kernels run through Triton's interpreter on small shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import secrets
import sys
import time
from typing import Any, Callable

import torch

from . import _dispatch, groundtruth
from .testing import TOL, errors, random_mask, select_ops, triton_version, within

# Forward outputs are float32 and most are sums of a few float32 terms; reductions over many
# tokens (losses, whitening statistics) need headroom for the order of the float32 accumulation.
FWD_TOL = (1e-4, 1e-4)
# kl_penalty is one estimate per token, each computed to ~1 float32 ulp (k3 included: it is
# summed as a series where the formula cancels): relative only, 1e-6 = 8 ulps, which leaves room
# for the float32 rounding of lp - ref that k3 amplifies by |d k3'(d) / k3| (~4 at d = -4).
KL_FWD_TOL = (0.0, 1e-6)


# Ops whose ``auto`` backend on CPU tensors is neither the kernel nor the reference (the chunked
# PyTorch path of linear_logprobs): verify gets an ``auto`` row for them too.
AUTO_HAS_OWN_CPU_PATH = ("linear_logprobs",)


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[torch.Generator, torch.dtype], tuple[tuple, dict]]
    grad: tuple[Any, ...] = ()  # positional indices / keyword names of inputs that get gradients
    fwd_tol: tuple[float, float] = FWD_TOL
    note: str = ""
    # Outputs of the inputs' scale (losses, advantages at 1e4) get 1e-6 of their largest finite
    # magnitude as extra absolute slack: float32 only knows a difference of two 1e4s to ~1e-3.
    scaled: bool = False


@dataclasses.dataclass
class Row:
    op: str
    impl: str
    direction: str
    shape: str
    dtype: str
    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    passed: bool
    note: str = ""


# --------------------------------------------------------------------------------------------
# Input makers
# --------------------------------------------------------------------------------------------


def _randn(shape, gen, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _logits_case(shape, *, masked: bool, temperature: float, strided: bool = False):
    def make(gen, dtype):
        if strided:
            # logits[:, :-1] of a [B, T+1, V] tensor: a non-contiguous view, as trainers pass it.
            full = _randn((shape[0], shape[1] + 1, shape[2]), gen, dtype, scale=4.0)
            logits = full[:, :-1]
        else:
            logits = _randn(shape, gen, dtype, scale=4.0)
        labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        kwargs = {"temperature": temperature, "return_entropy": True}
        if masked:
            flat = random_mask(int(math.prod(shape[:-1])) // shape[-2], shape[-2], gen)
            kwargs["mask"] = flat.reshape(shape[:-1])
        return (logits, labels), kwargs

    return make


def _entropy_case(shape, temperature):
    def make(gen, dtype):
        return (_randn(shape, gen, dtype, scale=4.0),), {"temperature": temperature}

    return make


def _tokens(B, T, gen, dtype, n, scale=1.0):
    return [_randn((B, T), gen, dtype, scale) for _ in range(n)]


def _kl_case(B, T, estimator):
    def make(gen, dtype):
        lp, ref = _tokens(B, T, gen, dtype, 2)
        return (lp - 1.0, ref - 1.0, estimator), {}

    return make


def _shape_rewards_case(B, T, estimator):
    def make(gen, dtype):
        lp, ref = _tokens(B, T, gen, dtype, 2)
        scores = _randn((B,), gen, dtype)
        return (scores, lp, ref, random_mask(B, T, gen)), {"kl_coef": 0.05, "estimator": estimator}

    return make


def _gae_case(B, T, gamma, lam, whiten):
    def make(gen, dtype):
        r, v = _tokens(B, T, gen, dtype, 2)
        return (r, v, random_mask(B, T, gen)), {"gamma": gamma, "lam": lam, "whiten": whiten}

    return make


def _group_case(B, T, K, estimator):
    def make(gen, dtype):
        return (_randn((B,), gen, dtype), K, random_mask(B, T, gen)), {"estimator": estimator}

    return make


def _reinforce_pp_case(B, T, gamma):
    def make(gen, dtype):
        return (_randn((B, T), gen, dtype), random_mask(B, T, gen)), {"gamma": gamma}

    return make


def _whiten_case(B, T, shift_mean):
    def make(gen, dtype):
        x = _randn((B, T), gen, dtype, 3.0) + 1.5
        return (x, random_mask(B, T, gen)), {"shift_mean": shift_mean}

    return make


def _advantages_case(B, T):
    def make(gen, dtype):
        lp, ref, v = _tokens(B, T, gen, dtype, 3)
        scores = _randn((B,), gen, dtype)
        kwargs = {"kl_coef": 0.05, "estimator": "k3", "gamma": 0.99, "lam": 0.95, "whiten": True}
        return (scores, lp, ref, v, random_mask(B, T, gen)), kwargs

    return make


def _policy_case(B, T, agg, dual):
    def make(gen, dtype):
        old = _randn((B, T), gen, dtype) - 2.0
        lp = (old.float() + 0.3 * torch.randn(B, T, generator=gen)).to(dtype)
        adv = _randn((B, T), gen, dtype)
        kwargs = {"agg": agg}
        if dual:
            kwargs.update(clip_low=0.2, clip_high=0.28, dual_clip=3.0, is_weights=torch.rand(B, T, generator=gen).to(dtype))
        return (lp, old, adv, random_mask(B, T, gen)), kwargs

    return make


# The token-level objectives of verl 0.9.1 (fastppo.policy_objectives) and options that make
# every trust region / clip trigger on some tokens.
TOKEN_OBJECTIVES = {
    "dppo_tv_loss": dict(clip_low=0.05, clip_high=0.1, clip_ratio_c=1.5),
    "dppo_kl_loss": dict(clip_low=0.01, clip_high=0.02, clip_ratio_c=1.5),
    "sapo_loss": dict(tau_pos=1.0, tau_neg=1.05),
    "gpg_loss": {},
    "cispo_loss": dict(clip_low=0.1, clip_high=0.28),
    "dro_loss": dict(beta=0.1),
}


def _objective_case(B, T, op, agg, extreme=False):
    def make(gen, dtype):
        # Log-probs of probabilities (<= 0), the old ones 0.6 nats around them.
        old = -torch.rand(B, T, generator=gen) * 3.0
        lp = (old + 0.6 * torch.randn(B, T, generator=gen)).clamp(max=-1e-3)
        adv = torch.randn(B, T, generator=gen)
        mask = random_mask(B, T, gen)
        w = torch.rand(B, T, generator=gen) + 0.5
        if extreme:
            # 1e4 magnitudes at valid tokens, NaN / inf garbage at masked ones.
            lp, old, adv = lp * 1e4, old * 1e4, adv * 1e4
            lp, old, adv, w = (_poisoned(mask, x, gen) for x in (lp, old, adv, w))
        kwargs = dict(agg=agg, is_weights=w.to(dtype), **TOKEN_OBJECTIVES[op])
        return (lp.to(dtype), old.to(dtype), adv.to(dtype), mask), kwargs

    return make


def _seq_policy_case(B, T, agg, weights):
    # gspo_loss / geo_mean_loss: the sequence-level ratio is a row reduction first.
    def make(gen, dtype):
        (lp, old, adv, mask), kwargs = _policy_case(B, T, agg, False)(gen, dtype)
        kwargs.update(clip_low=0.2, clip_high=0.28)
        if weights:
            kwargs["is_weights"] = (0.5 + torch.rand(B, T, generator=gen)).to(dtype)
        return (lp, old, adv, mask), kwargs

    return make


def _value_case(B, T, agg, clip):
    def make(gen, dtype):
        old = _randn((B, T), gen, dtype)
        v = (old.float() + 0.3 * torch.randn(B, T, generator=gen)).to(dtype)
        R = _randn((B, T), gen, dtype)
        return (v, old, R, random_mask(B, T, gen)), {"clip": clip, "agg": agg}

    return make


def _ppo_case(B, T, agg):
    def make(gen, dtype):
        old = _randn((B, T), gen, dtype) - 2.0
        lp = (old.float() + 0.3 * torch.randn(B, T, generator=gen)).to(dtype)
        adv, old_v, R = _tokens(B, T, gen, dtype, 3)
        v = (old_v.float() + 0.3 * torch.randn(B, T, generator=gen)).to(dtype)
        ent = (torch.rand(B, T, generator=gen) * 3).to(dtype)
        kwargs = {"entropy": ent, "dual_clip": 3.0, "ent_coef": 0.01, "agg": agg}
        return (lp, old, adv, v, old_v, R, random_mask(B, T, gen)), kwargs

    return make


def _aggregate_case(B, T, agg):
    def make(gen, dtype):
        return (_randn((B, T), gen, dtype), random_mask(B, T, gen), agg), {}

    return make


_POISON = (float("nan"), float("inf"), float("-inf"), 1e38)
_MASK_VALUES = (2.0, 0.5, -1.0, float("nan"))


def _poisoned(mask: torch.Tensor, x: torch.Tensor, gen) -> torch.Tensor:
    """x with every masked position replaced by NaN, +-inf or 1e38."""
    bad = torch.tensor(_POISON)[torch.randint(0, len(_POISON), x.shape, generator=gen)]
    return torch.where(mask, x.float(), bad).to(x.dtype)


def _odd_mask(mask: torch.Tensor, gen) -> torch.Tensor:
    """The same valid positions marked by 2, 0.5, -1 or NaN (mask != 0 is the rule)."""
    values = torch.tensor(_MASK_VALUES)[torch.randint(0, len(_MASK_VALUES), mask.shape, generator=gen)]
    return torch.where(mask, values, 0.0)


def _extreme_logits_case(shape):
    """Logits of magnitude 1e4 with a -inf entry per row; masked rows full of NaN; one NaN at a
    valid row (its outputs must be NaN)."""

    def make(gen, dtype):
        B, T, V = shape
        logits = torch.randn(shape, generator=gen) * 1e4
        logits[..., 1] = float("-inf")
        mask = random_mask(B, T, gen)
        logits = torch.where(mask.unsqueeze(-1), logits, float("nan"))
        b, t = mask.nonzero()[0].tolist()
        logits[b, t, 2] = float("nan")
        labels = torch.where(mask, torch.randint(0, V, (B, T), generator=gen), -100)
        return (logits.to(dtype), labels), {"temperature": 0.7, "return_entropy": True, "mask": _odd_mask(mask, gen)}

    return make


def _poisoned_ppo_case(B, T):
    """Every masked position of every input is NaN/inf/1e38, the mask is 2/0.5/-1/NaN, and the
    inputs are of magnitude 1e4: nothing may leak into the loss, the statistics or the gradients."""

    def make(gen, dtype):
        mask = random_mask(B, T, gen)
        old = torch.randn(B, T, generator=gen) * 1e4
        lp = old + 0.3 * torch.randn(B, T, generator=gen)
        adv, old_v, R = (torch.randn(B, T, generator=gen) * 1e4 for _ in range(3))
        v = old_v + 0.3 * 1e4 * torch.randn(B, T, generator=gen)
        ent = torch.rand(B, T, generator=gen) * 3
        w = torch.rand(B, T, generator=gen)
        lp, old, adv, v, old_v, R, ent, w = (_poisoned(mask, x.to(dtype), gen) for x in (lp, old, adv, v, old_v, R, ent, w))
        kwargs = {"entropy": ent, "dual_clip": 3.0, "ent_coef": 0.01, "value_clip": 2000.0, "is_weights": w, "agg": "seq-mean-token-mean"}
        return (lp, old, adv, v, old_v, R, _odd_mask(mask, gen)), kwargs

    return make


def _poisoned_advantages_case(B, T):
    def make(gen, dtype):
        mask = random_mask(B, T, gen)
        lp, ref, v = (_poisoned(mask, (torch.randn(B, T, generator=gen) * 1e4).to(dtype), gen) for _ in range(3))
        scores = torch.where(mask.any(dim=1), torch.randn(B, generator=gen), float("nan")).to(dtype)
        kwargs = {"kl_coef": 0.05, "estimator": "k1", "gamma": 0.99, "lam": 0.95, "whiten": True}
        return (scores, lp, ref, v, _odd_mask(mask, gen)), kwargs

    return make


def _nan_policy_case(B, T):
    """A NaN advantage at one valid token: the loss must be NaN, not a finite number."""

    def make(gen, dtype):
        args, kwargs = _policy_case(B, T, "token-mean", False)(gen, dtype)
        lp, old, adv, mask = args
        b, t = mask.nonzero()[0].tolist()
        adv = adv.clone()
        adv[b, t] = float("nan")
        return (lp, old, adv, mask), kwargs

    return make


def _linear_case(N, H, V, *, bias, masked, temperature, chunk_size):
    def make(gen, dtype):
        hidden = _randn((N, H), gen, dtype)
        weight = _randn((V, H), gen, dtype, scale=1.0 / math.sqrt(H) * 2.0)
        labels = torch.randint(0, V, (N,), generator=gen)
        kwargs = {"temperature": temperature, "return_entropy": True, "chunk_size": chunk_size}
        if bias:
            kwargs["bias"] = _randn((V,), gen, dtype)
        if masked:
            kwargs["mask"] = random_mask(N // 8, 8, gen).reshape(N)
        return (hidden, weight, labels), kwargs

    return make


def _linear_cases(large: bool) -> list[Case]:
    if large:
        shapes = [(4096, 896, 151936, True, True, 0.7, None), (16384, 4096, 32000, False, False, 1.0, None)]
    else:
        # Chunks that do not divide V, so every call folds several chunks, the last one partial.
        shapes = [(40, 33, 517, True, True, 0.7, 100), (24, 16, 203, False, False, 1.0, 64)]
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for N, H, V, bias, masked, temp, chunk in shapes:
            desc = f"N={N} H={H} V={V}" + (" bias" if bias else "") + (" masked" if masked else "") + f" T={temp}"
            grad = (0, 1, "bias") if bias else (0, 1)
            make = _linear_case(N, H, V, bias=bias, masked=masked, temperature=temp, chunk_size=chunk)
            cases.append(Case("linear_logprobs", desc, dtype, make, grad=grad))
    return cases


def build_cases(large: bool) -> list[Case]:
    """The verification grid: GPU-sized shapes when ``large``, interpreter-sized otherwise."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    if large:
        logit_shapes = [((4096, 32000), False, 1.0, False), ((2, 512, 151936), True, 0.7, True)]
        B, T = 512, 4096
        long_rows = (8, 32768)
    else:
        logit_shapes = [((33, 1000), False, 1.0, False), ((3, 5, 257), True, 0.7, True), ((1, 1, 1), False, 1.0, False)]
        B, T = 6, 37
        long_rows = (2, 300)
    cases: list[Case] = []
    for dtype in dtypes:
        for shape, masked, temp, strided in logit_shapes:
            desc = "x".join(map(str, shape)) + (" masked" if masked else "") + (" strided" if strided else "")
            cases.append(
                Case("logprobs_from_logits", desc + f" T={temp}", dtype, _logits_case(shape, masked=masked, temperature=temp, strided=strided), grad=(0,))
            )
        shape = logit_shapes[0][0]
        cases.append(Case("entropy_from_logits", "x".join(map(str, shape)), dtype, _entropy_case(shape, 1.3), grad=(0,)))
    for dtype in (torch.float32, torch.bfloat16):
        for est in ("k1", "abs", "k2", "k3"):
            cases.append(Case("kl_penalty", f"{B}x{T} {est}", dtype, _kl_case(B, T, est), fwd_tol=KL_FWD_TOL))
        cases.append(Case("shape_rewards", f"{B}x{T} k3", dtype, _shape_rewards_case(B, T, "k3")))
        cases.append(Case("masked_whiten", f"{B}x{T}", dtype, _whiten_case(B, T, True)))
        cases.append(Case("masked_whiten", f"{B}x{T} keep mean", dtype, _whiten_case(B, T, False)))
        cases.append(Case("compute_advantages", f"{B}x{T}", dtype, _advantages_case(B, T)))
        for agg in ("token-mean", "seq-mean-token-sum-norm"):
            cases.append(Case("policy_loss", f"{B}x{T} {agg}", dtype, _policy_case(B, T, agg, False), grad=(0,)))
            cases.append(Case("policy_loss", f"{B}x{T} {agg} dual+w", dtype, _policy_case(B, T, agg, True), grad=(0,)))
            cases.append(Case("value_loss", f"{B}x{T} {agg}", dtype, _value_case(B, T, agg, 0.2), grad=(0,)))
            cases.append(Case("ppo_loss", f"{B}x{T} {agg}", dtype, _ppo_case(B, T, agg), grad=(0, 3, "entropy")))
        for agg in ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            cases.append(Case("aggregate", f"{B}x{T} {agg}", dtype, _aggregate_case(B, T, agg), grad=(0,)))
        for op in ("gspo_loss", "geo_mean_loss"):
            for agg, w in (("seq-mean-token-mean", False), ("token-mean", True)):
                cases.append(Case(op, f"{B}x{T} {agg}{' w' if w else ''}", dtype, _seq_policy_case(B, T, agg, w), grad=(0,)))
    # Extreme inputs (see the module docstring).
    ext_logits = (4, 128, 32000) if large else (3, 5, 101)
    for dtype in (torch.float32, torch.bfloat16):
        desc = "x".join(map(str, ext_logits)) + " 1e4 -inf NaN"
        cases.append(Case("logprobs_from_logits", desc, dtype, _extreme_logits_case(ext_logits), grad=(0,), note="extreme"))
        cases.append(Case("ppo_loss", f"{B}x{T} 1e4 poisoned", dtype, _poisoned_ppo_case(B, T), grad=(0, 3, "entropy"), note="extreme", scaled=True))
        cases.append(Case("compute_advantages", f"{B}x{T} 1e4 poisoned", dtype, _poisoned_advantages_case(B, T), note="extreme", scaled=True))
        cases.append(Case("policy_loss", f"{B}x{T} NaN at a valid token", dtype, _nan_policy_case(B, T), grad=(0,), note="extreme"))
    for dtype in (torch.float32, torch.bfloat16):
        for op in TOKEN_OBJECTIVES:
            for agg in ("token-mean", "seq-mean-token-mean"):
                cases.append(Case(op, f"{B}x{T} {agg}", dtype, _objective_case(B, T, op, agg), grad=(0,)))
            cases.append(Case(op, f"{B}x{T} 1e4 poisoned", dtype, _objective_case(B, T, op, "seq-mean-token-sum", True),
                              grad=(0,), note="extreme", scaled=True))
    cases += _linear_cases(large)
    for est in ("grpo", "dr_grpo", "rloo", "grpo_passk", "opo", "gpg"):
        cases.append(Case("group_advantages", f"{B}x{T} K=2 {est}", torch.float32, _group_case(B, T, 2, est)))
    cases.append(Case("reinforce_pp_advantages", f"{B}x{T} g=0.99", torch.float32, _reinforce_pp_case(B, T, 0.99)))
    # GAE in float32 only: its inputs are usually float32, and its long scans are the point.
    for b, t in ((B, T), long_rows):
        for gamma, lam, whiten in ((1.0, 0.95, False), (0.99, 1.0, True), (0.9, 0.0, False)):
            cases.append(Case("gae", f"{b}x{t} g={gamma} l={lam}{' whiten' if whiten else ''}", torch.float32, _gae_case(b, t, gamma, lam, whiten)))
    return cases


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


def _flatten(out, prefix="out") -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):
        return [(f"{prefix}.{k}", v) for k, v in out.items()]
    items: list[tuple[str, torch.Tensor]] = []
    for i, o in enumerate(out):
        items += _flatten(o, f"{prefix}[{i}]")
    return items


def _to(args, kwargs, device, dtype=None):
    def conv(x):
        if isinstance(x, torch.Tensor):
            x = x.to(device)
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
        return x

    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


def _leaves(args, kwargs, grad):
    return [args[g] if isinstance(g, int) else kwargs[g] for g in grad]


def _errors_ok(got, want, tol, scaled) -> tuple[float, float, bool]:
    # The contract's outputs are float32: compare with the ground truth rounded to float32 (a
    # true 1e100 *is* inf there).
    want = want.detach().float() if got.dtype == torch.float32 else want.detach()
    if scaled:
        finite = want[torch.isfinite(want)]
        tol = (tol[0] + 1e-6 * (finite.abs().max().item() if finite.numel() else 0.0), tol[1])
    a, r = errors(got, want)
    return a, r, bool(within(got, want, tol).all())


def run_case(case: Case, device: str, gen: torch.Generator) -> list[Row]:
    """Rows for the Triton kernel (where the op has one) and the reference, both fed the case's
    inputs, against the float64 ground truth of the very same inputs."""
    import fastppo

    args, kwargs = case.make(gen, case.dtype)
    args, kwargs = _to(args, kwargs, device)
    truth_args, truth_kwargs = _to(args, kwargs, device, torch.float64)
    for x in _leaves(truth_args, truth_kwargs, case.grad):
        x.requires_grad_(True)
    want = getattr(groundtruth, case.op)(*truth_args, **truth_kwargs)
    want_items = _flatten(want)
    cotangents = [torch.randn(w.shape, generator=gen, dtype=torch.float64).to(device) for _, w in want_items if w.requires_grad]
    want_grads = ()
    if case.grad:
        want_grads = torch.autograd.grad(
            [w for _, w in want_items if w.requires_grad], _leaves(truth_args, truth_kwargs, case.grad), cotangents, allow_unused=True
        )

    impls = (["triton"] if _dispatch.has_kernel(case.op) else []) + ["torch"]
    if case.op in AUTO_HAS_OWN_CPU_PATH and device == "cpu":
        impls.append("auto")
    dtype_name = str(case.dtype).replace("torch.", "")
    rows = []
    for impl in impls:
        run_args, run_kwargs = _to(args, kwargs, device)
        run_args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in run_args)
        run_kwargs = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in run_kwargs.items()}
        leaves = _leaves(run_args, run_kwargs, case.grad)
        for x in leaves:
            x.requires_grad_(True)
        with fastppo.use_backend(impl):
            got = getattr(fastppo, case.op)(*run_args, **run_kwargs)
        got_items = _flatten(got)
        worst_abs, worst_rel, ok = 0.0, 0.0, True
        for (_, g), (_, w) in zip(got_items, want_items):
            a, r, fine = _errors_ok(g, w, case.fwd_tol, case.scaled)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
            ok = ok and fine and g.dtype in (torch.float32, torch.float64) and g.requires_grad == w.requires_grad
        rows.append(Row(case.op, impl, "fwd", case.shape, dtype_name, worst_abs, worst_rel, *case.fwd_tol, ok, case.note))
        if not case.grad:
            continue
        outs = [g for (_, g), (_, w) in zip(got_items, want_items) if w.requires_grad]
        if not all(o.requires_grad for o in outs):
            rows.append(Row(case.op, impl, "bwd", case.shape, dtype_name, math.inf, math.inf, *TOL[case.dtype], False, "no gradient"))
            continue
        got_grads = torch.autograd.grad(outs, leaves, [c.to(o.dtype) for c, o in zip(cotangents, outs)], allow_unused=True)
        tol = TOL[case.dtype]
        worst_abs, worst_rel, ok = 0.0, 0.0, True
        for leaf, g, w in zip(leaves, got_grads, want_grads):
            g = torch.zeros_like(leaf) if g is None else g
            w = torch.zeros_like(leaf, dtype=torch.float64) if w is None else w
            a, r, fine = _errors_ok(g, w, tol, case.scaled)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
            ok = ok and fine and g.dtype == leaf.dtype
        rows.append(Row(case.op, impl, "bwd", case.shape, dtype_name, worst_abs, worst_rel, *tol, ok, case.note))
    return rows


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _fmt_row(row: Row) -> str:
    status = "PASS" if row.passed else "FAIL"
    return (
        f"{row.op:<22} {row.impl:<9} {row.direction:<3} {row.shape:<40} {row.dtype:<8} "
        f"{row.max_abs_err:>10.2e} {row.max_rel_err:>10.2e} {row.atol:>8.0e}/{row.rtol:<6.0e} {status}"
    )


def main(args) -> int:
    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu and not _dispatch.interpreter_enabled():
        if "triton" in sys.modules:
            print("warning: triton was imported before the interpreter could be enabled", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cuda" if on_gpu else "cpu"
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    gen = torch.Generator().manual_seed(seed)
    cases = build_cases(large=on_gpu and not args.small)
    try:
        cases = select_ops(cases, args.ops)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kernels = sorted(_dispatch.kernel_ops())
    if on_gpu:
        print(f"fastppo verify on {torch.cuda.get_device_name()} (native Triton), seed {seed}")
    else:
        print(
            f"fastppo verify on CPU, seed {seed}: no GPU, so kernels run through Triton's interpreter "
            "(TRITON_INTERPRET=1) on small shapes"
        )
    print(f"ops with a Triton kernel: {', '.join(kernels) if kernels else 'none yet (references only)'}")
    header = (
        f"{'op':<22} {'impl':<9} {'dir':<3} {'shape':<40} {'dtype':<8} {'max abs':>10} {'max rel':>10} "
        f"{'atol/rtol':>15} result"
    )
    print(header)
    print("-" * len(header))
    rows: list[Row] = []
    start = time.perf_counter()
    for case in cases:
        try:
            new_rows = run_case(case, device, gen)
        except Exception as exc:  # a crash is a failure of that case, reported, not a traceback
            new_rows = [Row(case.op, "?", "fwd", case.shape, str(case.dtype).replace("torch.", ""), math.inf, math.inf, *case.fwd_tol, False, f"{type(exc).__name__}: {exc}")]
        for row in new_rows:
            print(_fmt_row(row) + (f"  ({row.note})" if row.note and not row.passed else ""), flush=True)
        rows += new_rows
    failed = [r for r in rows if not r.passed]
    elapsed = time.perf_counter() - start
    print("-" * len(header))
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed in {elapsed:.1f} s")
    if args.json:
        payload = {
            "command": "fastppo verify",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": torch.cuda.get_device_name() if on_gpu else f"cpu ({platform.processor() or platform.machine()}), Triton interpreter",
            "torch": torch.__version__,
            "triton": triton_version(),
            "seed": seed,
            "rows": [dataclasses.asdict(r) for r in rows],
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
        print(f"wrote {args.json}")
    return 1 if failed else 0

