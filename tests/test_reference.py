"""The references against numbers worked out by hand, and against gradient formulas.

Every expected value here is derived in the comment beside it, never taken from the code under
test. Where a formula for the gradient is known, autograd of the reference is checked against it
on fresh random inputs in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastppo import reference as ref
from helpers import random_mask

F64 = torch.float64


def t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def close(a, b, tol=1e-12):
    a = torch.as_tensor(a, dtype=F64)
    b = torch.as_tensor(b, dtype=F64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"\n got {a}\nwant {b}"


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------

# A 4-token response. The critic predicts V(S0..S3) = 0.5, 0.7, 1.0, 1.2; the only reward is the
# final score 2 on the last token.
REWARDS = [[0.0, 0.0, 0.0, 2.0]]
VALUES = [[0.5, 0.7, 1.0, 1.2]]
FULL = [[1, 1, 1, 1]]


def test_gae_critic_example_last_token():
    # gamma = lam = 1: A3 = r3 + V(end) - V(S3) = 2 + 0 - 1.2 = 0.8, and the return R3 = A3 + V3 = 2.
    adv, ret = ref.gae(t(REWARDS), t(VALUES), t(FULL).bool(), gamma=1.0, lam=1.0)
    assert adv[0, 3].item() == pytest.approx(0.8, abs=1e-12)
    assert ret[0, 3].item() == pytest.approx(2.0, abs=1e-12)


def test_gae_lam1_gamma1_is_return_to_go_minus_value():
    # Every return-to-go is 2, so A_t = 2 - V_t = 1.5, 1.3, 1.0, 0.8, and every return is 2.
    adv, ret = ref.gae(t(REWARDS), t(VALUES), t(FULL).bool(), gamma=1.0, lam=1.0)
    close(adv, [[1.5, 1.3, 1.0, 0.8]])
    close(ret, [[2.0, 2.0, 2.0, 2.0]])


def test_gae_lam0_is_one_step_td_error():
    # delta_t = r_t + V_{t+1} - V_t: 0.7-0.5, 1.0-0.7, 1.2-1.0, 2-1.2 = 0.2, 0.3, 0.2, 0.8.
    adv, ret = ref.gae(t(REWARDS), t(VALUES), t(FULL).bool(), gamma=1.0, lam=0.0)
    close(adv, [[0.2, 0.3, 0.2, 0.8]])
    close(ret, [[0.7, 1.0, 1.2, 2.0]])


def test_gae_gamma_and_lambda_below_one():
    # gamma = lam = 0.5, so gamma * lam = 0.25:
    # delta3 = 2 - 1.2 = 0.8               A3 = 0.8
    # delta2 = 0.5 * 1.2 - 1.0 = -0.4       A2 = -0.4 + 0.25 * 0.8 = -0.2
    # delta1 = 0.5 * 1.0 - 0.7 = -0.2       A1 = -0.2 + 0.25 * -0.2 = -0.25
    # delta0 = 0.5 * 0.7 - 0.5 = -0.15      A0 = -0.15 + 0.25 * -0.25 = -0.2125
    adv, ret = ref.gae(t(REWARDS), t(VALUES), t(FULL).bool(), gamma=0.5, lam=0.5)
    close(adv, [[-0.2125, -0.25, -0.2, 0.8]])
    close(ret, [[-0.2125 + 0.5, -0.25 + 0.7, -0.2 + 1.0, 0.8 + 1.2]])


def test_gae_skips_a_masked_gap():
    # Position 2 is masked out and holds garbage (V = 99, r = 55). The scan skips it: the value
    # after position 1 is V3 = 1.2 and A carries from 3 to 1.
    # A3 = 0.8; A1 = (0 + 1.2 - 0.7) + A3 = 1.3; A0 = (0 + 0.7 - 0.5) + A1 = 1.5.
    rewards = t([[0.0, 0.0, 55.0, 2.0]])
    values = t([[0.5, 0.7, 99.0, 1.2]])
    mask = t([[1, 1, 0, 1]]).bool()
    adv, ret = ref.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[1.5, 1.3, 0.0, 0.8]])
    close(ret, [[2.0, 2.0, 0.0, 2.0]])


def test_gae_left_padding_equals_right_padding_shifted():
    # The same 3-token response, once right-padded and once left-padded, gives the same numbers.
    r = [0.0, 1.0, 2.0]
    v = [0.3, 0.6, 0.9]
    right = ref.gae(t([r + [7.0]]), t([v + [7.0]]), t([[1, 1, 1, 0]]).bool(), gamma=0.9, lam=0.8)
    left = ref.gae(t([[7.0] + r]), t([[7.0] + v]), t([[0, 1, 1, 1]]).bool(), gamma=0.9, lam=0.8)
    close(right[0][:, :3], left[0][:, 1:])
    close(right[1][:, :3], left[1][:, 1:])
    assert right[0][0, 3] == 0 and left[0][0, 0] == 0


def test_gae_empty_row_and_single_token():
    # Row 0 has no valid token: all zeros. Row 1 has one valid token at t = 2 with r = 1, V = 0.25:
    # A = 1 - 0.25 = 0.75 and R = 1.
    rewards = t([[5.0, 5.0, 5.0], [9.0, 9.0, 1.0]])
    values = t([[5.0, 5.0, 5.0], [9.0, 9.0, 0.25]])
    mask = t([[0, 0, 0], [0, 0, 1]]).bool()
    adv, ret = ref.gae(rewards, values, mask, gamma=0.9, lam=0.9)
    close(adv, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.75]])
    close(ret, [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_gae_t_equals_one():
    # A single step: A = r - V.
    adv, ret = ref.gae(t([[2.0], [-1.0]]), t([[0.5], [0.5]]), t([[1], [1]]).bool())
    close(adv, [[1.5], [-1.5]])
    close(ret, [[2.0], [-1.0]])


def test_gae_whiten_whitens_valid_advantages_and_keeps_returns(rng):
    B, T = 5, 9
    rewards = torch.randn(B, T, generator=rng, dtype=F64)
    values = torch.randn(B, T, generator=rng, dtype=F64)
    mask = random_mask(B, T, rng)
    adv, ret = ref.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    wadv, wret = ref.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True)
    close(wret, ret)
    valid = wadv[mask]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert valid.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)
    assert (wadv[~mask] == 0).all()


def test_gae_float_mask_and_bool_mask_agree(rng):
    r = torch.randn(3, 6, generator=rng)
    v = torch.randn(3, 6, generator=rng)
    m = random_mask(3, 6, rng)
    a1 = ref.gae(r, v, m)
    a2 = ref.gae(r, v, m.float())
    close(a1[0], a2[0])
    close(a1[1], a2[1])


def test_gae_output_dtype_is_float32_for_low_precision_inputs(rng):
    r = torch.randn(2, 3, generator=rng).bfloat16()
    adv, ret = ref.gae(r, r, torch.ones(2, 3, dtype=torch.bool))
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# masked_whiten
# --------------------------------------------------------------------------------------------


def test_whiten_hand_example():
    # x = 1, 2, 3 (and a masked 100): mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1.
    x = t([[1.0, 2.0, 3.0, 100.0]])
    m = t([[1, 1, 1, 0]]).bool()
    out = ref.masked_whiten(x, m, eps=1e-300)
    close(out, [[-1.0, 0.0, 1.0, 0.0]])  # the masked position is 0 (DESIGN: masked outputs are 0)
    kept = ref.masked_whiten(x, m, shift_mean=False, eps=1e-300)
    close(kept, [[1.0, 2.0, 3.0, 0.0]])  # scale 1, mean added back


def test_whiten_gives_mean_zero_and_unit_unbiased_variance(rng):
    x = torch.randn(7, 11, generator=rng, dtype=F64) * 3 + 5
    m = random_mask(7, 11, rng)
    out = ref.masked_whiten(x, m)
    assert out[m].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert out[m].var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)
    kept = ref.masked_whiten(x, m, shift_mean=False)
    assert kept[m].mean().item() == pytest.approx(x[m].mean().item(), rel=1e-12)


def test_whiten_eps_enters_under_the_root():
    # var = 1 and eps = 3: scale 1 / sqrt(4) = 0.5.
    out = ref.masked_whiten(t([[1.0, 2.0, 3.0]]), t([[1, 1, 1]]).bool(), eps=3.0)
    close(out, [[-0.5, 0.0, 0.5]])


def test_whiten_one_valid_position_is_centered_unscaled():
    # n = 1: mean = 4, no variance, so x - 4 at the valid position; with shift_mean=False, x
    # itself. Masked positions are 0.
    x = t([[4.0, 10.0, -2.0]])
    m = t([[1, 0, 0]]).bool()
    close(ref.masked_whiten(x, m), [[0.0, 0.0, 0.0]])
    close(ref.masked_whiten(x, m, shift_mean=False), [[4.0, 0.0, 0.0]])


def test_whiten_no_valid_position_is_zero():
    x = t([[4.0, 10.0, -2.0]])
    m = t([[0, 0, 0]]).bool()
    close(ref.masked_whiten(x, m), [[0.0, 0.0, 0.0]])
    close(ref.masked_whiten(x, m, shift_mean=False), [[0.0, 0.0, 0.0]])


def test_whiten_ignores_inf_at_masked_positions():
    x = t([[1.0, 3.0, float("inf")]])
    out = ref.masked_whiten(x, t([[1, 1, 0]]).bool())
    assert torch.isfinite(out[0, :2]).all()
    # mean 2, unbiased var 2: (1 - 2) / sqrt(2)
    assert out[0, 0].item() == pytest.approx(-1 / math.sqrt(2), rel=1e-7)


# --------------------------------------------------------------------------------------------
# KL estimators and reward shaping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator, d_plus, d_minus",
    [
        # d = lp - ref = +1 and -1.
        ("k1", 1.0, -1.0),
        ("abs", 1.0, 1.0),
        ("k2", 0.5, 0.5),
        # k3 = exp(-d) + d - 1: exp(-1) + 0 = 0.36788 and exp(1) - 2 = 0.71828.
        ("k3", math.exp(-1.0), math.e - 2.0),
    ],
)
def test_kl_estimators_by_hand(estimator, d_plus, d_minus):
    lp = t([[-1.0, -2.0]])
    ref_lp = t([[-2.0, -1.0]])
    close(ref.kl_penalty(lp, ref_lp, estimator), [[d_plus, d_minus]])


def test_kl_clamp_only_when_asked():
    lp, ref_lp = t([[5.0, -5.0]]), t([[0.0, 0.0]])
    close(ref.kl_penalty(lp, ref_lp, "k1"), [[5.0, -5.0]])
    close(ref.kl_penalty(lp, ref_lp, "k1", clamp=2.0), [[2.0, -2.0]])


def test_kl_k3_is_nonnegative_and_zero_at_equality(rng):
    lp = torch.randn(4, 8, generator=rng, dtype=F64)
    kl = ref.kl_penalty(lp, lp + torch.randn(4, 8, generator=rng, dtype=F64), "k3")
    assert (kl >= 0).all()
    close(ref.kl_penalty(lp, lp, "k3"), torch.zeros(4, 8))


def test_shape_rewards_by_hand():
    # lp - ref = 0.5 everywhere, k1, kl_coef = 0.1: every valid token gets -0.05, and the score of
    # its row lands on the row's last valid token. Row 2 has no valid token and gets nothing.
    scores = t([1.0, 2.0, 3.0])
    lp = torch.full((3, 3), -1.0, dtype=F64)
    ref_lp = torch.full((3, 3), -1.5, dtype=F64)
    mask = t([[1, 1, 0], [0, 1, 1], [0, 0, 0]]).bool()
    rewards, kl = ref.shape_rewards(scores, lp, ref_lp, mask, kl_coef=0.1)
    close(rewards, [[-0.05, 0.95, 0.0], [0.0, -0.05, 1.95], [0.0, 0.0, 0.0]])
    close(kl, [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]])


def test_shape_rewards_score_goes_to_last_valid_token_across_a_gap():
    mask = t([[1, 0, 1, 0]]).bool()
    rewards, _ = ref.shape_rewards(t([4.0]), torch.zeros(1, 4, dtype=F64), torch.zeros(1, 4, dtype=F64), mask, kl_coef=1.0)
    close(rewards, [[0.0, 0.0, 4.0, 0.0]])


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

LOSS = [[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]]
LOSS_MASK = [[1, 1, 1], [1, 0, 0], [0, 0, 0]]  # row 2 is empty


@pytest.mark.parametrize(
    "agg, want",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),  # 2.5
        ("token-sum", 10.0),
        ("seq-mean-token-mean", (2.0 + 4.0) / 2),  # row means 2 and 4; the empty row does not count
        ("seq-mean-token-sum", (6.0 + 4.0) / 2),  # row sums 6 and 4
        ("seq-mean-token-sum-norm", (6.0 + 4.0) / 2 / 3),  # ... divided by T = 3
    ],
)
def test_aggregation_modes_by_hand(agg, want):
    got = ref.aggregate(t(LOSS), t(LOSS_MASK).bool(), agg)
    assert got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregation_empty_mask_is_zero_not_nan(agg):
    loss = t([[float("nan"), float("inf")]]).requires_grad_()
    out = ref.aggregate(loss, t([[0, 0]]).bool(), agg)
    assert out.item() == 0.0
    out.backward()
    assert (loss.grad == 0).all()


# --------------------------------------------------------------------------------------------
# Policy loss: the four clip quadrants, inside the range, dual clip
# --------------------------------------------------------------------------------------------


def _policy_one(adv, ratio, **kw):
    old = torch.zeros(1, 1, dtype=F64)
    lp = torch.full((1, 1), math.log(ratio), dtype=F64, requires_grad=True)
    loss, stats = ref.policy_loss(lp, old, t([[adv]]), t([[1]]).bool(), **kw)
    loss.backward()
    return loss.item(), lp.grad.item(), {k: v.item() for k, v in stats.items()}


@pytest.mark.parametrize(
    "adv, ratio, loss, grad, clipped",
    [
        # A > 0, ratio 1.5 above 1 + 0.2: max(-1.5, -1.2) = -1.2, the clipped term; no gradient.
        (1.0, 1.5, -1.2, 0.0, 1.0),
        # A > 0, ratio 0.5 below 1 - 0.2: max(-0.5, -0.8) = -0.5, unclipped; d/dlp = -A * ratio.
        (1.0, 0.5, -0.5, -0.5, 0.0),
        # A < 0, ratio 1.5: max(1.5, 1.2) = 1.5, unclipped; d/dlp = -A * ratio = 1.5.
        (-1.0, 1.5, 1.5, 1.5, 0.0),
        # A < 0, ratio 0.5: max(0.5, 0.8) = 0.8, the clipped term; no gradient.
        (-1.0, 0.5, 0.8, 0.0, 1.0),
        # Inside the range both terms equal -A * ratio = -2.2, with gradient -2.2.
        (2.0, 1.1, -2.2, -2.2, 0.0),
    ],
)
def test_policy_loss_clip_quadrants(adv, ratio, loss, grad, clipped):
    got_loss, got_grad, stats = _policy_one(adv, ratio)
    assert got_loss == pytest.approx(loss, abs=1e-12)
    assert got_grad == pytest.approx(grad, abs=1e-12)
    assert stats["clipfrac"] == clipped
    # approx_kl = mean(-(lp - old)) = -log(ratio)
    assert stats["approx_kl"] == pytest.approx(-math.log(ratio), abs=1e-12)


def test_policy_loss_asymmetric_clip():
    # clip_high = 0.5: ratio 1.4 with A > 0 is inside [0.8, 1.5]: loss -1.4, not clipped.
    loss, grad, stats = _policy_one(1.0, 1.4, clip_high=0.5)
    assert loss == pytest.approx(-1.4) and grad == pytest.approx(-1.4) and stats["clipfrac"] == 0
    # Symmetric 0.2 clips it at 1.2.
    loss, grad, stats = _policy_one(1.0, 1.4)
    assert loss == pytest.approx(-1.2) and grad == 0.0 and stats["clipfrac"] == 1


def test_policy_loss_dual_clip():
    # A = -1, ratio 5, c = 3: max(5, 1.2) = 5 is bounded by -A * c = 3; no gradient.
    loss, grad, stats = _policy_one(-1.0, 5.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and grad == 0.0
    assert stats["clipfrac_lower"] == 1.0 and stats["clipfrac"] == 0.0
    # Ratio 2 stays under the bound: loss 2, gradient -A * ratio = 2.
    loss, grad, stats = _policy_one(-1.0, 2.0, dual_clip=3.0)
    assert loss == pytest.approx(2.0) and grad == pytest.approx(2.0) and stats["clipfrac_lower"] == 0
    # Dual clip never touches A > 0.
    loss, grad, stats = _policy_one(1.0, 5.0, dual_clip=3.0)
    assert loss == pytest.approx(-1.2) and stats["clipfrac_lower"] == 0


def test_policy_loss_log_ratio_clamp_at_20():
    # lp - old = 50 is clamped to 20 before exp: ratio e^20, finite; A < 0 takes the unclipped term.
    lp = t([[50.0]]).requires_grad_()
    loss, stats = ref.policy_loss(lp, t([[0.0]]), t([[-1.0]]), t([[1]]).bool())
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(-20.0)
    loss.backward()
    assert lp.grad.item() == 0.0  # the clamp is saturated


def test_policy_loss_is_weights_scale_tokens():
    # Two tokens inside the clip range, A = 1, ratio 1: per-token -1; weights 0.5 and 2 -> -0.5, -2.
    lp = torch.zeros(1, 2, dtype=F64)
    loss, _ = ref.policy_loss(lp, lp, t([[1.0, 1.0]]), t([[1, 1]]).bool(), is_weights=t([[0.5, 2.0]]))
    assert loss.item() == pytest.approx((-0.5 - 2.0) / 2)


def test_policy_loss_fractions_count_valid_tokens_only():
    # Token 0 clipped (A > 0, ratio 1.5), token 1 inside, token 2 masked but would be clipped.
    lp = torch.log(t([[1.5, 1.0, 1.5]]))
    loss, stats = ref.policy_loss(lp, torch.zeros(1, 3, dtype=F64), t([[1.0, 1.0, 1.0]]), t([[1, 1, 0]]).bool())
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2)


def test_policy_loss_gradient_matches_formula(rng):
    # d loss / d lp_t = m_t * w_t * (-A_t * ratio_t) [unclipped branch active] / n_valid, for token-mean.
    B, T = 4, 10
    old = torch.randn(B, T, generator=rng, dtype=F64)
    lp = (old + 0.4 * torch.randn(B, T, generator=rng, dtype=F64)).requires_grad_()
    adv = torch.randn(B, T, generator=rng, dtype=F64)
    mask = random_mask(B, T, rng)
    loss, _ = ref.policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.3)
    loss.backward()
    ratio = torch.exp(lp.detach() - old)
    unclipped_active = torch.where(adv > 0, ratio <= 1.3, ratio >= 0.8)
    want = torch.where(mask & unclipped_active, -adv * ratio, 0.0) / mask.sum()
    close(lp.grad, want)


# --------------------------------------------------------------------------------------------
# Value loss
# --------------------------------------------------------------------------------------------


def test_value_loss_clip_by_hand():
    # old = 1, clip 0.2. Token 0: v = 1.5, R = 0: unclipped 2.25, clipped (1.2 - 0)^2 = 1.44 -> 2.25.
    # Token 1: v = 1.5, R = 2: unclipped 0.25, clipped (1.2 - 2)^2 = 0.64 -> 0.64 (clipped).
    v = t([[1.5, 1.5]]).requires_grad_()
    loss, stats = ref.value_loss(v, t([[1.0, 1.0]]), t([[0.0, 2.0]]), t([[1, 1]]).bool(), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.64) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # d/dv of 0.5 * mean: token 0 -> 0.5 * 2 * (1.5 - 0) / 2 = 0.75; token 1 is clipped -> 0.
    close(v.grad, [[0.75, 0.0]])


def test_value_loss_without_clip_is_plain_squared_error(rng):
    v = torch.randn(3, 5, generator=rng, dtype=F64).requires_grad_()
    R = torch.randn(3, 5, generator=rng, dtype=F64)
    mask = random_mask(3, 5, rng)
    loss, stats = ref.value_loss(v, v.detach() + 10, R, mask, clip=None)
    want = 0.5 * ((v.detach() - R) ** 2)[mask].mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    close(v.grad, torch.where(mask, v.detach() - R, 0.0) / mask.sum())


# --------------------------------------------------------------------------------------------
# Log-probs and entropy
# --------------------------------------------------------------------------------------------


def test_logprobs_by_hand():
    # logits ln 1, ln 2, ln 3 -> p = 1/6, 2/6, 3/6.
    logits = torch.log(t([[1.0, 2.0, 3.0]]))
    lp, ent = ref.logprobs_from_logits(logits, torch.tensor([2]), return_entropy=True)
    assert lp.item() == pytest.approx(math.log(0.5))
    h = -(1 / 6 * math.log(1 / 6) + 2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6))
    assert ent.item() == pytest.approx(h)
    # Temperature 2 on doubled logits gives the same distribution.
    lp2, ent2 = ref.logprobs_from_logits(2 * logits, torch.tensor([2]), temperature=2.0, return_entropy=True)
    assert lp2.item() == pytest.approx(lp.item()) and ent2.item() == pytest.approx(h)
    assert ref.entropy_from_logits(logits).item() == pytest.approx(h)


def test_logprobs_with_neg_inf_and_huge_logits():
    logits = t([[0.0, float("-inf"), 0.0], [1e4, -1e4, 0.0]]).requires_grad_()
    lp, ent = ref.logprobs_from_logits(logits, torch.tensor([0, 1]), return_entropy=True)
    # Row 0: two equal finite logits: log(1/2), entropy log 2. Row 1: label logit -1e4 - 1e4.
    close(lp.detach(), [math.log(0.5), -2e4])
    close(ent.detach(), [math.log(2.0), 0.0])
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_logprobs_masked_rows_give_zero_and_never_see_garbage():
    logits = t([[[0.0, 1.0], [float("nan"), float("nan")]]]).requires_grad_()
    labels = torch.tensor([[1, -100]])  # an ignore-index label at a masked position is fine
    mask = torch.tensor([[True, False]])
    lp, ent = ref.logprobs_from_logits(logits, labels, mask=mask, return_entropy=True)
    assert lp[0, 1].item() == 0.0 and ent[0, 1].item() == 0.0
    assert lp[0, 0].item() == pytest.approx(-math.log1p(math.exp(-1.0)))
    (lp.sum() + ent.sum()).backward()
    assert (logits.grad[0, 1] == 0).all() and torch.isfinite(logits.grad).all()


def test_logprob_and_entropy_gradients_match_formulas(rng):
    # d logprob / d logits = (onehot - p) / T;  d H / d logits = -p (log p + H) / T.
    N, V, temp = 6, 13, 0.7
    logits = (torch.randn(N, V, generator=rng, dtype=F64) * 3).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=rng)
    g_lp = torch.randn(N, generator=rng, dtype=F64)
    g_h = torch.randn(N, generator=rng, dtype=F64)
    lp, ent = ref.logprobs_from_logits(logits, labels, temperature=temp, return_entropy=True)
    (lp * g_lp + ent * g_h).sum().backward()
    z = logits.detach() / temp
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    H = -(p * logp).sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(labels, V).to(F64)
    want = ((onehot - p) * g_lp[:, None] - p * (logp + H) * g_h[:, None]) / temp
    close(logits.grad, want, tol=1e-10)


def test_logprobs_3d_equals_flattened(rng):
    logits = torch.randn(2, 3, 7, generator=rng)
    labels = torch.randint(0, 7, (2, 3), generator=rng)
    a = ref.logprobs_from_logits(logits, labels)
    b = ref.logprobs_from_logits(logits.reshape(6, 7), labels.reshape(6))
    assert a.shape == (2, 3)
    close(a.reshape(6), b)


def test_logprobs_output_float32_for_bf16_and_fp16(rng):
    for dtype in (torch.bfloat16, torch.float16):
        logits = torch.randn(4, 9, generator=rng).to(dtype)
        lp, ent = ref.logprobs_from_logits(logits, torch.zeros(4, dtype=torch.long), return_entropy=True)
        assert lp.dtype == torch.float32 and ent.dtype == torch.float32
        # computed from the rounded inputs upcast: equal to the float64 reference to float32 rounding
        want = ref.logprobs_from_logits(logits.double(), torch.zeros(4, dtype=torch.long))
        close(lp, want, tol=1e-5)


# --------------------------------------------------------------------------------------------
# Composites
# --------------------------------------------------------------------------------------------


def test_compute_advantages_composes_shaping_and_gae(rng):
    B, T = 4, 7
    scores = torch.randn(B, generator=rng, dtype=F64)
    lp, ref_lp, values = (torch.randn(B, T, generator=rng, dtype=F64) for _ in range(3))
    mask = random_mask(B, T, rng)
    adv, ret, rewards, kl = ref.compute_advantages(scores, lp, ref_lp, values, mask, kl_coef=0.2, estimator="k2", gamma=0.9, lam=0.8)
    want_r, want_kl = ref.shape_rewards(scores, lp, ref_lp, mask, kl_coef=0.2, estimator="k2")
    want_a, want_ret = ref.gae(want_r, values, mask, gamma=0.9, lam=0.8, whiten=True)
    for got, want in ((adv, want_a), (ret, want_ret), (rewards, want_r), (kl, want_kl)):
        close(got, want)


def test_ppo_loss_is_policy_plus_value_minus_entropy(rng):
    B, T = 3, 8
    old = torch.randn(B, T, generator=rng, dtype=F64)
    lp = (old + 0.3 * torch.randn(B, T, generator=rng, dtype=F64)).requires_grad_()
    adv, old_v, R = (torch.randn(B, T, generator=rng, dtype=F64) for _ in range(3))
    v = (old_v + 0.3 * torch.randn(B, T, generator=rng, dtype=F64)).requires_grad_()
    ent = torch.rand(B, T, generator=rng, dtype=F64).requires_grad_()
    mask = random_mask(B, T, rng)
    loss, stats = ref.ppo_loss(lp, old, adv, v, old_v, R, mask, entropy=ent, vf_coef=0.7, ent_coef=0.05, agg="seq-mean-token-mean")
    pg, _ = ref.policy_loss(lp, old, adv, mask, agg="seq-mean-token-mean")
    vf, _ = ref.value_loss(v, old_v, R, mask, agg="seq-mean-token-mean")
    h = ref.aggregate(ent, mask, "seq-mean-token-mean")
    assert loss.item() == pytest.approx((pg + 0.7 * vf - 0.05 * h).item(), rel=1e-12)
    assert set(stats) == {"policy_loss", "value_loss", "entropy", "clipfrac", "clipfrac_lower", "approx_kl", "value_clipfrac"}
    loss.backward()
    assert ent.grad is not None and v.grad is not None and lp.grad is not None
    # d loss / d entropy = -ent_coef * d agg / d entropy
    n_rows = (mask.sum(1) > 0).sum().to(F64)
    row_len = mask.sum(1, keepdim=True).clamp(min=1).to(F64)
    want = torch.where(mask, -0.05 / (row_len * n_rows), 0.0)
    close(ent.grad, want)
