"""Several processes through torch.distributed (gloo, 2 ranks on the CPU, launched by torchrun).

* the 2-rank run's first iteration equals the 1-process iteration on the same global batch: the
  metrics (losses, gradient norm, whitened advantages, scores, KL) and every actor and critic
  parameter after two optimizer steps;
* ``--resume`` with 2 ranks continues the run exactly as the uninterrupted one, and a
  single process resumes the checkpoint the 2 ranks wrote;
* a rank that raises stops every rank with its error and a non-zero exit, well within a timeout.

Run as a script (``python -m torch.distributed.run ... tests/test_train_distributed.py MODE OUT``)
this file is the worker the tests launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


# --------------------------------------------------------------------------------------------
# worker side


def _fixed_generate(trainer):
    """Responses fixed by each prompt's tokens: rank-independent, so one process and two ranks
    train on the same global batch (sampling streams differ between them by design)."""
    from helpers import pad_responses

    tok = trainer.tokenizer
    vocab = len(tok)

    def generate(prompt_ids, prompt_mask):
        rows = []
        for ids, m in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            real = [i for i, k in zip(ids, m) if k]  # the padding width differs between one and two ranks
            h = sum(i * (j + 3) for j, i in enumerate(real))
            length = 2 + h % 5  # 2..6 tokens: uneven lengths, uneven token counts per rank
            toks = [4 + (h * (t + 1) + t) % (vocab - 4) for t in range(length)]
            if h % 3 == 0:
                toks[-1] = tok.eos_token_id
            rows.append(toks)
        return pad_responses(rows, tok.pad_token_id, prompt_ids.device)

    return generate


def _update(out: str, micro: int, **options) -> None:
    """One iteration (two optimizer steps) on a fixed global batch; rank 0 saves metrics and weights."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fastppo.train import PPOTrainer, builtin, distributed

    cfg = builtin.default_config(output_dir=out, iterations=1, batch_size=8, mini_batch_size=4,
                                 micro_batch_size=micro, ppo_epochs=1, max_new_tokens=6, progress=False, plot=False,
                                 **options)
    trainer = PPOTrainer(cfg)
    trainer.generate = _fixed_generate(trainer)
    row = trainer.iteration()
    params = get_model_state_dict(distributed._modules(trainer),
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.dist.is_main:
        torch.save({"row": row, "params": {k: v.detach().clone() for k, v in params.items()}},
                   os.path.join(out, "result.pt"))


# Critic-free, whitened over the batch by REINFORCE++, and a per-sequence aggregation.
OTHER = dict(advantage_estimator="reinforce++", loss_agg="seq-mean-token-mean", kl_loss_coef=0.1, kl_estimator="k3")
RUN = dict(batch_size=8, mini_batch_size=4, micro_batch_size=2, max_new_tokens=4, ppo_epochs=1, progress=False,
           plot=False)


def _worker_ranks(out: str) -> None:
    """Under torchrun: the fixed-batch update, then a 3-iteration run with a checkpoint per
    iteration, whose last checkpoint is then removed and the run resumed from step 2 by new trainers."""
    import shutil

    import torch.distributed as dist

    from fastppo.train import PPOTrainer, builtin

    _update(os.path.join(out, "update-2"), micro=1)
    _update(os.path.join(out, "reinforce-2"), micro=1, **OTHER)
    run = os.path.join(out, "run")
    full = PPOTrainer(builtin.default_config(output_dir=run, iterations=3, save_every=1, **RUN)).train()["history"]
    if dist.get_rank() == 0:
        shutil.rmtree(os.path.join(run, "checkpoints", "step-00000003"))
    dist.barrier()
    trainer = PPOTrainer(builtin.default_config(output_dir=run, iterations=3, resume=True, **RUN))
    resumed_from = trainer.resumed_from
    resumed = trainer.train()["history"]
    if dist.get_rank() == 0:
        # The finished policy in output_dir itself: the whole weights of the last step, loadable.
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        final = load_file(os.path.join(run, "model.safetensors"))
        ckpt = load_file(os.path.join(run, "checkpoints", "step-00000003", "actor", "model.safetensors"))
        loaded = AutoModelForCausalLM.from_pretrained(run)
        final_ok = (final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)
                    and os.path.isfile(os.path.join(run, "critic", "config.json"))
                    and all(torch.equal(p.detach(), final[n]) for n, p in loaded.named_parameters() if n in final))
        with open(os.path.join(out, "runs.json"), "w", encoding="utf-8") as f:
            json.dump({"full": full, "resumed": resumed, "resumed_from": resumed_from, "final_ok": final_ok}, f)
    dist.destroy_process_group()


def _worker_one(out: str) -> None:
    """One plain process: the fixed-batch update with the whole mini-batch in one micro-batch (so its
    token-mean is exactly over the mini-batch's tokens, as the ranks' global normalisation is), then
    ``fastppo train --resume`` of the checkpoint the 2 ranks wrote, through the CLI."""
    from fastppo.cli import main

    _update(os.path.join(out, "update-1"), micro=4)
    _update(os.path.join(out, "reinforce-1"), micro=4, **OTHER)
    argv = ["train", "--batch-size", "8", "--mini-batch-size", "4", "--micro-batch-size", "2", "--max-new-tokens",
            "4", "--ppo-epochs", "1", "--no-progress", "--no-plot", "--iterations", "4", "--output-dir",
            os.path.join(out, "run"), "--resume"]
    code = main(argv)
    with open(os.path.join(out, "one.json"), "w", encoding="utf-8") as f:
        json.dump({"exit": code}, f)


def _worker_fail(out: str) -> None:
    """Rank 1's reward function raises in the second iteration, while rank 0 goes on."""
    from fastppo.train import PPOTrainer, builtin

    rank = int(os.environ.get("RANK", "0"))
    calls = []

    def reward(prompts, completions):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise ValueError("reward service unreachable on rank 1 (planted by the test)")
        return [float(len(c.split())) for c in completions]

    cfg = builtin.default_config(output_dir=out, iterations=4, batch_size=8, mini_batch_size=8, micro_batch_size=4,
                                 max_new_tokens=4, ppo_epochs=1, progress=False, plot=False, reward=None)
    PPOTrainer(cfg, reward_fn=reward).train()


if __name__ == "__main__":
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "ranks":
        _worker_ranks(target)
    elif mode == "one":
        _worker_one(target)
    elif mode == "fail":
        _worker_fail(target)
    sys.exit(0)


# --------------------------------------------------------------------------------------------
# test side

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _env() -> dict[str, str]:
    from helpers import torchrun_env

    return torchrun_env(ROOT)


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def _plain(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=ROOT)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One torchrun launch (2 ranks), then one plain process: each process start costs tens of seconds here."""
    out = tmp_path_factory.mktemp("ranks")
    _ok(_torchrun(HERE, "ranks", str(out)))
    proc = _plain(HERE, "one", str(out))
    _ok(proc)
    return out, proc


def test_two_ranks_first_update_equals_one_process(ranks):
    out, _ = ranks
    a = torch.load(out / "update-1" / "result.pt", weights_only=True)
    b = torch.load(out / "update-2" / "result.pt", weights_only=True)
    for key in ("score_mean", "score_std", "kl", "reward_mean", "entropy", "advantage_mean", "response_length",
                "policy_loss", "value_loss", "clipfrac", "approx_kl", "grad_norm", "explained_variance",
                "value_mean"):
        assert b["row"][key] == pytest.approx(a["row"][key], rel=1e-4, abs=1e-6), key
    assert a["row"]["grad_norm"] > 0 and a["row"]["response_length"] > 2
    assert a["params"].keys() == b["params"].keys()
    assert any(k.startswith("critic.") for k in a["params"])
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(str(out / "update-1" / "builtin" / "model-seed0")).state_dict()
    moved = 0
    for k, v in a["params"].items():
        # Adam's first step is lr * g / (|g| + eps): an element whose gradient is near eps moves by a
        # fraction of lr that the two reduction orders round differently (seen: 3e-6 of a 1e-3
        # step), so the absolute slack is 1 % of the tensor's largest step.
        # (the critic starts from the same model: critic.model.<name> is <name> of the start)
        name = k[len("actor."):] if k.startswith("actor.") else k[len("critic.model."):]
        before = start.get(name)
        before = before if before is not None and before.shape == v.shape else None
        step = 0.0 if before is None else float((v - before).abs().max())
        torch.testing.assert_close(b["params"][k], v, rtol=1e-4, atol=1e-6 + 1e-2 * step,
                                   msg=lambda m, k=k: f"{k}: {m}")
        if k.startswith("actor."):
            moved += int(not torch.equal(v, before))
    assert moved > 10  # the update really changed the actor's weights


def test_two_ranks_equal_one_process_for_reinforce_pp_and_seq_mean(ranks):
    out, _ = ranks
    a = torch.load(out / "reinforce-1" / "result.pt", weights_only=True)
    b = torch.load(out / "reinforce-2" / "result.pt", weights_only=True)
    for key in ("score_mean", "kl", "policy_loss", "kl_loss", "clipfrac", "approx_kl", "grad_norm", "entropy"):
        assert b["row"][key] == pytest.approx(a["row"][key], rel=1e-4, abs=1e-6), key
    assert not any(k.startswith("critic.") for k in a["params"])
    for k, v in a["params"].items():
        torch.testing.assert_close(b["params"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_two_ranks_resume_continues_the_run(ranks):
    out, _ = ranks
    runs = json.loads((out / "runs.json").read_text())
    assert runs["resumed_from"].endswith("step-00000002")
    assert runs["final_ok"]  # rank 0 wrote the gathered final policy (and critic) into output_dir
    full, resumed = runs["full"], runs["resumed"]
    assert [r["step"] for r in full] == [1, 2, 3]
    assert [r["step"] for r in resumed] == [1, 2, 3]  # metrics.jsonl: steps 1, 2 kept, 3 written again
    # The one-process layout (safetensors, trainer_state.json/.safetensors): no torch.distributed.checkpoint pickles.
    assert sorted(os.listdir(out / "run" / "checkpoints" / "step-00000003")) == [
        "actor", "config.yaml", "critic", "fingerprint.json", "trainer_state.json",
        "trainer_state.safetensors"]
    for key in ("score_mean", "kl", "policy_loss", "value_loss", "grad_norm", "entropy", "advantage_mean"):
        assert resumed[2][key] == pytest.approx(full[2][key], rel=1e-4, abs=1e-6), key


def test_one_process_resumes_what_two_ranks_wrote(ranks):
    """The 2-rank checkpoint is also a one-process one: full weights, the optimizer in its layout."""
    out, proc = ranks
    assert json.loads((out / "one.json").read_text()) == {"exit": 0}
    assert "resumed from" in proc.stdout and "step-00000003" in proc.stdout
    assert "notice: resuming a checkpoint written by 2 ranks on 1 process (step-00000003)" in proc.stderr
    assert [r["step"] for r in _rows(out / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path):
    start = time.monotonic()
    proc = _torchrun(HERE, "fail", str(tmp_path / "run"), timeout=180)
    took = time.monotonic() - start
    assert proc.returncode != 0
    out = proc.stderr + proc.stdout
    assert "ValueError: reward service unreachable on rank 1" in out  # rank 1's own error
    # rank 0 learns of it at the same step and stops with a message naming rank 1, not a lost connection
    assert "rank 0 stopped: rank 1 failed: ValueError: reward service unreachable on rank 1" in out
    assert took < 170
