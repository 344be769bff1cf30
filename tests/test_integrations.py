"""The drop-in adapters (fastppo.integrations) against their peers.

Each adapter is compared with two peers on random inputs:

* ``formula``: the peer's published formulas, written out below (always runs);
* ``real``: the peer's own function, when it can be imported here (skipped otherwise):
  verl's ``verl.trainer.ppo.core_algos`` (``pip install --no-deps verl`` plus omegaconf,
  tensordict, codetiming and ray), OpenRLHF's ``openrlhf/models/loss.py`` (``pip install
  --no-deps openrlhf``; loaded with a stand-in for its unused ``deepspeed`` import) and TRL's
  ``trl.trainer.utils``. OpenRLHF's GAE is a method of a Ray actor module and is checked by
  formula only.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch

import fastppo
from fastppo.integrations import openrlhf as fo
from fastppo.integrations import trl as ft

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
# fp32 sums in another order (a kernel, a chunked reduction) differ in the last digits.
CLOSE = dict(rtol=1e-5, atol=1e-5)


def randn(rng, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)


def mask_with_edges(rng, B, T):
    """Random mask with right padding, left padding, a gap and an empty row (B >= 5)."""
    m = torch.rand(B, T, generator=rng) > 0.3
    m[0] = torch.arange(T) < T - 3  # right padding
    m[1] = torch.arange(T) >= 2  # left padding
    m[2] = True
    m[2, T // 3 : T // 2] = False  # a gap
    m[3] = False  # an empty row
    return m


def assert_close(actual, expected, what="", **tol):
    tol = tol or CLOSE
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(actual, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.allclose(actual, expected, equal_nan=False, **tol), (
        f"{what}: max abs error {(actual - expected).abs().max().item():.3g}"
    )


class Cfg(dict):
    """Both what verl reads (attributes, ``.get``) and a Mapping, like omegaconf's DictConfig."""

    __getattr__ = dict.__getitem__


# =============================================================================================
# verl
# =============================================================================================


class VerlFormulas:
    """verl 0.9's published formulas (core_algos.agg_loss, compute_policy_loss_vanilla,
    compute_gae_advantage_return, compute_value_loss; torch_functional.masked_whiten)."""

    @staticmethod
    def agg(L, m, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
        m = m.float()
        Lm = torch.where(m.bool(), L, 0.0)
        if mode == "token-mean":
            n = m.sum() if batch_num_tokens is None else batch_num_tokens
            return Lm.sum() / n * dp_size
        if mode == "token-sum":
            return Lm.sum() * dp_size
        rows = (m.sum(-1) > 0).float()
        n = rows.sum() if global_batch_size is None else global_batch_size
        if mode == "seq-mean-token-mean":
            per_row = Lm.sum(-1) / (m.sum(-1) + 1e-8)
            return (per_row * rows).sum() / n * dp_size
        loss = (Lm.sum(-1) * rows).sum() / n * dp_size
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss

    @staticmethod
    def masked_mean(x, m):
        return torch.where(m.bool(), x, 0.0).sum() / (m.float().sum() + 1e-8)

    def policy_loss(self, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
        clip = config["clip_ratio"]
        low = config["clip_ratio_low"] if config.get("clip_ratio_low") is not None else clip
        high = config["clip_ratio_high"] if config.get("clip_ratio_high") is not None else clip
        c = config.get("clip_ratio_c", 3.0)
        log_ratio = (log_prob - old_log_prob).clamp(-20, 20)
        ratio = log_ratio.exp()
        A = advantages
        plain, clipped = -A * ratio, -A * ratio.clamp(1 - low, 1 + high)
        L1 = torch.maximum(plain, clipped)
        bound = -A * c
        L = torch.where(A < 0, torch.minimum(L1, bound), L1)
        if rollout_is_weights is not None:
            L = L * rollout_is_weights
        loss = self.agg(L, response_mask, loss_agg_mode, **config.get("global_batch_info", {}))
        metrics = {
            "actor/pg_clipfrac": self.masked_mean((clipped > plain).float(), response_mask).item(),
            "actor/ppo_kl": self.masked_mean(-log_ratio, response_mask).item(),
            "actor/pg_clipfrac_lower": self.masked_mean(((L1 > bound) & (A < 0)).float(), response_mask).item(),
        }
        return loss, metrics

    def gae(self, token_level_rewards, values, response_mask, gamma, lam):
        m = response_mask.float()
        B, T = values.shape
        next_v = torch.zeros(B, dtype=values.dtype)
        running = torch.zeros(B, dtype=values.dtype)
        out = torch.zeros_like(values)
        for t in reversed(range(T)):
            delta = token_level_rewards[:, t] + gamma * next_v - values[:, t]
            a = delta + gamma * lam * running
            next_v = torch.where(m[:, t] > 0, values[:, t], next_v)
            running = torch.where(m[:, t] > 0, a, running)
            out[:, t] = running
        returns = out + values
        mean = self.masked_mean(out, m)
        var = self.masked_mean((out - mean) ** 2, m) * (m.sum() / (m.sum() - 1))
        return (out - mean) * torch.rsqrt(var + 1e-8), returns

    def value_loss(self, vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean", **info):
        vclip = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
        e1, e2 = (vpreds - returns) ** 2, (vclip - returns) ** 2
        loss = 0.5 * self.agg(torch.maximum(e1, e2), response_mask, loss_agg_mode, **info)
        return loss, self.masked_mean((e2 > e1).float(), response_mask)


def load_verl():
    """verl's core_algos with fastppo taken out of it, or skip."""
    try:
        core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError as exc:  # verl absent, or present without its light dependencies
        pytest.skip(f"verl's core_algos cannot be imported here: {exc}")
    from fastppo.integrations import verl as fv

    fv.uninstall()
    return core_algos


class VerlReal:
    def __init__(self, core_algos):
        self.ca = core_algos

    def policy_loss(self, *args):
        return self.ca.compute_policy_loss_vanilla(*args)

    def gae(self, rewards, values, mask, gamma, lam):
        # verl's scan does arithmetic on the mask, which a bool tensor does not allow.
        return self.ca.compute_gae_advantage_return(rewards, values, mask.float(), gamma, lam)

    def value_loss(self, *args, **kwargs):
        return self.ca.compute_value_loss(*args, **kwargs)


@pytest.fixture(params=["formula", "real"])
def verl_peer(request):
    if request.param == "formula":
        yield VerlFormulas()
        return
    core_algos = load_verl()
    yield VerlReal(core_algos)
    from fastppo.integrations import verl as fv

    fv.uninstall()


@pytest.fixture
def fv():
    from fastppo.integrations import verl as module

    return module


def policy_inputs(rng, B=6, T=13, spread=1.0):
    old = randn(rng, B, T)
    # A spread of 1 in the log-ratio reaches past 1 + clip and past the dual-clip bound of 3.
    lp = old + randn(rng, B, T, scale=spread)
    adv = randn(rng, B, T)
    # Row 0 starts with valid tokens: one certain dual-clip case, one certain upper clip.
    lp[0, :2] = old[0, :2] + 2.0
    adv[0, 0], adv[0, 1] = -1.0, 1.0
    return old, lp, adv, mask_with_edges(rng, B, T)


GLOBAL_INFOS = [
    {},
    {"dp_size": 2, "batch_num_tokens": 57, "global_batch_size": 9, "loss_scale_factor": None},
    {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": 40},
]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", range(len(GLOBAL_INFOS)))
@pytest.mark.parametrize("weights", [False, True])
def test_verl_policy_loss(verl_peer, fv, rng, mode, info, weights):
    old, lp, adv, mask = policy_inputs(rng)
    is_w = torch.rand(lp.shape, generator=rng) * 2 if weights else None
    cfg = Cfg(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=3.0,
              global_batch_info=dict(GLOBAL_INFOS[info]))
    lp_ours = lp.clone().requires_grad_()
    lp_peer = lp.clone().requires_grad_()
    loss, metrics = fv.compute_policy_loss_fastppo(old, lp_ours, adv, mask, mode, cfg, is_w)
    ref_loss, ref_metrics = verl_peer.policy_loss(old, lp_peer, adv, mask, mode, cfg, is_w)
    assert_close(loss, ref_loss.detach(), "loss")
    assert set(metrics) == set(ref_metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    for k, v in metrics.items():
        assert isinstance(v, float), k
        assert math.isclose(v, ref_metrics[k], rel_tol=1e-5, abs_tol=1e-6), (k, v, ref_metrics[k])
    assert ref_metrics["actor/pg_clipfrac_lower"] > 0, "the inputs should exercise the dual clip"
    loss.backward()
    ref_loss.backward()
    assert_close(lp_ours.grad, lp_peer.grad, "grad")


def test_verl_policy_loss_config_errors(fv, rng):
    old, lp, adv, mask = policy_inputs(rng)
    with pytest.raises(ValueError, match="config"):
        fv.compute_policy_loss_fastppo(old, lp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        fv.compute_policy_loss_fastppo(old, lp, adv, mask, "token-mean", Cfg(clip_ratio=0.2, clip_ratio_c=1.0))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fv.compute_policy_loss_fastppo(old, lp, adv, mask, "token-avg", Cfg(clip_ratio=0.2))
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fv.compute_policy_loss_fastppo(old, lp, adv, mask, "token-mean",
                                       Cfg(clip_ratio=0.2, global_batch_info={"dp_size": 2}))


def test_verl_all_masked_batch_gives_zero_not_nan(fv, rng):
    old, lp, adv, _ = policy_inputs(rng)
    empty = torch.zeros(lp.shape, dtype=torch.bool)
    for mode in AGG_MODES:
        loss, metrics = fv.compute_policy_loss_fastppo(old, lp, adv, empty, mode, Cfg(clip_ratio=0.2))
        assert loss.item() == 0.0 and all(v == 0.0 for v in metrics.values())
        vloss, frac = fv.compute_value_loss(lp, adv, old, empty, 0.2, mode)
        assert vloss.item() == 0.0 and frac.item() == 0.0


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_verl_gae(verl_peer, fv, rng, gamma, lam):
    B, T = 6, 15
    rewards, values = randn(rng, B, T), randn(rng, B, T)
    mask = mask_with_edges(rng, B, T)
    adv, ret = fv.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = verl_peer.gae(rewards, values, mask, gamma, lam)
    # Every position, masked ones included: verl leaves the carried advantage there.
    assert_close(adv, ref_adv, "advantages")
    assert_close(ret, ref_ret, "returns")
    assert adv[~mask].abs().sum() > 0, "masked positions are not zeroed, as in verl"


def test_verl_gae_matches_fastppo_at_valid_positions(fv, rng):
    B, T = 5, 9
    rewards, values = randn(rng, B, T), randn(rng, B, T)
    mask = mask_with_edges(rng, B, T)
    adv, ret = fv.compute_gae_advantage_return(rewards, values, mask, torch.tensor(0.99), 0.95)
    ref_adv, ref_ret = fastppo.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True)
    assert_close(adv[mask], ref_adv[mask], "advantages")
    assert_close(ret[mask], ref_ret[mask], "returns")


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", range(len(GLOBAL_INFOS)))
def test_verl_value_loss(verl_peer, fv, rng, mode, info):
    B, T = 6, 13
    values, returns = randn(rng, B, T), randn(rng, B, T)
    vpreds = values + randn(rng, B, T, scale=0.3)
    mask = mask_with_edges(rng, B, T)
    kwargs = {k: v for k, v in GLOBAL_INFOS[info].items()}
    ours_in = vpreds.clone().requires_grad_()
    peer_in = vpreds.clone().requires_grad_()
    loss, frac = fv.compute_value_loss(ours_in, returns, values, mask, 0.2, mode, **kwargs)
    ref_loss, ref_frac = verl_peer.value_loss(peer_in, returns, values, mask, 0.2, mode, **kwargs)
    assert_close(loss, ref_loss.detach(), "loss")
    # Exact: the clipped fraction counts strict comparisons, verl's way.
    assert frac.item() == pytest.approx(ref_frac.item(), abs=1e-7)
    loss.backward()
    ref_loss.backward()
    assert_close(ours_in.grad, peer_in.grad, "grad")


def core_parts(state):
    """The parts install() puts in by default (the others are opt-in and stay out here)."""
    assert not any(state[k] for k in state if k not in ("policy_loss", "gae", "value_loss")), state
    return {k: state[k] for k in ("policy_loss", "gae", "value_loss")}


def test_verl_install_round_trip(fv, monkeypatch):
    core_algos = load_verl()
    original_gae = core_algos.compute_gae_advantage_return
    original_vl = core_algos.compute_value_loss
    original_registry_gae = core_algos.ADV_ESTIMATOR_REGISTRY["gae"]
    # A module that imported compute_value_loss by name, as verl.workers.utils.losses does.
    consumer = types.ModuleType("verl._fastppo_test_consumer")
    consumer.compute_value_loss = original_vl
    monkeypatch.setitem(sys.modules, consumer.__name__, consumer)
    try:
        fv.install()
        fv.install()  # idempotent
        assert core_algos.get_policy_loss_fn("fastppo") is fv.compute_policy_loss_fastppo
        assert core_algos.get_policy_loss_fn("vanilla") is core_algos.compute_policy_loss_vanilla
        assert core_algos.compute_gae_advantage_return is fv.compute_gae_advantage_return
        assert core_algos.get_adv_estimator_fn("gae") is fv.compute_gae_advantage_return
        assert core_algos.compute_value_loss is fv.compute_value_loss
        assert consumer.compute_value_loss is fv.compute_value_loss
        assert core_parts(fv.installed()) == {"policy_loss": True, "gae": True, "value_loss": True}
    finally:
        fv.uninstall()
    assert "fastppo" not in core_algos.POLICY_LOSS_REGISTRY
    assert core_algos.compute_gae_advantage_return is original_gae
    assert core_algos.ADV_ESTIMATOR_REGISTRY["gae"] is original_registry_gae
    assert core_algos.compute_value_loss is original_vl
    assert consumer.compute_value_loss is original_vl
    assert core_parts(fv.installed()) == {"policy_loss": False, "gae": False, "value_loss": False}
    # The external_lib hook only imports the module; that import runs _install_on_import.
    try:
        monkeypatch.setenv("FASTPPO_VERL_INSTALL", "loss")
        fv._install_on_import()
        assert core_parts(fv.installed()) == {"policy_loss": True, "gae": False, "value_loss": False}
        fv.uninstall()
        monkeypatch.setenv("FASTPPO_VERL_INSTALL", "0")
        fv._install_on_import()
        assert core_parts(fv.installed()) == {"policy_loss": False, "gae": False, "value_loss": False}
        monkeypatch.delenv("FASTPPO_VERL_INSTALL")
        fv._install_on_import()
        assert core_parts(fv.installed()) == {"policy_loss": True, "gae": True, "value_loss": True}
    finally:
        fv.uninstall()


# =============================================================================================
# OpenRLHF
# =============================================================================================


def _masked_mean(x, m):
    m = torch.ones_like(x) if m is None else m.to(x.dtype)
    return (x * m).sum() / m.sum()


def _openrlhf_agg(L, m, token_level, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    m = m.to(L.dtype)
    if token_level:
        if batch_num_tokens is None:
            return _masked_mean(L, m)
        return (L * m).sum() / batch_num_tokens * dp_size
    counts = m.sum(-1)
    per_row = (L * m).sum(-1) / (counts + 1e-8)
    rows = (counts > 0).to(L.dtype)
    if global_batch_size is None:
        return (per_row * rows).sum() / rows.sum()
    return (per_row * rows).sum() / global_batch_size * dp_size


class OpenRLHFFormulas:
    """OpenRLHF 0.11's published formulas (openrlhf/models/loss.py, experience_maker.py)."""

    class PolicyLoss(torch.nn.Module):
        def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                     policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
                     is_correction_gating="ratio", is_correction_threshold=(0.5, 5.0)):
            super().__init__()
            self.lo, self.hi, self.c, self.tok = clip_eps_low, clip_eps_high, dual_clip, token_level_loss
            self.level, self.mode, self.gating = is_correction_level, is_correction_mode, is_correction_gating
            self.band = is_correction_threshold

        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                    dp_size=1, batch_num_tokens=None, global_batch_size=None):
            raw = log_probs - old_log_probs
            ratio = raw.clamp(-20, 20).exp()
            s1, s2 = ratio * advantages, ratio.clamp(1 - self.lo, 1 + self.hi) * advantages
            L = -torch.min(s1, s2)
            if self.c is not None:
                L = torch.where(advantages < 0, torch.minimum(L, -self.c * advantages), L)
            vllm_kl = frac = None
            if self.level != "off":
                lo, hi = self.band
                d = (old_log_probs - rollout_log_probs).detach()
                m = action_mask.to(d.dtype)
                if self.gating == "ratio":
                    stat = ((d * m).sum(-1) / m.sum(-1)).exp().unsqueeze(-1) if self.level == "seq" else d.exp()
                else:
                    p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
                    q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
                    stat = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()) if self.gating == "binary_kl" \
                        else (p - q).abs()
                    if self.level == "seq":
                        stat = ((stat * m).sum(-1) / m.sum(-1)).unsqueeze(-1)
                if self.mode == "clip":
                    w, out = stat.clamp(lo, hi), (stat < lo) | (stat > hi)
                else:
                    keep = (stat >= lo) & (stat <= hi)
                    w, out = torch.where(keep, d.exp(), 0.0), ~keep
                L = w * L
                frac = out.float().mean() if self.level == "seq" else _masked_mean(out.float(), action_mask)
                vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask)
            mask = torch.ones_like(L) if action_mask is None else action_mask
            loss = _openrlhf_agg(L, mask, self.tok, dp_size, batch_num_tokens, global_batch_size)
            return loss, _masked_mean((s2 < s1).float(), action_mask), _masked_mean(-raw.detach(), action_mask), \
                vllm_kl, frac

    class ValueLoss(torch.nn.Module):
        def __init__(self, clip_eps=None, token_level_loss=True):
            super().__init__()
            self.clip, self.tok = clip_eps, token_level_loss

        def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                    global_batch_size=None):
            L = (values - returns) ** 2
            if self.clip is not None:
                vc = old_values + (values - old_values).clamp(-self.clip, self.clip)
                L = torch.max((vc - returns) ** 2, L)
            mask = torch.ones_like(L) if action_mask is None else action_mask
            return 0.5 * _openrlhf_agg(L, mask, self.tok, dp_size, batch_num_tokens, global_batch_size)

    @staticmethod
    def get_advantages_and_returns(values, rewards, action_mask, gamma, lambd):
        if action_mask is not None:
            values, rewards = action_mask * values, action_mask * rewards
        T = rewards.shape[1]
        running, out = 0.0, []
        for t in reversed(range(T)):
            nxt = values[:, t + 1] if t < T - 1 else 0.0
            running = rewards[:, t] + gamma * nxt - values[:, t] + gamma * lambd * running
            out.append(running)
        adv = torch.stack(out[::-1], dim=1)
        return adv, adv + values


_OPENRLHF_LOSS: list = []


def load_openrlhf_loss():
    """OpenRLHF's real ``openrlhf.models.loss`` module, or skip.

    ``openrlhf/models/__init__.py`` pulls in the actor (flash-attn, deepspeed) and
    ``models/utils.py`` imports deepspeed without using it in the losses, so the package init is
    bypassed and a bare ``deepspeed`` stands in when the real one is absent. sys.modules is put
    back afterwards; the loaded module keeps working on its own. Loaded once per session: a
    second load would re-import the torch modules the clean-up dropped, which torch refuses.
    """
    if _OPENRLHF_LOSS:
        return _OPENRLHF_LOSS[0]
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        pytest.skip("openrlhf is not installed (pip install --no-deps openrlhf)")
    before = dict(sys.modules)
    try:
        for name in ("openrlhf", "openrlhf.models"):
            pkg = types.ModuleType(name)
            sub = spec.submodule_search_locations[0] + ("/models" if name.endswith("models") else "")
            pkg.__path__ = [sub]
            sys.modules[name] = pkg
        if importlib.util.find_spec("deepspeed") is None:
            sys.modules["deepspeed"] = types.ModuleType("deepspeed")
        _OPENRLHF_LOSS.append(importlib.import_module("openrlhf.models.loss"))
        return _OPENRLHF_LOSS[0]
    except ImportError as exc:
        pytest.skip(f"openrlhf.models.loss cannot be imported here: {exc}")
    finally:
        for name in list(sys.modules):
            if name not in before:
                del sys.modules[name]
        sys.modules.update(before)


@pytest.fixture(scope="module", params=["formula", "real"])
def openrlhf_peer(request):
    if request.param == "formula":
        return OpenRLHFFormulas
    return load_openrlhf_loss()


POLICY_SETTINGS = [
    dict(),
    dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0),
    dict(dual_clip=2.0, token_level_loss=False),
    dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.5, 2.0)),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.5, 2.0)),
    dict(is_correction_level="seq", is_correction_threshold=(0.6, 1.6), token_level_loss=False),
    dict(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.05)),
    dict(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=(0.0, 0.1)),
]
BATCH_INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 50.0, "global_batch_size": 11.0}]


@pytest.mark.parametrize("setting", range(len(POLICY_SETTINGS)))
@pytest.mark.parametrize("info", range(len(BATCH_INFOS)))
def test_openrlhf_policy_loss(openrlhf_peer, rng, setting, info):
    old, lp, adv, mask = policy_inputs(rng)
    mask[3, 0] = True  # OpenRLHF's per-row statistics are NaN for an empty row
    rollout = old + randn(rng, *old.shape, scale=0.5)
    kwargs = POLICY_SETTINGS[setting]
    ours_fn, peer_fn = fo.PolicyLoss(**kwargs), openrlhf_peer.PolicyLoss(**kwargs)
    ours_in, peer_in = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    ours = ours_fn(ours_in, old, adv, action_mask=mask, rollout_log_probs=rollout, **BATCH_INFOS[info])
    peer = peer_fn(peer_in, old, adv, action_mask=mask, rollout_log_probs=rollout, **BATCH_INFOS[info])
    assert len(ours) == len(peer) == 5
    for name, a, b in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours, peer):
        if b is None:
            assert a is None, name
        else:
            assert_close(a.detach(), b.detach(), name)
    ours[0].backward()
    peer[0].backward()
    assert_close(ours_in.grad, peer_in.grad, "grad")


def test_openrlhf_policy_loss_without_mask(openrlhf_peer, rng):
    old, lp, adv, _ = policy_inputs(rng)
    ours = fo.PolicyLoss(dual_clip=3.0)(lp, old, adv)
    peer = openrlhf_peer.PolicyLoss(dual_clip=3.0)(lp, old, adv)
    for a, b in zip(ours[:3], peer[:3]):
        assert_close(a, b)


def test_openrlhf_policy_loss_rejects_what_it_does_not_do():
    with pytest.raises(ValueError, match="ppo"):
        fo.PolicyLoss(policy_loss_type="dapo")
    with pytest.raises(ValueError, match="dual_clip"):
        fo.PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="clip"):
        fo.PolicyLoss(is_correction_level="seq", is_correction_mode="clip")


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("info", range(len(BATCH_INFOS)))
def test_openrlhf_value_loss(openrlhf_peer, rng, clip, token_level, info):
    B, T = 6, 11
    old, returns = randn(rng, B, T), randn(rng, B, T)
    values = old + randn(rng, B, T, scale=0.3)
    mask = mask_with_edges(rng, B, T)
    mask[3, 0] = True
    ours_in, peer_in = values.clone().requires_grad_(), values.clone().requires_grad_()
    loss = fo.ValueLoss(clip, token_level)(ours_in, old, returns, action_mask=mask, **BATCH_INFOS[info])
    ref = openrlhf_peer.ValueLoss(clip, token_level)(peer_in, old, returns, action_mask=mask, **BATCH_INFOS[info])
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert_close(loss.detach(), ref.detach(), "loss")
    loss.backward()
    ref.backward()
    assert_close(ours_in.grad, peer_in.grad, "grad")


@pytest.mark.parametrize("layout", ["right", "edges", "none"])
def test_openrlhf_gae_formula(rng, layout):
    B, T = 6, 12
    values, rewards = randn(rng, B, T), randn(rng, B, T)
    if layout == "right":
        lengths = torch.randint(0, T + 1, (B,), generator=rng)
        mask = torch.arange(T) < lengths[:, None]
    else:
        mask = None if layout == "none" else mask_with_edges(rng, B, T)
    adv, ret = fo.get_advantages_and_returns(values, rewards, mask, 0.99, 0.95)
    ref_adv, ref_ret = OpenRLHFFormulas.get_advantages_and_returns(values, rewards, mask, 0.99, 0.95)
    assert_close(adv, ref_adv, "advantages")
    assert_close(ret, ref_ret, "returns")
    if layout == "right":
        # Right padding: OpenRLHF's scan and fastppo's skip-the-mask scan agree.
        assert_close(adv, fastppo.gae(rewards, values, mask, gamma=0.99, lam=0.95)[0], "vs fastppo.gae")


# =============================================================================================
# TRL
# =============================================================================================


class TRLFormulas:
    """TRL's published definitions (trl/trainer/utils.py)."""

    @staticmethod
    def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
        lp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return lp if row_mask is None else lp.masked_fill(row_mask == 0, 0.0)

    @staticmethod
    def entropy_from_logits(logits, chunk_size=128):
        logp = torch.log_softmax(logits.double(), -1)
        return -(logp.exp() * logp).sum(-1)

    @classmethod
    def selective_log_softmax_and_entropy(cls, logits, index, entropy_requires_grad=True, temperature=1.0,
                                          row_mask=None):
        lp = cls.selective_log_softmax(logits, index, temperature, row_mask)
        ent = cls.entropy_from_logits(logits / temperature)
        return lp, ent if row_mask is None else ent.masked_fill(row_mask == 0, 0.0)


@pytest.fixture(scope="module")
def trl_utils():
    pytest.importorskip("trl")
    ft.unpatch()
    return importlib.import_module("trl.trainer.utils")


@pytest.fixture(params=["formula", "real"])
def trl_peer(request):
    if request.param == "formula":
        return TRLFormulas
    return request.getfixturevalue("trl_utils")


@pytest.mark.parametrize("shape", [(3, 7, 33), (5, 17), (2, 1, 3, 9)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_selective_log_softmax(trl_peer, rng, shape, temperature):
    logits = randn(rng, *shape, scale=3.0)
    index = torch.randint(0, shape[-1], shape[:-1], generator=rng)
    row_mask = (torch.rand(shape[:-1], generator=rng) > 0.3).long()
    ours_in, peer_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    for mask in (None, row_mask):
        kwargs = {} if (mask is None and temperature == 1.0) else dict(temperature=temperature, row_mask=mask)
        ours = ft.selective_log_softmax(ours_in, index, **kwargs)
        ref = trl_peer.selective_log_softmax(peer_in, index, **kwargs)
        assert ours.dtype == torch.float32
        assert_close(ours.detach(), ref.detach(), "log-probs", rtol=1e-5, atol=1e-5)
    (ours * torch.arange(ours.numel()).reshape(ours.shape)).sum().backward()
    (ref * torch.arange(ref.numel()).reshape(ref.shape)).sum().backward()
    assert_close(ours_in.grad, peer_in.grad, "grad", rtol=1e-5, atol=1e-5)


def test_trl_selective_log_softmax_bf16(trl_peer, rng):
    logits = randn(rng, 2, 5, 40, scale=3.0, dtype=torch.bfloat16)
    index = torch.randint(0, 40, (2, 5), generator=rng)
    ours = ft.selective_log_softmax(logits, index)
    # TRL's CPU path returns bf16 and so does the adapter (computed in float32, rounded once).
    assert ours.dtype == torch.bfloat16
    assert_close(ours, trl_peer.selective_log_softmax(logits, index).float(), rtol=2e-2, atol=5e-2)


def test_trl_selective_log_softmax_top_k(trl_utils, rng):
    # [..., K] indices: fastppo's one-normaliser path (tests/test_integrations_trl.py has more).
    logits = randn(rng, 2, 5, 12)
    index = torch.randint(0, 12, (2, 5, 3), generator=rng)
    assert_close(ft.selective_log_softmax(logits, index), trl_utils.selective_log_softmax(logits, index))


@pytest.mark.parametrize("shape", [(3, 7, 33), (5, 17), (2, 1, 3, 9), (11,)])
def test_trl_entropy_from_logits(trl_peer, rng, shape):
    logits = randn(rng, *shape, scale=3.0)
    ours_in, peer_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = ft.entropy_from_logits(ours_in, chunk_size=2)
    ref = trl_peer.entropy_from_logits(peer_in, chunk_size=2)
    assert ours.shape == logits.shape[:-1]
    assert_close(ours.detach(), ref.detach(), "entropy", rtol=1e-5, atol=1e-5)
    ours.sum().backward()
    ref.sum().backward()
    assert_close(ours_in.grad, peer_in.grad, "grad", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_trl_selective_log_softmax_and_entropy(trl_peer, rng, requires_grad):
    if not hasattr(trl_peer, "selective_log_softmax_and_entropy"):
        pytest.skip("this TRL version has no selective_log_softmax_and_entropy")
    logits = randn(rng, 3, 6, 21, scale=2.0).requires_grad_()
    index = torch.randint(0, 21, (3, 6), generator=rng)
    row_mask = torch.rand(3, 6, generator=rng) > 0.3
    lp, ent = ft.selective_log_softmax_and_entropy(logits, index, requires_grad, 0.8, row_mask)
    ref_lp, ref_ent = trl_peer.selective_log_softmax_and_entropy(logits, index, requires_grad, 0.8, row_mask)
    assert_close(lp.detach(), ref_lp.detach(), "log-probs", rtol=1e-5, atol=1e-5)
    assert_close(ent.detach(), ref_ent.detach(), "entropy", rtol=1e-5, atol=1e-5)
    assert ent.requires_grad == requires_grad


def test_trl_patch_round_trip(trl_utils, monkeypatch):
    names = [n for n in ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
             if hasattr(trl_utils, n)]
    originals = {n: getattr(trl_utils, n) for n in names}
    # A trainer module that did `from .utils import selective_log_softmax, entropy_from_logits`.
    consumer = types.ModuleType("trl.trainer._fastppo_test_consumer")
    for n in names:
        setattr(consumer, n, originals[n])
    consumer.unrelated = len
    monkeypatch.setitem(sys.modules, consumer.__name__, consumer)
    try:
        ft.patch()
        ft.patch()  # idempotent: the originals stay TRL's
        assert ft.is_patched()
        for n in names:
            assert getattr(trl_utils, n) is getattr(ft, n)
            assert getattr(consumer, n) is getattr(ft, n)
        assert consumer.unrelated is len
        # A module imported after patch() copies the patched names and is restored too.
        late = types.ModuleType("trl.trainer._fastppo_test_late")
        late.selective_log_softmax = trl_utils.selective_log_softmax
        monkeypatch.setitem(sys.modules, late.__name__, late)
    finally:
        ft.unpatch()
    assert not ft.is_patched()
    for n in names:
        assert getattr(trl_utils, n) is originals[n]
        assert getattr(consumer, n) is originals[n]
    assert late.selective_log_softmax is originals["selective_log_softmax"]
    ft.unpatch()  # a second unpatch is a no-op
    assert trl_utils.selective_log_softmax is originals["selective_log_softmax"]


def test_trl_patched_context_manager(trl_utils):
    original = trl_utils.selective_log_softmax
    with pytest.raises(RuntimeError):
        with ft.patched():
            assert trl_utils.selective_log_softmax is ft.selective_log_softmax
            with ft.patched():  # nested: the inner exit leaves the outer patch in place
                pass
            assert ft.is_patched()
            raise RuntimeError("the patch is undone even when the block fails")
    assert trl_utils.selective_log_softmax is original


def test_openrlhf_patch_round_trip(monkeypatch):
    # Stand-ins for OpenRLHF's modules (the real ones need deepspeed, flash-attn and Ray).
    class TheirPolicyLoss: ...
    class TheirValueLoss: ...
    class RemoteExperienceMaker:
        def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
            raise AssertionError("OpenRLHF's own GAE should have been replaced")

    fakes = {
        "openrlhf.models.loss": dict(PolicyLoss=TheirPolicyLoss, ValueLoss=TheirValueLoss),
        "openrlhf.models": dict(PolicyLoss=TheirPolicyLoss, ValueLoss=TheirValueLoss),
        "openrlhf.trainer.ray.ppo_actor": dict(PolicyLoss=TheirPolicyLoss),
        "openrlhf.trainer.ray.ppo_critic": dict(ValueLoss=TheirValueLoss),
        "openrlhf.trainer.ppo_utils.experience_maker": dict(RemoteExperienceMaker=RemoteExperienceMaker),
    }
    for name, attrs in fakes.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    try:
        fo.patch()
        fo.patch()  # idempotent
        assert sys.modules["openrlhf.models"].PolicyLoss is fo.PolicyLoss
        assert sys.modules["openrlhf.trainer.ray.ppo_actor"].PolicyLoss is fo.PolicyLoss
        assert sys.modules["openrlhf.trainer.ray.ppo_critic"].ValueLoss is fo.ValueLoss
        values, rewards = torch.randn(2, 5), torch.randn(2, 5)
        mask = torch.arange(5) < torch.tensor([[3], [5]])
        adv, ret = RemoteExperienceMaker().get_advantages_and_returns(values, rewards, mask, 1.0, 0.9)
        assert_close(adv, fo.get_advantages_and_returns(values, rewards, mask, 1.0, 0.9)[0])
    finally:
        fo.unpatch()
    assert sys.modules["openrlhf.models.loss"].PolicyLoss is TheirPolicyLoss
    assert sys.modules["openrlhf.trainer.ray.ppo_actor"].PolicyLoss is TheirPolicyLoss
    assert sys.modules["openrlhf.trainer.ray.ppo_critic"].ValueLoss is TheirValueLoss
    with pytest.raises(AssertionError, match="replaced"):
        RemoteExperienceMaker().get_advantages_and_returns(values, rewards, mask, 1.0, 0.9)
