"""A multi-process checkpoint can never run code when resumed (2 gloo ranks under torchrun, CPU).

One torchrun launch writes a 2-rank run with checkpoints at steps 1 and 2 and keeps a copy of both.
Then it plants a pickle payload (it creates a marker file when unpickled) where
``torch.distributed.checkpoint`` kept its files (``dcp/``) and resumes with 2 ranks (step 2
loads: those files are never read); then in every file of step 2 (falls back to step 1 with one
warning); then in step 1 too, and resumes through the CLI (refused, exit 2). In this process, a
payload goes into each file of the copied step 2 in turn, and both readers (the one-process one
and the one the ranks use) read it: every file either makes the checkpoint unusable or is never
opened, and the marker never appears. Last, that reader on LoRA adapters (actor and critic):
every trained tensor comes back.

Run as a script (``python -m torch.distributed.run ... tests/test_trust_checkpoint_dist.py OUT``)
this file is the worker the test launches.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
STEP1, STEP2 = "step-00000001", "step-00000002"
RUN = dict(iterations=2, save_every=1, batch_size=8, mini_batch_size=4, micro_batch_size=2, max_new_tokens=4,
           ppo_epochs=1, progress=False, plot=False)
CLI = ["--iterations", "3", "--save-every", "1", "--batch-size", "8", "--mini-batch-size", "4",
       "--micro-batch-size", "2", "--max-new-tokens", "4", "--ppo-epochs", "1", "--no-progress", "--no-plot"]
OLD_DCP = ("dcp/.metadata", "dcp/__0_0.distcp")  # what torch.distributed.checkpoint wrote (both unpickled on read)


class Payload:
    def __init__(self, marker: str):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.marker, "w"))


def plant(path: str, marker: str) -> None:
    """Replace ``path`` with a pickle that writes ``marker`` when loaded: torch's zip container for
    the files torch writes, a bare pickle (as ``.metadata`` is) for the others."""
    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith((".pt", ".distcp")):
        torch.save({"format": 2, "step": 1, "payload": Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)


def files(directory: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), directory) for d, _, ns in os.walk(directory) for n in ns)


def plant_everywhere(ckpt: str, marker: str) -> None:
    """A payload in every file of ``ckpt`` but ``fingerprint.json`` (JSON, which a run checks
    first: a damaged one skips the checkpoint before anything else is read) and in ``dcp/``."""
    for rel in sorted({*files(ckpt), *OLD_DCP} - {"fingerprint.json"}):
        plant(os.path.join(ckpt, rel), marker)


# --------------------------------------------------------------------------------------------
# worker side


def _worker(out: str) -> None:
    import torch.distributed as dist

    from fastppo.cli import main
    from fastppo.train import PPOTrainer, builtin

    run = os.path.join(out, "run")
    ckpts = os.path.join(run, "checkpoints")
    marker = os.path.join(out, "PWNED")
    PPOTrainer(builtin.default_config(output_dir=run, **RUN)).train()
    rank = dist.get_rank()
    step2 = os.path.join(ckpts, STEP2)
    if rank == 0:
        shutil.copytree(ckpts, os.path.join(out, "pristine"))
        # The files torch.distributed.checkpoint wrote (those it would unpickle on load), planted
        # next to the others: never read, the checkpoint resumes from its safe files.
        for rel in {*OLD_DCP, *(f for f in files(step2) if f.startswith("dcp/"))}:
            plant(os.path.join(step2, rel), marker)
    dist.barrier()
    trainer = PPOTrainer(builtin.default_config(output_dir=run, resume=True, **RUN))
    result = {"dcp_planted": [os.path.basename(trainer.resumed_from), trainer.step]}
    if rank == 0:
        plant_everywhere(step2, marker)
    dist.barrier()
    # Each rank's own stderr: two processes writing into one pipe may interleave their lines.
    with contextlib.redirect_stderr(io.StringIO()) as err:
        trainer = PPOTrainer(builtin.default_config(output_dir=run, resume=True, **RUN))
    result["all_planted"] = [os.path.basename(trainer.resumed_from), trainer.step, err.getvalue()]
    del trainer
    if rank == 0:
        plant_everywhere(os.path.join(ckpts, STEP1), marker)
    dist.barrier()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        result["cli"] = [main(["train", "--output-dir", run, "--resume", *CLI]), err.getvalue()]
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.exit(0)


# --------------------------------------------------------------------------------------------
# test side

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_trust")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               FASTPPO_DIST_TIMEOUT="60", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           HERE, str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, proc


def ours(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("fastppo")]


def test_two_ranks_never_run_a_payload_in_their_checkpoint(poisoned):
    out, proc = poisoned
    assert not (out / "PWNED").exists()
    # The checkpoint the ranks write holds only safetensors, JSON/YAML and the JSON + safetensors trainer state.
    assert files(str(out / "pristine" / STEP2)) == [
        "actor/config.json", "actor/generation_config.json", "actor/model.safetensors",
        "actor/tokenizer.json", "actor/tokenizer_config.json", "config.yaml", "critic/config.json",
        "critic/model.safetensors", "fingerprint.json", "trainer_state.json",
        "trainer_state.safetensors"]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Payloads where torch.distributed.checkpoint's files were: never read, step 2 resumes.
    assert [r["dcp_planted"] for r in ranks] == [[STEP2, 2], [STEP2, 2]]
    # In every file of step 2: both ranks skip it together and resume from step 1; rank 0 warns for both.
    assert [r["all_planted"][:2] for r in ranks] == [[STEP1, 1], [STEP1, 1]]
    warning, quiet = (ours(r["all_planted"][2]) for r in ranks)  # (transformers' progress bars aside)
    assert len(warning) == 1 and warning[0].startswith(f"fastppo train: warning: skipped checkpoint {STEP2}: ")
    assert warning[0].endswith(f"resuming from {STEP1}") and quiet == []
    # The reader's reason: the planted pickle is no safetensors/JSON state (found without unpickling).
    assert "the trainer state (trainer_state.json, trainer_state.safetensors) cannot be read" in warning[0]
    assert "nothing in it was run" in warning[0]
    assert "weights_only" not in warning[0] and "\x1b" not in warning[0]
    # Both poisoned: `fastppo train --resume` refuses on every rank in one line, exit 2.
    for r in ranks:
        code, err = r["cli"]
        assert code == 2 and len(ours(err)) == 1, err
        assert ours(err)[0].startswith("fastppo train: error: --resume: no usable checkpoint under ")
    assert "Traceback" not in proc.stderr


def test_a_payload_in_any_one_file_is_never_run(poisoned, tmp_path, capsys):
    """Each file of the 2-rank checkpoint in turn, read by the one-process and the multi-process reader."""
    from fastppo.train import ConfigError, PPOTrainer, builtin, checkpoint, distributed

    out, _ = poisoned
    run = tmp_path / "run"
    shutil.copytree(out / "run" / "builtin", run / "builtin")
    shutil.copytree(out / "pristine", run / "checkpoints")
    # One process resumes what 2 ranks wrote, and says so in one line.
    trainer = PPOTrainer(builtin.default_config(output_dir=str(run), resume=True, **RUN))
    assert trainer.resumed_from.endswith(STEP2) and trainer.step == 2
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "notice" in ln]
    assert len(notes) == 1 and "written by 2 ranks on 1 process" in notes[0], notes
    marker = tmp_path / "PWNED"
    pristine = str(run / "checkpoints" / STEP2)
    outcome = {}
    for rel in [*files(pristine), *OLD_DCP]:
        for name, reader in (("one", checkpoint.resume), ("ranks", distributed.resume)):
            ckpt = tmp_path / "try" / STEP2
            shutil.rmtree(ckpt.parent, ignore_errors=True)
            shutil.copytree(pristine, ckpt)
            plant(str(ckpt / rel), str(marker))
            try:
                reader(trainer, [str(ckpt)])
                outcome[rel, name] = "loaded"
            except ConfigError as exc:  # the only candidate is unusable: refused in one line
                assert "no usable checkpoint" in str(exc) and "\n" not in str(exc)
                outcome[rel, name] = "refused"
            assert not marker.exists(), (rel, name)
    capsys.readouterr()
    read = {"actor/config.json", "actor/model.safetensors", "critic/config.json", "critic/model.safetensors",
            "fingerprint.json", "trainer_state.json", "trainer_state.safetensors"}
    assert outcome == {(rel, name): "refused" if rel in read else "loaded"
                       for rel in [*files(pristine), *OLD_DCP] for name in ("one", "ranks")}


def test_the_ranks_reader_puts_both_lora_adapters_back_whole(tmp_path):
    """The reader the ranks use, on LoRA actor and critic (whose value head peft saves under
    another name): every trained tensor comes back, none skipped by the non-strict LoRA load."""
    from safetensors.torch import load_file

    from fastppo.train import PPOTrainer, builtin, distributed

    lora = dict(RUN, iterations=1, lora_r=4, critic_lora_r=4)
    PPOTrainer(builtin.default_config(output_dir=str(tmp_path / "a"), **lora)).train()
    ckpt = tmp_path / "a" / "checkpoints" / STEP1
    shutil.copytree(tmp_path / "a" / "builtin", tmp_path / "b" / "builtin")
    fresh = PPOTrainer(builtin.default_config(output_dir=str(tmp_path / "b"), **lora))
    assert distributed.resume(fresh, [str(ckpt)]) == str(ckpt) and fresh.step == 1
    for model, saved in ((fresh.actor, load_file(ckpt / "actor" / "adapter_model.safetensors")),
                         (fresh.critic.model, load_file(ckpt / "critic" / "adapter_model.safetensors"))):
        own = {k: p for k, p in model.named_parameters() if p.requires_grad}
        assert len(own) == len(saved)
        for k, p in own.items():
            short = k.replace(".modules_to_save.default.", ".").replace(".default.", ".")
            assert torch.equal(p.detach(), saved[short]), k
    assert any(k.endswith("score.weight") for k in saved)  # the critic's value head is among them
