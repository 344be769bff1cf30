"""verl drop-in for the advantage estimators (issue 19, item 2): every name of verl 0.9.1's
``ADV_ESTIMATOR_REGISTRY`` but GAE (tested in test_integrations.py), ours against verl's own
function on the same random inputs: float32 and bfloat16, ragged masks with gaps, random
``index`` arrays (strings, integers, uneven groups); and install()/uninstall() of the registry.
Skipped without verl.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from fastppo.testing import assert_close

pytest.importorskip("verl")
ca = pytest.importorskip("verl.trainer.ppo.core_algos")
fv = pytest.importorskip("fastppo.integrations.verl")
from fastppo.integrations import _verl_estimators as ve  # noqa: E402

# verl's own functions, by registry name (read from the module, never from a registry we swapped).
VERL_FUNCTIONS = {key: getattr(ca, attr) for attr, key, _ in ve.VERL_ESTIMATORS}
VERL_FUNCTIONS.update(grpo=ca.compute_grpo_outcome_advantage, rloo=ca.compute_rloo_outcome_advantage,
                      reinforce_plus_plus=ca.compute_reinforce_plus_plus_outcome_advantage)
OURS = {key: ours for _, key, ours in ve.VERL_ESTIMATORS}
OURS.update(grpo=fv.compute_grpo_outcome_advantage, rloo=fv.compute_rloo_outcome_advantage,
            reinforce_plus_plus=fv.compute_reinforce_plus_plus_outcome_advantage)


class Config(dict):
    """verl passes an AlgoConfig: attribute access (``config.gamma``) and ``.get``."""

    __getattr__ = dict.get


def originals_installed():
    if any(getattr(ca, attr) is ours for attr, _, ours in ve.VERL_ESTIMATORS):
        pytest.skip("fastppo's estimators are installed into verl in this process")


def case(rng, dtype, labels):
    B, T = 12, 9
    lengths = torch.randint(1, T + 1, (B,), generator=rng)
    # Row 1 loses its first token to the gap below; keep it a member (a row with no valid token is
    # no group member in fastppo but one in verl's opo/OTB: a documented difference, not this test's).
    lengths[1] = lengths[1].clamp(min=2)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    mask[1, 0] = 0.0  # a gap (multi-turn observation tokens)
    mask[3, 1:3] = 0.0
    mask[:, 0] = torch.where(torch.arange(B) == 1, 0.0, 1.0)
    rewards = (torch.randn(B, T, generator=rng) * mask).to(dtype)
    if labels == "strings":
        index = np.array([f"uid-{i}" for i in torch.randint(0, 4, (B,), generator=rng).tolist()], dtype=object)
    else:
        index = torch.randint(0, 4, (B,), generator=rng).numpy() * 7
    # Every group has >= 2 rows (grpo_passk requires it): fold singletons into another group.
    ids, counts = np.unique(index, return_counts=True)
    for lone in ids[counts == 1]:
        index[np.flatnonzero(index == lone)[0]] = ids[counts >= 2][0] if (counts >= 2).any() else index[0]
    if len(np.unique(index)) == B or (np.unique(index, return_counts=True)[1] < 2).any():
        index[:] = index[0]
    extra = dict(old_log_probs=(-torch.rand(B, T, generator=rng) * 3).to(dtype),
                 sum_pi_squared=(torch.rand(B, T, generator=rng) * 0.6).to(dtype),
                 reward_baselines=torch.randn(B, generator=rng).to(dtype),
                 config=Config(norm_adv_by_std_in_grpo=True, gamma=0.9))
    return rewards, mask.to(dtype), index, extra


def call(fn, rewards, mask, index, extra, f32=False):
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=index, **extra)
    if f32:
        kw = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kw.items() if k in params})


@pytest.mark.parametrize("labels", ["strings", "ints"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_estimator_matches_verl(rng, dtype, labels):
    """Ours on the inputs (float32 out) against verl on the same values in float32 (for bf16
    inputs verl would otherwise round its own intermediates to bf16)."""
    originals_installed()
    rewards, mask, index, extra = case(rng, dtype, labels)
    for name, verl_fn in VERL_FUNCTIONS.items():
        want_adv, want_ret = call(verl_fn, rewards, mask, index, extra, f32=True)
        adv, ret = call(OURS[name], rewards, mask, index, extra)
        assert adv.dtype == torch.float32, name
        assert_close(adv, want_adv, (2e-5, 2e-5), f"{name} advantages")
        assert_close(ret, want_ret, (2e-5, 2e-5), f"{name} returns")


def test_rollout_is_weights_and_options_match_verl(rng):
    originals_installed()
    rewards, mask, index, extra = case(rng, torch.float32, "ints")
    iw = torch.rand(mask.shape, generator=rng) + 0.5
    for name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        for tail in (True, False):
            kw = dict(extra, rollout_is_weights=iw, handle_zero_tail=tail)
            assert_close(call(OURS[name], rewards, mask, index, kw)[0], call(VERL_FUNCTIONS[name], rewards, mask, index, kw)[0],
                         (2e-5, 2e-5), f"{name} tail={tail}")
    kw = dict(extra, config=Config(norm_adv_by_std_in_grpo=False))
    for name in ("grpo_passk", "gdpo"):
        assert_close(call(OURS[name], rewards, mask, index, kw)[0], call(VERL_FUNCTIONS[name], rewards, mask, index, kw)[0],
                     (2e-5, 2e-5), f"{name} without std")
    got = ve.compute_gpg_outcome_advantage(rewards, mask, index, f_norm=2.5)[0]
    assert_close(got, ca.compute_gpg_outcome_advantage(rewards, mask, index, f_norm=2.5)[0], (2e-5, 2e-5), "gpg f_norm")


def test_gdpo_reward_components_match_verl(rng):
    originals_installed()
    rewards, mask, index, extra = case(rng, torch.float32, "ints")
    B, T = mask.shape
    prompt_len = 3
    lengths = mask.sum(-1).long()
    attention = torch.cat([torch.ones(B, prompt_len), (torch.arange(T)[None, :] < lengths[:, None]).float()], 1).long()
    batch = {"prompts": torch.zeros(B, prompt_len), "attention_mask": attention}
    comps = {"format": np.random.default_rng(0).integers(0, 2, B).astype(np.float32),
             "accuracy": np.random.default_rng(1).normal(size=B).astype(np.float32)}
    config = Config(gdpo_reward_keys=["format", "accuracy"], gdpo_reward_weights=[0.5, 2.0])
    kw = dict(config=config, non_tensor_batch=comps, batch=batch)
    got = ve.compute_gdpo_outcome_advantage(rewards, mask, index, **kw)[0]
    want = ca.compute_gdpo_outcome_advantage(rewards, mask, index, **kw)[0]
    assert_close(got, want, (2e-5, 2e-5), "gdpo components")


def test_passk_refuses_a_group_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        ve.compute_grpo_passk_outcome_advantage(torch.ones(3, 2), torch.ones(3, 2), np.array([0, 0, 1]),
                                                config=Config())


def test_install_registers_every_name():
    state = fv.installed()["estimators"]
    try:
        fv.install(policy_loss=False, gae=False, value_loss=False, estimators=True)
        for attr, key, ours in ve.VERL_ESTIMATORS:
            assert ca.ADV_ESTIMATOR_REGISTRY[key] is ours and getattr(ca, attr) is ours
            assert ca.get_adv_estimator_fn(key) is ours
        assert fv.installed()["estimators"]
    finally:
        if not state:
            saved = {k: v for k, v in fv._saved.items()}
            fv.uninstall()
            # Put back what was installed before (install() on import: gae, value loss, the loss).
            if ("ADV_ESTIMATOR_REGISTRY", "gae") in saved:
                fv.install()
    for attr, key, ours in ve.VERL_ESTIMATORS:
        if not state:
            assert ca.ADV_ESTIMATOR_REGISTRY[key] is not ours and getattr(ca, attr) is not ours


# verl 0.9.1's own sdist tests of these functions (test_core_algos_on_cpu.py,
# test_reinforce_pp_multiturn_on_cpu.py) run with every part installed in tests/test_verl_own_tests.py.
