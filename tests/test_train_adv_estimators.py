"""``fastppo train --advantage-estimator NAME`` for verl 0.9.1's estimator names (issue 19, item 5):
every accepted one runs on the built-in task, one learns, and the three that need data the trainer
does not produce (remax, optimal_token_baseline, tir_optimal_token_baseline) are refused with one
line that gives the reason."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

from fastppo.train import PPOTrainer  # noqa: E402
from fastppo.train import builtin  # noqa: E402
from fastppo.train.config import GROUP_ESTIMATORS, REFUSED_ESTIMATORS  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("torch_backend")]

NEW = ("grpo_vectorized", "rloo_vectorized", "grpo_passk", "opo", "gpg", "reinforce_plus_plus_baseline", "gdpo",
       "reinforce_plus_plus")


@pytest.mark.parametrize("estimator", NEW)
def test_each_estimator_runs_on_the_builtin_task(tmp_path, estimator):
    k = 4 if estimator in GROUP_ESTIMATORS else 1
    cfg = builtin.default_config(output_dir=str(tmp_path), iterations=1, batch_size=8, mini_batch_size=8,
                                 micro_batch_size=8, max_new_tokens=4, ppo_epochs=1, progress=False, plot=False,
                                 advantage_estimator=estimator, num_generations=k, seed=1)
    trainer = PPOTrainer(cfg)
    assert trainer.critic is None
    row = trainer.iteration()
    for key in ("policy_loss", "advantage_mean", "score_mean"):
        assert key in row and row[key] == row[key], (estimator, key)  # present and not NaN


def test_reinforce_plus_plus_baseline_learns(tmp_path):
    # The setup of test_train_estimators' learners (seed 0, 12 iterations of 8 prompts x 4).
    cfg = builtin.default_config(output_dir=str(tmp_path), iterations=12, batch_size=32, mini_batch_size=16,
                                 micro_batch_size=16, max_new_tokens=8, progress=False, plot=False, seed=0,
                                 advantage_estimator="reinforce_plus_plus_baseline", num_generations=4)
    rows = PPOTrainer(cfg).train()["history"]
    first = sum(r["score_mean"] for r in rows[:3]) / 3
    last = sum(r["score_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.3, (first, last)


@pytest.mark.parametrize("estimator", sorted(REFUSED_ESTIMATORS))
def test_estimators_needing_missing_data_are_refused(tmp_path, capfd, estimator):
    from fastppo.cli import main as cli_main

    argv = ["train", "--iterations", "1", "--batch-size", "4", "--mini-batch-size", "4", "--micro-batch-size", "4",
            "--max-new-tokens", "2", "--no-progress", "--no-plot", "--output-dir", str(tmp_path / "out"),
            "--advantage-estimator", estimator, "--num-generations", "2"]
    capfd.readouterr()
    try:
        rc = cli_main(argv)
    except SystemExit as exc:
        rc = exc.code
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert estimator in lines[0] and "not available" in lines[0] and REFUSED_ESTIMATORS[estimator][:20] in lines[0]
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
