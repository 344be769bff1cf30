"""fastppo.integrations.trl against TRL 1.16: TRL's own test cases, TRL's own functions, float64.

1. ``TestTRLSuite*``: TRL's own unit tests of the functions the adapter replaces, re-expressed
   here (TRL's wheel ships no tests) and run through TRL's public names with ``patch()`` in force,
   so that ``trl.kernels.ChunkedLogProbFunction`` & co. *are* fastppo's (asserted in each test).
   The cases follow huggingface/trl (Apache-2.0) ``tests/test_utils.py::TestSelectiveLogSoftmax``
   and ``tests/test_kernels.py::TestLogProbEntropy`` / ``TestChunkedLogProbFunction``: the same
   inputs, assertions and tolerances, with these deviations, each said where it happens:
   TRL's GPU-only marker is dropped (the adapter runs on CPU); TRL's checks of its own tiling
   (rows per ``torch.mm`` call) are left out; TRL's ``torch.equal`` for half-precision log-probs
   is replaced by "within one unit in the last place of TRL's value and at least as close to the
   float64 answer" (fastppo rounds its float32 result once; TRL's bf16 ``log_softmax`` rounds
   twice, so it is off by one ulp in ~20% of elements, see ``test_half_precision_is_one_rounding``).
2. Random inputs against float64 ground truth (``fastppo.groundtruth``) and against TRL's own
   functions (fp32/bf16, masks, temperature, ``[..., K]`` indices, gradients, NaN and -inf).
3. ``patch()``: what it swaps and restores, and TRL's own fused LM head (``add_fused_lm_head``,
   the path of GRPOTrainer) running on fastppo in a tiny transformers model.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from unittest.mock import patch as mock_patch

import pytest
import torch
import torch.nn.functional as F

from fastppo import groundtruth as gt
from fastppo.integrations import trl as ft
from helpers import TOL, assert_close

trl = pytest.importorskip("trl")
U = importlib.import_module("trl.trainer.utils")
K = importlib.import_module("trl.kernels")
CLP = importlib.import_module("trl.kernels.chunked_logprob")
HAS_KERNEL_FN = hasattr(K, "selective_log_softmax_and_entropy")
# TRL's originals, captured before any test patches anything.
ft.unpatch()
TRL_SLS = U.selective_log_softmax
TRL_ENT = U.entropy_from_logits
TRL_SLSE = U.selective_log_softmax_and_entropy
TRL_CHUNKED = CLP.ChunkedLogProbFunction


def randn(rng, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)


@pytest.fixture
def swapped():
    """TRL with fastppo swapped in, for one test."""
    with ft.patched():
        yield
    assert not ft.is_patched()


def ulp_of(x: torch.Tensor) -> torch.Tensor:
    """Spacing of the floating numbers of x's dtype at |x| (float64)."""
    x = x.detach()
    return (torch.nextafter(x.abs(), torch.full_like(x, math.inf)) - x.abs()).double()


# =============================================================================================
# 1. TRL's own test cases, through TRL's names, fastppo swapped in
# =============================================================================================


class TestTRLSuiteSelectiveLogSoftmax:
    """huggingface/trl tests/test_utils.py::TestSelectiveLogSoftmax (B=4, T=32, V=1024)."""

    @staticmethod
    def _check(actual, expected, logits, index, dtype):
        assert actual.dtype == dtype  # TRL's CPU path returns the logits' dtype
        if dtype in (torch.float16, torch.bfloat16):
            # TRL: torch.equal(actual, expected). fastppo rounds once from float32, so it may sit
            # one ulp from torch's twice-rounded value, and is never further from the truth.
            assert ((actual.double() - expected.double()).abs() <= ulp_of(expected)).all()
            truth = torch.gather(logits.double().log_softmax(-1), -1, index)
            # A float32 value rounded once lands within half an ulp of the truth, give or take
            # float32's own error: a truth within that error of a rounding midpoint may round
            # either way (seed 1988597875: 8.3863 at fp16's ulp of 0.0078).
            f32_err = 4e-6 * (1 + truth.abs())
            ours_err = (actual.double() - truth).abs()
            theirs_err = (expected.double() - truth).abs()
            assert ours_err.max() <= theirs_err.max() + f32_err.max(), (ours_err.max(), theirs_err.max())
            assert (ours_err <= 0.5 * ulp_of(truth.to(dtype)) + f32_err).all()
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
    def test_selective_log_softmax(self, swapped, rng, dtype):
        assert U.selective_log_softmax is ft.selective_log_softmax
        input_ids = torch.randint(0, 1024, (4, 32), generator=rng)
        logits = torch.randn(4, 32, 1024, generator=rng).to(dtype)
        expected = torch.gather(logits.log_softmax(-1), -1, input_ids.unsqueeze(-1)).squeeze(-1)
        actual = U.selective_log_softmax(logits, input_ids)
        self._check(actual.unsqueeze(-1), expected.unsqueeze(-1), logits, input_ids.unsqueeze(-1), dtype)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("k", [1, 8])
    def test_selective_log_softmax_multi_index(self, swapped, rng, dtype, k):
        index = torch.randint(0, 1024, (4, 32, k), generator=rng)
        logits = torch.randn(4, 32, 1024, generator=rng).to(dtype)
        expected = torch.gather(logits.log_softmax(-1), -1, index)
        actual = U.selective_log_softmax(logits, index)
        assert actual.shape == (4, 32, k)
        self._check(actual, expected, logits, index, dtype)


def _trl_kernel_reference(logits, index, temperature, row_mask):
    logits = logits.float() / temperature
    logp = logits.log_softmax(-1)
    lp = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    if row_mask is not None:
        lp, ent = lp.masked_fill(~row_mask, 0.0), ent.masked_fill(~row_mask, 0.0)
    return lp, ent


@pytest.mark.skipif(not HAS_KERNEL_FN, reason="trl.kernels has no selective_log_softmax_and_entropy here")
class TestTRLSuiteLogProbEntropy:
    """huggingface/trl tests/test_kernels.py::TestLogProbEntropy (V=2053, sliced views, +-20 blocks)."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize(("lp_w", "ent_w", "use_mask"), [(2, None, True), (None, 0.5, True), (2, 0.5, True),
                                                             (2, 0.5, False)])
    def test_forward_and_backward(self, swapped, rng, dtype, lp_w, ent_w, use_mask):
        assert K.selective_log_softmax_and_entropy is ft.kernel_selective_log_softmax_and_entropy
        assert U._fused_logprob_entropy is ft.kernel_selective_log_softmax_and_entropy
        V = 2053
        base = torch.randn(2, 5, V, generator=rng).to(dtype)
        base[..., :1024].add_(20)
        base[..., 1024:2048].sub_(20)
        base.requires_grad_()
        logits = base[:, 1:4]  # a non-contiguous view, as TRL passes
        index = torch.randint(V, (2, 5), generator=rng)[:, 1:4]
        index[0, 0] = V - 1
        mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)[:, 1:4]
        row_mask = mask if use_mask else None

        lp, ent = K.selective_log_softmax_and_entropy(logits, index, temperature=0.7, row_mask=row_mask)
        assert lp.dtype == ent.dtype == torch.float32
        lp[0, 2] = 0.0  # editing an output must not corrupt what backward saved
        loss = (lp_w * lp.sum() if lp_w else 0.0) + (ent_w * ent.sum() if ent_w else 0.0)
        loss.backward()

        ref_in = base.detach().clone().requires_grad_()
        ref_lp, ref_ent = _trl_kernel_reference(ref_in[:, 1:4], index, 0.7, row_mask)
        ref_lp[0, 2] = 0.0
        ref_loss = (lp_w * ref_lp.sum() if lp_w else 0.0) + (ent_w * ref_ent.sum() if ent_w else 0.0)
        ref_loss.backward()
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base.grad, ref_in.grad, rtol=1e-3, atol=1e-3)


    def test_torch_compile_fullgraph(self, swapped):
        # TRL compiles with the default backend; aot_eager traces the same graph, cheaply on CPU.
        logits = torch.randn(2, 3, 257, dtype=torch.bfloat16, requires_grad=True)
        index = torch.randint(257, (2, 3))
        row_mask = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)

        def loss(logits, index, row_mask):
            lp, ent = K.selective_log_softmax_and_entropy(logits, index, temperature=0.8, row_mask=row_mask)
            return (lp + 0.1 * ent).sum()

        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(logits, index, row_mask)
        compiled.backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
        assert torch.count_nonzero(logits.grad[~row_mask]) == 0
        # The traced graph computes what eager does (custom ops, not a silent fallback).
        eager_in = logits.detach().clone().requires_grad_()
        eager = loss(eager_in, index, row_mask)
        eager.backward()
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(logits.grad, eager_in.grad)


class TestTRLSuiteChunkedLogProbFunction:
    """huggingface/trl tests/test_kernels.py::TestChunkedLogProbFunction (N=64, H=32, V=128, chunk 32)."""

    N, H, V, CHUNK = 64, 32, 128, 32

    @staticmethod
    def reference(hidden, weight, labels, temperature, bias=None, logit_scale=1.0, softcap=None):
        logits = hidden @ weight.t()
        if bias is not None:
            logits = logits + bias
        logits = logits.to(torch.float32) * logit_scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits / temperature
        log_p = F.log_softmax(logits, dim=-1)
        return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)

    def inputs(self, rng, dtype=torch.float32, grad=(False, False)):
        hidden = torch.randn(self.N, self.H, generator=rng).to(dtype).requires_grad_(grad[0])
        weight = torch.randn(self.V, self.H, generator=rng).to(dtype).requires_grad_(grad[1])
        labels = torch.randint(0, self.V, (self.N,), generator=rng)
        return hidden, weight, labels

    @pytest.fixture(autouse=True)
    def _is_fastppo(self, swapped):
        assert K.ChunkedLogProbFunction is ft.ChunkedLogProbFunction
        assert U._ChunkedLogProbFunction is ft.ChunkedLogProbFunction

    @pytest.mark.parametrize("temperature", [1.0, 0.7])
    def test_forward(self, rng, temperature):
        # TRL also checks its own row tiling (TOKEN_CHUNK_SIZE); fastppo tiles its own way.
        hidden, weight, labels = self.inputs(rng)
        lp, ent, *_ = K.ChunkedLogProbFunction.apply(hidden, weight, None, labels, temperature, self.CHUNK)
        ref_lp, ref_ent = self.reference(hidden, weight, labels, temperature)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)

    def test_log_sum_sq_probs(self, rng):
        hidden, weight, labels = self.inputs(rng)
        _, _, lssp, _, _ = K.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.7, self.CHUNK)
        logits = (hidden @ weight.t()) / 0.7
        expected = torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)
        torch.testing.assert_close(lssp, expected, atol=1e-5, rtol=1e-5)

    def test_mean_logits(self, rng):
        hidden, weight, labels = self.inputs(rng)
        _, _, _, mean, _ = K.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.7, self.CHUNK)
        torch.testing.assert_close(mean, (hidden @ weight.t()).mean(-1) / 0.7, atol=1e-5, rtol=1e-5)

    def test_is_top1_matches_argmax_with_ties(self, rng):
        hidden, weight, _ = self.inputs(rng)
        weight[self.V // 2:] = weight[: self.V - self.V // 2]  # exact ties; argmax takes the first
        argmax = (hidden @ weight.t()).argmax(-1)
        labels = torch.where(torch.arange(self.N) % 2 == 0, argmax, argmax + self.V // 2).clamp(max=self.V - 1)
        *_, is_top1 = K.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, self.CHUNK)
        torch.testing.assert_close(is_top1, argmax == labels)

    @pytest.mark.parametrize(("logit_scale", "softcap"), [(0.5, None), (1.0, 30.0), (0.5, 30.0)])
    def test_logit_scale_and_softcapping(self, rng, logit_scale, softcap):
        # With a softcap the call goes to TRL's own class (fastppo has no softcap): checked below.
        hidden, weight, labels = self.inputs(rng)
        with mock_patch.object(TRL_CHUNKED, "apply", wraps=TRL_CHUNKED.apply) as theirs:
            lp, ent, *_ = K.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.7, self.CHUNK, softcap,
                                                         logit_scale)
        assert theirs.called == (softcap is not None)
        ref_lp, ref_ent = self.reference(hidden, weight, labels, 0.7, logit_scale=logit_scale, softcap=softcap)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)

    def check_bf16_against_truth(self, ours, leaves, loss_of, tol):
        """TRL's bf16 cases compare with a reference that rounds the logits to bf16 (as TRL's own
        tile does); fastppo keeps them in float32, so it is compared with the float64 answer of the
        same rounded inputs (the reference casts its logits to float32 after the float64 matmul), at
        TRL's tolerance, and must be at least as close to it as TRL's reference is."""
        exact = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
        loss_of(exact).backward()
        rounded = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        loss_of(rounded).backward()
        for a, e, r in zip(ours, exact, rounded):
            if e.grad is None:
                continue
            torch.testing.assert_close(a.double(), e.grad, atol=tol, rtol=tol)
            assert (a.double() - e.grad).abs().max() <= (r.grad.double() - e.grad).abs().max() + 1e-3

    @pytest.mark.parametrize(("dtype", "temperature", "tol"), [
        (torch.float32, 1.0, 1e-5), (torch.float32, 0.7, 1e-5), (torch.bfloat16, 1.0, 1e-2), (torch.bfloat16, 0.7, 1e-2)])
    def test_backward(self, rng, dtype, temperature, tol):
        hidden, weight, labels = self.inputs(rng, dtype, grad=(True, True))
        lp, *_ = K.ChunkedLogProbFunction.apply(hidden, weight, None, labels, temperature, self.CHUNK)
        lp.sum().backward()
        grads = hidden.grad.clone(), weight.grad.clone()
        if dtype == torch.bfloat16:  # deviation: see check_bf16_against_truth
            self.check_bf16_against_truth(grads, (hidden, weight), lambda t: self.reference(
                t[0], t[1], labels, temperature)[0].sum(), tol)
            return
        hidden.grad = weight.grad = None
        self.reference(hidden, weight, labels, temperature)[0].sum().backward()
        torch.testing.assert_close(grads[0], hidden.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(grads[1], weight.grad, atol=tol, rtol=tol)

    def test_backward_bfloat16_hidden_float32_weight(self, rng):
        hidden, _, labels = self.inputs(rng, torch.bfloat16, grad=(True, False))
        weight = torch.randn(self.V, self.H, generator=rng, requires_grad=True)
        lp, *_ = K.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, self.CHUNK)
        lp.sum().backward()
        grads = hidden.grad.clone(), weight.grad.clone()
        assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
        # TRL: weight cast to hidden's dtype, then the bf16-logits reference; deviation as above.
        ref, _ = self.reference(hidden.detach().double(), weight.detach().to(hidden.dtype).double(), labels, 1.0)
        torch.testing.assert_close(lp, ref, atol=1e-2, rtol=1e-2)
        # The weight is rounded to bf16 in the truth too: that rounding is TRL's contract.
        self.check_bf16_against_truth(grads, (hidden, weight), lambda t: self.reference(
            t[0], t[1].to(torch.bfloat16).to(t[0].dtype), labels, 1.0)[0].sum(), 1e-2)

    def test_backward_uses_autocast_hidden_for_weight_gradient(self, rng):
        hidden = torch.linspace(1.0, 2.0, self.N * self.H).reshape(self.N, self.H).to(torch.bfloat16).float()
        perturbed = hidden + 1e-4
        assert torch.equal(hidden.to(torch.bfloat16), perturbed.to(torch.bfloat16))
        hidden.requires_grad_()
        perturbed.requires_grad_()
        weight = torch.randn(self.V, self.H, generator=rng, requires_grad=True)
        weight2 = weight.detach().clone().requires_grad_()
        labels = torch.randint(0, self.V, (self.N,), generator=rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, *_ = K.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, self.CHUNK)
            lp2, *_ = K.ChunkedLogProbFunction.apply(perturbed, weight2, None, labels, 1.0, self.CHUNK)
        lp.sum().backward()
        lp2.sum().backward()
        torch.testing.assert_close(lp, lp2, rtol=0, atol=0)
        torch.testing.assert_close(weight.grad, weight2.grad, rtol=0, atol=0)

    @pytest.mark.parametrize("temperature", [1.0, 0.7])
    def test_backward_entropy_and_combined(self, rng, temperature):
        for coef_lp, coef_ent in ((0.0, 1.0), (2.0, 0.5)):
            hidden, weight, labels = self.inputs(rng, grad=(True, True))
            lp, ent, *_ = K.ChunkedLogProbFunction.apply(hidden, weight, None, labels, temperature, self.CHUNK)
            (coef_lp * lp + coef_ent * ent).sum().backward()
            grads = hidden.grad.clone(), weight.grad.clone()
            hidden.grad = weight.grad = None
            ref_lp, ref_ent = self.reference(hidden, weight, labels, temperature)
            (coef_lp * ref_lp + coef_ent * ref_ent).sum().backward()
            torch.testing.assert_close(grads[0], hidden.grad, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(grads[1], weight.grad, atol=1e-4, rtol=1e-4)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_bias(self, rng, dtype):
        hidden, weight, labels = self.inputs(rng, dtype, grad=(True, True))
        bias = torch.randn(self.V, generator=rng).to(dtype).requires_grad_()
        lp, ent, *_ = K.ChunkedLogProbFunction.apply(hidden, weight, bias, labels, 0.7, self.CHUNK)
        (2.0 * lp + 0.5 * ent).sum().backward()
        grads = hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()
        atol, rtol = (5e-2, 2e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)
        leaves = (hidden, weight, bias)
        if dtype == torch.bfloat16:  # deviation: see check_bf16_against_truth
            ref_lp, ref_ent = self.reference(*(t.detach().double() for t in leaves[:2]), labels, 0.7,
                                             bias.detach().double())
            torch.testing.assert_close(lp, ref_lp, atol=atol, rtol=rtol)
            torch.testing.assert_close(ent, ref_ent, atol=atol, rtol=rtol)

            def loss_of(t):
                r_lp, r_ent = self.reference(t[0], t[1], labels, 0.7, t[2])
                return (2.0 * r_lp + 0.5 * r_ent).sum()

            self.check_bf16_against_truth(grads, leaves, loss_of, atol)
            return
        hidden.grad = weight.grad = bias.grad = None
        ref_lp, ref_ent = self.reference(hidden, weight, labels, 0.7, bias)
        (2.0 * ref_lp + 0.5 * ref_ent).sum().backward()
        torch.testing.assert_close(lp, ref_lp, atol=atol, rtol=rtol)
        torch.testing.assert_close(ent, ref_ent, atol=atol, rtol=rtol)
        for actual, expected in zip(grads, (hidden.grad, weight.grad, bias.grad), strict=True):
            torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)

    def test_backward_skips_frozen_parameter_gradients(self, rng):
        hidden, weight, labels = self.inputs(rng, grad=(True, False))
        bias = torch.randn(self.V, generator=rng)
        lp, *_ = K.ChunkedLogProbFunction.apply(hidden, weight, bias, labels, 1.0, self.CHUNK)
        with mock_patch.object(torch, "zeros", wraps=torch.zeros) as zeros:
            lp.sum().backward()
        shapes = [c.args[0] if len(c.args) == 1 else tuple(c.args) for c in zeros.call_args_list]
        assert weight.shape not in shapes and tuple(weight.shape) not in shapes
        assert bias.shape not in shapes and tuple(bias.shape) not in shapes
        assert hidden.grad is not None

    @pytest.mark.parametrize("requires_grad", [(True, False, False), (False, True, False), (False, False, True)])
    def test_backward_with_partially_frozen_inputs(self, rng, requires_grad):
        hidden, weight, labels = self.inputs(rng)
        bias = torch.randn(self.V, generator=rng)
        for t, g in zip((hidden, weight, bias), requires_grad):
            t.requires_grad_(g)
        lp, *_ = K.ChunkedLogProbFunction.apply(hidden, weight, bias, labels, 1.0, self.CHUNK)
        lp.sum().backward()
        refs = [t.detach().clone().requires_grad_(g) for t, g in zip((hidden, weight, bias), requires_grad)]
        self.reference(refs[0], refs[1], labels, 1.0, refs[2])[0].sum().backward()
        for ours, ref in zip((hidden, weight, bias), refs):
            if ref.grad is None:
                assert ours.grad is None
            else:
                torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-5)


# =============================================================================================
# 2. Random inputs: float64 ground truth and TRL's own functions
# =============================================================================================


def _gt_topk(logits, index, temperature, row_mask):
    """float64 ground truth of log_softmax(logits / T) at [..., K] indices (differentiable)."""
    expanded = logits.unsqueeze(-2).expand(*index.shape, logits.shape[-1])
    return gt.logprobs_from_logits(expanded, index, temperature=temperature, mask=row_mask).reshape(index.shape)


def _mask(rng, shape):
    m = torch.rand(shape, generator=rng) > 0.3
    m.view(-1, shape[-1])[0] = False  # a row (or a position's K entries) with nothing valid
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 1, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_selective_log_softmax_vs_float64_and_trl(rng, dtype, k, temperature, masked):
    shape = (3, 7, 37)
    logits = randn(rng, *shape, scale=4.0, dtype=dtype)
    index = torch.randint(0, 37, shape[:-1] if k is None else (*shape[:-1], k), generator=rng)
    if k == 4:
        index[0, 0, 1] = index[0, 0, 0]  # a duplicate index
    row_mask = _mask(rng, index.shape).long() if masked else None
    ours_in = logits.clone().requires_grad_()
    truth_in = logits.double().requires_grad_()
    ours = ft.selective_log_softmax(ours_in, index, temperature, row_mask)
    assert ours.dtype == dtype and ours.shape == index.shape
    idx_k = index if k else index.unsqueeze(-1)
    mask_k = None if row_mask is None else (row_mask if k else row_mask.unsqueeze(-1))
    truth = _gt_topk(truth_in, idx_k, temperature, mask_k)
    truth = truth if k else truth.squeeze(-1)
    # One rounding of a float32 value: half an ulp of the output dtype, plus float32's own error.
    half_ulp = 0.5 * ulp_of(truth.detach().to(dtype))
    assert ((ours.detach().double() - truth.detach()).abs() <= half_ulp + 2e-5 * (1 + truth.detach().abs())).all()
    theirs = TRL_SLS(logits, index, temperature, row_mask)
    assert theirs.dtype == ours.dtype
    if dtype == torch.bfloat16 and temperature != 1.0:
        # TRL divides bf16 logits by T in bf16: each z/T is off by up to 2^-9 |z/T|, which moves
        # the picked value and the row's log-sum-exp (by at most 2^-9 max|z/T|), and it rounds its
        # output once more. Worked: z = 9.5, T = 0.7 gives z/T = 13.57, rounded to 13.5625.
        zt = logits.double() / temperature
        picked = zt.gather(-1, idx_k).abs()
        lse_err = zt.abs().amax(-1, keepdim=True)
        bound = 2.0 ** -9 * (picked + lse_err)
        bound = (bound if k else bound.squeeze(-1)) + ulp_of(theirs.detach()) + TOL[dtype][0]
        gap = (ours.detach().double() - theirs.detach().double()).abs()
        assert (gap <= bound).all(), f"vs TRL: {gap.max().item():.3e} over its own bf16 rounding"
    else:
        assert_close(ours, theirs.detach(), TOL[dtype], "vs TRL's selective_log_softmax")
    # Gradients against float64, through a weighted sum (every entry its own weight).
    w = randn(rng, *index.shape)
    (ours.float() * w).sum().backward()
    (truth * w.double()).sum().backward()
    assert_close(ours_in.grad, truth_in.grad, TOL[dtype], "d logits")
    if masked:
        dead = (row_mask == 0) if k is None else (row_mask == 0).all(-1)
        assert (ours_in.grad[dead] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_and_entropy_exact_at_1e4(rng, dtype):
    logits = randn(rng, 3, 5, 50, scale=1e4, dtype=dtype)
    index = torch.randint(0, 50, (3, 5, 4), generator=rng)
    index[..., 1] = logits.argmax(-1)  # log-prob ~0 next to ones of about -1e4
    lp = ft.selective_log_softmax(logits, index, 0.7)
    truth = _gt_topk(logits.double(), index, 0.7, None)
    # The float32 answer rounded once to the output dtype: half an ulp, plus float32's own error.
    bound = 0.5 * ulp_of(truth.to(dtype)) + 1e-6 * (1 + truth.abs())
    assert ((lp.double() - truth).abs() <= bound).all()
    ent = ft.entropy_from_logits(logits)
    assert_close(ent, gt.entropy_from_logits(logits), TOL[dtype], "entropy at 1e4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_tied_logits_at_distinct_indices_keep_their_own_gradient(dtype):
    """Two different indices with the same logit (common in bf16): each log-prob's gradient must
    land on its own logit. Worked: logits [1, 2, 2, 0] (T = 1), index [1, 2, 3], weights w = [a, b, c]
    on the log-probs: d/dz_j = w_j [j picked] - p_j * (a + b + c)."""
    logits = torch.tensor([[[1.0, 2.0, 2.0, 0.0]]], dtype=dtype, requires_grad=True)
    index = torch.tensor([[[1, 2, 3]]])
    w = torch.tensor([[[-2.0, 1.5, 0.25]]])
    lp = ft.selective_log_softmax(logits, index, 1.0)
    (lp.float() * w).sum().backward()
    z = torch.tensor([1.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    p = z.softmax(-1)
    want = -p * w.sum().double()
    want[1:] += w[0, 0].double()
    assert_close(lp.float()[0, 0], (z - z.logsumexp(-1))[1:], TOL[dtype], "tied log-probs")
    assert_close(logits.grad[0, 0], want, TOL[dtype], "gradient of tied distinct indices")


def test_top_k_worked_example():
    # softmax(log [1, 2, 3, 4, 0]) = [0.1, 0.2, 0.3, 0.4, 0]: the fifth logit is -inf.
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]] * 3)).requires_grad_()
    index = torch.tensor([[3, 0, 0, 2], [4, 1, 4, 3], [4, 4, 4, 4]])
    lp = ft.selective_log_softmax(logits, index)
    expected = torch.log(torch.tensor([[0.4, 0.1, 0.1, 0.3], [0.0, 0.2, 0.0, 0.4], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(lp.detach(), expected, (1e-6, 1e-6), "worked top-K log-probs")
    # Gradient of sum_k lp_k at temperature 1: count(v in index) - K * p_v, here for row 0:
    # [2, 0, 1, 1, 0] - 4 * [0.1, 0.2, 0.3, 0.4, 0] = [1.6, -0.8, -0.2, -0.6, 0].
    lp[0].sum().backward()
    assert_close(logits.grad[0], torch.tensor([1.6, -0.8, -0.2, -0.6, 0.0]), (1e-6, 1e-6), "worked gradient")
    assert (logits.grad[1:] == 0).all()


def test_top_k_nan_stays_in_its_row_and_never_leaks_from_masked_entries():
    logits = torch.randn(4, 9)
    logits[1, 3] = math.nan  # a valid row with a NaN logit: its log-probs are NaN
    logits[2] = math.nan  # a fully masked row: never read
    logits = logits.requires_grad_()
    index = torch.tensor([[0, 1], [2, 5], [1, 2], [3, 3]])
    row_mask = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 1]])
    lp = ft.selective_log_softmax(logits, index, 0.9, row_mask)
    assert torch.isnan(lp[1]).all()
    assert lp[0, 1] == 0 and (lp[2] == 0).all() and torch.isfinite(lp[[0, 3]]).all()
    lp[[0, 2, 3]].sum().backward()
    # Row 1 is NaN in and its gradient NaN too, as PyTorch's own log_softmax gives it.
    assert torch.isfinite(logits.grad[[0, 2, 3]]).all() and (logits.grad[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 33), (5, 17), (2, 1, 3, 9), (11,)])
def test_entropy_from_logits_vs_float64_and_trl(rng, dtype, shape):
    logits = randn(rng, *shape, scale=3.0, dtype=dtype)
    ours_in, truth_in = logits.clone().requires_grad_(), logits.double().requires_grad_()
    ours = ft.entropy_from_logits(ours_in)
    assert ours.dtype == dtype and ours.shape == logits.shape[:-1]
    truth = gt.entropy_from_logits(truth_in)
    assert_close(ours, truth.detach(), TOL[dtype], "entropy")
    assert_close(ours, TRL_ENT(logits), TOL[dtype], "vs TRL's entropy_from_logits")
    ours.float().sum().backward()
    truth.sum().backward()
    assert_close(ours_in.grad, truth_in.grad, TOL[dtype], "d logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_vs_float64_and_trl(rng, dtype, entropy_requires_grad):
    logits = randn(rng, 3, 6, 21, scale=2.0, dtype=dtype)
    index = torch.randint(0, 21, (3, 6), generator=rng)
    row_mask = _mask(rng, (3, 6))
    ours_in, truth_in = logits.clone().requires_grad_(), logits.double().requires_grad_()
    lp, ent = ft.selective_log_softmax_and_entropy(ours_in, index, entropy_requires_grad, 0.8, row_mask)
    assert lp.dtype == ent.dtype == dtype and ent.requires_grad == entropy_requires_grad
    t_lp, t_ent = gt.logprobs_from_logits(truth_in, index, temperature=0.8, return_entropy=True, mask=row_mask)
    assert_close(lp, t_lp.detach(), TOL[dtype], "log-probs")
    assert_close(ent, t_ent.detach(), TOL[dtype], "entropy")
    r_lp, r_ent = TRL_SLSE(logits, index, entropy_requires_grad, 0.8, row_mask)
    assert r_lp.dtype == lp.dtype
    assert_close(lp, r_lp, TOL[dtype], "vs TRL log-probs")
    assert_close(ent, r_ent, TOL[dtype], "vs TRL entropy")
    loss = lp.float().sum() + (0.3 * ent.float().sum() if entropy_requires_grad else 0.0)
    loss.backward()
    (t_lp.sum() + (0.3 * t_ent.sum() if entropy_requires_grad else 0.0)).backward()
    assert_close(ours_in.grad, truth_in.grad, TOL[dtype], "d logits")


@pytest.mark.skipif(not HAS_KERNEL_FN, reason="trl.kernels has no selective_log_softmax_and_entropy here")
def test_kernel_contract_float32_outputs_and_temperature_check(rng):
    logits = randn(rng, 4, 50, dtype=torch.bfloat16)
    index = torch.randint(0, 50, (4,), generator=rng)
    lp, ent = ft.kernel_selective_log_softmax_and_entropy(logits, index, 0.5)
    assert lp.dtype == ent.dtype == torch.float32  # TRL's kernel returns float32 whatever the logits
    t_lp, t_ent = gt.logprobs_from_logits(logits, index, temperature=0.5, return_entropy=True)
    assert_close(lp, t_lp, (2e-5, 2e-5), "log-probs")
    assert_close(ent, t_ent, (2e-5, 2e-5), "entropy")
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be positive"):
            ft.kernel_selective_log_softmax_and_entropy(logits, index, bad)
        with pytest.raises(ValueError, match="temperature must be positive"):
            ft.selective_log_softmax(logits, index, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("temperature", "logit_scale", "with_bias"), [(1.0, 1.0, False), (0.7, 0.5, True)])
def test_chunked_logprob_vs_float64_and_trl(rng, dtype, temperature, logit_scale, with_bias):
    N, H, V = 19, 12, 75
    hidden = randn(rng, N, H, dtype=dtype)
    weight = randn(rng, V, H, scale=0.5, dtype=dtype)
    bias = randn(rng, V, dtype=dtype) if with_bias else None
    labels = torch.randint(0, V, (N,), generator=rng)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    t_leaves = [t.detach().double().requires_grad_() for t in leaves]
    outs = ft.ChunkedLogProbFunction.apply(leaves[0], leaves[1], leaves[2] if with_bias else None, labels,
                                           temperature, 16, None, logit_scale)
    lp, ent, lssp, mean, top1 = outs
    assert all(o.dtype == torch.float32 for o in (lp, ent, lssp, mean)) and top1.dtype == torch.bool
    # float64 ground truth of the same (already rounded) inputs.
    t_lp, t_ent = gt.linear_logprobs(t_leaves[0] * logit_scale, t_leaves[1], labels,
                                     bias=(t_leaves[2] * logit_scale) if with_bias else None,
                                     temperature=temperature, return_entropy=True)
    assert_close(lp, t_lp.detach(), (2e-5, 2e-5), "log-probs")
    assert_close(ent, t_ent.detach(), (2e-5, 2e-5), "entropy")
    z = (hidden.double() @ weight.double().T + (bias.double() if with_bias else 0.0)) * logit_scale / temperature
    extras_tol = (2e-5, 2e-5) if dtype == torch.float32 else (2e-2, 2e-2)  # TRL rounds the tile to bf16
    assert_close(lssp, torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1), extras_tol, "log_sum_sq_probs")
    assert_close(mean, z.mean(-1), extras_tol, "mean_logits")
    theirs = TRL_CHUNKED.apply(hidden, weight, bias, labels, temperature, 16, None, logit_scale)
    for name, a, b in zip(("log-probs", "entropy", "log_sum_sq_probs", "mean_logits"), outs, theirs):
        assert_close(a, b, (2e-5, 2e-5) if dtype == torch.float32 else (2e-2, 2e-2), f"vs TRL {name}")
    assert torch.equal(top1, theirs[4])
    g_lp, g_ent = randn(rng, N), randn(rng, N)
    ((lp * g_lp) + (ent * g_ent)).sum().backward()
    ((t_lp * g_lp.double()) + (t_ent * g_ent.double())).sum().backward()
    for name, a, b in zip(("hidden", "weight", "bias"), leaves, t_leaves):
        assert a.grad.dtype == dtype
        assert_close(a.grad, b.grad, TOL[dtype], f"d {name}")


def test_chunked_logprob_outputs_selection_and_empty_batch():
    h = torch.randn(5, 4)
    w = torch.randn(7, 4)
    t = torch.randint(0, 7, (5,))
    lp, ent, lssp, mean, top1 = ft.ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 3, None, 1.0, ("log_probs",))
    assert lp.shape == (5,) and ent is None and lssp is None and mean is None and top1 is None
    # An all-masked micro-batch (TRL scores only the valid positions): 0 rows, still differentiable.
    h0 = torch.randn(0, 4, requires_grad=True)
    lp0, ent0, *_ = ft.ChunkedLogProbFunction.apply(h0, w, None, t[:0], 1.0, 3, None, 1.0, ("log_probs", "entropy"))
    assert lp0.shape == ent0.shape == (0,) and lp0.requires_grad
    (lp0.sum() + ent0.sum()).backward()
    assert h0.grad.shape == (0, 4)


# =============================================================================================
# 3. patch(): what is swapped, and TRL's own fused LM head running on fastppo
# =============================================================================================


def test_patch_swaps_every_binding_and_restores_them(monkeypatch):
    ft.unpatch()
    bindings = [(U, "selective_log_softmax", TRL_SLS), (U, "entropy_from_logits", TRL_ENT),
                (U, "selective_log_softmax_and_entropy", TRL_SLSE), (U, "_ChunkedLogProbFunction", TRL_CHUNKED),
                (K, "ChunkedLogProbFunction", TRL_CHUNKED), (CLP, "ChunkedLogProbFunction", TRL_CHUNKED)]
    if HAS_KERNEL_FN:
        kern = importlib.import_module("trl.kernels.logprob_entropy").selective_log_softmax_and_entropy
        bindings += [(U, "_fused_logprob_entropy", kern), (K, "selective_log_softmax_and_entropy", kern)]
    for module, name, original in bindings:
        assert getattr(module, name) is original, (module.__name__, name)
    # A trainer module that imported the kernel's name before patch(), and one imported after.
    early = types.ModuleType("trl.trainer._fastppo_early")
    early.ChunkedLogProbFunction = TRL_CHUNKED
    monkeypatch.setitem(sys.modules, early.__name__, early)
    try:
        ft.patch()
        ft.patch()  # idempotent
        for module, name, original in bindings:
            assert getattr(module, name) is not original, (module.__name__, name)
            assert getattr(module, name).__module__ == "fastppo.integrations.trl"
        assert early.ChunkedLogProbFunction is ft.ChunkedLogProbFunction
        late = types.ModuleType("trl.trainer._fastppo_late")
        late.ChunkedLogProbFunction = K.ChunkedLogProbFunction
        monkeypatch.setitem(sys.modules, late.__name__, late)
    finally:
        ft.unpatch()
    for module, name, original in bindings:
        assert getattr(module, name) is original, (module.__name__, name)
    assert early.ChunkedLogProbFunction is TRL_CHUNKED and late.ChunkedLogProbFunction is TRL_CHUNKED


def _tiny_model(seed):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("outputs", [("log_probs", "entropy"), ("log_probs", "entropy", "log_sum_sq_probs",
                                                                "mean_logits", "is_top1")])
def test_trl_fused_lm_head_runs_on_fastppo(rng, outputs):
    """GRPOTrainer's path in TRL 1.16: add_fused_lm_head -> model(..., fused_lm_head=True)."""
    model = _tiny_model(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    U.add_fused_lm_head(model, temperature=0.7, outputs=outputs)
    ids = torch.randint(0, 97, (3, 9), generator=rng)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return out, grads

    theirs, their_grads = run()
    with ft.patched(), mock_patch.object(ft.ChunkedLogProbFunction, "apply",
                                         wraps=ft.ChunkedLogProbFunction.apply) as ours_called:
        ours, our_grads = run()
    assert ours_called.call_count == 1
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        if name in outputs:
            assert_close(getattr(ours, name), getattr(theirs, name).detach(), (2e-5, 2e-5), name)
    if "is_top1" in outputs:
        assert torch.equal(ours.is_top1, theirs.is_top1)
    assert_close(ours.loss, theirs.loss.detach(), (2e-5, 2e-5), "loss")
    for a, b in zip(our_grads, their_grads):
        assert_close(a, b, (1e-5, 1e-4), "parameter gradient")
