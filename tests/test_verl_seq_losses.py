"""verl 0.9.1's own ``gspo``, ``geo_mean``, ``clip_cov`` and ``kl_cov`` against fastppo's adapters
(``fastppo.integrations._verl_seq_losses``), on the same random masked inputs: float32 and bf16,
ragged masks with an empty row, every ``loss_agg_mode``, rollout weights, global-batch figures,
values, metrics and gradients; ``clip_cov`` under the same torch seed (the same tokens dropped).

verl computes in the input dtype (bf16 losses for bf16 inputs) and fastppo in float32, so bf16
is compared with bf16 tolerances; the token selection of clip_cov/kl_cov is made in the inputs'
dtype by both, so it is compared exactly (through the gradient's zero pattern and the metrics).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import fastppo
from fastppo.integrations import _verl_seq_losses as fs

AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
NAMES = list(fs.VERL_SEQ_LOSSES)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.fixture(scope="module")
def core_algos():
    try:
        ca = importlib.import_module("verl.trainer.ppo.core_algos")
        from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"verl cannot be imported here: {exc}")
    from fastppo.integrations import verl as fv

    fv.uninstall()
    return ca


def _config(name, *, global_info=None, **policy_loss):
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio_low=0.2,
                      clip_ratio_high=0.28, policy_loss=PolicyLossConfig(loss_mode=name, **policy_loss))
    if global_info:
        cfg.global_batch_info.update(global_info)
    return cfg


def _inputs(rng, B, T, dtype, name):
    mask = torch.rand(B, T, generator=rng) > 0.25
    mask[0] = torch.arange(T) < T - 3  # right padding
    mask[1] = torch.arange(T) >= 2  # left padding
    mask[2] = False  # an empty row
    old = (torch.randn(B, T, generator=rng, dtype=torch.float64) - 1.5)
    lp = old + 0.3 * torch.randn(B, T, generator=rng, dtype=torch.float64)
    old, lp = old.to(dtype), lp.to(dtype)
    # Away from the clip bounds, where float32 and bf16 (verl) may decide a comparison differently.
    for _ in range(20):
        d = lp.double() - old.double()
        if name == "gspo":
            s = torch.where(mask, d, 0.0).sum(1) / mask.sum(1).clamp(min=1)
            near = (((s - math.log(0.8)).abs() < 2e-2) | ((s - math.log(1.28)).abs() < 2e-2)).unsqueeze(1).expand(B, T)
        else:
            near = ((d + 0.2).abs() < 2e-2) | ((d - 0.28).abs() < 2e-2)
            r = torch.exp(d)
            near |= ((r - 0.8).abs() < 2e-2) | ((r - 1.28).abs() < 2e-2)
        if not near.any():
            break
        lp = torch.where(near, lp.double() + 0.05, lp.double()).to(dtype)
    adv = (2 * torch.randn(B, T, generator=rng)).to(dtype)
    w = (0.5 + torch.rand(B, T, generator=rng)).to(dtype)
    return lp, old, adv, mask.float(), w


def _both(core_algos, name, lp, old, adv, mask, agg, cfg, w, seed):
    verl_fn = getattr(core_algos, f"compute_policy_loss_{name}")
    ours_fn = fs.VERL_SEQ_LOSSES[name]
    out = []
    for fn in (verl_fn, ours_fn):
        x = lp.clone().requires_grad_()
        torch.manual_seed(seed)
        loss, metrics = fn(old, x, adv, mask, agg, cfg, w)
        loss.backward()
        out.append((loss.detach().double(), metrics, x.grad.double()))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_matches_verl(core_algos, name, dtype, rng):
    options = {"clip_cov": dict(clip_cov_ratio=0.1), "kl_cov": dict(kl_cov_ratio=0.1, ppo_kl_coef=0.5)}.get(name, {})
    for i, agg in enumerate(AGGS):
        lp, old, adv, mask, w = _inputs(rng, 7, 29, dtype, name)
        seed = int(torch.randint(0, 2**31, (1,), generator=rng))
        weights = w if i % 2 else None
        (vl, vm, vg), (ol, om, og) = _both(core_algos, name, lp, old, adv, mask, agg, _config(name, **options),
                                           weights, seed)
        tol = TOL[dtype]
        atol = tol["atol"] * max(1.0, vl.abs().item())
        if dtype == torch.bfloat16:
            # verl sums in bf16: its rounding grows with the sum of |terms| (token-sum of ~150
            # terms of ~2 is off by ~0.06), which fastppo's float32 sum does not share.
            atol += 2**-8 * fastppo.aggregate(1.5 * adv.float().abs(), mask, agg).item()
        assert torch.allclose(ol, vl, rtol=tol["rtol"], atol=atol), (name, agg, ol.item(), vl.item())
        assert set(om) == set(vm), (om, vm)
        for k in vm:
            assert om[k] == pytest.approx(vm[k], rel=tol["rtol"], abs=tol["atol"]), (name, agg, k, om[k], vm[k])
        gscale = max(1e-3, vg.abs().max().item())
        assert torch.allclose(og, vg, rtol=tol["rtol"], atol=tol["atol"] * gscale), (name, agg, (og - vg).abs().max())
        if name in ("clip_cov", "kl_cov"):
            # The same tokens chosen: verl's metrics (exact counts) and a dropped token's zero gradient.
            if name == "clip_cov":
                assert om["actor/pg_clipfrac"] == vm["actor/pg_clipfrac"] > 0
                assert torch.equal(og == 0, vg == 0)


@pytest.mark.parametrize("name", ["gspo", "clip_cov", "kl_cov"])
def test_global_batch_info(core_algos, name, rng):
    # dp_size 2 with the global token / sequence counts: verl rescales local sums.
    for agg in AGGS:
        lp, old, adv, mask, w = _inputs(rng, 6, 17, torch.float32, name)
        info = dict(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=11,
                    loss_scale_factor=7 if agg == "seq-mean-token-sum-norm" else None)
        cfg = _config(name, global_info=info, **({"clip_cov_ratio": 0.1} if name == "clip_cov" else {}))
        (vl, _, vg), (ol, _, og) = _both(core_algos, name, lp, old, adv, mask, agg, cfg, w, 7)
        assert torch.allclose(ol, vl, rtol=2e-5, atol=2e-5), (name, agg)
        assert torch.allclose(og, vg, rtol=2e-5, atol=2e-6), (name, agg)


def test_install_registers_and_uninstall_restores(core_algos):
    from fastppo.integrations import verl as fv

    originals = {name: core_algos.POLICY_LOSS_REGISTRY[name] for name in NAMES}
    try:
        fv.install(policy_loss=False, gae=False, value_loss=False, policy_losses=True)
        for name in NAMES:
            assert core_algos.get_policy_loss_fn(name) is fs.VERL_SEQ_LOSSES[name]
        assert fs.installed(core_algos)
    finally:
        fv.uninstall()
    for name in NAMES:
        assert core_algos.POLICY_LOSS_REGISTRY[name] is originals[name]
