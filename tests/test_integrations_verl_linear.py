"""verl's fused LM head (``verl.utils.kernel.linear_cross_entropy``) behind fastppo.linear_logprobs.

verl 0.9.1's own implementation is CUDA-only (its host code asserts ``hidden.is_cuda``), and the
verl sdist ships no test of it (its ``tests/utils`` is not in the sdist). So the adapter is held to
the float64 ground truth of the same inputs, and to verl's own PyTorch implementation of the same
math, ``verl.utils.experimental.torch_functional.FusedLinearForPPOFunction`` (the
``fused_kernels_backend=torch`` path), in values and gradients. Skipped where verl is missing.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from fastppo import groundtruth
from fastppo.integrations import _verl_linear as vl
from helpers import TOL, TOL_FP32_OUT, assert_close

F64 = torch.float64


@pytest.fixture(scope="module")
def verl_lce():
    try:
        module = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
        torch_impl = importlib.import_module("verl.utils.experimental.torch_functional")
    except ImportError as exc:
        pytest.skip(f"verl's linear_cross_entropy cannot be imported here: {exc}")
    return module, torch_impl.FusedLinearForPPOFunction


def inputs(rng, shape, H, V, dtype, *, trainable=True, big_row=False):
    hidden = torch.randn(*shape, H, generator=rng)
    if big_row:  # logits of magnitude ~1e4 in one row: the row max must come first
        hidden.view(-1, H)[0] *= 3e3
    weight = torch.randn(V, H, generator=rng) * 0.5
    labels = torch.randint(0, V, shape, generator=rng)
    hidden = hidden.to(dtype).requires_grad_()
    weight = weight.to(dtype).requires_grad_(trainable)
    return hidden, weight, labels


def truth(hidden, weight, labels, temperature, g_lp, g_ent):
    """float64 log-probs, entropy and their gradients for the same (rounded) inputs."""
    h = hidden.detach().to(F64).requires_grad_()
    w = weight.detach().to(F64).requires_grad_()
    lp, ent = groundtruth.linear_logprobs(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1),
                                          temperature=temperature, return_entropy=True)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,temperature,trainable", [((2, 7), 1.0, True), ((11,), 0.7, False), ((1, 9), 1.3, True)])
def test_against_ground_truth_and_verls_torch_path(verl_lce, rng, dtype, shape, temperature, trainable):
    _, verl_torch = verl_lce
    H, V = 24, 203
    hidden, weight, labels = inputs(rng, shape, H, V, dtype, trainable=trainable, big_row=dtype == torch.float32)
    N = labels.numel()
    g_lp, g_ent = torch.randn(N, generator=rng), torch.randn(N, generator=rng)
    lp, ent = vl.linear_cross_entropy(hidden, weight, labels, temperature, "none")
    # verl's contract: flat [N] float32 outputs, d hidden in hidden's shape.
    assert lp.shape == ent.shape == (N,) and lp.dtype == ent.dtype == torch.float32
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    t_lp, t_ent, t_dh, t_dw = truth(hidden, weight, labels, temperature, g_lp, g_ent)
    tol = TOL_FP32_OUT[dtype] if dtype == torch.float32 else (1e-4, 1e-4)
    assert_close(lp, t_lp, tol, "logprobs")
    assert_close(ent, t_ent, tol, "entropy")
    assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == dtype
    assert_close(hidden.grad, t_dh.view(hidden.shape), TOL[dtype], "d hidden")
    if trainable:
        assert_close(weight.grad, t_dw, TOL[dtype], "d weight")
    else:
        assert weight.grad is None
    if dtype != torch.float32:
        return  # verl's torch path rounds its logits to the input dtype
    # verl's own PyTorch implementation of the same op, on the same inputs.
    h2 = hidden.detach().requires_grad_()
    w2 = weight.detach().requires_grad_(trainable)
    v_lp, v_ent = verl_torch.apply(h2, w2, labels, temperature, 4)
    ((v_lp.reshape(-1) * g_lp).sum() + (v_ent.reshape(-1) * g_ent).sum()).backward()
    assert_close(lp, v_lp.detach().reshape(-1), (1e-4, 1e-4), "logprobs vs verl")
    assert_close(ent, v_ent.detach().reshape(-1), (1e-4, 1e-4), "entropy vs verl")
    assert_close(hidden.grad, h2.grad, (1e-4, 1e-4), "d hidden vs verl")
    if trainable:
        assert_close(weight.grad, w2.grad, (1e-4, 1e-4), "d weight vs verl")


@pytest.mark.parametrize("reduction", ["sum", "mean", "MEAN"])
def test_reductions(rng, reduction):
    H, V = 16, 97
    hidden, weight, labels = inputs(rng, (3, 5), H, V, torch.float32)
    lp, ent = vl.linear_cross_entropy(hidden, weight, labels, 1.0, reduction)
    assert lp.shape == () and ent.shape == (15,)
    (2.0 * lp + ent.sum()).backward()
    scale = 2.0 if reduction == "sum" else 2.0 / 15
    t_lp, t_ent, t_dh, t_dw = truth(hidden, weight, labels, 1.0, torch.full((15,), scale), torch.ones(15))
    want = t_lp.sum() if reduction == "sum" else t_lp.mean()
    assert_close(lp, want.float(), TOL_FP32_OUT[torch.float32], "reduced logprobs")
    assert_close(ent, t_ent, TOL_FP32_OUT[torch.float32], "entropy")
    assert_close(hidden.grad, t_dh.view(hidden.shape), TOL[torch.float32], "d hidden")
    assert_close(weight.grad, t_dw, TOL[torch.float32], "d weight")
    # No token: a reduced log-prob of 0, not NaN.
    lp0, ent0 = vl.linear_cross_entropy(hidden[:0], weight, labels[:0], 1.0, reduction)
    assert float(lp0.detach()) == 0.0 and ent0.shape == (0,)


def test_worked_example():
    # Two classes, logits (0, log 3): p = (1/4, 3/4); log p[1] = log 3/4, H = -(1/4 log 1/4 + 3/4 log 3/4).
    import math

    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    lp, ent = vl.linear_cross_entropy(hidden, weight, torch.tensor([1]), 1.0, "none")
    assert abs(float(lp[0]) - math.log(0.75)) < 1e-6
    assert abs(float(ent[0]) - -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))) < 1e-6


def test_bad_input_raises_value_error(rng):
    hidden, weight, labels = inputs(rng, (4,), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        vl.linear_cross_entropy(hidden, weight, labels, 1.0, "avg")
    with pytest.raises(ValueError, match="labels"):
        vl.linear_cross_entropy(hidden, weight, labels[:3], 1.0, "none")
    with pytest.raises(ValueError, match="temperature"):
        vl.linear_cross_entropy(hidden, weight, labels, 0.0, "none")
    with pytest.raises(ValueError, match="temperature"):
        vl.linear_cross_entropy(hidden, weight, labels, "1.0", "none")


def test_tensor_parallel_goes_to_verl(verl_lce, monkeypatch):
    module, _ = verl_lce
    calls = []
    monkeypatch.setattr(module, "linear_cross_entropy", lambda *a: calls.append(a) or "verl")
    group = object()
    assert vl.linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long),
                                   1.0, "none", group) == "verl"
    assert calls and calls[0][-1] is group


def test_install_round_trip(verl_lce, monkeypatch):
    from fastppo.integrations import verl as fv

    module, _ = verl_lce
    original = module.linear_cross_entropy
    # A verl module that imported the function by name (as verl.models.mcore's forwards do).
    consumer = types.ModuleType("verl._fastppo_test_lce_consumer")
    consumer.linear_cross_entropy = original
    monkeypatch.setitem(sys.modules, consumer.__name__, consumer)
    try:
        fv.install(policy_loss=False, gae=False, value_loss=False, linear_cross_entropy=True)
        fv.install(policy_loss=False, gae=False, value_loss=False, linear_cross_entropy=True)  # idempotent
        assert fv.installed()["linear_cross_entropy"]
        assert module.linear_cross_entropy is vl.linear_cross_entropy
        assert consumer.linear_cross_entropy is vl.linear_cross_entropy
        # What verl's HF forward (forward_with_triton_backend) imports at call time:
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy as imported

        assert imported is vl.linear_cross_entropy
    finally:
        fv.uninstall()
    assert module.linear_cross_entropy is original and consumer.linear_cross_entropy is original
    assert not fv.installed()["linear_cross_entropy"]
    # Opt-in: the default install leaves it alone.
    try:
        fv.install(policy_loss=False, gae=False, value_loss=False)
        assert module.linear_cross_entropy is original
    finally:
        fv.uninstall()
