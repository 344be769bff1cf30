"""``fastppo train --advantage-estimator grpo|rloo|reinforce++``: critic-free PPO on the built-in task."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

import fastppo  # noqa: E402
from fastppo.train import ConfigError, PPOTrainer  # noqa: E402
from fastppo.train import builtin, checkpoint  # noqa: E402
from fastppo.train import trainer as trainer_module  # noqa: E402

from helpers import assert_train_refuses  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("torch_backend")]



@pytest.fixture
def no_critic(monkeypatch):
    """Any attempt to load a critic fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a critic was loaded in a critic-free mode")

    monkeypatch.setattr(trainer_module, "load_critic", refuse)


def small(out, **kw):
    base = dict(output_dir=str(out), iterations=2, batch_size=8, mini_batch_size=8, micro_batch_size=8,
                max_new_tokens=4, ppo_epochs=1, progress=False, plot=False, advantage_estimator="grpo",
                num_generations=4)
    base.update(kw)
    return builtin.default_config(**base)


# (estimator, num_generations): grpo and rloo compare the K responses to a prompt; reinforce++ needs no group.
LEARNERS = [("grpo", 4), ("rloo", 4), ("reinforce++", 1)]


@pytest.mark.parametrize("estimator,k", LEARNERS, ids=[e for e, _ in LEARNERS])
def test_builtin_task_learns_without_a_critic(tmp_path, no_critic, estimator, k):
    # 12 iterations of 32 responses (8 prompts x 4 for grpo/rloo). With seed 0 each estimator goes
    # from ~0.03 to ~0.55 (grpo, rloo at 20 iterations: ~0.88); the margin leaves room for numerics.
    cfg = builtin.default_config(output_dir=str(tmp_path), iterations=12, batch_size=32, mini_batch_size=16,
                                 micro_batch_size=16, max_new_tokens=8, progress=False, plot=False, seed=0,
                                 advantage_estimator=estimator, num_generations=k)
    trainer = PPOTrainer(cfg)
    assert trainer.critic is None
    assert len(trainer.optimizer.param_groups) == 1  # the actor's only
    summary = trainer.train()
    rows = summary["history"]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("score_mean", "kl", "entropy", "policy_loss", "clipfrac", "approx_kl", "advantage_mean"):
        assert key in rows[0], key
    for key in ("value_loss", "value_clipfrac", "explained_variance", "value_mean"):
        assert key not in rows[0], key  # nothing that needs a critic's values
    first = sum(r["score_mean"] for r in rows[:3]) / 3
    last = sum(r["score_mean"] for r in rows[-3:]) / 3
    assert abs(first) < 0.2
    assert last > first + 0.3, (estimator, first, last)
    assert rows[-1]["kl"] > 0
    ckpt = summary["checkpoint"]
    assert sorted(os.listdir(ckpt)) == ["actor", "config.yaml", "fingerprint.json", "trainer_state.json",
        "trainer_state.safetensors"]


def test_group_layout_and_kl_loss(tmp_path, no_critic, monkeypatch):
    """K consecutive rows per prompt; grpo advantages come from fastppo.group_advantages; the KL loss
    term is differentiable and reported; the KL reward penalty is not used by grpo."""
    seen = {}
    real = fastppo.group_advantages

    def spy(scores, group_size, mask, **kw):
        seen.update(group_size=group_size, estimator=kw.get("estimator"))
        return real(scores, group_size, mask, **kw)

    monkeypatch.setattr(fastppo, "group_advantages", spy)
    trainer = PPOTrainer(small(tmp_path, advantage_estimator="rloo", kl_loss_coef=0.5, iterations=1))
    drawn = []
    real_next = trainer.sampler.next
    trainer.sampler.next = lambda n: drawn.append(n) or real_next(n)
    row = trainer.iteration()
    assert drawn == [2]  # batch_size 8 / num_generations 4 prompts
    assert seen == {"group_size": 4, "estimator": "rloo"}
    assert "kl_loss" in row and row["kl_coef"] == 0.0
    assert row["kl_loss"] == pytest.approx(0.0, abs=1e-5)  # the first update: actor == reference


def test_prompts_repeat_in_consecutive_rows(tmp_path, no_critic, monkeypatch):
    trainer = PPOTrainer(small(tmp_path, advantage_estimator="grpo", num_generations=4, batch_size=8))
    captured = {}
    real = trainer.generate

    def gen(prompt_ids, prompt_mask):
        captured["ids"] = prompt_ids.clone()
        return real(prompt_ids, prompt_mask)

    trainer.generate = gen
    trainer.iteration()
    ids = captured["ids"]
    assert ids.shape[0] == 8
    for g in range(2):
        for r in range(4):
            assert torch.equal(ids[4 * g + r], ids[4 * g])


BAD = [
    (["--advantage-estimator", "ppo"], "advantage_estimator"),
    (["--advantage-estimator", "grpo", "--num-generations", "1"], "num_generations"),
    (["--advantage-estimator", "rloo"], "num_generations"),  # default K = 1
    (["--num-generations", "0"], "num_generations"),
    (["--num-generations", "3"], "multiple of num_generations"),  # batch_size 4
    (["--kl-loss-coef", "-1"], "kl_loss_coef"),
    (["--advantage-estimator", "grpo", "--num-generations", "2", "--kl-target", "1"], "kl_target"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=["unknown", "grpo-k1", "rloo-default-k", "k0", "k-not-dividing",
                                                    "kl-loss-neg", "grpo-kl-target"])
def test_bad_values_exit_2_with_one_line(tmp_path, capfd, argv, expected):
    assert_train_refuses(tmp_path, capfd, argv, expected)


def test_critic_model_with_a_critic_free_estimator_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="uses no critic"):
        small(tmp_path, critic_model=str(tmp_path)).check()


def test_resume_critic_free(tmp_path, no_critic):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    kw = dict(advantage_estimator="reinforce++", num_generations=2, kl_loss_coef=0.1)
    PPOTrainer(small(straight, iterations=3, **kw)).train()
    PPOTrainer(small(cut, iterations=2, save_every=1, **kw)).train()
    assert not os.path.exists(cut / "checkpoints" / "step-00000002" / "critic")

    resumed = PPOTrainer(small(cut, iterations=3, resume=True, **kw))
    assert resumed.step == 2 and resumed.critic is None
    resumed.train()
    a, b = (checkpoint_rows(p) for p in (straight, cut))
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("score_mean", "kl", "policy_loss", "kl_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)

    # A gae run must not resume a critic-free run's directory (and the other way round).
    with pytest.raises(ConfigError, match="advantage_estimator"):
        PPOTrainer(small(cut, iterations=4, resume=True, advantage_estimator="gae", num_generations=2,
                         kl_loss_coef=0.1))


def test_checkpoints_written_before_the_estimator_options_still_resume():
    """A fingerprint without the new options reads as gae, K = 1, no KL loss."""
    cfg = builtin.default_config()
    new = {"options": {"advantage_estimator": "gae", "num_generations": 1, "kl_loss_coef": 0.0, "seed": 0},
           "actor": None, "critic": None, "reward_model": None, "prompts": {}}
    old = {"options": {"seed": 0}, "actor": None, "critic": None, "reward_model": None, "prompts": {}}
    assert checkpoint._differences(old, new) == []
    assert cfg.advantage_estimator == "gae"
    new["options"]["advantage_estimator"] = "grpo"
    assert checkpoint._differences(old, new) == ["advantage_estimator is 'grpo' now, was 'gae'"]


def checkpoint_rows(out):
    from fastppo.train.metrics import read_metrics

    return read_metrics(os.path.join(out, "metrics.jsonl"))
