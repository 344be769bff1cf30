"""Every op, on both backends, against the independent float64 ground truth (fastppo.groundtruth).

The inputs are float32 or bfloat16; the ground truth is computed in float64 from those very
(already rounded) inputs by code that shares nothing with ``fastppo.reference``, so a reference
that is wrong in float32 fails here (a comparison of the reference with itself in float64 cannot
see that). Scenarios:

* ``random``:  ordinary magnitudes, bool masks with empty, left- and right-padded rows;
* ``extreme``: inputs of magnitude 1e4 (logits with -inf entries as well);
* ``poison``:  every masked position of every input holds NaN, +-inf or 1e38, and the mask is a
               float tensor of 2, 0.5, -1, NaN (all valid: mask != 0) and 0;
* ``nan``:     one valid position holds NaN: it must come out as NaN (NaN in, NaN out), never as
               a number, and must not spread into the rows it does not belong to.

Triton runs through the interpreter here (natively on a GPU), with outputs poisoned with NaN; the
sizes are small for that reason. Forward tolerance: 1e-4 absolute and relative, plus 1e-6 of the
output's largest finite magnitude for the ops whose outputs have the inputs' scale (a float32
difference of two numbers of 1e4 is only known to ~1e-3); log-probs and entropy get no such slack.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo import groundtruth as gt
from fastppo.testing import TOL, random_mask, within

BACKENDS = ("torch", "triton")
DTYPES = (torch.float32, torch.bfloat16)
SCENARIOS = ("random", "extreme", "poison", "nan")
B, T, V = 5, 9, 37
POISON = (float("nan"), float("inf"), float("-inf"), 1e38)
MASK_VALUES = (2.0, 0.5, -1.0, float("nan"))


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class Inputs:
    def __init__(self, scenario: str, dtype: torch.dtype, gen: torch.Generator, T: int = T):
        self.scenario, self.dtype, self.gen, self.T = scenario, dtype, gen, T
        self.scale = 1e4 if scenario == "extreme" else 1.0
        self.bool_mask = random_mask(B, T, gen)
        self.shape = (B, T)
        self.nan_at = None
        if scenario == "nan":
            rows = self.bool_mask.any(dim=1).nonzero().flatten()
            b = int(rows[0])
            t = int(self.bool_mask[b].nonzero().flatten()[-1])
            self.nan_at = (b, t)

    @property
    def mask(self) -> torch.Tensor:
        if self.scenario != "poison":
            return self.bool_mask
        values = torch.tensor(MASK_VALUES)[torch.randint(0, len(MASK_VALUES), self.shape, generator=self.gen)]
        return torch.where(self.bool_mask, values, 0.0)

    def tokens(self, shift: float = 0.0, *, poison: bool = True) -> torch.Tensor:
        x = torch.randn(self.shape, generator=self.gen) * self.scale + shift
        if self.scenario == "poison" and poison:
            bad = torch.tensor(POISON)[torch.randint(0, len(POISON), self.shape, generator=self.gen)]
            x = torch.where(self.bool_mask, x, bad)
        return x.to(self.dtype)

    def scores(self) -> torch.Tensor:
        x = torch.randn(self.shape[0], generator=self.gen) * self.scale
        if self.scenario == "poison":  # a row with no valid token gets no score, whatever it is
            x = torch.where(self.bool_mask.any(dim=1), x, float("nan"))
        return x.to(self.dtype)

    def with_nan(self, x: torch.Tensor) -> torch.Tensor:
        if self.nan_at is not None:
            x = x.clone()
            x[self.nan_at] = float("nan")
        return x

    def with_nan_score(self, s: torch.Tensor) -> torch.Tensor:
        if self.nan_at is not None:
            s = s.clone()
            s[self.nan_at[0]] = float("nan")
        return s

    def logits(self) -> torch.Tensor:
        x = torch.randn(*self.shape, V, generator=self.gen) * (self.scale if self.scenario == "extreme" else 4.0)
        if self.scenario == "extreme":
            x[..., 3] = float("-inf")  # a -inf entry in every row (never the whole row)
        if self.scenario == "poison":
            x = torch.where(self.bool_mask.unsqueeze(-1), x, float("nan"))
        if self.nan_at is not None:
            x[self.nan_at + (5,)] = float("nan")
        return x.to(self.dtype)


def away_from_band_edge(old: torch.Tensor, step: torch.Tensor, clip: float, dtype) -> torch.Tensor:
    """old + step rounded to ``dtype``, nudged where |v - old| lands within a few ulps of the clip
    band's edge: at 1e4 the float32 grid (spacing 1e-3) puts v - old at the edge itself, where
    old +- clip rounded in float32 and in float64 disagree on whether the value was clipped."""
    v = (old.float() + step).to(dtype)
    eps = torch.finfo(dtype).eps
    for _ in range(10):
        gap = ((v.double() - old.double()).abs() - clip).abs()
        near = gap < 8 * eps * (old.double().abs() + v.double().abs()) + 1e-6
        if not bool(near.any()):
            break
        v = torch.where(near, (v.double() + 0.05 * max(1.0, clip)).to(dtype), v)
    return v


def make_case(op: str, inp: Inputs):
    """(args, kwargs, names of the inputs that get gradients) for ``op``."""
    m = inp.mask
    if op == "logprobs_from_logits":
        labels = torch.randint(0, V, inp.shape, generator=inp.gen)
        if inp.scenario == "poison":
            labels = torch.where(inp.bool_mask, labels, -100)  # masked labels are ignored
        return [inp.logits(), labels], {"temperature": 0.7, "return_entropy": True, "mask": m}, [0]
    if op == "entropy_from_logits":
        logits = inp.logits()
        if inp.scenario == "poison":  # no mask: every row is valid
            logits = torch.nan_to_num(logits.float(), nan=1.0).to(inp.dtype)
        return [logits], {"temperature": 1.3}, [0]
    if op == "kl_penalty":
        lp = inp.with_nan(inp.tokens(-1.0, poison=False))
        return [lp, inp.tokens(-1.0, poison=False), "k3"], {"clamp": 10.0}, [0, 1]
    if op == "shape_rewards":
        return [inp.scores(), inp.with_nan(inp.tokens(-1.0)), inp.tokens(-1.0), m], {"kl_coef": 0.05, "estimator": "k2"}, []
    if op == "gae":
        return [inp.with_nan(inp.tokens()), inp.tokens(), m], {"gamma": 0.99, "lam": 0.95}, []
    if op == "masked_whiten":
        return [inp.with_nan(inp.tokens(1.5)), m], {}, []
    if op == "compute_advantages":
        lp, ref = inp.tokens(-1.0), inp.tokens(-1.0)
        # k3 = e^r - r - 1 (r = ref - lp) overflows float32 from r = 88.7, while the reward
        # -0.05 * k3 stays finite up to r = 91.7: the float32 contract cannot hold that window
        # (float64 keeps a finite reward; float32 already has k3 = inf), so 1e4-scale draws skip it.
        r = ref.double() - lp.double()
        ref = torch.where((r > 88.0) & (r < 93.0), (ref.double() + 300.0).to(ref.dtype), ref)
        args = [inp.scores(), lp, ref, inp.with_nan(inp.tokens()), m]
        return args, {"kl_coef": 0.05, "estimator": "k3", "gamma": 0.99, "lam": 0.95, "whiten": True}, []
    if op == "policy_loss":
        old = inp.tokens(-2.0)
        lp = (old.float() + 0.3 * torch.randn(inp.shape, generator=inp.gen)).to(inp.dtype)
        kwargs = {"clip_high": 0.28, "dual_clip": 3.0, "is_weights": inp.tokens(1.0).abs(), "agg": "seq-mean-token-mean"}
        return [lp, old, inp.with_nan(inp.tokens()), m], kwargs, [0]
    if op == "value_loss":
        old = inp.tokens()
        v = away_from_band_edge(old, 0.3 * inp.scale * torch.randn(inp.shape, generator=inp.gen), 0.2 * inp.scale, inp.dtype)
        return [v, old, inp.with_nan(inp.tokens()), m], {"clip": 0.2 * inp.scale, "agg": "token-mean"}, [0]
    if op == "aggregate":
        return [inp.with_nan(inp.tokens()), m, "seq-mean-token-sum-norm"], {}, [0]
    if op == "ppo_loss":
        old = inp.tokens(-2.0)
        lp = (old.float() + 0.3 * torch.randn(inp.shape, generator=inp.gen)).to(inp.dtype)
        old_v = inp.tokens()
        v = away_from_band_edge(old_v, 0.3 * torch.randn(inp.shape, generator=inp.gen), 0.2, inp.dtype)
        kwargs = {"entropy": inp.tokens(2.0).abs(), "dual_clip": 3.0, "ent_coef": 0.01, "agg": "token-mean"}
        return [lp, old, inp.with_nan(inp.tokens()), v, old_v, inp.tokens(), m], kwargs, [0, 3, "entropy"]
    if op == "group_advantages":  # B = 5: one group of five (rows with no valid token are no members)
        return [inp.with_nan_score(inp.scores()), 5, m], {"estimator": "grpo", "eps": 1e-4}, []
    if op == "reinforce_pp_advantages":
        return [inp.with_nan(inp.tokens()), m], {"gamma": 0.99}, []
    raise AssertionError(op)


OPS = (
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_penalty",
    "shape_rewards",
    "gae",
    "masked_whiten",
    "compute_advantages",
    "policy_loss",
    "value_loss",
    "aggregate",
    "ppo_loss",
    "group_advantages",
    "reinforce_pp_advantages",
)
# Ops whose outputs carry the inputs' scale (see the module docstring).
SCALED = {"reinforce_pp_advantages", "kl_penalty", "shape_rewards", "gae", "compute_advantages", "policy_loss", "value_loss", "aggregate", "ppo_loss"}


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def flatten(out, prefix="out"):
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):
        return [(f"{prefix}.{k}", v) for k, v in out.items()]
    return [item for i, o in enumerate(out) for item in flatten(o, f"{prefix}[{i}]")]


def largest_term(op, args, kwargs) -> float:
    """The largest per-token term a loss op sums (finite inputs only). A mean of terms of 1e8 of
    either sign can be near 0, and float32 knows it only to a few ulps of the terms, not of it."""
    def big(x):
        x = x.detach().double()
        x = x[torch.isfinite(x)]
        return float(x.abs().max()) if x.numel() else 0.0

    if op == "policy_loss":
        return 3.0 * big(args[2]) * max(1.0, big(kwargs["is_weights"]))
    if op == "value_loss":
        return (big(args[0].double() - args[2].double()) + kwargs["clip"]) ** 2
    if op == "ppo_loss":
        return 3.0 * big(args[2]) + (big(args[3].double() - args[5].double()) + 0.2) ** 2 + big(kwargs["entropy"])
    if op == "aggregate":
        return big(args[0])
    return 0.0


def check(name, got, want, tol, scaled, tie_halves=False, term=0.0):
    # Rounded to the contract's float32 output first: a true value of 1e100 *is* inf in float32.
    want = want.detach().float().double().cpu() if got.dtype == torch.float32 else want.detach().double().cpu()
    got = got.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    atol, rtol = tol
    if scaled:
        finite = want[torch.isfinite(want)]
        atol += 1e-6 * max(finite.abs().max().item() if finite.numel() else 0.0, term)
    ok = within(got, want, (atol, rtol))
    if tie_halves:
        # At 1e4 the two squared value errors (each ~1e8, float32 spacing ~8) can round to the same
        # float32 number where float64 still tells them apart: the max then splits the gradient in
        # half, as torch.maximum does, and the float64 truth cannot reproduce that rounding tie.
        ok |= within(2 * got, want, (atol, rtol))
    if not bool(ok.all()):
        idx = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {ok.numel()} elements off; first at {list(idx)}: "
            f"got {got[idx].item()!r}, ground truth {want[idx].item()!r} (atol={atol:.2e}, rtol={rtol})"
        )


def upcast(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double().requires_grad_(x.requires_grad)
    return x


def leaves(args, kwargs, names):
    return [args[n] if isinstance(n, int) else kwargs[n] for n in names]


def run_against_ground_truth(op, backend, dtype, scenario, gen):
    inp = Inputs(scenario, dtype, gen)
    args, kwargs, grad_names = make_case(op, inp)
    # The ground truth sees the same rounded inputs, upcast to float64 (integers and masks as they are).
    # (A float mask upcast to float64 keeps its values, NaN included: it means the same to both.)
    for x in leaves(args, kwargs, grad_names):
        x.requires_grad_(True)
    gt_args = [upcast(a) for a in args]
    gt_kwargs = {k: upcast(v) for k, v in kwargs.items()}
    want = getattr(gt, op)(*gt_args, **gt_kwargs)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = lambda x: x.detach().to(device).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x  # noqa: E731
    run_args = [dev(a) for a in args]
    run_kwargs = {k: dev(v) for k, v in kwargs.items()}
    with fastppo.use_backend(backend):
        if backend == "triton":
            from fastppo.kernels._common import poisoned_outputs

            with poisoned_outputs():
                got = getattr(fastppo, op)(*run_args, **run_kwargs)
        else:
            got = getattr(fastppo, op)(*run_args, **run_kwargs)

    got_items, want_items = flatten(got), flatten(want)
    assert [n for n, _ in got_items] == [n for n, _ in want_items]
    fwd_tol = (1e-4, 1e-4)
    term = largest_term(op, args, kwargs)
    for (name, g), (_, w) in zip(got_items, want_items):
        assert g.dtype == torch.float32, f"{name} is {g.dtype}, the contract says float32"
        check(f"{op} {name}", g, w, fwd_tol, op in SCALED, term=term if name in ("out", "out[0]") or name.endswith("_loss") else 0.0)  # losses, not fractions

    if not grad_names:
        for name, g in got_items:
            assert not g.requires_grad, f"{op} {name}: rollout ops return tensors without gradient"
        return
    for (name, g), (_, w) in zip(got_items, want_items):
        assert g.requires_grad == w.requires_grad, f"{op} {name}: requires_grad {g.requires_grad}, the contract says {w.requires_grad}"
    diff = [(g, w) for (_, g), (_, w) in zip(got_items, want_items) if w.requires_grad]
    cot = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for _, w in diff]
    got_leaves = leaves(run_args, run_kwargs, grad_names)
    want_leaves = leaves(gt_args, gt_kwargs, grad_names)
    got_grads = torch.autograd.grad([g for g, _ in diff], got_leaves, [c.to(device, g.dtype) for c, (g, _) in zip(cot, diff)], allow_unused=True)
    want_grads = torch.autograd.grad([w for _, w in diff], want_leaves, cot, allow_unused=True)
    for name, leaf, g, w in zip(grad_names, got_leaves, got_grads, want_grads):
        g = torch.zeros_like(leaf) if g is None else g
        w = torch.zeros_like(leaf, dtype=torch.float64) if w is None else w
        assert g.dtype == leaf.dtype
        if inp.scenario == "poison" and op not in ("entropy_from_logits", "kl_penalty"):
            masked = ~inp.bool_mask
            if op == "logprobs_from_logits":
                masked = masked.unsqueeze(-1).expand_as(g)
            assert bool((g.detach().cpu()[masked] == 0).all()), f"{op} grad[{name}]: masked positions must get exactly 0"
        tol = TOL[dtype] if g.dtype != torch.float32 or op in ("logprobs_from_logits", "entropy_from_logits") else (1e-4, 1e-4)
        value_grad = (op, name) in (("value_loss", 0), ("ppo_loss", 3))
        check(f"{op} grad[{name}]", g, w, tol, op in SCALED, tie_halves=value_grad and scenario == "extreme")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op_matches_float64_ground_truth(op, backend, dtype, scenario, rng):
    run_against_ground_truth(op, backend, dtype, scenario, rng)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_empty_time_axis(op, backend, rng):
    """T = 0: every op returns empty [B, 0] tensors or a loss of 0, never NaN, never a crash."""
    args, kwargs, _ = make_case(op, Inputs("random", torch.float32, rng, T=0))
    with fastppo.use_backend(backend):
        out = getattr(fastppo, op)(*args, **kwargs)
    for name, x in flatten(out):
        if x.dim() == 0:
            assert x.item() == 0.0, f"{op} {name} = {x.item()} with T = 0"
        else:
            assert x.shape[-1] == 0 or (op == "entropy_from_logits" and x.numel() == 0), f"{op} {name}: shape {tuple(x.shape)}"
            assert not torch.isnan(x).any()
