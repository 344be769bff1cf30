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
    import torch

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
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = True
        return out.to(prompt_ids.device), mask.to(prompt_ids.device)

    return generate


def _worker_update(out: str, micro: int) -> None:
    """One iteration (two optimizer steps) on a fixed global batch; rank 0 saves metrics and weights."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fastppo.train import PPOTrainer, builtin, distributed

    cfg = builtin.default_config(output_dir=os.path.join(out, "run"), iterations=1, batch_size=8,
                                 mini_batch_size=4, micro_batch_size=micro, ppo_epochs=1, max_new_tokens=6,
                                 progress=False, plot=False)
    trainer = PPOTrainer(cfg)
    trainer.generate = _fixed_generate(trainer)
    row = trainer.iteration()
    params = get_model_state_dict(distributed._modules(trainer),
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.dist.is_main:
        torch.save({"row": row, "params": {k: v.detach().clone() for k, v in params.items()}},
                   os.path.join(out, "result.pt"))
    trainer.dist.shutdown()


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
    if mode == "update":
        _worker_update(target, int(sys.argv[3]))
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
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["FASTPPO_DIST_TIMEOUT"] = "60"
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


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


def test_two_ranks_first_update_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # One process: the whole mini-batch in one micro-batch, so its token-mean is over the mini-batch's
    # tokens exactly (the 2-rank run normalises by the global count, whatever its micro-batches).
    _ok(_plain(HERE, "update", str(one), "4"))
    _ok(_torchrun(HERE, "update", str(two), "1"))
    a = torch.load(one / "result.pt", weights_only=True)
    b = torch.load(two / "result.pt", weights_only=True)
    for key in ("score_mean", "score_std", "kl", "reward_mean", "entropy", "advantage_mean", "response_length",
                "policy_loss", "value_loss", "clipfrac", "approx_kl", "grad_norm", "explained_variance",
                "value_mean"):
        assert b["row"][key] == pytest.approx(a["row"][key], rel=1e-4, abs=1e-6), key
    assert a["row"]["grad_norm"] > 0 and a["row"]["response_length"] > 2
    assert a["params"].keys() == b["params"].keys()
    assert any(k.startswith("critic.") for k in a["params"])
    moved = 0
    start = _initial_params(one)
    for k, v in a["params"].items():
        torch.testing.assert_close(b["params"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        moved += int(not torch.equal(v, start[k]))
    assert moved > len(a["params"]) // 2  # the update really changed the weights


def _initial_params(run_dir):
    from transformers import AutoModelForCausalLM

    from fastppo.train import builtin

    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "run" / "builtin" / "model-seed0"))
    own = {f"actor.{k}": v for k, v in model.state_dict().items()}
    found = {}
    for k in torch.load(run_dir / "result.pt", weights_only=True)["params"]:
        found[k] = own.get(k, torch.full((1,), float("nan")))  # critic weights: never equal to NaN
    assert builtin  # the built-in model is what both runs started from
    return found


def test_two_ranks_resume_and_one_process_resumes_their_checkpoint(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["-m", "fastppo", "train", "--batch-size", "8", "--mini-batch-size", "4", "--micro-batch-size", "2",
              "--max-new-tokens", "4", "--ppo-epochs", "1", "--no-progress", "--no-plot"]
    _ok(_torchrun(*common, "--iterations", "3", "--output-dir", str(full)))
    _ok(_torchrun(*common, "--iterations", "2", "--output-dir", str(cut)))
    assert os.path.isdir(cut / "checkpoints" / "step-00000002" / "dcp")
    proc = _torchrun(*common, "--iterations", "3", "--output-dir", str(cut), "--resume")
    _ok(proc)
    assert "resumed from" in proc.stdout
    a, b = _rows(full / "metrics.jsonl"), _rows(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("score_mean", "kl", "policy_loss", "value_loss", "grad_norm", "entropy"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-4, abs=1e-6), key
    # The 2-rank checkpoint is also a one-process checkpoint (full weights, optimizer in its layout).
    proc = _plain("-m", "fastppo", "train", *common[3:], "--iterations", "4", "--output-dir", str(cut),
                  "--resume")
    _ok(proc)
    rows = _rows(cut / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path):
    start = time.monotonic()
    proc = _torchrun(HERE, "fail", str(tmp_path / "run"), timeout=180)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert "reward service unreachable on rank 1" in proc.stderr + proc.stdout
    assert took < 170
