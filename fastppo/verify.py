"""``fastppo verify``: every kernel against its reference on fresh random inputs.

For each op the table holds one row per (shape, dtype, direction): the maximum absolute and
relative error of the implementation under test against the reference computed in float64 on
the same (already rounded) inputs, the tolerance, and PASS/FAIL. The implementation under test
is the Triton kernel where the op has one; an op without a kernel yet is checked through its
reference at the input dtype (``impl`` says which). Without a GPU, kernels run through Triton's
interpreter on small shapes.
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

from . import _dispatch, reference
from .testing import TOL, errors, random_mask, select_ops, triton_version, within

# Forward outputs are float32 and most are sums of a few float32 terms; reductions over many
# tokens (losses, whitening statistics) need headroom for the order of the float32 accumulation.
FWD_TOL = (1e-4, 1e-4)


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[torch.Generator, torch.dtype], tuple[tuple, dict]]
    grad: tuple[Any, ...] = ()  # positional indices / keyword names of inputs that get gradients
    fwd_tol: tuple[float, float] = FWD_TOL
    note: str = ""


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
            cases.append(Case("kl_penalty", f"{B}x{T} {est}", dtype, _kl_case(B, T, est)))
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


def run_case(case: Case, device: str, gen: torch.Generator) -> list[Row]:
    import fastppo

    has_kernel = _dispatch.has_kernel(case.op)
    impl_name = "triton" if has_kernel else "reference"
    args, kwargs = case.make(gen, case.dtype)
    args, kwargs = _to(args, kwargs, device)
    ref_args, ref_kwargs = _to(args, kwargs, device, torch.float64)
    for x in _leaves(args, kwargs, case.grad) + _leaves(ref_args, ref_kwargs, case.grad):
        x.requires_grad_(True)

    if has_kernel:
        with fastppo.use_backend("triton"):
            got = getattr(fastppo, case.op)(*args, **kwargs)
    else:
        got = getattr(reference, case.op).raw(*args, **kwargs)
    want = getattr(reference, case.op).raw(*ref_args, **ref_kwargs)

    rows = []
    dtype_name = str(case.dtype).replace("torch.", "")
    got_items, want_items = _flatten(got), _flatten(want)
    worst_abs, worst_rel, ok = 0.0, 0.0, True
    for (name, g), (_, w) in zip(got_items, want_items):
        a, r = errors(g, w)
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
        ok = ok and g.dtype in (torch.float32, torch.float64) and bool(within(g, w, case.fwd_tol).all())
    rows.append(Row(case.op, impl_name, "fwd", case.shape, dtype_name, worst_abs, worst_rel, *case.fwd_tol, ok, case.note))

    if case.grad:
        diff = [(g, w) for (_, g), (_, w) in zip(got_items, want_items) if g.requires_grad]
        cotangents = [torch.randn(g.shape, generator=gen, dtype=torch.float64).to(device) for g, _ in diff]
        leaves = _leaves(args, kwargs, case.grad)
        ref_leaves = _leaves(ref_args, ref_kwargs, case.grad)
        got_grads = torch.autograd.grad(
            [g for g, _ in diff], leaves, [c.to(g.dtype) for c, (g, _) in zip(cotangents, diff)], allow_unused=True
        )
        want_grads = torch.autograd.grad([w for _, w in diff], ref_leaves, cotangents, allow_unused=True)
        tol = TOL[case.dtype]
        worst_abs, worst_rel, ok = 0.0, 0.0, True
        for leaf, g, w in zip(leaves, got_grads, want_grads):
            g = torch.zeros_like(leaf) if g is None else g
            w = torch.zeros_like(leaf, dtype=torch.float64) if w is None else w
            a, r = errors(g, w)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
            ok = ok and g.dtype == leaf.dtype and bool(within(g, w, tol).all())
        rows.append(Row(case.op, impl_name, "bwd", case.shape, dtype_name, worst_abs, worst_rel, *tol, ok, case.note))
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


# --------------------------------------------------------------------------------------------
# linear_logprobs (issue 10). Appended as its own block (the grid above is being edited in
# parallel); fold _linear_cases into build_cases when merging.
# --------------------------------------------------------------------------------------------


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


_build_cases_without_linear = build_cases


def build_cases(large: bool) -> list[Case]:  # noqa: F811 - extends the grid above
    return _build_cases_without_linear(large) + _linear_cases(large)
