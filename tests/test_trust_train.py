"""Trust, third round, for the trainer: divergence, ``--overwrite`` ownership, a full disk.

* a NaN/inf loss or gradient norm skips that optimizer step (counted in ``skipped_steps``) and
  ``max_skipped_steps`` in a row stop the run; weights holding NaN/inf are never checkpointed and
  a checkpoint holding them is never resumed from;
* ``--overwrite`` removes only what a fastppo run listed in its ``fastppo_run.json``;
* a write that fails for want of space (ENOSPC, in each form torch, safetensors and the OS report
  it) stops the run with one line naming the disk, the place and the intact checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import fastppo  # noqa: E402
from fastppo.train import ConfigError, PPOTrainer  # noqa: E402
from fastppo.train import checkpoint  # noqa: E402
from helpers import small_config  # noqa: E402
from fastppo.train.trainer import DiskFull, TrainingDiverged  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("torch_backend")]

STEP1, STEP2, STEP3 = "step-00000001", "step-00000002", "step-00000003"


def small(out, **kw):
    """Two optimizer steps per iteration (mini-batches of 4 of 8 responses), one micro-batch each."""
    return small_config(out, mini_batch_size=4, **kw)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 2-iteration run: checkpoints at steps 1 and 2, the final model in the directory."""
    out = tmp_path_factory.mktemp("trust") / "run"
    with fastppo.use_backend("torch"):
        PPOTrainer(small(out)).train()
    return out


@pytest.fixture
def run(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _rows(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------
# 2: divergence

def _poison_losses(trainer, how: dict[int, str]) -> None:
    """Make the loss of the n-th micro-batch (one per optimizer step here) non-finite: ``inf`` adds a
    constant (the gradients stay finite: only the loss check can catch it), ``nan`` multiplies (the
    gradients turn NaN too)."""
    original = trainer._loss
    calls = [0]

    def loss(*args, **kwargs):
        value, stats = original(*args, **kwargs)
        kind = how.get(calls[0])
        calls[0] += 1
        if kind == "inf":
            value = value + float("inf")
        elif kind == "nan":
            value = value * float("nan")
        return value, stats

    trainer._loss = loss


def test_max_skipped_steps_is_a_whole_number_of_at_least_one():
    from fastppo.train import PPOConfig

    assert PPOConfig().max_skipped_steps == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_skipped_steps"):
            PPOConfig(max_skipped_steps=bad).check()


def test_nonfinite_steps_are_skipped_and_counted_and_a_good_step_resets_the_count(tmp_path):
    trainer = PPOTrainer(small(tmp_path / "run", iterations=3, max_skipped_steps=3))
    _poison_losses(trainer, {0: "inf", 1: "nan", 4: "nan", 5: "inf"})
    before = _weights(trainer.actor), _weights(trainer.critic.model)

    row = trainer.iteration()  # both steps skipped: nothing moved, not even the schedule
    assert row["skipped_steps"] == 2 and trainer.diverged is None
    assert trainer.scheduler.last_epoch == 0 and not trainer.optimizer.state
    for name, p in trainer.actor.state_dict().items():
        assert torch.equal(p, before[0][name]), name
    for name, p in trainer.critic.model.state_dict().items():
        assert torch.equal(p, before[1][name]), name
    assert row["grad_norm"] != row["grad_norm"]  # NaN: no step was taken to average over

    row = trainer.iteration()  # two good steps
    assert row["skipped_steps"] == 0 and trainer.scheduler.last_epoch == 2
    assert row["grad_norm"] > 0 and torch.isfinite(torch.tensor(row["policy_loss"]))
    assert any(not torch.equal(p, before[0][n]) for n, p in trainer.actor.state_dict().items())

    row = trainer.iteration()  # two bad ones again: 2 in a row, below max_skipped_steps 3
    assert row["skipped_steps"] == 2 and trainer.diverged is None and trainer.scheduler.last_epoch == 2
    assert all(torch.isfinite(p).all() for p in trainer.actor.parameters())


def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    # The reproduction: a huge but finite coefficient turns the first update's gradients NaN.
    trainer = PPOTrainer(small(out, iterations=4, kl_loss_coef=1e300, max_skipped_steps=3))
    start = _weights(trainer.actor)
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    message = str(info.value)
    assert "\n" not in message
    assert "iteration 2" in message and "the actor gradient norm" in message and "3 optimizer steps in a row" in message
    assert f"the last good checkpoint, {out / 'checkpoints' / STEP1}, is intact" in message
    # Iteration 1 skipped its 2 steps and was checkpointed (its weights are the starting ones);
    # iteration 2 skipped the third in a row and stopped the run: logged, never checkpointed.
    assert [r["skipped_steps"] for r in _rows(out)] == [2, 1]
    assert sorted(os.listdir(out / "checkpoints")) == [STEP1]
    saved = checkpoint.read(trainer, str(out / "checkpoints" / STEP1))["actor"]
    for name, p in start.items():
        assert torch.equal(saved[name], p), name


def test_weights_a_finite_step_overflowed_stop_the_run_at_that_iteration(tmp_path):
    out = tmp_path / "run"
    trainer = PPOTrainer(small(out, iterations=3))
    step = trainer.optimizer.step
    taken = []

    def overflowing_step(*args, **kwargs):
        # As an optimizer can overflow a weight from finite gradients (low-precision weights, an
        # absurd learning rate): the gradients and the loss of every step stay finite.
        step(*args, **kwargs)
        taken.append(1)
        if len(taken) == 2:
            with torch.no_grad():
                next(trainer.actor.parameters()).view(-1)[0] = float("inf")

    trainer.optimizer.step = overflowing_step
    with pytest.raises(TrainingDiverged, match="^training diverged at iteration 1: after its updates the actor "
                                               "weights hold NaN or inf; no checkpoint had been written yet"):
        trainer.train()
    assert [r["skipped_steps"] for r in _rows(out)] == [0]  # logged, then stopped before the checkpoint
    assert not os.path.exists(out / "checkpoints")


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    trainer = PPOTrainer(small(tmp_path / "run"))
    with torch.no_grad():
        next(trainer.critic.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="the critic weights hold NaN or inf; no checkpoint was written"):
        trainer.save_checkpoint()
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # not even a temporary directory


def _nan_into(ckpt) -> None:
    from safetensors.torch import load_file, save_file

    file = ckpt / "actor" / "model.safetensors"
    weights = load_file(str(file))
    name = sorted(weights)[0]
    weights[name].view(-1)[1] = float("nan")
    save_file(weights, str(file), metadata={"format": "pt"})


def test_resume_skips_a_checkpoint_with_nonfinite_weights(run, capsys):
    _nan_into(run / "checkpoints" / STEP2)
    # max_skipped_steps changes nothing a run computes: a resume may change it.
    trainer = PPOTrainer(small(run, iterations=3, resume=True, max_skipped_steps=5))
    assert trainer.resumed_from.endswith(STEP1) and trainer.step == 1
    err = capsys.readouterr().err
    assert f"skipped checkpoint {STEP2}: the actor weights hold NaN or inf" in err
    assert all(torch.isfinite(p).all() for p in trainer.actor.parameters())

    _nan_into(run / "checkpoints" / STEP1)
    with pytest.raises(ConfigError, match="no usable checkpoint .*step-00000001: the actor weights hold NaN"):
        PPOTrainer(small(run, iterations=3, resume=True))


# --------------------------------------------------------------------------------------------
# 3: --overwrite removes only what a fastppo run wrote

def _cli(argv, capsys) -> tuple[int, str]:
    from fastppo.cli import main as cli_main

    capsys.readouterr()
    rc = cli_main(argv)
    return rc, capsys.readouterr().err


def test_overwrite_refuses_a_directory_no_fastppo_run_wrote(tmp_path, capsys):
    out = tmp_path / "mine"
    files = {"checkpoints/epoch-3.pt": "weights", "critic/notes.md": "notes", "vocab.txt": "a\nb",
             "merges.txt": "#v"}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    rc, err = _cli(["train", "--output-dir", str(out), "--overwrite", "--iterations", "1"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "no fastppo_run.json" in lines[0] and "--overwrite only removes what a fastppo run wrote" in lines[0]
    assert {n: (out / n).read_text() for n in files} == files
    assert sorted(os.listdir(out)) == ["checkpoints", "critic", "merges.txt", "vocab.txt"]


def test_overwrite_spares_files_a_user_added_to_a_run_directory(run, capsys):
    marker = json.loads((run / "fastppo_run.json").read_text())["written"]
    assert "metrics.jsonl" in marker and f"checkpoints/{STEP2}/" in marker and "critic/config.json" in marker
    added = {"notes.txt": "mine", "critic/notes.md": "about the critic", "checkpoints/epoch-3.pt": "other weights",
             "my_vocab.txt": "x"}
    for name, text in added.items():
        (run / name).write_text(text)
    trainer = PPOTrainer(small(run, iterations=1, overwrite=True))
    trainer.train()
    assert "removed the previous run's" in capsys.readouterr().err
    assert {n: (run / n).read_text() for n in added} == added
    assert sorted(os.listdir(run / "checkpoints")) == ["epoch-3.pt", STEP1]
    assert [r["step"] for r in _rows(run)] == [1]
    assert sorted(os.listdir(run / "critic")) == sorted(
        [n.split("/", 1)[1] for n in json.loads((run / "fastppo_run.json").read_text())["written"]
         if n.startswith("critic/")] + ["notes.md"])


def test_the_marker_never_makes_overwrite_delete_outside_the_directory(run, tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    linked = tmp_path / "linked.txt"
    linked.write_text("keep too")
    os.remove(run / "metrics.jsonl")
    os.symlink(linked, run / "metrics.jsonl")  # a listed name that became a link: the link goes, not its target
    data = json.loads((run / "fastppo_run.json").read_text())
    data["written"] += ["../precious.txt", str(outside), "critic/../../precious.txt"]
    (run / "fastppo_run.json").write_text(json.dumps(data))
    checkpoint.clear_outputs(str(run))
    assert outside.read_text() == "keep" and linked.read_text() == "keep too"
    assert not os.path.lexists(run / "metrics.jsonl") and not os.path.exists(run / "checkpoints")


# --------------------------------------------------------------------------------------------
# 4: a full disk

def _safetensors_error():
    from safetensors import SafetensorError

    # As safetensors reports the Rust io::Error of a full disk.
    return SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')


NO_SPACE = {
    "torch-zip-writer": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    "oserror": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "safetensors": _safetensors_error,
}


def test_disk_full_recognises_each_form_and_nothing_else():
    for make in NO_SPACE.values():
        assert checkpoint.disk_full(make())
    wrapped = RuntimeError("could not save")
    wrapped.__cause__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert checkpoint.disk_full(wrapped)
    for other in (OSError(errno.EACCES, "Permission denied"), RuntimeError("CUDA out of memory"),
                  ValueError("bad value"), OSError(errno.EIO, "No space left on device")):
        assert not checkpoint.disk_full(other), other


@pytest.mark.parametrize("form", sorted(NO_SPACE))
def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_previous_checkpoint(run, monkeypatch, form):
    import transformers.modeling_utils

    trainer = PPOTrainer(small(run, iterations=3, resume=True))

    def full(*args, **kwargs):
        raise NO_SPACE[form]()

    # The writer that fails: safetensors' for the weights, and for the trainer state's tensors each
    # form (a torch writer's zip error, the OS's errno, safetensors' own).
    if form == "safetensors":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    else:
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiskFull) as info:
        trainer.train()
    message = str(info.value)
    assert "\n" not in message and "no space left on device (ENOSPC)" in message
    assert f"checkpoint {STEP3} in {run / 'checkpoints'}" in message
    assert f"{run / 'checkpoints' / STEP2}, is intact" in message
    monkeypatch.undo()
    assert sorted(os.listdir(run / "checkpoints")) == [STEP1, STEP2]  # no partial directory left
    assert checkpoint.read(trainer, str(run / "checkpoints" / STEP2))["state"]["step"] == 2


def test_a_full_disk_while_saving_the_final_model_exits_1_with_one_line(run, monkeypatch, capsys):
    import transformers.modeling_utils

    before = (run / "model.safetensors").read_bytes()
    real = transformers.modeling_utils.safe_save_file

    def full_for_the_final_model(tensors, filename, *args, **kwargs):
        if ".tmp-final-" in str(filename):
            raise _safetensors_error()
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_for_the_final_model)
    rc, err = _cli(["train", "--output-dir", str(run), "--resume", "--iterations", "3", "--batch-size", "8",
                    "--mini-batch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "4", "--ppo-epochs", "1",
                    "--no-progress", "--no-plot", "--save-every", "1"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("fastppo train: error")]
    assert rc == 1 and len(lines) == 1, err
    assert (f"no space left on device (ENOSPC) while writing the final model in {run}; the previous checkpoint, "
            f"{run / 'checkpoints' / STEP3}, is intact") in lines[0]
    assert "Traceback" not in err
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-final-")]
    assert (run / "model.safetensors").read_bytes() == before  # the previous final model, whole


# --------------------------------------------------------------------------------------------
# under torchrun: one rank's non-finite loss skips the step on every rank

def _worker_one_rank_diverges(out: str) -> None:
    """Rank 1's first loss is +inf with finite gradients: only the all-reduced loss flag catches
    it, and rank 0 must skip the same step (its own loss and the global norms are finite)."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    with fastppo.use_backend("torch"):
        trainer = PPOTrainer(small(out, iterations=1, save_every=0))
        if rank == 1:
            _poison_losses(trainer, {0: "inf"})
        row = trainer.iteration()
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"skipped_steps": row["skipped_steps"], "lr_steps": trainer.scheduler.last_epoch}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_under_torchrun_every_rank_skips_the_step_one_rank_found_non_finite(tmp_path):
    import subprocess
    import sys

    if not torch.distributed.is_available():  # pragma: no cover
        pytest.skip("torch.distributed is not available")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               FASTPPO_DIST_TIMEOUT="60")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.abspath(__file__), str(out)], capture_output=True, text=True, timeout=240,
                          env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Two optimizer steps in the iteration: the first skipped by both ranks, the second taken by both.
    assert ranks == [{"skipped_steps": 1, "lr_steps": 1}] * 2


if __name__ == "__main__":
    import sys

    _worker_one_rank_diverges(sys.argv[1])
