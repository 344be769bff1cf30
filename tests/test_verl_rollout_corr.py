"""bypass_mode and the verl rollout-correction adapters against verl 0.9.1's own functions.

verl computes in its inputs' dtype, so it gets the float32 upcast of bf16 inputs; the float64
ground truth (``fastppo.groundtruth.bypass_mode_loss``) checks the op on its own.
"""

from __future__ import annotations

import pytest
import torch

import fastppo
from fastppo import groundtruth as gt
from helpers import assert_close, random_mask

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
TOL = (2e-6, 2e-5)
STD_TOL = (2e-3, 1e-3)


class Cfg(dict):
    """What verl reads from an ActorConfig: attributes, ``.get`` and ``hasattr``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def actor_config(rc: dict, **global_batch_info) -> Cfg:
    return Cfg(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
               policy_loss=Cfg(loss_mode="bypass_mode", rollout_correction=Cfg(rc)),
               global_batch_info=dict(global_batch_info))


@pytest.fixture(scope="module")
def verl_core():
    core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    from fastppo.integrations import _verl_rollout_corr as rc

    # verl's own functions, whatever an earlier test installed.
    own = {a: rc._saved.get(("attr", a), getattr(helper, a)) for a in rc.REPLACED}
    own["bypass"] = rc._saved.get(("attr", "compute_policy_loss_bypass_mode"), core.compute_policy_loss_bypass_mode)
    assert own["bypass"].__module__ == "verl.trainer.ppo.core_algos"
    return own


def inputs(rng, B=7, T=9, dtype=torch.float32):
    rollout = (torch.randn(B, T, generator=rng, dtype=torch.float64) * 0.5 - 1.5)
    current = rollout + torch.randn(B, T, generator=rng, dtype=torch.float64) * 0.2
    adv = torch.randn(B, T, generator=rng, dtype=torch.float64)
    mask = random_mask(B, T, rng, kinds=("right", "left", "gap", "full", "single", "scatter"))
    return current.to(dtype), rollout.to(dtype), adv.to(dtype), mask


RC_CASES = [
    dict(loss_type="ppo_clip"),
    dict(loss_type="ppo_clip", rollout_is="token", rollout_is_threshold=1.5, rollout_rs="seq_max_k2",
         rollout_rs_threshold=0.05),
    dict(loss_type="reinforce"),
    dict(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_batch_normalize=True),
    dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold="0.8_1.25", rollout_rs="token_k1,seq_mean_k3",
         rollout_rs_threshold="0.7_1.4,0.02"),
]


def ours_kwargs(rc: dict) -> dict:
    kw = dict(loss_type=rc["loss_type"], clip_low=0.15, clip_high=0.28, dual_clip=3.0)
    if rc.get("rollout_is"):
        spec = rc["rollout_is_threshold"]
        kw["level"] = rc["rollout_is"]
        if isinstance(spec, str) and "_" in spec:
            lo, hi = spec.split("_")
            kw.update(mode="mask", lower=float(lo), upper=float(hi))
        else:
            kw["upper"] = float(spec)
        kw["batch_normalize"] = rc.get("rollout_is_batch_normalize", False)
    if rc.get("rollout_rs"):
        kw.update(rs=rc["rollout_rs"], rs_threshold=rc["rollout_rs_threshold"])
    return kw


def metric_check(ours: dict, theirs: dict, what: str):
    assert set(ours) == set(theirs), f"{what}: {sorted(set(ours) ^ set(theirs))}"
    for k, v in theirs.items():
        t = STD_TOL if k.endswith("_std") else TOL
        assert_close(torch.as_tensor(ours[k], dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64), t,
                     f"{what} {k}")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("case", range(len(RC_CASES)))
def test_bypass_mode_op_matches_verl(verl_core, rng, agg, case):
    rc = RC_CASES[case]
    dtype = torch.bfloat16 if case % 2 else torch.float32
    cur, roll, adv, mask = inputs(rng, dtype=dtype)
    lp = cur.clone().requires_grad_(True)
    loss, stats = fastppo.bypass_mode_loss(lp, roll, adv, mask, agg=agg, **ours_kwargs(rc))
    loss.backward()
    vlp = cur.float().clone().requires_grad_(True)
    vloss, vmetrics = verl_core["bypass"](roll.float(), vlp, adv.float(), mask.float(), loss_agg_mode=agg,
                                          config=actor_config(rc))
    vloss.backward()
    assert loss.dtype == torch.float32
    assert_close(loss.detach(), vloss.detach(), TOL, "loss")
    assert_close(lp.grad.float(), vlp.grad, (1e-6, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2), "grad")
    names = {"approx_kl": "actor/ppo_kl", "clipfrac": "actor/pg_clipfrac", "clipfrac_lower": "actor/pg_clipfrac_lower"}
    ours = {names.get(k, k): v for k, v in stats.items()}
    metric_check(ours, vmetrics, f"{rc} {agg}")
    # ... and the float64 ground truth, value and gradient.
    g = cur.detach().double().requires_grad_(True)
    gloss, gstats = gt.bypass_mode_loss(g, roll, adv, mask, agg=agg, **ours_kwargs(rc))
    gloss.backward()
    assert_close(loss.detach(), gloss.detach(), TOL, "ground-truth loss")
    assert_close(lp.grad.float(), g.grad, (1e-6, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2), "gt grad")
    metric_check(stats, {k: v for k, v in gstats.items()}, "ground truth")


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
def test_bypass_adapter_matches_verl_with_global_batch(verl_core, rng, loss_type):
    from fastppo.integrations._verl_rollout_corr import compute_policy_loss_bypass_mode

    cur, roll, adv, mask = inputs(rng)
    rc = dict(loss_type=loss_type, rollout_is="token", rollout_is_threshold=1.6, rollout_rs="seq_mean_k1",
              rollout_rs_threshold=1.15)
    for agg in AGG_MODES:
        info = dict(dp_size=2, batch_num_tokens=80, global_batch_size=12, loss_scale_factor=16)
        lp, vlp = cur.clone().requires_grad_(True), cur.clone().requires_grad_(True)
        loss, metrics = compute_policy_loss_bypass_mode(roll, lp, adv, mask.float(), agg, actor_config(rc, **info))
        vloss, vmetrics = verl_core["bypass"](roll, vlp, adv, mask.float(), agg, actor_config(rc, **info))
        loss.backward()
        vloss.backward()
        assert_close(loss.detach(), vloss.detach(), TOL, agg)
        assert_close(lp.grad, vlp.grad, (1e-6, 1e-4), agg + " grad")
        metric_check(metrics, vmetrics, agg)
        assert all(isinstance(v, float) for v in metrics.values())


def test_helper_adapters_match_verl(verl_core, rng):
    from fastppo.integrations import _verl_rollout_corr as rc

    cur, roll, _, mask = inputs(rng, B=8, T=7)
    m = mask.float()
    lr = cur - roll
    w, met = rc.compute_rollout_correction_weights(lr, m, "sequence", "0.5_3.0", True)
    vw, vmet = verl_core["compute_rollout_correction_weights"](lr, m, "sequence", "0.5_3.0", True)
    assert_close(w, vw, TOL, "weights")
    metric_check(met, vmet, "weights")
    nm, met = rc.compute_rollout_rejection_mask(lr, m, "token_k2,seq_sum_k1", "0.02,0.5_2.0")
    vnm, vmet = verl_core["compute_rollout_rejection_mask"](lr, m, "token_k2,seq_sum_k1", "0.02,0.5_2.0")
    assert nm.dtype == vnm.dtype and torch.equal(nm, vnm)
    metric_check(met, vmet, "rejection")
    metric_check(rc.compute_offpolicy_metrics(cur, roll, m), verl_core["compute_offpolicy_metrics"](cur, roll, m), "off")
    metric_check(rc.compute_offpolicy_metrics(cur, None, m), verl_core["compute_offpolicy_metrics"](cur, None, m), "off1")
    metric_check(rc.compute_rollout_corr_metrics_from_logprobs(cur, roll, m),
                 verl_core["compute_rollout_corr_metrics_from_logprobs"](cur, roll, m), "from_logprobs")
    proto, nm, met = rc.compute_rollout_correction_and_rejection_mask(cur, roll, m, "token", 2.0, False, "token_k3", 0.05)
    vproto, vnm, vmet = verl_core["compute_rollout_correction_and_rejection_mask"](cur, roll, m, "token", 2.0, False,
                                                                                   "token_k3", 0.05)
    assert type(proto) is type(vproto)
    assert_close(proto.batch["rollout_is_weights"], vproto.batch["rollout_is_weights"], TOL, "proto")
    assert nm.dtype == vnm.dtype and torch.equal(nm, vnm)
    metric_check(met, vmet, "unified")
    with pytest.raises(TypeError, match="not a boolean"):
        rc.compute_rollout_correction_and_rejection_mask(cur, roll, m, "token", True)


def test_install_swaps_and_uninstall_restores(verl_core, rng):
    import verl.trainer.ppo.core_algos as core
    import verl.trainer.ppo.rollout_corr_helper as helper

    from fastppo.integrations import _verl_rollout_corr as rc
    from fastppo.integrations import verl as fv

    try:
        fv.install(rollout_correction=True)
        assert fv.installed()["rollout_correction"]
        assert core.get_policy_loss_fn("bypass_mode") is rc.compute_policy_loss_bypass_mode
        for attr, ours in rc.REPLACED.items():
            assert getattr(helper, attr) is ours
        # verl's own batch-level entry point now runs fastppo (it looks the helper up at call time).
        from verl.protocol import DataProto

        cur, roll, _, mask = inputs(rng, B=4, T=5)
        batch = DataProto.from_dict(tensors={"old_log_probs": cur, "rollout_log_probs": roll,
                                             "response_mask": mask.float()})
        out, metrics = helper.compute_rollout_correction_and_add_to_batch(
            batch, dict(rollout_is="token", rollout_is_threshold=2.0, rollout_rs="token_k1", rollout_rs_threshold=1.5))
        w, keep, _ = fastppo.rollout_correction(cur, roll, mask, level="token", upper=2.0, rs="token_k1",
                                                rs_threshold=1.5)
        assert torch.equal(out.batch["response_mask"].bool(), keep)
        assert torch.equal(out.batch["rollout_is_weights"].float(), w)
        fv.install(rollout_correction=True)  # idempotent
    finally:
        fv.uninstall()
    assert not fv.installed()["rollout_correction"]
    assert core.get_policy_loss_fn("bypass_mode") is verl_core["bypass"]
    for attr in rc.REPLACED:
        assert getattr(helper, attr) is verl_core[attr]
    fv.install()  # the default parts, as importing the adapter left them


def test_registered_in_policy_losses():
    assert fastppo.get_policy_loss("bypass_mode") is fastppo.bypass_mode_loss
    with pytest.raises(ValueError, match="loss_type"):
        fastppo.bypass_mode_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                                 loss_type="ppo")
