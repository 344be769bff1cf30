"""Liger-Kernel's fused linear cross entropy behind fastppo.linear_logprobs, against the real Liger.

Liger 0.8's ``LigerFusedLinearCrossEntropyFunction`` runs its Triton kernels on the CPU through the
interpreter (TRITON_INTERPRET=1, set by conftest), and its ``LigerFusedLinearScaledCrossEntropyFunction``
takes its PyTorch fallback off CUDA: both are compared with the adapter in values and gradients,
and the plain NLL with the float64 ground truth. Skipped when liger-kernel is not installed
(``pip install fastppo[test]`` brings it).
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from fastppo import groundtruth
from helpers import TOL, assert_close

pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install 'fastppo[test]')")

from fastppo.integrations import liger as fl  # noqa: E402

F64 = torch.float64


@pytest.fixture(scope="module")
def liger():
    try:
        from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction as flce
        from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as scaled
        from liger_kernel.transformers import functional
    except ImportError as exc:  # liger present without a dependency it needs here
        pytest.skip(f"liger_kernel.ops cannot be imported here: {exc}")
    fl.unpatch()
    return flce, scaled, functional


def case(rng, M, H, V, dtype, *, bias=False, ignored=(1,), nan_ignored=False):
    x = torch.randn(M, H, generator=rng)
    w = torch.randn(V, H, generator=rng) * 0.5
    b = torch.randn(V, generator=rng) if bias else None
    y = torch.randint(0, V, (M,), generator=rng)
    for i in ignored:
        y[i] = -100
        if nan_ignored:  # an ignored row must not leak, whatever it holds
            x[i] = float("nan")
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), y


def grads_of(fn, x, w, b, go):
    """Outputs of ``fn(x, w, b)`` and the gradients of ``sum(go * loss)`` (+ z_loss)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    loss, z = fn(x, w, b)
    (loss * go if loss.dim() else loss * go.sum()).sum().backward()
    return loss.detach(), (None if z is None else z.detach()), x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,z_scale,token_scaling", [(False, 0.0, False), (True, 1e-3, False), (False, 1e-2, True)])
def test_flce_matches_liger(liger, rng, reduction, bias, z_scale, token_scaling):
    flce, _, _ = liger
    M, H, V = 9, 16, 133
    x, w, b, y = case(rng, M, H, V, torch.float32, bias=bias, ignored=(1, 6))
    go = torch.rand(M, generator=rng) + 0.5 if reduction == "none" else torch.tensor(1.7)
    args = (None, -100, z_scale, 0.0, reduction, None, True, None, token_scaling, False, False)

    def theirs(x, w, b):
        out = flce.apply(x, w, y, b, *args)
        return out[0], out[1]

    def ours(x, w, b):
        out = fl.LigerFusedLinearCrossEntropyFunction.apply(x, w, y, b, *args)
        assert out[2] is None and out[3] is None
        return out[0], out[1]

    got, want = grads_of(ours, x, w, b, go), grads_of(theirs, x, w, b, go)
    assert got[0].dtype == want[0].dtype == torch.float32 and got[0].shape == want[0].shape
    for name, g, e in zip(("loss", "z_loss", "d input", "d weight", "d bias"), got, want):
        if e is None:
            assert g is None, name
            continue
        assert_close(g, e, (1e-4, 1e-4), name)
    assert (got[2][[1, 6]] == 0).all()
    # A NaN hidden state in an ignored row: no NaN anywhere (Liger 0.8.5's d weight is all NaN
    # then: it multiplies the row's zero d logits by its NaN input).
    x[[1, 6]] = float("nan")
    got = grads_of(ours, x, w, b, go)
    for name, g in zip(("loss", "z_loss", "d input", "d weight", "d bias"), got):
        assert g is None or bool(torch.isfinite(g).all()), name
    assert (got[2][[1, 6]] == 0).all()


def test_flce_against_float64_truth_bf16(liger, rng):
    M, H, V = 8, 24, 301
    x, w, _, y = case(rng, M, H, V, torch.bfloat16, ignored=(3,))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fl.liger_fused_linear_cross_entropy(xg, wg, y, reduction="mean")
    loss.backward()
    valid = y != -100
    x64 = torch.where(valid.unsqueeze(1), x, 0).to(F64).requires_grad_()
    w64 = w.to(F64).requires_grad_()
    lp = groundtruth.linear_logprobs(x64, w64, y.clamp(min=0), mask=valid)
    want = -(lp.sum() / valid.sum())
    want.backward()
    assert loss.dtype == torch.float32
    assert abs(float(loss.detach()) - float(want.detach())) < 2e-5 * (1 + abs(float(want.detach())))
    assert_close(xg.grad, x64.grad.to(torch.bfloat16), TOL[torch.bfloat16], "d input")
    assert_close(wg.grad, w64.grad.to(torch.bfloat16), TOL[torch.bfloat16], "d weight")


def test_worked_example(liger):
    # Two classes, logits (0, log 3): p = (1/4, 3/4). NLL of class 1 = -log 3/4; lse = log 4.
    x = torch.tensor([[1.0]])
    w = torch.tensor([[0.0], [math.log(3.0)]])
    out = fl.liger_fused_linear_cross_entropy(x, w, torch.tensor([1]), reduction="none", lse_square_scale=0.5,
                                              return_z_loss=True)
    z = 0.5 * math.log(4.0) ** 2
    assert abs(float(out.loss[0]) - (-math.log(0.75) + z)) < 1e-6
    assert abs(float(out.z_loss[0]) - z) < 1e-6


@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_scaled_matches_liger(liger, rng, return_entropy, temperature):
    _, scaled, _ = liger
    M, H, V = 7, 12, 90
    x, w, _, y = case(rng, M, H, V, torch.float32, ignored=(0,))
    g_nll, g_ent = torch.randn(M, generator=rng), torch.randn(M, generator=rng)
    results = []
    for impl in (fl.LigerFusedLinearScaledCrossEntropyFunction, scaled):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = impl.apply(xg, wg, y, temperature, -100, 1, return_entropy)
        nll, ent = out if return_entropy else (out, None)
        total = (nll * g_nll).sum() + (0 if ent is None else (ent * g_ent).sum())
        total.backward()
        results.append((nll.detach(), None if ent is None else ent.detach(), xg.grad, wg.grad))
    for name, g, e in zip(("nll", "entropy", "d input", "d weight"), *results):
        if e is None:
            assert g is None
            continue
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert_close(g, e, (1e-4, 1e-4), name)


def test_unsupported_options_go_to_liger(liger, rng, monkeypatch):
    flce, _, _ = liger
    x, w, _, y = case(rng, 5, 8, 40, torch.float32, ignored=())
    calls = []
    monkeypatch.setitem(fl._saved, "LigerFusedLinearCrossEntropyFunction",
                        types.SimpleNamespace(apply=lambda *a: calls.append(a) or ("liger",) * 4))
    for kw in (dict(label_smoothing=0.1), dict(softcap=30.0), dict(return_token_accuracy=True),
               dict(ce_weight=torch.ones(40))):
        fl.liger_fused_linear_cross_entropy(x, w, y, **kw)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="reduction"):
        fl.liger_fused_linear_cross_entropy(x, w, y, reduction="avg")


def test_patch_round_trip(liger, rng, monkeypatch):
    flce, scaled, functional = liger
    consumer = types.ModuleType("verl._fastppo_test_liger_consumer")
    consumer._LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY = scaled
    monkeypatch.setitem(sys.modules, consumer.__name__, consumer)
    with fl.patched():
        fl.patch()  # idempotent
        assert fl.is_patched()
        assert functional.LigerFusedLinearCrossEntropyFunction is fl.LigerFusedLinearCrossEntropyFunction
        assert consumer._LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY is fl.LigerFusedLinearScaledCrossEntropyFunction
        # Liger's own functional form now runs fastppo, with Liger's signature.
        x, w, _, y = case(rng, 6, 8, 50, torch.float32, ignored=(2,))
        got = functional.liger_fused_linear_cross_entropy(x, w, y, reduction="sum")
        want = fl.liger_fused_linear_cross_entropy(x, w, y, reduction="sum")
        assert float(got) == float(want)
    assert not fl.is_patched()
    assert functional.LigerFusedLinearCrossEntropyFunction is flce
    assert consumer._LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY is scaled
