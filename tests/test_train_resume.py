"""--resume: never unpickles, survives damaged checkpoints and logs, refuses another run's directory."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import fastppo  # noqa: E402
from fastppo.train import ConfigError, PPOTrainer  # noqa: E402
from fastppo.train import builtin, checkpoint  # noqa: E402
from helpers import small_config  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("torch_backend")]

STEP1, STEP2 = "step-00000001", "step-00000002"



def small(out, **kw):
    return small_config(out, mini_batch_size=8, **kw)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 2-iteration run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("base") / "run"
    with fastppo.use_backend("torch"):
        PPOTrainer(small(out)).train()
    assert sorted(os.listdir(out / "checkpoints")) == [STEP1, STEP2]
    return out


@pytest.fixture
def run(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def _ckpt(out, name=STEP2):
    return out / "checkpoints" / name


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.marker, "w"))


def _leftovers(out):
    return [n for n in os.listdir(out / "checkpoints") if not checkpoint._NAME.match(n)]


# --------------------------------------------------------------------------------------------
# 10: a checkpoint can never run code

def _state(ckpt):
    from fastppo.train import safestate

    return safestate.load(str(ckpt / "trainer_state.json"), str(ckpt / "trainer_state.safetensors"))


def test_trainer_state_is_json_and_safetensors_nothing_pickled(run):
    from safetensors.torch import load_file

    ckpt = _ckpt(run)
    json.loads((ckpt / "trainer_state.json").read_text())  # plain JSON (raises on anything else)
    assert load_file(str(ckpt / "trainer_state.safetensors"))  # plain safetensors
    assert not any(n.endswith((".pt", ".pkl", ".bin")) for n in os.listdir(ckpt))
    state = _state(ckpt)
    assert state["step"] == 2 and state["format"] == checkpoint.FORMAT
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    if "numpy" in state["rng"]:
        assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor)


def test_planted_pickle_payload_never_runs(run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    torch.save({"step": 2, "payload": Payload(marker)}, _ckpt(run) / "trainer_state.json")

    # The newest checkpoint holds the payload: skipped with a warning, the run resumes from step 1.
    trainer = PPOTrainer(small(run, iterations=3, resume=True))
    assert not marker.exists()
    assert trainer.resumed_from.endswith(STEP1) and trainer.step == 1
    err = capsys.readouterr().err
    assert f"skipped checkpoint {STEP2}" in err and "trainer_state.json" in err

    # Every checkpoint holds one: the command refuses in one line, exit 2, and nothing runs.
    torch.save({"step": 1, "payload": Payload(marker)}, _ckpt(run, STEP1) / "trainer_state.safetensors")
    from fastppo.cli import main

    rc = main(["train", "--output-dir", str(run), "--resume", "--iterations", "3", "--batch-size", "8",
               "--mini-batch-size", "8", "--micro-batch-size", "8", "--max-new-tokens", "4", "--ppo-epochs", "1",
               "--save-every", "1", "--no-progress", "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert len(err.strip().splitlines()) == 1 and "no usable checkpoint" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# 12: damaged checkpoints and logs

def _truncate_state(ckpt):
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])


def _empty_weights(ckpt):
    (ckpt / "actor" / "model.safetensors").write_bytes(b"")


def _no_critic(ckpt):
    shutil.rmtree(ckpt / "critic")


def _no_state(ckpt):
    os.remove(ckpt / "trainer_state.safetensors")


@pytest.mark.parametrize("damage", [_truncate_state, _empty_weights, _no_critic, _no_state],
                         ids=["truncated-state", "empty-weights", "missing-critic", "missing-state"])
def test_damaged_newest_checkpoint_falls_back_to_an_older_one(run, damage, capsys):
    damage(_ckpt(run))
    trainer = PPOTrainer(small(run, iterations=3, resume=True))
    assert trainer.resumed_from.endswith(STEP1) and trainer.step == 1
    assert f"skipped checkpoint {STEP2}" in capsys.readouterr().err
    trainer.train()
    # Step 2 was written again, whole, over the damaged one, and nothing is left lying around.
    assert sorted(os.listdir(run / "checkpoints")) == [STEP1, STEP2, "step-00000003"]
    assert _state(_ckpt(run))["step"] == 2
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_resumed_weights_equal_the_checkpoint(run):
    from transformers import AutoModelForCausalLM

    trainer = PPOTrainer(small(run, iterations=3, resume=True))
    saved = AutoModelForCausalLM.from_pretrained(_ckpt(run) / "actor").state_dict()
    for name, p in trainer.actor.state_dict().items():
        torch.testing.assert_close(p, saved[name], rtol=0, atol=0, msg=name)


def test_cut_off_metrics_line_does_not_stop_resume(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "score_me')  # killed in the middle of a write
    PPOTrainer(small(run, iterations=3, resume=True)).train()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_resume_into_another_runs_directory_refuses_before_loading_weights(run, monkeypatch):
    from fastppo.train import trainer as trainer_module

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the fingerprint was checked")

    monkeypatch.setattr(trainer_module, "load_actor", no_weights)
    with pytest.raises(ConfigError, match=r"different run: learning_rate is 0\.5 now, was 0\.001"):
        PPOTrainer(small(run, iterations=3, resume=True, learning_rate=0.5))
    with pytest.raises(ConfigError, match="different run: seed"):
        PPOTrainer(small(run, iterations=3, resume=True, seed=1))


def test_resume_with_another_model_refuses(tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    model_dir, prompts = builtin.materialize(str(tmp_path / "builtin"), seed=0)
    shutil.copytree(model_dir, a)
    shutil.copytree(model_dir, b)
    torch.manual_seed(5)  # same architecture, other weights: a different model all the same
    AutoModelForCausalLM.from_config(builtin.build_model_config()).save_pretrained(b)
    out = tmp_path / "out"
    kw = dict(dataset=prompts, reward="sentiment", iterations=1)
    PPOTrainer(small(out, model=a, **kw)).train()
    with pytest.raises(ConfigError, match="actor model differs \\(its weights\\)"):
        PPOTrainer(small(out, model=b, **dict(kw, iterations=2), resume=True))
    # The same model moved elsewhere resumes: its contents count, not its path.
    moved = str(tmp_path / "moved")
    shutil.copytree(a, moved)
    assert PPOTrainer(small(out, model=moved, **dict(kw, iterations=2), resume=True)).step == 1


# --------------------------------------------------------------------------------------------
# 12: writing

def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    trainer = PPOTrainer(small(tmp_path, iterations=1))
    synced, events = [], []
    real_fsync, real_rename = checkpoint._fsync, os.rename

    def fsync(path, directory=False):
        synced.append(os.path.normpath(path))
        real_fsync(path, directory)

    def rename(src, dst):
        if os.path.basename(src).startswith(".tmp-step-"):
            on_disk = [os.path.normpath(os.path.join(d, n)) for d, ds, fs in os.walk(src) for n in fs + ds]
            events.append((set(on_disk + [os.path.normpath(src)]) - set(synced), dst))
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint, "_fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    path = trainer.save_checkpoint()
    assert events and events[0] == (set(), path)  # every file and directory synced before the rename
    assert os.path.normpath(os.path.dirname(path)) in synced  # and the directory that holds it, after


def test_no_old_directories_left_and_a_crashed_swap_is_undone(run):
    root = run / "checkpoints"
    trainer = PPOTrainer(small(run, iterations=2, resume=True))
    assert trainer.step == 2
    trainer.save_checkpoint()  # the same step again: swapped in, the old one dropped
    assert _leftovers(run) == []

    # A crash between the two renames of a swap leaves the old checkpoint aside: it is put back.
    os.rename(root / STEP2, root / f".old-{STEP2}-999")
    os.makedirs(root / f".tmp-{STEP2}-999")
    os.makedirs(root / f"{STEP1}.old-123")  # what fastppo 0.1 could leave behind
    assert checkpoint.latest_checkpoint(str(run)).endswith(STEP2)
    assert _leftovers(run) == []
    assert PPOTrainer(small(run, iterations=2, resume=True)).step == 2
