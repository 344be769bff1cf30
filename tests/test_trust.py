"""Regression tests for the trust issue: each one failed before its fix.

The sweep over every op, both backends and extreme inputs is tests/test_ground_truth.py; here
are the defects one by one, with hand-worked numbers where they make the point.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import fastppo
from fastppo import groundtruth as gt
from fastppo import reference as ref

BACKENDS = ("torch", "triton")
F64 = torch.float64


# --------------------------------------------------------------------------------------------
# 1. Extreme logits: the reference itself was wrong in float32
# --------------------------------------------------------------------------------------------


def test_entropy_of_huge_logits_is_exact_and_below_log_v():
    # 11 logits near 1e4: the top three are 1e4, 1e4 - 0.5, 1e4 - 1, seven sit at 1e4 - 2 and one
    # at -1e4. The float64 entropy is 1.9504; the old float32 reference said 2.7549 (the float32
    # spacing at 1e4 is 1e-3, and lse(z) - sum p z subtracted two numbers of size 1e4).
    logits = torch.tensor([[1e4, 1e4 - 1, 1e4 - 0.5, -1e4] + [1e4 - 2] * 7])
    exact = gt.entropy_from_logits(logits.double()).item()
    assert exact == pytest.approx(1.9504, abs=1e-4)
    got = ref.entropy_from_logits(logits).item()
    assert got == pytest.approx(exact, abs=1e-5)
    assert got <= math.log(11)


def test_logprob_gradient_at_huge_logits_matches_float64():
    logits = (torch.randn(4, 23, dtype=F64) * 1e4).float().requires_grad_()
    labels = torch.randint(0, 23, (4,))
    lp, ent = ref.logprobs_from_logits(logits, labels, temperature=0.7, return_entropy=True)
    exact = logits.detach().double().requires_grad_()
    lp64, ent64 = gt.logprobs_from_logits(exact, labels, temperature=0.7, return_entropy=True)
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent64, rtol=1e-6, atol=1e-5)
    (lp + ent).sum().backward()
    (lp64 + ent64).sum().backward()
    torch.testing.assert_close(logits.grad.double(), exact.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 2. NaN: nothing leaks from masked positions; NaN at a valid position propagates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_at_masked_positions_gives_finite_gradients(backend):
    # One valid token (advantage 1, ratio 1); the masked one holds NaN and inf everywhere.
    nan, inf = float("nan"), float("inf")
    lp = torch.tensor([[-1.0, nan]], requires_grad=True)
    v = torch.tensor([[0.5, inf]], requires_grad=True)
    mask = torch.tensor([[1, 0]])
    with fastppo.use_backend(backend):
        loss, stats = fastppo.ppo_loss(
            lp, torch.tensor([[-1.0, nan]]), torch.tensor([[1.0, nan]]), v, torch.tensor([[0.5, -inf]]),
            torch.tensor([[1.5, nan]]), mask, is_weights=torch.tensor([[1.0, nan]]), entropy=torch.tensor([[0.3, nan]]),
            ent_coef=0.1,
        )
        loss.backward()
    # policy -1 * 1 = -1; value 0.5 * (0.5 - 1.5)^2 = 0.5, times vf_coef 0.5; entropy bonus 0.03.
    assert loss.item() == pytest.approx(-1.0 + 0.25 - 0.03, abs=1e-6)
    assert lp.grad.tolist() == [[-1.0, 0.0]]
    assert v.grad[0, 0].item() == pytest.approx(0.5 * (0.5 - 1.5), abs=1e-6) and v.grad[0, 1].item() == 0.0
    assert all(math.isfinite(s.item()) for s in stats.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_at_a_valid_position_propagates(backend):
    nan = float("nan")
    mask = torch.ones(1, 3, dtype=torch.bool)
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    with fastppo.use_backend(backend):
        loss, _ = fastppo.policy_loss(lp, lp, torch.tensor([[1.0, nan, 2.0]]), mask)
        assert math.isnan(loss.item()), "a NaN advantage must not become a finite policy loss"
        kl = fastppo.kl_penalty(torch.tensor([[nan, 0.0]]), torch.zeros(1, 2), "k1", clamp=1.0)
        assert math.isnan(kl[0, 0].item()) and kl[0, 1].item() == 0.0
        out = fastppo.logprobs_from_logits(torch.tensor([[0.0, nan, 1.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 2]))
        assert math.isnan(out[0].item()) and math.isfinite(out[1].item())


# --------------------------------------------------------------------------------------------
# 3. A required tensor given as None
# --------------------------------------------------------------------------------------------

OPTIONAL = {"mask", "is_weights", "entropy"}


def _required_tensor_calls():
    z = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    full = {
        "logprobs_from_logits": ((torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)), {}),
        "entropy_from_logits": ((torch.zeros(2, 3, 5),), {}),
        "kl_penalty": ((z, z), {}),
        "shape_rewards": ((torch.zeros(2), z, z, m), {"kl_coef": 0.1}),
        "gae": ((z, z, m), {}),
        "masked_whiten": ((z, m), {}),
        "compute_advantages": ((torch.zeros(2), z, z, z, m), {"kl_coef": 0.1}),
        "policy_loss": ((z, z, z, m), {}),
        "value_loss": ((z, z, z, m), {}),
        "aggregate": ((z, m), {}),
        "ppo_loss": ((z, z, z, z, z, z, m), {}),
        "linear_logprobs": ((torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long)), {}),
        "group_advantages": ((torch.zeros(2), 1, m), {}),
        "reinforce_pp_advantages": ((z, m), {}),
    }
    for op, (args, kwargs) in full.items():
        names = [p.name for p in inspect.signature(getattr(ref, op)).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
        for i, name in enumerate(names[: len(args)]):
            if not isinstance(args[i], torch.Tensor):  # group_size: an int, not a tensor
                continue
            yield pytest.param(op, args, kwargs, i, name, id=f"{op}-{name}")


@pytest.mark.parametrize("module", ["fastppo", "reference"])
@pytest.mark.parametrize("op, args, kwargs, index, name", list(_required_tensor_calls()))
def test_required_tensor_given_as_none_is_a_value_error(module, op, args, kwargs, index, name):
    fn = getattr(fastppo if module == "fastppo" else ref, op)
    args = list(args)
    args[index] = None
    with pytest.raises(ValueError, match=f"{name} is required"):
        fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# 4. A mask means mask != 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [2.0, 0.5, -1.0, float("nan")])
def test_mask_values_other_than_one_mark_valid_tokens_not_weights(backend, value):
    # Losses 1, 2, 3 on valid tokens and a masked 100: the token mean is 2 whatever nonzero value
    # marks the valid tokens (a mask of 2s gave 4 on one backend and 2 on the other).
    L = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    bool_mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    mask = torch.where(bool_mask, value, 0.0)
    with fastppo.use_backend(backend):
        assert fastppo.aggregate(L, mask, "token-mean").item() == pytest.approx(2.0)
        assert fastppo.aggregate(L, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 3.0) / 2)
        adv, _ = fastppo.gae(L, torch.zeros(2, 3), mask, gamma=1.0, lam=1.0)
        assert adv.tolist() == [[3.0, 2.0, 0.0], [3.0, 0.0, 0.0]]


# --------------------------------------------------------------------------------------------
# 5. Value clipfrac: no rounding ties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_clipfrac_counts_no_rounding_ties(backend):
    # Values within the band around old values of scale 0.1: nothing is clipped, so clipfrac is 0.
    # The old form old + clamp(v - old, -c, c) rounds v - old and back and differs from v by one
    # float32 rounding, which the strict ">" then counted as clipped for ~11% of tokens.
    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, 50, generator=g) * 0.1
    # |v - old| < 0.15 < clip 0.2; v rounded once from float64, as a critic's output would be.
    v = (old.double() + (torch.rand(64, 50, generator=g, dtype=F64) - 0.5) * 0.3).float()
    R = torch.randn(64, 50, generator=g) * 0.1
    mask = torch.ones(64, 50, dtype=torch.bool)
    old_form = old + torch.clamp(v - old, -0.2, 0.2)
    assert ((old_form - R).square() > (v - R).square()).float().mean() > 0.01  # the old defect
    with fastppo.use_backend(backend):
        loss, stats = fastppo.value_loss(v, old, R, mask, clip=0.2)
    assert stats["clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(0.5 * (v - R).double().square().mean().item(), rel=1e-5)


# --------------------------------------------------------------------------------------------
# 7. Autograd: kl_penalty differentiable, rollout ops not, on both backends
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_penalty_trains_on_every_backend_and_rollout_ops_carry_no_gradient(backend):
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref_lp = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with fastppo.use_backend(backend):
        kl = fastppo.kl_penalty(lp, ref_lp, "k2")
        kl.sum().backward()
        # k2 = (lp - ref)^2 / 2: gradient d = lp - ref = 0.5, -1.0 for lp and its negative for ref.
        assert lp.grad.tolist() == [[0.5, -1.0]] and ref_lp.grad.tolist() == [[-0.5, 1.0]]
        outs = [
            *fastppo.shape_rewards(torch.ones(1), lp, ref_lp, mask, kl_coef=0.1),
            *fastppo.gae(lp, ref_lp, mask),
            fastppo.masked_whiten(lp, mask),
            *fastppo.compute_advantages(torch.ones(1), lp, ref_lp, lp, mask, kl_coef=0.1),
        ]
    assert not any(o.requires_grad for o in outs)


# --------------------------------------------------------------------------------------------
# 8. Whitening
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_at_1e20_is_exact_and_masked_positions_are_zero(backend):
    x = torch.tensor([[1e20, 3e20, 2e20, float("nan")], [-1e20, float("inf"), 5e20, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    with fastppo.use_backend(backend):
        out = fastppo.masked_whiten(x, mask)
    want = gt.masked_whiten(x.double(), mask)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert out[0, 3].item() == 0.0 and out[1, 1].item() == 0.0


# --------------------------------------------------------------------------------------------
# 9. Unchecked labels stay memory-safe
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_labels_never_read_outside_the_row(backend, monkeypatch):
    monkeypatch.setenv("FASTPPO_VALUE_CHECKS", "0")
    logits = torch.randn(3, 7)
    labels = torch.tensor([-5, 10**8, 3])
    with fastppo.use_backend(backend):
        lp = fastppo.logprobs_from_logits(logits, labels)
    # The first two values are meaningless (documented) but finite; the in-range one is exact.
    assert torch.isfinite(lp).all()
    assert lp[2].item() == pytest.approx(torch.log_softmax(logits[2].double(), -1)[3].item(), abs=1e-5)
