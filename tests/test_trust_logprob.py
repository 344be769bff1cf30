"""Issue 9 (trust) for the log-prob / entropy kernels (kernels/logprob.py): NaN and inf at valid
rows, masks that are not 0/1, unchecked out-of-range labels, logits of magnitude 1e4.

Expected values come from :func:`ground_truth`, the formula written out here in float64 on the
already-rounded inputs (never another backend): row max first, then log-sum-exp, entropy
-sum p log p, and the analytic gradient

    d z = (onehot(label) - p) * g_lp - p * (log p + H) * g_ent,   d logits = d z / T.

Comparisons are NaN-aware (:func:`assert_same`): NaN exactly where the ground truth is NaN, and
within tolerance everywhere else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastppo
from fastppo.kernels import logprob as K

from helpers import TOL, TOL_FP32_OUT, within

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 64 columns, so that V = 257 or 999 needs several per row."""
    monkeypatch.setattr(K, "MAX_BLOCK", 64)
    return 64


# --------------------------------------------------------------------------------------------
# Ground truth and comparison
# --------------------------------------------------------------------------------------------


def ground_truth(logits, labels=None, *, temperature=1.0, mask=None, g_lp=None, g_ent=None):
    """(log-prob, entropy, d logits or None) in float64 on the logits' device, from the formula.

    ``labels`` out of [0, V) are clamped into it, which is what the kernels do when value checks
    are off. ``mask`` means ``mask != 0``; masked rows give 0 and a zero gradient row. ``g_lp`` /
    ``g_ent`` are the incoming gradients (None: that output gets none).
    """
    x = logits.detach().to(torch.float64)
    dev = x.device
    V = x.shape[-1]
    m = x.amax(-1, keepdim=True)  # propagates NaN
    z = (x - m) / temperature
    lse = torch.log(torch.exp(z).sum(-1, keepdim=True))
    logp = z - lse
    p = torch.exp(logp)
    p_logp = torch.where(p == 0, 0.0, p * logp)  # 0 log 0 = 0 for -inf logits; NaN stays NaN
    ent = -p_logp.sum(-1)
    lp = onehot = None
    if labels is not None:
        lab = labels.to(dev, torch.long).clamp(0, V - 1)
        lp = logp.gather(-1, lab[..., None]).squeeze(-1)
        onehot = torch.nn.functional.one_hot(lab, V).to(torch.float64)
    grad = None
    if g_lp is not None or g_ent is not None:
        dz = torch.zeros_like(x)
        if g_lp is not None:
            dz = dz + (onehot - p) * g_lp.to(dev, torch.float64)[..., None]
        if g_ent is not None:
            term = torch.where(p == 0, 0.0, p * (logp + ent[..., None]))
            dz = dz - term * g_ent.to(dev, torch.float64)[..., None]
        grad = dz / temperature
    if mask is not None:
        valid = (mask != 0).to(dev)
        ent = torch.where(valid, ent, 0.0)
        if lp is not None:
            lp = torch.where(valid, lp, 0.0)
        if grad is not None:
            grad = torch.where(valid[..., None], grad, 0.0)
    return lp, ent, grad


def assert_same(actual, expected, tol, what):
    """NaN exactly where ``expected`` is NaN; everywhere else within ``tol`` (infinities equal)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: NaN pattern differs at {int((nan_a != nan_e).sum())} elements, first at {idx}: "
            f"got {a[tuple(idx)].item()!r}, expected {e[tuple(idx)].item()!r}"
        )
    ok = within(a[~nan_e], e[~nan_e], tol)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].item()
        got, want = a[~nan_e][bad].item(), e[~nan_e][bad].item()
        raise AssertionError(f"{what}: {int((~ok).sum())} elements off; e.g. got {got!r}, expected {want!r} (tol {tol})")


def run_and_check(logits, labels, gen, *, temperature=1.0, mask=None, outputs=("logprob", "entropy"), grads=None,
                  cot_nan_at_masked=False):
    """Kernel (through the public op, outputs poisoned) vs :func:`ground_truth`, forward and backward.

    ``outputs``: which op/outputs ("logprob", "entropy" or both); ``grads``: which of them get an
    incoming gradient (default: all).
    """
    from fastppo.kernels._common import poisoned_outputs

    grads = outputs if grads is None else grads
    dtype = logits.dtype
    leaf = logits.detach().clone().requires_grad_(True)
    with fastppo.use_backend("triton"), poisoned_outputs():
        if outputs == ("entropy",):
            got = {"entropy": fastppo.entropy_from_logits(leaf, temperature=temperature)}
        elif outputs == ("logprob",):
            got = {"logprob": fastppo.logprobs_from_logits(leaf, labels, temperature=temperature, mask=mask)}
        else:
            lp, ent = fastppo.logprobs_from_logits(leaf, labels, temperature=temperature, mask=mask, return_entropy=True)
            got = {"logprob": lp, "entropy": ent}
    cots = {}
    for name in grads:
        c = torch.randn(logits.shape[:-1], generator=gen).to(DEV)
        if cot_nan_at_masked and mask is not None:
            c = torch.where((mask != 0), c, torch.full_like(c, float("nan")))
        cots[name] = c
    want_lp, want_ent, want_grad = ground_truth(
        logits, labels if "logprob" in outputs else None, temperature=temperature, mask=mask,
        g_lp=cots.get("logprob"), g_ent=cots.get("entropy"),
    )
    want = {"logprob": want_lp, "entropy": want_ent}
    for name, value in got.items():
        assert value.dtype == torch.float32
        assert_same(value, want[name], TOL_FP32_OUT[dtype], name)
    if not grads:
        return got, None
    with fastppo.use_backend("triton"), poisoned_outputs():
        (g,) = torch.autograd.grad([got[n] for n in grads], leaf, [cots[n] for n in grads])
    assert g.dtype == dtype and g.shape == logits.shape
    assert_same(g, want_grad, TOL[dtype], f"d logits ({'+'.join(grads)})")
    if mask is not None:
        off = (mask == 0).to(g.device)
        assert bool((g[off] == 0).all()), "masked rows must get an exactly zero gradient"
        for value in got.values():
            assert bool((value[off] == 0).all()), "masked rows must output exactly 0"
    return got, g


def _randn(shape, gen, dtype, scale=4.0):
    return (torch.randn(shape, generator=gen) * scale).to(DEV, dtype)


# --------------------------------------------------------------------------------------------
# 1. NaN / +inf at a valid row: NaN out, forward and backward; -inf entries exact
# --------------------------------------------------------------------------------------------


def _nan_rows(gen, dtype, V):
    """Rows: NaN at the label, NaN in a later block than the max, NaN in the first block, NaN in
    the last partial block, +inf, +inf twice, two clean rows, -inf entries (exact), NaN with
    +-inf around it."""
    logits = _randn((10, V), gen, dtype)
    labels = torch.randint(0, V, (10,), generator=gen).to(DEV)
    nan, inf = float("nan"), float("inf")
    logits[0, 100] = nan
    labels[0] = 100
    logits[1, 3] = 50.0  # the max comes first, the NaN three blocks later
    logits[1, 200] = nan
    labels[1] = 3
    logits[2, 0] = nan
    logits[3, V - 1] = nan
    logits[4, 70] = inf
    logits[5, 10] = logits[5, 130] = inf
    logits[7, :150] = -inf  # -inf entries (not the whole row) are exact
    labels[7] = 160
    logits[8, 5] = -inf
    logits[8, 6] = nan
    logits[8, 7] = inf
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "outputs,with_mask",
    [(("logprob", "entropy"), False), (("logprob", "entropy"), True), (("logprob",), False), (("entropy",), False)],
    ids=["both", "both-masked", "logprob-only", "entropy-op"],
)
def test_nan_logit_at_valid_row_gives_nan(small_blocks, rng, dtype, outputs, with_mask):
    V = 257
    logits, labels = _nan_rows(rng, dtype, V)
    mask = None
    if with_mask:
        mask = torch.ones(10, dtype=torch.float32, device=DEV)
        mask[9] = 0.0  # a masked row holding NaN: 0 out, 0 gradient
        logits[9, 40] = float("nan")
    got, g = run_and_check(logits, labels, rng, temperature=0.8, mask=mask, outputs=outputs)
    for name, value in got.items():
        assert bool(torch.isnan(value[:6]).all()), f"{name}: every NaN / +inf row must be NaN"
        assert bool(torch.isnan(value[8])), f"{name}: row 8"
        assert bool(torch.isfinite(value[6:8]).all()), f"{name}: clean rows stay finite"
    assert bool(torch.isnan(g[:6]).all()) and bool(torch.isnan(g[8]).all()), "NaN rows get NaN gradient rows"
    assert bool(torch.isfinite(g[6:8]).all())


_PTX_SCRIPT = textwrap.dedent(
    """
    import json, os, re, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from fastppo.kernels import logprob as K
    try:
        from triton.backends.compiler import GPUTarget
        target = GPUTarget("cuda", 90, 32)
    except Exception as exc:  # no CUDA backend in this triton build
        print(json.dumps({"skip": repr(exc)})); sys.exit(0)

    def signature(kernel, consts):
        types = {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "labels_ptr": "*i64", "valid_ptr": "*u8"}
        sig = {}
        for n in kernel.arg_names:
            if n in consts: sig[n] = "constexpr"
            elif n.endswith("_ptr"): sig[n] = types.get(n, "*fp32")
            elif n == "inv_temp": sig[n] = "fp32"
            elif n in ("T", "V"): sig[n] = "i32"
            else: sig[n] = "i64"
        return sig

    out = {}
    for kernel, flags in ((K._logprob_fwd_kernel, ("HAS_MASK", "WITH_LOGPROB", "WITH_ENTROPY")),
                          (K._logprob_bwd_kernel, ("HAS_MASK", "HAS_GRAD_LOGPROB", "HAS_GRAD_ENTROPY"))):
        consts = dict.fromkeys(flags, True)
        consts["BLOCK"] = 128
        # The peeled variant (head/tail block + 16-byte body) holds every max the plain one has.
        consts.update({k: v for k, v in (("PEEL", True), ("GRAD_ALIGNED", True), ("VEC", 8), ("K", 2))
                       if k in kernel.arg_names})
        src = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, consts), constexprs=consts)
        ptx = triton.compile(src, target=target, options={"num_warps": 1}).asm["ptx"]
        out[kernel.__name__] = {
            "max_nan": len(re.findall(r"\\bmax\\.NaN\\.f32", ptx)),
            "max_plain": len(re.findall(r"\\bmax\\.f32", ptx)),
            "min_plain": len(re.findall(r"\\bmin\\.f32", ptx)),
        }
    print(json.dumps(out))
    """
)


def test_sm90_ptx_max_is_nan_propagating():
    """Offline sm_90 compile: every float max in both kernels is ``max.NaN.f32`` (PTX ``max.f32``
    returns the non-NaN operand, so a plain one would drop a NaN logit on a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"no offline CUDA compile: {out['skip']}")
    for name, counts in out.items():
        assert counts["max_nan"] > 0, f"{name}: no NaN-propagating max in the PTX: {counts}"
        assert counts["max_plain"] == 0 and counts["min_plain"] == 0, f"{name}: NaN-dropping max/min: {counts}"


# --------------------------------------------------------------------------------------------
# 2. Masks: mask != 0 is valid (2, 0.5, -1, NaN); masked rows are never read
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mask_kind", ["float", "int", "bool"])
def test_masked_rows_never_read_whatever_they_hold(small_blocks, rng, dtype, mask_kind):
    B, T, V = 3, 6, 201
    full = _randn((B, T + 1, V), rng, dtype)
    logits = full[:, :-1]  # a strided view, as logits[:, :-1] in a trainer
    labels = torch.randint(0, V, (B, T), generator=rng).to(DEV)
    if mask_kind == "float":
        mask = torch.tensor([[2.0, 0.0, 0.5, -1.0, float("nan"), 0.0],
                             [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                             [1.0, 1e-30, 0.0, -0.0, 3.0, 1.0]], device=DEV)
    elif mask_kind == "int":
        mask = torch.tensor([[2, 0, 1, -1, 7, 0], [0] * 6, [1, 1, 0, 0, -3, 1]], device=DEV, dtype=torch.int32)
    else:
        mask = torch.tensor([[1, 0, 1, 1, 1, 0], [0] * 6, [1, 1, 0, 0, 1, 1]], device=DEV, dtype=torch.bool)
    off = mask == 0
    garbage = [float("nan"), float("inf"), float("-inf"), 1e38 if dtype == torch.float32 else 6e4]
    for i, (b, t) in enumerate(off.nonzero().tolist()):
        logits[b, t] = garbage[i % len(garbage)]
        logits[b, t, i % V] = float("nan")
        labels[b, t] = [-5, V, 10**8, -(10**8)][i % 4]  # out of range: a read would fault or be wrong
    run_and_check(logits, labels, rng, temperature=1.3, mask=mask, cot_nan_at_masked=True)


# --------------------------------------------------------------------------------------------
# 3. FASTPPO_VALUE_CHECKS=0: out-of-range labels are clamped, never read out of bounds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_unchecked_out_of_range_labels_are_clamped(small_blocks, rng, monkeypatch, with_mask, label_dtype):
    """Rows sit inside a NaN-filled allocation: a label of -1 or V read out of its row would pick up
    a NaN (or another row's logit) instead of the clamped label's logit."""
    monkeypatch.setenv("FASTPPO_VALUE_CHECKS", "0")
    N, V = 8, 130
    storage = torch.full((N + 2, V + 2), float("nan"), device=DEV)
    logits = storage[1:-1, 1:-1]  # NaN one column left and right of every row, and a NaN row above and below
    logits.copy_(_randn((N, V), rng, torch.float32))
    # Every unclamped read lands inside ``storage`` (a clean failure rather than a crash); the
    # far-away labels are test_unchecked_huge_labels_do_not_crash's.
    labels = torch.tensor([-1, V, V + 1, -V, 2 * V + 5, -3, V + 2, 3], dtype=label_dtype, device=DEV)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], device=DEV) if with_mask else None
    got, g = run_and_check(logits, labels, rng, temperature=0.9, mask=mask)
    assert bool(torch.isfinite(got["logprob"]).all()) and bool(torch.isfinite(g).all())


def test_unchecked_huge_labels_do_not_crash():
    """Labels of +-1e8, 2^62 and -2^31 (a segfault before the clamp), in a fresh process so a crash
    fails this test instead of killing the run."""
    script = textwrap.dedent(
        """
        import os, torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
        os.environ["FASTPPO_VALUE_CHECKS"] = "0"
        import fastppo
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        V = 100
        logits = torch.randn(4, V, device=dev).requires_grad_(True)
        labels = torch.tensor([10**8, -(10**8), 2**62, -(2**31)], device=dev)
        with fastppo.use_backend("triton"):
            lp, ent = fastppo.logprobs_from_logits(logits, labels, return_entropy=True)
            lp_m = fastppo.logprobs_from_logits(logits, labels, mask=torch.ones(4, device=dev))
            (g,) = torch.autograd.grad([lp, ent, lp_m], logits, [torch.ones(4, device=dev)] * 3)
        ls = torch.log_softmax(logits.detach().double().cpu(), -1)
        want = ls[torch.arange(4), torch.tensor([V - 1, 0, V - 1, 0])]
        assert torch.allclose(lp.double().cpu(), want, atol=1e-5), (lp, want)
        assert torch.equal(lp, lp_m) and bool(torch.isfinite(g).all())
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"
    )


# --------------------------------------------------------------------------------------------
# 4. Logits of magnitude 1e4, fp32 and bf16, temperature 0.7 and 1, odd V
# --------------------------------------------------------------------------------------------


def _logits_1e4(gen, dtype, N, V):
    x = torch.randint(-1, 2, (N, V), generator=gen) * 1e4 + torch.randn(N, V, generator=gen) * 3
    x[0, 10] = x[0, V - 2] = 1e4  # a tie at the top, in the first and the last block
    x[1, :] = -1e4
    x[1, V - 1] = 1e4  # the max alone in the last, partial block
    x[2] = -1e4 + torch.randn(V, generator=gen)  # all near -1e4: many comparable terms
    x[3] = 1e4 + torch.randn(V, generator=gen) * 0.5
    x[4, : V // 2] = float("-inf")  # -inf entries, not the whole row
    return x.to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("V,blocks", [(257, "small"), (999, "small"), (999, "launcher")])
def test_logits_of_magnitude_1e4_against_float64(rng, monkeypatch, dtype, temperature, V, blocks):
    if blocks == "small":
        monkeypatch.setattr(K, "MAX_BLOCK", 64)
    block, _ = K._block_and_warps(V, torch.tensor([], dtype=dtype).element_size())
    assert V % block != 0
    N = 6
    logits = _logits_1e4(rng, dtype, N, V)
    labels = torch.randint(0, V, (N,), generator=rng).to(DEV)
    labels[0], labels[1], labels[4] = V - 2, V - 1, 3  # row 4: the label's logit is -inf
    got, g = run_and_check(logits, labels, rng, temperature=temperature)
    assert got["logprob"][4].item() == float("-inf")
    # The entropy is a proper one: 0 <= H <= log V.
    ent = got["entropy"]
    assert bool((ent >= -1e-6).all()) and bool((ent <= torch.log(torch.tensor(float(V))) + 1e-5).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_entropy_op_at_1e4_against_float64(small_blocks, rng, dtype):
    """entropy_from_logits alone (the kernel's no-label specialisation), 11 logits of 1e4 scale
    as in the issue's probe, and a 3-D batch."""
    logits = torch.cat([_logits_1e4(rng, dtype, 6, 257)[:, -11:], _randn((6, 11), rng, dtype)]).view(3, 4, 11)
    run_and_check(logits, None, rng, temperature=0.7, outputs=("entropy",))
