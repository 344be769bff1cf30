"""The trainer's rollout correction (--rollout-is / --rollout-rs) on the built-in task, hf engine.

The hf engine samples with the actor itself, so its recorded log-probs equal the trainer's old
log-probs up to float32 rounding (ratio ~ 1): a weight bound below 1 then scales every token's
policy loss exactly, which shows that the weights reach the loss, and a ratio band excluding 1
rejects every token, which shows that the rejection reaches the mask.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fastppo.train import PPOTrainer, builtin  # noqa: E402
from fastppo.train.config import ConfigError  # noqa: E402
from helpers import small_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_backend")


def first_iteration(out, **kw):
    cfg = small_config(out, iterations=1, **kw)
    return PPOTrainer(cfg).iteration()


@pytest.mark.parametrize("options", [
    dict(rollout_is="token"),
    dict(rollout_is="sequence", rollout_is_threshold=3.0, rollout_is_batch_normalize=True),
    dict(rollout_is="geometric", rollout_is_lower=0.5),
    dict(rollout_is="tis", rollout_is_cap=1.5),
    dict(rollout_rs="token_k1,seq_mean_k3,seq_max_k2", rollout_rs_threshold="0.5_2.0,0.1,0.2"),
    dict(rollout_is="token", rollout_rs="geometric", rollout_rs_threshold="1.01", advantage_estimator="grpo",
         num_generations=2),
], ids=["token", "sequence-bn", "geometric-icepop", "tis-alias", "rs-chain", "grpo-token-geo-rs"])
def test_each_option_runs_on_the_builtin_task(tmp_path, options):
    row = first_iteration(tmp_path, **options)
    assert math.isfinite(row["policy_loss"])
    # The hf engine's own sampling log-probs are the trainer's, to rounding.
    assert row["rollout_logprob_diff_max"] < 1e-4
    assert abs(row["rollout_corr/kl"]) < 1e-5
    if options.get("rollout_is"):
        assert row["rollout_corr/rollout_is_mean"] == pytest.approx(1.0, abs=1e-4)
        assert "rollout_is_weight_mean" in row
    if options.get("rollout_rs"):
        assert row["rollout_corr/rollout_rs_masked_fraction"] == 0.0  # ratio 1 passes every criterion


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora-fused-head"])
def test_weights_reach_the_loss(tmp_path, lora):
    """Weights truncated at 0.5 (every ratio is ~1): the first update's policy loss is half of the
    uncorrected run's, on the logits path and on the fused-head path (LoRA: linear_ppo_loss)."""
    # Unwhitened advantages (a whitened batch's token-mean loss is 0 at ratio 1 whatever the weights),
    # and a penalty for cut-off responses so that the scores do not happen to average 0.
    plain = first_iteration(tmp_path / "plain", lora_r=lora, whiten_advantages=False, missing_eos_penalty=0.5)
    half = first_iteration(tmp_path / "half", lora_r=lora, whiten_advantages=False, missing_eos_penalty=0.5,
                           rollout_is="token", rollout_is_threshold=0.5)
    assert "rollout_corr/kl" not in plain  # no correction: the hf engine records nothing
    assert half["rollout_is_weight_mean"] == pytest.approx(0.5, abs=1e-7)
    assert abs(plain["policy_loss"]) > 1e-6
    assert half["policy_loss"] == pytest.approx(0.5 * plain["policy_loss"], rel=1e-4, abs=1e-7)
    # The weights multiply the policy loss only: the clip fraction and KL are unweighted.
    assert half["approx_kl"] == pytest.approx(plain["approx_kl"], rel=1e-4, abs=1e-7)


def test_rejected_tokens_leave_the_loss(tmp_path):
    """A ratio band that excludes 1 rejects every token: nothing is left in the loss."""
    row = first_iteration(tmp_path, rollout_rs="token_k1", rollout_rs_threshold="1.5_2.0")
    assert row["rollout_corr/rollout_rs_masked_fraction"] == 1.0
    assert row["rollout_corr/rollout_rs_seq_masked_fraction"] == 1.0
    assert row["policy_loss"] == 0.0 and row["value_loss"] == 0.0


def test_hf_sampling_logprobs_are_recorded(tmp_path):
    cfg = small_config(tmp_path, iterations=1, rollout_is="token", temperature=0.7, top_p=0.9)
    trainer = PPOTrainer(cfg)
    prompt_ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    torch.manual_seed(0)
    responses, mask, lps = trainer.generate(prompt_ids, prompt_mask, logprobs=True)
    torch.manual_seed(0)
    responses2, mask2 = trainer.generate(prompt_ids, prompt_mask)
    assert torch.equal(responses, responses2) and torch.equal(mask, mask2)  # recording draws nothing
    assert lps.shape == responses.shape and lps.dtype == torch.float32
    assert (lps[~mask] == 0).all() and (lps[mask] <= 0).all()
    # top_p truncation renormalises: the sampler's log-prob is at least the full distribution's.
    from fastppo.train.models import position_ids_from, response_logprobs

    seq = torch.cat([prompt_ids, responses], 1)
    attn = torch.cat([prompt_mask, mask.long()], 1)
    with torch.no_grad():
        full, _ = response_logprobs(trainer.actor, seq, attn, position_ids_from(attn), 3, mask, 0.7)
    assert (lps[mask] >= full[mask] - 1e-5).all()


def test_bad_options_are_refused():
    for kw, match in [
        (dict(rollout_is="tokens"), "rollout_is"),
        (dict(rollout_is_threshold=0.0), "rollout_is_threshold"),
        (dict(rollout_is_lower=3.0), "rollout_is_lower"),
        (dict(rollout_rs="token_k1"), "needs rollout_rs_threshold"),
        (dict(rollout_rs_threshold="2.0"), "without rollout_rs"),
        (dict(rollout_rs="seq_max_k1", rollout_rs_threshold="2.0"), "unknown rejection option"),
        (dict(rollout_rs="token_k2", rollout_rs_threshold="0.5_1.0"), "one upper bound"),
        (dict(rollout_is_cap=1.5, rollout_is_threshold=3.0), "older name"),
    ]:
        with pytest.raises(ConfigError, match=match):
            builtin.default_config(**kw).check()


def test_cli_flags(tmp_path):
    import argparse

    from fastppo.train.cli import add_parser, resolve_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--rollout-is", "sequence", "--rollout-is-threshold", "3",
                              "--rollout-is-lower", "0.2", "--rollout-is-batch-normalize", "--rollout-rs",
                              "token_k1,seq_max_k3", "--rollout-rs-threshold", "0.5_2.0,0.3"])
    cfg = resolve_config(args)
    assert (cfg.rollout_is, cfg.rollout_is_threshold, cfg.rollout_is_lower, cfg.rollout_is_batch_normalize,
            cfg.rollout_rs, cfg.rollout_rs_threshold) == ("sequence", 3.0, 0.2, True, "token_k1,seq_max_k3",
                                                          "0.5_2.0,0.3")
    cfg.check()
