"""Regression tests for the op defects of issue 18, item 6; each one failed before its fix.

a. Under ``torch.compile(fullgraph=True)`` a bad input raised dynamo's ``Unsupported`` instead of
   the op's own ``ValueError``.
b. ``linear_logprobs`` double backward on the chunked (CPU) and Triton paths.
c. The CPU chunked path gave a NaN entropy for a -inf logit made by the matmul.
d. ``group_advantages`` gave silent zeros when the float32 variance of the scores overflowed.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import groundtruth as gt
from helpers import TOL_FP32_OUT, assert_close

BACKENDS = ("torch", "triton")
F64 = torch.float64
NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------------------------
# a. The op's ValueError under torch.compile(fullgraph=True), the message of eager
# --------------------------------------------------------------------------------------------

B, T, V, H = 4, 3, 5, 6


def _bt(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (B, T)), dtype=dtype)


def _mask(*shape):
    return torch.ones(*(shape or (B, T)), dtype=torch.bool)


def _labels(*shape):
    return torch.randint(0, V, shape or (B, T))


def _losses(n):
    return [_bt() for _ in range(n)] + [_mask()]


# (op, tensors, the call on them with the bad option as a constant, the op's message). One case
# per kind of check: shape, rank, dtype, device, None where a tensor is required, non-finite or
# out-of-range numbers, unknown choices, non-bool flags.
CASES = [
    ("logprobs_from_logits", lambda: [_bt(B, T, V), _labels()],
     lambda x, y: fastppo.logprobs_from_logits(x, y, temperature=0.0), r"temperature must be > 0\.0, got 0\.0"),
    ("logprobs_from_logits", lambda: [_bt(B, T, V), _bt()],
     lambda x, y: fastppo.logprobs_from_logits(x, y), r"labels must be an integer tensor, got torch\.float32"),
    ("logprobs_from_logits", lambda: [_bt(B, T, V), _labels(B, T + 1)],
     lambda x, y: fastppo.logprobs_from_logits(x, y), r"labels have shape \[4, 4\] but logits \[4, 3, 5\] need"),
    ("entropy_from_logits", lambda: [_bt(V)],
     lambda x: fastppo.entropy_from_logits(x), r"logits must be \[B, T, V\] or \[N, V\], got shape \[5\]"),
    ("entropy_from_logits", lambda: [_bt(B, V)],
     lambda x: fastppo.entropy_from_logits(x, temperature=NAN), r"temperature must be finite, got nan"),
    ("kl_penalty", lambda: [_bt(), _bt()],
     lambda a, b: fastppo.kl_penalty(a, b, "k9"), r"unknown KL estimator 'k9'; expected one of k1, abs, k2, k3"),
    ("kl_penalty", lambda: [_bt(), _bt(dtype=F64)],
     lambda a, b: fastppo.kl_penalty(a, b), r"ref_logprobs has dtype torch\.float64 but logprobs has torch\.float32"),
    ("kl_penalty", lambda: [_bt(), _bt().to("meta")],
     lambda a, b: fastppo.kl_penalty(a, b), r"ref_logprobs is on meta but logprobs is on cpu"),
    ("kl_penalty", lambda: [_bt(), _bt()],
     lambda a, b: fastppo.kl_penalty(a, b, clamp=-1.0), r"clamp must be > 0\.0, got -1\.0"),
    ("shape_rewards", lambda: [_bt(B + 1), _bt(), _bt(), _mask()],
     lambda s, a, b, m: fastppo.shape_rewards(s, a, b, m, kl_coef=0.1), r"scores must be \[B\] = \[4\]"),
    ("shape_rewards", lambda: [_bt(B), _bt(), _bt()],
     lambda s, a, b: fastppo.shape_rewards(s, a, b, None, kl_coef=0.1), r"mask is required: expected a torch\.Tensor, got None"),
    ("gae", lambda: _losses(2),
     lambda r, v, m: fastppo.gae(r, v, m, gamma=1.5), r"gamma must be <= 1\.0, got 1\.5"),
    ("gae", lambda: [_bt(), _bt(B, T + 1), _mask()],
     lambda r, v, m: fastppo.gae(r, v, m), r"values has shape \[4, 4\] but rewards has \[4, 3\]"),
    ("masked_whiten", lambda: _losses(1),
     lambda x, m: fastppo.masked_whiten(x, m, eps=0.0), r"eps must be > 0\.0, got 0\.0"),
    ("masked_whiten", lambda: [_bt(), _mask(B, T + 1)],
     lambda x, m: fastppo.masked_whiten(x, m), r"mask has shape \[4, 4\] but x has \[4, 3\]"),
    ("compute_advantages", lambda: [_bt(B)] + _losses(3),
     lambda s, a, b, v, m: fastppo.compute_advantages(s, a, b, v, m, kl_coef=0.1, whiten="yes"),
     r"whiten must be True or False, got 'yes'"),
    ("compute_advantages", lambda: [_bt(B)] + _losses(3),
     lambda s, a, b, v, m: fastppo.compute_advantages(s, a, b, v, m, kl_coef=INF), r"kl_coef must be finite, got inf"),
    ("policy_loss", lambda: _losses(3),
     lambda a, b, c, m: fastppo.policy_loss(a, b, c, m, agg="mean"), r"unknown aggregation \(agg\) 'mean'"),
    ("policy_loss", lambda: _losses(3),
     lambda a, b, c, m: fastppo.policy_loss(a, b, c, m, dual_clip=1.0), r"dual_clip must be > 1\.0, got 1\.0"),
    ("policy_loss", lambda: [_bt(), _bt(), _mask()],
     lambda a, b, m: fastppo.policy_loss(a, b, None, m), r"advantages is required: expected a torch\.Tensor, got None"),
    ("value_loss", lambda: _losses(3),
     lambda a, b, c, m: fastppo.value_loss(a, b, c, m, clip=-0.1), r"clip must be >= 0\.0, got -0\.1"),
    ("value_loss", lambda: [_bt(B, T, 2), _bt(B, T, 2), _bt(B, T, 2), _mask(B, T, 2)],
     lambda a, b, c, m: fastppo.value_loss(a, b, c, m), r"values must be \[B, T\] \(2-D\), got shape \[4, 3, 2\]"),
    ("ppo_loss", lambda: _losses(6) + [_bt(B, 1)],
     lambda a, b, c, d, e, f, m, h: fastppo.ppo_loss(a, b, c, d, e, f, m, entropy=h),
     r"entropy has shape \[4, 1\] but logprobs has \[4, 3\]"),
    ("ppo_loss", lambda: _losses(6),
     lambda a, b, c, d, e, f, m: fastppo.ppo_loss(a, b, c, d, e, f, m, vf_coef=NAN), r"vf_coef must be finite, got nan"),
    ("aggregate", lambda: [torch.ones(B, T, dtype=torch.int64), _mask()],
     lambda x, m: fastppo.aggregate(x, m), r"loss_mat must be a floating tensor .* got torch\.int64"),
    ("linear_logprobs", lambda: [_bt(B, T, H), _bt(V, H + 1), _labels()],
     lambda h, w, y: fastppo.linear_logprobs(h, w, y), r"weight has shape \[5, 7\] but hidden has H = 6"),
    ("linear_logprobs", lambda: [_bt(B, T, H), _bt(V, H), _labels(), _bt(V + 1)],
     lambda h, w, y, b: fastppo.linear_logprobs(h, w, y, bias=b), r"bias must be \[V\] = \[5\] \(one per row of weight\)"),
    ("linear_logprobs", lambda: [_bt(B, T, H), _bt(V, H), _labels()],
     lambda h, w, y: fastppo.linear_logprobs(h, w, y, chunk_size=0), r"chunk_size must be None or an integer >= 1, got 0"),
    ("group_advantages", lambda: [_bt(B), _mask()],
     lambda s, m: fastppo.group_advantages(s, 3, m), r"group_size must divide the batch: B = 4 rows"),
    ("group_advantages", lambda: [_bt(B), _mask()],
     lambda s, m: fastppo.group_advantages(s, 2, m, estimator="ppo"), r"unknown group estimator 'ppo'"),
    ("reinforce_pp_advantages", lambda: _losses(1),
     lambda r, m: fastppo.reinforce_pp_advantages(r, m, gamma=-0.5), r"gamma must be >= 0\.0, got -0\.5"),
    ("gspo_loss", lambda: _losses(3),
     lambda a, b, c, m: fastppo.gspo_loss(a, b, c, m, dual_clip=0.5), r"dual_clip must be > 1\.0, got 0\.5"),
    ("geo_mean_loss", lambda: [_bt(), _bt(), _mask()],
     lambda a, b, m: fastppo.geo_mean_loss(a, b, None, m), r"advantages is required: expected a torch\.Tensor, got None"),
]


def test_the_trace_time_raise_carries_the_mark_of_assume_constant_result():
    """_checks marks it by hand (the decorator would import dynamo, and triton, with fastppo)."""
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert vars(marked) and vars(marked).items() <= vars(fastppo._checks._raise_traced).items()


def test_the_cases_cover_every_public_op():
    assert {op for op, *_ in CASES} == set(fastppo._library.OPS)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_raises_the_ops_value_error_under_fullgraph_compile(case, rng):
    op, make, call, message = CASES[case]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    tensors = make()
    with pytest.raises(ValueError, match=message):
        call(*tensors)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=message):
        torch.compile(call, fullgraph=True, backend="eager")(*tensors)


@pytest.mark.parametrize("case", [2, 9, 25, 28], ids=lambda i: CASES[i][0])
def test_bad_shapes_raise_the_ops_value_error_with_dynamic_shapes(case, rng):
    """dynamic=True: the message names the sizes of the call (symbolic while tracing)."""
    op, make, call, message = CASES[case]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=message):
        torch.compile(call, fullgraph=True, backend="eager", dynamic=True)(*make())


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_input_still_compiles_after_a_bad_one(backend, rng):
    """The failed check leaves nothing behind: the same function then compiles and runs."""
    lp, ref = (torch.randn(B, T, generator=rng) for _ in range(2))
    f = torch.compile(lambda a, b: fastppo.kl_penalty(a, b, "k1"), fullgraph=True, backend="eager")
    torch._dynamo.reset()
    with fastppo.use_backend(backend):
        with pytest.raises(ValueError, match="ref_logprobs has shape"):
            f(lp, ref[:, :2])
        assert_close(f(lp, ref), gt.kl_penalty(lp, ref, "k1"), TOL_FP32_OUT[torch.float32], "kl")


# --------------------------------------------------------------------------------------------
# b. linear_logprobs double backward: refused with a clear error on the loops' paths
# --------------------------------------------------------------------------------------------

# "auto" on CPU tensors is the chunked PyTorch path (fastppo/linear.py); "triton" its kernels.
LOOP_PATHS = ("auto", "triton")


def _linear_truth(leaves, labels):
    """float64 ground truth (log-probs, entropy) of ``linear_logprobs`` on float64 copies of the
    leaves, and those copies."""
    t = [x.detach().double().requires_grad_() for x in leaves]
    return gt.linear_logprobs(t[0], t[1], labels, bias=t[2], return_entropy=True), t


@pytest.mark.parametrize("backend", LOOP_PATHS)
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_linear_logprobs_double_backward_is_refused_by_name_after_exact_first_grads(backend, head, rng):
    """Both backwards (the recomputing one, and a frozen head's per-row one) refuse by name."""
    N, Hd, Vd = 6, 5, 7
    hidden, weight, bias = (torch.randn(*s, generator=rng).requires_grad_() for s in ((N, Hd), (Vd, Hd), (Vd,)))
    labels = torch.randint(0, Vd, (N,), generator=rng)
    leaves = (hidden, weight, bias) if head == "trainable" else (hidden,)
    with fastppo.use_backend(backend):
        args = (hidden, weight, bias) if head == "trainable" else (hidden, weight.detach(), bias.detach())
        lp, ent = fastppo.linear_logprobs(args[0], args[1], labels, bias=args[2], return_entropy=True, chunk_size=3)
        first = torch.autograd.grad((lp + ent).sum(), leaves, create_graph=True)
    (t_lp, t_ent), t_leaves = _linear_truth((hidden, weight, bias), labels)
    want = torch.autograd.grad((t_lp + t_ent).sum(), t_leaves[: len(leaves)])
    for name, g, w in zip(("hidden", "weight", "bias"), first, want):
        assert_close(g, w, (1e-4, 1e-4), f"d {name} with create_graph=True")
    with pytest.raises(NotImplementedError, match=r"double backward of linear_logprobs is not supported .*"
                                                  r"FASTPPO_BACKEND=torch"):
        torch.autograd.grad(first[0].square().sum(), leaves[-1])


def test_linear_logprobs_double_backward_still_works_on_the_reference(rng):
    """The way out that the error names: the full-logits reference, against float64 autograd."""
    N, Hd, Vd = 4, 3, 5
    hidden, weight = (torch.randn(*s, generator=rng).requires_grad_() for s in ((N, Hd), (Vd, Hd)))
    labels = torch.randint(0, Vd, (N,), generator=rng)
    with fastppo.use_backend("torch"):
        (dh,) = torch.autograd.grad(fastppo.linear_logprobs(hidden, weight, labels).sum(), hidden, create_graph=True)
        (ddw,) = torch.autograd.grad(dh.square().sum(), weight)
    t_h, t_w = (x.detach().double().requires_grad_() for x in (hidden, weight))
    (t_dh,) = torch.autograd.grad(gt.linear_logprobs(t_h, t_w, labels).sum(), t_h, create_graph=True)
    (t_ddw,) = torch.autograd.grad(t_dh.square().sum(), t_w)
    assert_close(ddw, t_ddw, (1e-4, 1e-4), "second-order d weight")


# --------------------------------------------------------------------------------------------
# c. A -inf logit out of the matmul: p log p = 0 on the chunked path too
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", LOOP_PATHS)
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_linear_logprobs_minus_inf_logits_from_the_matmul_match_float64(backend, head, rng):
    """Finite inputs whose product overflows float32 to a -inf logit in row 0 (1e30 * -1e20 at
    column 1; float64 keeps -1e50, p = 0 there), with a finite bias, then with a -inf bias entry
    (column 2) as well. Each -inf adds 0 to the entropy sum and its gradient, as in the float64
    ground truth (the overflow alone gave NaN on the CPU path: its floor looked at the bias only)."""
    N, Hd, Vd = 5, 4, 6
    hidden = torch.randn(N, Hd, generator=rng)
    weight = torch.randn(Vd, Hd, generator=rng)
    hidden[:, 0] = 0.0
    hidden[0, 0] = 1e30
    weight[:, 0] = 0.0
    weight[1, 0] = -1e20
    labels = torch.tensor([0, 3, 4, 5, 0])
    for minus_inf_bias in (False, True):
        bias = torch.randn(Vd, generator=rng)
        if minus_inf_bias:
            bias[2] = -INF
        args = [x.detach().requires_grad_(i == 0 or head == "trainable") for i, x in enumerate((hidden, weight, bias))]
        leaves = args if head == "trainable" else args[:1]
        with fastppo.use_backend(backend):
            lp, ent = fastppo.linear_logprobs(*args[:2], labels, bias=args[2], return_entropy=True, chunk_size=4)
            cot = torch.randn(2, N, generator=rng)
            got = torch.autograd.grad((lp, ent), leaves, (cot[0], cot[1]))
        (t_lp, t_ent), t_leaves = _linear_truth(args, labels)
        t_leaves = t_leaves[: len(leaves)]
        assert bool(torch.isfinite(t_ent).all())
        what = f"-inf bias {minus_inf_bias}"
        assert_close(lp, t_lp, TOL_FP32_OUT[torch.float32], f"logprobs, {what}")
        assert_close(ent, t_ent, TOL_FP32_OUT[torch.float32], f"entropy, {what}")
        want = torch.autograd.grad((t_lp, t_ent), t_leaves, (cot[0].double(), cot[1].double()))
        for name, g, w in zip(("hidden", "weight", "bias"), got, want):
            assert_close(g, w, (1e-4, 1e-4), f"d {name}, {what}")


@pytest.mark.parametrize("backend", LOOP_PATHS)
def test_linear_logprobs_minus_inf_hidden_is_nan_like_float64(backend, rng):
    """A -inf hidden entry makes -inf, +inf or NaN logits by the sign of the weights; with
    positive weights there, every logit of the row is -inf: no distribution, NaN in the float64
    ground truth (as log_softmax) on that row only, and on every path."""
    N, Hd, Vd = 3, 4, 5
    hidden = torch.randn(N, Hd, generator=rng)
    weight = torch.randn(Vd, Hd, generator=rng)
    weight[:, 2] = weight[:, 2].abs() + 0.1
    hidden[1, 2] = -INF
    labels = torch.randint(0, Vd, (N,), generator=rng)
    t_lp, t_ent = gt.linear_logprobs(hidden, weight, labels, return_entropy=True)
    assert bool(t_lp[1].isnan()) and bool(t_ent[1].isnan()) and bool(torch.isfinite(t_ent[[0, 2]]).all())
    with fastppo.use_backend(backend):
        lp, ent = fastppo.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=2)
    assert_close(lp, t_lp, TOL_FP32_OUT[torch.float32], "logprobs")
    assert_close(ent, t_ent, TOL_FP32_OUT[torch.float32], "entropy")


# --------------------------------------------------------------------------------------------
# d. group_advantages: scores up to float32's max, no overflow in the group statistics
# --------------------------------------------------------------------------------------------

GROUP_ESTIMATORS = (("grpo", True), ("grpo", False), ("dr_grpo", True), ("rloo", True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator,norm_by_std", GROUP_ESTIMATORS)
def test_group_advantages_of_huge_scores_match_float64(backend, estimator, norm_by_std, rng):
    """Scores of magnitude 1e19 .. 1.6e38 (centred values up to 3.2e38 still fit float32): the
    float32 square of the spread overflowed, the std became inf, and grpo said 0 everywhere
    (dr_grpo and rloo overflowed their sums beyond ~1e38 / K). Groups of K = 4: random signs,
    one member masked out, and one group of four equal scores (std 0: advantage 0)."""
    K, Bg, Tt = 4, 12, 3
    mask = torch.rand(Bg, Tt, generator=rng) < 0.8
    mask[:, 0] = True
    mask[1] = False  # a non-member: left out of its group
    for mag in (1e19, 1e25, 1e30, 1e36, 1.6e38):
        scores = (torch.rand(Bg, generator=rng) * 2 - 1) * mag
        scores[8:12] = mag
        want = gt.group_advantages(scores, K, mask, estimator=estimator, norm_by_std=norm_by_std)
        with fastppo.use_backend(backend):
            got = fastppo.group_advantages(scores, K, mask, estimator=estimator, norm_by_std=norm_by_std)
        assert bool(torch.isfinite(want).all())
        # float32 tolerance in the scale of the outputs: the scores' for s - mean (its rounding
        # is a float32 ulp of the scores), 1 once divided by the std.
        atol, rtol = TOL_FP32_OUT[torch.float32]
        scale = 1.0 if (estimator, norm_by_std) == ("grpo", True) else mag
        assert_close(got, want, (atol * scale, rtol), f"{estimator} at |scores| ~ {mag:.0e}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_of_scores_at_float32_max_matches_float64(backend, rng):
    """Scores spread over [-max, max] of float32 (their difference is beyond float32): the
    normalised advantages are of order 1 and equal the float64 ground truth; a group mixing 3e38
    with small scores too."""
    K = 4
    fmax = torch.finfo(torch.float32).max
    scores = (torch.rand(8, generator=rng) * 2 - 1) * fmax
    scores[4:8] = torch.tensor([3e38, 1.0, -2.0, 0.5])
    mask = torch.ones(8, 2, dtype=torch.bool)
    want = gt.group_advantages(scores, K, mask)
    with fastppo.use_backend(backend):
        got = fastppo.group_advantages(scores, K, mask)
    assert_close(got, want, TOL_FP32_OUT[torch.float32], "grpo at float32 max")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_up_to_float32_max_matches_float64(backend, shift_mean, rng):
    """Whitening statistics never overflow: values of magnitude 1e36 .. 3.3e38 (random signs, and
    all of one sign), rows long enough that a chunk's plain float32 sum overflows (the kernel
    returned NaN from ~1e37 at 240 valid positions a row), and x - mean beyond float32 where x
    and the mean have opposite signs. The whitened values are of order 1 and equal float64's."""
    x0 = torch.rand(3, 300, generator=rng)
    signs = torch.where(torch.rand(3, 300, generator=rng) < 0.5, -1.0, 1.0)
    mask = torch.rand(3, 300, generator=rng) < 0.8
    mask[2, 150:] = False
    for mag in (1e36, 1e37, 1e38, 3.3e38):
        for x in (x0 * mag, x0 * signs * mag):
            x = x.masked_fill(~mask, NAN)  # masked positions never leak
            want = gt.masked_whiten(x, mask, shift_mean=shift_mean)
            with fastppo.use_backend(backend):
                got = fastppo.masked_whiten(x, mask, shift_mean=shift_mean)
            assert bool(torch.isfinite(want).all())
            # shift_mean=False adds the mean back: outputs in the scale of the values.
            atol, rtol = TOL_FP32_OUT[torch.float32]
            scale = 1.0 if shift_mean else mag
            assert_close(got, want, (atol * scale, rtol), f"masked_whiten at |x| ~ {mag:.0e}")
