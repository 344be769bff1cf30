"""verl 0.9.1's token-level policy losses (``dppo_tv``, ``dppo_kl``, ``sapo``, ``gpg``, ``cispo``,
``dro``) against fastppo's adapters (``fastppo.integrations._verl_policy_losses``): verl's own
``compute_policy_loss_<name>`` and ours on the same random masked inputs, with verl's real
ActorConfig, every ``loss_agg_mode``, global-batch normalisation, rollout IS weights, values,
metrics and gradients; and ``install(policy_losses=True)`` / ``uninstall()``.

bf16: fastppo computes in float32 whatever the input dtype, verl computes bf16 in bf16; ours on
bf16 inputs is compared with verl on the same bf16 values upcast to float32 (the gradient, in the
input's dtype, to bf16 rounding).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastppo
from fastppo.testing import random_mask

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402

from fastppo.integrations import verl as fv  # noqa: E402
from fastppo.integrations._verl_policy_losses import ADAPTERS  # noqa: E402

NAMES = ("dppo_tv", "dppo_kl", "sapo", "gpg", "cispo", "dro")
AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
INFOS = ({}, {"dp_size": 2, "batch_num_tokens": 57, "global_batch_size": 9, "loss_scale_factor": 40})


@pytest.fixture(scope="module")
def verl_fns():
    """verl's own functions, with fastppo taken out of verl first (another test may have installed it)."""
    fv.uninstall()
    return {name: getattr(core_algos, f"compute_policy_loss_{name}") for name in NAMES}


def _config(name, info):
    return ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=1.5,
        tau_pos=1.0, tau_neg=1.05,
        policy_loss=PolicyLossConfig(loss_mode=name, dro_beta=0.1),
        global_batch_info=dict(info),
    )


def _inputs(gen, B=9, T=11):
    old = -torch.rand(B, T, generator=gen) * 3.0
    lp = (old + torch.randn(B, T, generator=gen) * 0.6).clamp(max=-1e-3)
    adv = torch.randn(B, T, generator=gen)
    w = torch.rand(B, T, generator=gen) + 0.5
    return old, lp, adv, random_mask(B, T, gen).float(), w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_adapter_matches_verl(verl_fns, rng, name, dtype):
    old, lp, adv, mask, w = (t.to(dtype) if t.is_floating_point() and i != 3 else t
                             for i, t in enumerate(_inputs(rng)))
    grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for agg in AGGS:
        for info in INFOS:
            for weights in (None, w):
                cfg = _config(name, info)
                ours = lp.clone().requires_grad_()
                peer = lp.float().clone().requires_grad_()
                loss, metrics = ADAPTERS[name](old, ours, adv, mask, agg, cfg, weights)
                up = (lambda t: None if t is None else t.float())  # noqa: E731
                ref, ref_metrics = verl_fns[name](up(old), peer, up(adv), mask, agg, cfg, up(weights))
                what = f"{name} {agg} {info} weights={weights is not None}"
                assert loss.dtype == torch.float32
                assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5, abs_tol=1e-6), (what, loss, ref)
                assert set(metrics) == set(ref_metrics), what
                for k, v in metrics.items():
                    assert isinstance(v, float), k
                    assert math.isclose(v, ref_metrics[k], rel_tol=1e-5, abs_tol=1e-6), (what, k, v, ref_metrics[k])
                loss.backward()
                ref.backward()
                assert ours.grad.dtype == dtype
                torch.testing.assert_close(ours.grad.float(), peer.grad, **grad_tol, msg=what)


def test_inputs_exercise_the_branches(verl_fns, rng):
    old, lp, adv, mask, _ = _inputs(rng, 16, 32)
    for name in ("dppo_tv", "dppo_kl", "cispo"):
        _, m = verl_fns[name](old, lp, adv, mask, "token-mean", _config(name, {}))
        assert 0 < m["actor/pg_clipfrac"] < 1, (name, m)
    _, m = verl_fns["dppo_tv"](old, lp, adv, mask, "token-mean", _config("dppo_tv", {}))
    assert m["actor/pg_clipfrac_lower"] > 0


def test_adapter_on_the_kernel_backend(verl_fns, rng, kernel_device):
    """The same numbers through the Triton kernels (interpreter on CPU)."""
    old, lp, adv, mask, w = (t.to(kernel_device) for t in _inputs(rng, 5, 7))
    for name in NAMES:
        cfg = _config(name, {})
        ours = lp.clone().requires_grad_()
        peer = lp.clone().requires_grad_()
        with fastppo.use_backend("triton"):
            loss, metrics = ADAPTERS[name](old, ours, adv, mask, "seq-mean-token-sum-norm", cfg, w)
        ref, ref_metrics = verl_fns[name](old, peer, adv, mask, "seq-mean-token-sum-norm", cfg, w)
        assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5, abs_tol=1e-6), name
        assert metrics == pytest.approx(ref_metrics, rel=1e-5, abs=1e-6)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(ours.grad, peer.grad, rtol=1e-5, atol=1e-6)


def test_sapo_ignores_loss_agg_mode_like_verl(verl_fns, rng):
    old, lp, adv, mask, _ = _inputs(rng)
    cfg = _config("sapo", {})
    a, _ = ADAPTERS["sapo"](old, lp, adv, mask, "token-sum", cfg)
    b, _ = ADAPTERS["sapo"](old, lp, adv, mask, "seq-mean-token-mean", cfg)
    assert torch.equal(a, b)


def test_config_errors(rng):
    old, lp, adv, mask, _ = _inputs(rng, 3, 4)
    for name in NAMES:
        with pytest.raises(ValueError, match="config"):
            ADAPTERS[name](old, lp, adv, mask, "token-mean", None)
    bad = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                      policy_loss=PolicyLossConfig(loss_mode="dro"))
    with pytest.raises(ValueError, match="dro_beta"):
        ADAPTERS["dro"](old, lp, adv, mask, "token-mean", bad)


def test_install_registers_verls_names_and_uninstall_restores(verl_fns):
    try:
        fv.install(policy_loss=False, gae=False, value_loss=False, policy_losses=True)
        for name in NAMES:
            assert core_algos.get_policy_loss_fn(name) is ADAPTERS[name]
            assert getattr(core_algos, f"compute_policy_loss_{name}") is ADAPTERS[name]
        assert fv.installed()["policy_losses"]
        fv.install(policy_loss=False, gae=False, value_loss=False, policy_losses=True)  # idempotent
    finally:
        fv.uninstall()
    for name in NAMES:
        assert core_algos.get_policy_loss_fn(name) is verl_fns[name]
        assert getattr(core_algos, f"compute_policy_loss_{name}") is verl_fns[name]
    assert not fv.installed()["policy_losses"]
