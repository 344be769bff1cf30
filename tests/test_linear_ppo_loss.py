"""``fastppo.linear_ppo_loss`` (issue 20): the clipped PPO objective straight from hidden states.

Two kinds of checks, each on both heads (``trainable``: weight and bias require grad;
``frozen``: they do not, and the chunked paths take the frozen-head pass whose d hidden is formed
in the forward):

* against the float64 ground truth (``fastppo.groundtruth.linear_ppo_loss``) on every backend:
  ``reference`` (full logits), ``chunked`` (``auto`` on CPU tensors) and ``triton`` (the
  interpreter, tiny shapes, kernel outputs poisoned);
* against its definition on the same backend: ``linear_logprobs`` then ``policy_loss``, the
  entropy bonus and the KL loss, values, stats and gradients within float32 tolerance.

Inputs hold NaN and inf at masked positions (hidden, labels, every [B, T] input): they must reach
nothing. The mask has an empty row.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import fastppo
from fastppo import groundtruth as gt
from fastppo import linear

from helpers import TOL, TOL_FP32_OUT, assert_close, random_mask

AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
HEADS = ["trainable", "frozen"]
STATS = ("policy_loss", "entropy", "kl", "clipfrac", "clipfrac_lower", "approx_kl")


def _inputs(gen, B=4, T=5, H=12, V=70, *, poison=True, bias=True):
    """hidden [B, T, H], weight, bias, labels, mask (an empty row) and the [B, T] loss inputs;
    masked positions poisoned with NaN / inf / out-of-range labels."""
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.4
    b = torch.randn(V, generator=gen) if bias else None
    labels = torch.randint(0, V, (B, T), generator=gen)
    mask = random_mask(B, T, gen)
    assert B < 4 or T == 0 or not mask.any(dim=1).all(), "random_mask gives an empty row"
    # Old log-probs near the current ones, so that some ratios clip and some do not.
    with torch.no_grad():
        lp = gt.linear_logprobs(hidden, weight, labels, bias=b).float()
    old = lp + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    ref = lp + 0.3 * torch.randn(B, T, generator=gen)
    isw = torch.rand(B, T, generator=gen) + 0.5
    if poison:
        off = mask == 0
        hidden[off] = float("nan")
        labels[off] = V + 7
        for x, v in ((old, float("nan")), (adv, float("inf")), (ref, float("nan")), (isw, float("-inf"))):
            x[off] = v
    return dict(hidden=hidden, weight=weight, bias=b, labels=labels, mask=mask, old=old, adv=adv, ref=ref, isw=isw)


def _kwargs(d, *, agg="token-mean", dual_clip=None, is_weights=False, ent_coef=0.01, kl_coef=0.05, kl=True,
            temperature=0.8, clip_high=None, chunk_size=16):
    return dict(old_logprobs=d["old"], advantages=d["adv"], mask=d["mask"], bias=d["bias"], temperature=temperature,
                clip_low=0.2, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
                is_weights=d["isw"] if is_weights else None, ent_coef=ent_coef,
                ref_logprobs=d["ref"] if kl else None, kl_coef=kl_coef, kl_estimator="k3", chunk_size=chunk_size)


def _leaves(d, head):
    h = d["hidden"].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(head == "trainable")
    b = None if d["bias"] is None else d["bias"].clone().requires_grad_(head == "trainable")
    return h, w, b, [h] if head == "frozen" else [x for x in (h, w, b) if x is not None]


def _call(backend, run_kernel, h, w, labels, kw):
    if backend == "triton":
        return run_kernel(fastppo.linear_ppo_loss, h, w, labels, **kw)
    with fastppo.use_backend({"reference": "torch", "chunked": "auto"}[backend]):
        return fastppo.linear_ppo_loss(h, w, labels, **kw)


def _truth(d, head, kw):
    """float64 loss, stats and gradients; masked hidden rows zeroed first (a NaN there would make
    float64 autograd's d weight = d logits^T @ h NaN, though its d logits are 0)."""
    valid = (d["mask"] != 0).unsqueeze(-1)
    h = torch.where(valid, d["hidden"], 0.0).double().requires_grad_(True)
    w = d["weight"].double().requires_grad_(True)
    b = None if d["bias"] is None else d["bias"].double().requires_grad_(True)
    loss, stats = gt.linear_ppo_loss(h, w, d["labels"], **{**kw, "bias": b})
    leaves = [h] if head == "frozen" else [x for x in (h, w, b) if x is not None]
    return loss, stats, torch.autograd.grad(loss, leaves, allow_unused=True)


def _check_against_truth(backend, run_kernel, d, head, kw, *, grad_tol=TOL[torch.float32]):
    h, w, b, leaves = _leaves(d, head)
    no_recompute = mock.patch.object(linear, "backward_pass", side_effect=AssertionError("recomputed"))
    loss, stats = _call(backend, run_kernel, h, w, d["labels"], {**kw, "bias": b})
    with no_recompute if (head == "frozen" and backend != "reference") else contextlib.nullcontext():
        grads = torch.autograd.grad(loss, leaves)
    t_loss, t_stats, t_grads = _truth(d, head, kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, t_loss, TOL_FP32_OUT[torch.float32], f"{backend} {head} loss")
    assert list(stats) == list(STATS)
    for k in STATS:
        assert stats[k].shape == () and not stats[k].requires_grad, k
        assert_close(stats[k], t_stats[k], TOL_FP32_OUT[torch.float32], f"{backend} {head} stats[{k}]")
    for name, g, t in zip(("hidden", "weight", "bias"), grads, t_grads):
        assert g.dtype == torch.float32
        assert_close(g, t, grad_tol, f"{backend} {head} d {name}")
    off = d["mask"] == 0
    assert bool((grads[0][off] == 0).all()), "masked rows get an exactly zero d hidden"
    return loss, grads


# --------------------------------------------------------------------------------------------
# The float64 ground truth, every backend, both heads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("agg", AGGS)
def test_every_agg_mode_matches_float64(run_kernel, rng, backend, head, agg):
    d = _inputs(rng)
    _check_against_truth(backend, run_kernel, d, head, _kwargs(d, agg=agg, dual_clip=3.0, is_weights=True))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("case", ["plain", "clip-higher", "no-entropy-no-kl", "kl-only", "no-bias"])
def test_options_match_float64(run_kernel, rng, backend, head, case):
    d = _inputs(rng, bias=case != "no-bias")
    kw = {
        "plain": _kwargs(d),
        "clip-higher": _kwargs(d, clip_high=0.28, temperature=1.0),
        "no-entropy-no-kl": _kwargs(d, ent_coef=0.0, kl=False),
        "kl-only": _kwargs(d, ent_coef=0.0, kl_coef=0.2),
        "no-bias": _kwargs(d, dual_clip=2.0),
    }[case]
    _check_against_truth(backend, run_kernel, d, head, kw)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_triton_backend_matches_float64(run_kernel, rng, head, agg):
    """The Triton path (interpreter): linear kernels or the frozen-head pass, then the Triton
    policy-loss, aggregate and KL kernels."""
    d = _inputs(rng, B=4, T=3, H=6, V=40)
    _check_against_truth("triton", run_kernel, d, head, _kwargs(d, agg=agg, dual_clip=3.0, is_weights=True))


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("head", HEADS)
def test_float64_inputs(run_kernel, rng, backend, head):
    d = _inputs(rng, B=4, T=3, H=6, V=30)
    d = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in d.items()}
    kw = _kwargs(d, dual_clip=3.0, is_weights=True)
    h, w, b, leaves = _leaves(d, head)
    loss, stats = _call(backend, run_kernel, h, w, d["labels"], {**kw, "bias": b})
    grads = torch.autograd.grad(loss, leaves)
    t_loss, t_stats, t_grads = _truth(d, head, kw)
    assert loss.dtype == torch.float64
    assert_close(loss, t_loss, TOL[torch.float64], "loss")
    for k in STATS:
        assert_close(stats[k], t_stats[k], TOL[torch.float64], k)
    for g, t in zip(grads, t_grads):
        assert_close(g, t, TOL[torch.float64], "gradient")


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("head", HEADS)
def test_nan_at_a_valid_position_makes_the_loss_nan(run_kernel, rng, backend, head):
    """A NaN hidden state at a valid token: loss NaN, as in float64 (no silent drop)."""
    d = _inputs(rng)
    b, t = (d["mask"] != 0).nonzero()[0].tolist()
    d["hidden"][b, t, 3] = float("nan")
    h, w, bias, leaves = _leaves(d, head)
    loss, _ = _call(backend, run_kernel, h, w, d["labels"], {**_kwargs(d), "bias": bias})
    t_loss, _, t_grads = _truth(d, head, _kwargs(d))
    assert bool(t_loss.isnan()) and bool(loss.isnan())
    (g,) = torch.autograd.grad(loss, [h])
    assert torch.equal(g.isnan(), t_grads[0].isnan())


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("case", ["T=0", "all-masked"])
def test_empty(run_kernel, backend, head, case, rng):
    d = _inputs(rng, B=2, T=0 if case == "T=0" else 3, H=5, V=11, poison=False)
    d["mask"] = torch.zeros_like(d["mask"])
    h, w, b, leaves = _leaves(d, head)
    loss, stats = _call(backend, run_kernel, h, w, d["labels"], {**_kwargs(d), "bias": b})
    assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())
    for g in torch.autograd.grad(loss, leaves):
        assert bool((g == 0).all())


# --------------------------------------------------------------------------------------------
# Its definition: linear_logprobs, then the [B, T] losses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("agg", AGGS)
def test_equals_linear_logprobs_then_policy_loss(rng, head, agg):
    d = _inputs(rng)
    kw = _kwargs(d, agg=agg, dual_clip=3.0, is_weights=True)
    h, w, b, leaves = _leaves(d, head)
    loss, stats = fastppo.linear_ppo_loss(h, w, d["labels"], **{**kw, "bias": b})
    grads = torch.autograd.grad(loss, leaves)

    h2, w2, b2, leaves2 = _leaves(d, head)
    lp, ent = fastppo.linear_logprobs(h2, w2, d["labels"], bias=b2, temperature=kw["temperature"],
                                      return_entropy=True, mask=d["mask"], chunk_size=kw["chunk_size"])
    pg, pg_stats = fastppo.policy_loss(lp, d["old"], d["adv"], d["mask"], clip_low=0.2, dual_clip=3.0, agg=agg,
                                       is_weights=d["isw"])
    ent_agg = fastppo.aggregate(ent, d["mask"], agg)
    ref = torch.where(d["mask"], d["ref"], 0.0)
    kl_agg = fastppo.aggregate(fastppo.kl_penalty(lp, ref, "k3"), d["mask"], agg)
    want = pg - kw["ent_coef"] * ent_agg + kw["kl_coef"] * kl_agg
    want_grads = torch.autograd.grad(want, leaves2)
    tol = TOL_FP32_OUT[torch.float32]
    assert_close(loss, want, tol, "loss")
    want_stats = {"policy_loss": pg, "entropy": ent_agg, "kl": kl_agg, **pg_stats}
    for k in STATS:
        assert_close(stats[k], want_stats[k].detach(), tol, k)
    for name, g, t in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert_close(g, t, TOL[torch.float32], f"d {name}")


@pytest.mark.parametrize("ent_coef", [0.0, 0.01])
def test_frozen_head_keeps_one_row_tensor_and_backward_does_no_matmul(rng, monkeypatch, ent_coef):
    """With a frozen head the forward does two vocabulary matmuls per chunk (three when the
    entropy is in the loss; its value alone costs none), the op saves d loss / d h
    ([N_valid, H]) and nothing vocabulary-sized, and the backward only scales it."""
    d = _inputs(rng, B=3, T=4, H=8, V=50, bias=False)  # no bias: every product goes through mm_acc
    h, w, b, _ = _leaves(d, "frozen")
    calls = []
    real = linear.mm_acc
    monkeypatch.setattr(linear, "mm_acc", lambda *a: calls.append(1) or real(*a))
    loss, stats = fastppo.linear_ppo_loss(h, w, d["labels"], **{**_kwargs(d, ent_coef=ent_coef), "bias": b})
    assert len(calls) == (3 if ent_coef else 2) * 4  # 4 chunks of 16 columns, one row tile
    assert float(stats["entropy"]) > 0
    saved = loss.grad_fn.saved_tensors
    n_valid = int((d["mask"] != 0).sum())
    assert [tuple(t.shape) for t in saved if t.dim() == 2] == [(n_valid, 8)]
    monkeypatch.setattr(linear, "mm_acc", mock.Mock(side_effect=AssertionError("a matmul in backward")))
    monkeypatch.setattr(linear, "backward_pass", mock.Mock(side_effect=AssertionError("recomputed")))
    loss.backward()
    assert h.grad is not None and w.grad is None


def test_double_backward_is_refused_by_name(rng):
    d = _inputs(rng, B=2, T=3, H=5, V=20, poison=False)
    h, w, b, _ = _leaves(d, "frozen")
    loss, _ = fastppo.linear_ppo_loss(h, w, d["labels"], **{**_kwargs(d), "bias": b})
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward of linear_logprobs is not supported"):
        torch.autograd.grad(g.square().sum(), h)


# --------------------------------------------------------------------------------------------
# Validation and signatures
# --------------------------------------------------------------------------------------------


def _bad(**over):
    g = torch.Generator().manual_seed(0)
    d = _inputs(g, B=2, T=3, H=4, V=5, poison=False)
    kw = _kwargs(d)
    args = [d["hidden"], d["weight"], d["labels"]]
    for k, v in over.items():
        if k in ("hidden", "weight", "labels"):
            args[("hidden", "weight", "labels").index(k)] = v
        else:
            kw[k] = v
    return args, kw


BAD = [
    (dict(hidden=torch.zeros(6, 4), labels=torch.zeros(6, dtype=torch.long)), "hidden must be [B, T, H]"),
    (dict(old_logprobs=torch.zeros(2, 4)), "advantages has shape [2, 3]"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), "mask has shape [3, 2]"),
    (dict(ref_logprobs=torch.zeros(2, 2)), "ref_logprobs has shape [2, 2]"),
    (dict(kl_estimator="k9"), "unknown KL estimator (kl_estimator) 'k9'"),
    (dict(agg="mean"), "unknown aggregation (agg) 'mean'"),
    (dict(ent_coef=float("nan")), "ent_coef must be finite"),
    (dict(clip_low=1.5), "clip_low must be <= 1.0"),
    (dict(temperature=0.0), "temperature must be > 0.0"),
]


@pytest.mark.parametrize("module", [fastppo, fastppo.reference], ids=["fastppo", "reference"])
@pytest.mark.parametrize("over, fragment", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_raises_one_clear_value_error(module, over, fragment):
    args, kw = _bad(**over)
    with pytest.raises(ValueError) as info:
        module.linear_ppo_loss(*args, **kw)
    assert fragment in str(info.value), str(info.value)


def test_signatures_match_the_reference():
    import inspect

    from fastppo.kernels import linear_logprob as K

    ref = inspect.signature(fastppo.reference.linear_ppo_loss.raw).parameters
    for fn in (fastppo.linear_ppo_loss, linear.linear_ppo_loss, K.linear_ppo_loss):
        params = inspect.signature(fn).parameters
        assert [(n, p.default, p.kind) for n, p in params.items()] == [(n, p.default, p.kind) for n, p in ref.items()]


@pytest.mark.parametrize("head", HEADS)
def test_torch_compile_composes_the_registered_ops(rng, head):
    """Under torch.compile the op is the registered linear_logprobs, policy_loss, aggregate and
    kl_penalty ops (no custom op of its own): same numbers as float64, full graph."""
    d = _inputs(rng, B=4, T=3, H=6, V=30)
    kw = _kwargs(d, dual_clip=3.0, is_weights=True)
    h, w, b, leaves = _leaves(d, head)
    torch._dynamo.reset()
    f = torch.compile(lambda h, w, b: fastppo.linear_ppo_loss(h, w, d["labels"], **{**kw, "bias": b}),
                      backend="aot_eager", fullgraph=True)
    loss, stats = f(h, w, b)
    grads = torch.autograd.grad(loss, leaves)
    t_loss, t_stats, t_grads = _truth(d, head, kw)
    assert_close(loss, t_loss, TOL_FP32_OUT[torch.float32], "compiled loss")
    for k in STATS:
        assert_close(stats[k], t_stats[k], TOL_FP32_OUT[torch.float32], k)
    for g, t in zip(grads, t_grads):
        assert_close(g, t, TOL[torch.float32], "compiled gradient")
