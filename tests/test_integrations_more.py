"""More of verl and OpenRLHF behind fastppo, each against the real peer function.

verl 0.9.1 (``verl.trainer.ppo.core_algos``): ``kl_penalty`` (every name, ``+`` variants),
``agg_loss``, GRPO / RLOO / REINFORCE++ and ``install()`` of all of them.
OpenRLHF 0.11.2 (``openrlhf/models/loss.py``, ``openrlhf/models/utils.py``): ``PolicyLoss``
with ``policy_loss_type="gspo"`` and ``compute_approx_kl``. Skipped where the peer is missing.
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch

from fastppo.integrations import openrlhf as fo
from test_integrations import (
    AGG_MODES,
    GLOBAL_INFOS,
    Cfg,
    assert_close,
    load_openrlhf_loss,
    load_verl,
    mask_with_edges,
    policy_inputs,
    randn,
)


def assert_same(actual, expected, what):
    """Equal values, NaN where the peer has NaN, inf where it has inf (no torch.testing: it
    imports torch.distributed, which the OpenRLHF loader's sys.modules clean-up trips over)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), (what, actual, expected)
    assert torch.allclose(actual[~nan], expected[~nan], rtol=1e-6, atol=1e-6), (what, actual, expected)


@pytest.fixture
def verl():
    from fastppo.integrations import verl as fv

    core_algos = load_verl()
    yield core_algos, fv
    fv.uninstall()


# =============================================================================================
# verl: kl_penalty
# =============================================================================================

KL_NAMES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]


def kl_inputs(rng, B=6, T=11):
    lp = randn(rng, B, T, scale=3.0) - 2.0
    ref = randn(rng, B, T, scale=3.0) - 2.0
    # Past every clamp: |d| > 20 both ways, and k3's estimate past 10.
    lp[0, 0], ref[0, 0] = -30.0, 0.0
    lp[0, 1], ref[0, 1] = 0.0, -30.0
    lp[0, 2], ref[0, 2] = -8.0, 0.0
    return lp, ref


@pytest.mark.parametrize("name", KL_NAMES + [n + "+" for n in KL_NAMES])
def test_verl_kl_penalty(verl, rng, name):
    # verl's own low_var_kl / k3, exp(r) - r - 1 in float32, cancels at small |d| (off by up to
    # ~1e-7 absolute, 100 % relative at |d| = 1e-4), where fastppo's is accurate: assert_close's
    # absolute 1e-5 covers verl's error here; tests/test_trust_k3.py holds fastppo's to the float64
    # ground truth at a relative bound instead.
    core_algos, fv = verl
    lp, ref = kl_inputs(rng)
    ours_lp, ours_ref = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    peer_lp, peer_ref = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    ours = fv.kl_penalty(ours_lp, ours_ref, name)
    peer = core_algos.kl_penalty(peer_lp, peer_ref, name)
    assert_close(ours.detach(), peer.detach(), name)
    weights = torch.rand(lp.shape, generator=rng)
    (ours * weights).sum().backward()
    (peer * weights).sum().backward()
    assert_close(ours_lp.grad, peer_lp.grad, f"{name} grad logprob")
    assert_close(ours_ref.grad, peer_ref.grad, f"{name} grad ref")


def test_verl_kl_penalty_edges(verl):
    core_algos, fv = verl
    lp = torch.tensor([float("-inf"), 0.0, float("nan"), -100.0])
    ref = torch.tensor([0.0, float("-inf"), 0.0, 0.0])
    for name in ("low_var_kl", "k3", "k3+"):
        assert_same(fv.kl_penalty(lp, ref, name), core_algos.kl_penalty(lp, ref, name), name)
    for name in ("full", "k4"):
        with pytest.raises(NotImplementedError):
            core_algos.kl_penalty(lp, ref, name)
        with pytest.raises(NotImplementedError):
            fv.kl_penalty(lp, ref, name)


# =============================================================================================
# verl: agg_loss
# =============================================================================================


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", range(len(GLOBAL_INFOS)))
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_verl_agg_loss(verl, rng, mode, info, mask_dtype):
    core_algos, fv = verl
    B, T = 7, 12
    L = randn(rng, B, T)
    mask = mask_with_edges(rng, B, T).to(mask_dtype)
    ours_in, peer_in = L.clone().requires_grad_(), L.clone().requires_grad_()
    ours = fv.agg_loss(ours_in, mask, mode, **GLOBAL_INFOS[info])
    peer = core_algos.agg_loss(peer_in, mask, mode, **GLOBAL_INFOS[info])
    assert_close(ours.detach(), peer.detach(), mode)
    ours.backward()
    peer.backward()
    assert_close(ours_in.grad, peer_in.grad, f"{mode} grad")


def test_verl_agg_loss_errors_and_empty(verl):
    core_algos, fv = verl
    L, mask = torch.randn(3, 4), torch.ones(3, 4)
    for fn in (fv.agg_loss, core_algos.agg_loss):
        with pytest.raises(ValueError):
            fn(L, mask, "token-avg")
        with pytest.raises(ValueError, match="batch_num_tokens"):
            fn(L, mask, "token-mean", dp_size=2)
    # An all-masked batch: 0 where verl's local token-mean gives NaN (documented difference).
    assert fv.agg_loss(L, torch.zeros(3, 4), "token-mean").item() == 0.0
    assert core_algos.agg_loss(L, torch.zeros(3, 4), "token-mean").isnan()


# =============================================================================================
# verl: GRPO, RLOO, REINFORCE++
# =============================================================================================


def outcome_inputs(rng, layout, B=12, T=9):
    mask = mask_with_edges(rng, B, T)  # row 3 is empty: still a group member in verl
    rewards = torch.zeros(B, T)
    last = torch.where(mask, torch.arange(T), -1).amax(-1)
    scores = torch.randint(0, 3, (B,), generator=rng).float() + randn(rng, B, scale=0.1)
    rows = torch.arange(B)[last >= 0]
    rewards[rows, last[rows]] = scores[rows]
    if layout == "contiguous":
        index = np.array([f"uid-{b // 4}" for b in range(B)], dtype=object)
    else:  # shuffled, uneven groups (sizes 5, 3, 2, 1, 1)
        sizes = [5, 3, 2, 1, 1]
        index = np.array(sum(([f"p{g}"] * n for g, n in enumerate(sizes)), []), dtype=object)
        index = index[torch.randperm(B, generator=rng).numpy()]
    return rewards, mask, index


@pytest.mark.parametrize("layout", ["contiguous", "shuffled"])
@pytest.mark.parametrize("norm", [True, False])
def test_verl_grpo(verl, rng, layout, norm):
    core_algos, fv = verl
    rewards, mask, index = outcome_inputs(rng, layout)
    ours = fv.compute_grpo_outcome_advantage(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm)
    peer = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, index, 1e-6, norm)
    for a, b in zip(ours, peer):
        assert_close(a, b, f"grpo {layout}")
    assert ours[0].abs().sum() > 0


@pytest.mark.parametrize("layout", ["contiguous", "shuffled"])
def test_verl_rloo(verl, rng, layout):
    core_algos, fv = verl
    rewards, mask, index = outcome_inputs(rng, layout)
    ours = fv.compute_rloo_outcome_advantage(rewards, mask, index, config=Cfg(gamma=1.0))
    peer = core_algos.compute_rloo_outcome_advantage(rewards.clone(), mask, index, config=Cfg(gamma=1.0))
    for a, b in zip(ours, peer):
        assert_close(a, b, f"rloo {layout}")


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_verl_reinforce_plus_plus(verl, rng, gamma):
    core_algos, fv = verl
    B, T = 6, 14
    rewards = randn(rng, B, T, scale=0.1)
    mask = mask_with_edges(rng, B, T)
    rewards[0, T - 4] += 1.0
    ours = fv.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=Cfg(gamma=gamma))
    # verl's scan does arithmetic on the mask (1 - mask), which a bool tensor does not allow.
    peer = core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask.float(), config=Cfg(gamma=gamma))
    for what, a, b in zip(("advantages", "returns"), ours, peer):
        assert_close(a, b, what)
    with pytest.raises(ValueError, match="config"):
        fv.compute_reinforce_plus_plus_outcome_advantage(rewards, mask)


# =============================================================================================
# verl: install() of every part
# =============================================================================================

ALL_PARTS = dict(vanilla=True, kl_penalty=True, agg_loss=True, estimators=True, policy_losses=True, rollout_correction=True, linear_cross_entropy=True)


def test_verl_install_everything_round_trip(verl, monkeypatch):
    core_algos, fv = verl
    policy_registry = dict(core_algos.POLICY_LOSS_REGISTRY)
    adv_registry = dict(core_algos.ADV_ESTIMATOR_REGISTRY)
    attrs = {attr: getattr(core_algos, attr) for swaps in fv._SWAPS.values() for attr, _ in swaps}
    consumer = types.ModuleType("verl._fastppo_test_consumer_more")
    consumer.kl_penalty, consumer.agg_loss = core_algos.kl_penalty, core_algos.agg_loss
    monkeypatch.setitem(sys.modules, consumer.__name__, consumer)
    fv.install(**ALL_PARTS)
    fv.install(**ALL_PARTS)  # idempotent
    assert all(fv.installed().values())
    assert core_algos.get_policy_loss_fn("vanilla") is fv.compute_policy_loss_fastppo
    assert core_algos.get_adv_estimator_fn("grpo") is fv.compute_grpo_outcome_advantage
    assert core_algos.get_adv_estimator_fn("rloo") is fv.compute_rloo_outcome_advantage
    assert core_algos.get_adv_estimator_fn("reinforce_plus_plus") is fv.compute_reinforce_plus_plus_outcome_advantage
    assert core_algos.kl_penalty is fv.kl_penalty and consumer.kl_penalty is fv.kl_penalty
    assert core_algos.agg_loss is fv.agg_loss and consumer.agg_loss is fv.agg_loss
    fv.uninstall()
    assert core_algos.POLICY_LOSS_REGISTRY == policy_registry
    assert core_algos.ADV_ESTIMATOR_REGISTRY == adv_registry
    assert {attr: getattr(core_algos, attr) for attr in attrs} == attrs
    assert consumer.kl_penalty is attrs["kl_penalty"] and consumer.agg_loss is attrs["agg_loss"]
    assert not any(fv.installed().values())
    # The import hook: "full" is every part, a list picks parts, anything else is refused.
    monkeypatch.setenv("FASTPPO_VERL_INSTALL", "full")
    fv._install_on_import()
    assert all(fv.installed().values())
    fv.uninstall()
    monkeypatch.setenv("FASTPPO_VERL_INSTALL", "kl_penalty, estimators")
    fv._install_on_import()
    assert {k for k, v in fv.installed().items() if v} == {"kl_penalty", "estimators"}
    fv.uninstall()
    monkeypatch.setenv("FASTPPO_VERL_INSTALL", "gae,kl")
    with pytest.raises(ValueError, match="FASTPPO_VERL_INSTALL"):
        fv._install_on_import()
    assert not any(fv.installed().values())


# =============================================================================================
# OpenRLHF: GSPO and compute_approx_kl
# =============================================================================================


@pytest.fixture(scope="module")
def openrlhf_loss():
    return load_openrlhf_loss()


GSPO_SETTINGS = [
    dict(policy_loss_type="gspo"),
    dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4),
    dict(policy_loss_type="gspo", clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, token_level_loss=True),
    dict(policy_loss_type="gspo", is_correction_level="token", is_correction_threshold=(0.5, 2.0)),
]
GSPO_INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 50.0, "global_batch_size": 11.0}]


@pytest.mark.parametrize("setting", range(len(GSPO_SETTINGS)))
@pytest.mark.parametrize("info", range(len(GSPO_INFOS)))
def test_openrlhf_gspo(openrlhf_loss, rng, setting, info):
    old, lp, adv, mask = policy_inputs(rng, spread=0.3)
    # GSPO's advantages are per sequence; token-varying ones work the same way.
    adv[1:] = adv[1:, :1]
    rollout = old + randn(rng, *old.shape, scale=0.3)
    # Row 1 certainly clips in every setting: its mean log-ratio is 0.6 against both old and rollout
    # (sequence ratio e^0.6 = 1.82 > 1.28) and its advantage is positive. Random rows alone left the
    # clip fraction at 0 for some seeds (FASTPPO_TEST_SEED=1585914394).
    lp[1], rollout[1], adv[1] = old[1] + 0.6, old[1], 1.0
    kwargs = GSPO_SETTINGS[setting]
    ours_fn, peer_fn = fo.PolicyLoss(**kwargs), openrlhf_loss.PolicyLoss(**kwargs)
    ours_in, peer_in = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    mask_f = mask.float()  # OpenRLHF's GSPO multiplies by the mask
    ours = ours_fn(ours_in, old, adv, action_mask=mask, rollout_log_probs=rollout, **GSPO_INFOS[info])
    peer = peer_fn(peer_in, old, adv, action_mask=mask_f, rollout_log_probs=rollout, **GSPO_INFOS[info])
    for name, a, b in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours, peer):
        if b is None:
            assert a is None, name
        else:
            assert_close(a.detach(), b.detach(), name)
    assert peer[1] > 0, "the inputs should clip some sequences"
    ours[0].backward()
    peer[0].backward()
    assert_close(ours_in.grad, peer_in.grad, "grad")


def test_openrlhf_gspo_needs_rollout_with_correction(rng):
    old, lp, adv, mask = policy_inputs(rng)
    loss_fn = fo.PolicyLoss(policy_loss_type="gspo", is_correction_level="token")
    with pytest.raises(ValueError, match="rollout_log_probs"):
        loss_fn(lp, old, adv, action_mask=mask)


@pytest.fixture(scope="module")
def openrlhf_approx_kl(openrlhf_loss):
    # openrlhf.models.utils, reached through a function the loss module imported from it.
    return openrlhf_loss.masked_mean.__globals__["compute_approx_kl"]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
def test_openrlhf_compute_approx_kl(openrlhf_approx_kl, rng, estimator, unbiased, with_old):
    lp, base = kl_inputs(rng)
    lp[0, 3], base[0, 3] = -13.0, 0.0  # past k1's clamp of 10 and k3's bound of -10
    old = lp + randn(rng, *lp.shape, scale=1.5) if with_old else None
    ours_in, peer_in = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    ours = fo.compute_approx_kl(ours_in, base, old, kl_estimator=estimator, unbiased_gradient=unbiased)
    peer = openrlhf_approx_kl(peer_in, base, old, kl_estimator=estimator, unbiased_gradient=unbiased)
    assert ours.dtype == peer.dtype == torch.float32
    assert_close(ours.detach(), peer.detach(), estimator)
    mask = mask_with_edges(rng, *lp.shape)
    # As OpenRLHF's consumers use it: a masked mean over the response tokens.
    (torch.where(mask, ours, 0.0).sum() / mask.sum()).backward()
    (torch.where(mask, peer, 0.0).sum() / mask.sum()).backward()
    assert_close(ours_in.grad, peer_in.grad, f"{estimator} grad")


def test_openrlhf_compute_approx_kl_edges(openrlhf_approx_kl):
    lp = torch.tensor([float("-inf"), 0.0, float("nan"), -100.0], dtype=torch.float64)
    base = torch.tensor([0.0, float("-inf"), 0.0, 0.0], dtype=torch.float64)
    for estimator in ("k1", "k2", "k3"):
        assert_same(
            fo.compute_approx_kl(lp, base, kl_estimator=estimator),
            openrlhf_approx_kl(lp, base, kl_estimator=estimator),
            estimator,
        )
    with pytest.raises(ValueError, match="kl_estimator"):
        fo.compute_approx_kl(lp, base, kl_estimator="k4")
