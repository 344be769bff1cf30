"""examples/trl_recipe/run.py --quick: TRL's PPO recipe end to end, offline, on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SCRIPT = os.path.join(ROOT, "examples", "trl_recipe", "run.py")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    work = tmp_path_factory.mktemp("trl_recipe")
    # FASTPPO_BACKEND=torch: the trainer's wiring is under test here, not the kernels (which the
    # interpreter would make slow); the ops have their own tests.
    env = dict(os.environ, FASTPPO_BACKEND="torch", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--workdir", str(work)], cwd=str(work), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


def test_each_step_leaves_what_the_next_one_loads(recipe):
    work, proc = recipe
    # 1: the SFT stand-in, with its chat template
    tok = json.load(open(work / "base" / "tokenizer_config.json"))
    assert "chat_template" in tok or (work / "base" / "chat_template.jinja").is_file()
    # 2: TRL's RewardTrainer wrote a one-label sequence classifier with the actor's tokenizer, and it learned
    cfg = json.load(open(work / "reward" / "config.json"))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and len(cfg.get("id2label", {0: 0})) == 1
    assert (work / "reward" / "tokenizer.json").is_file()
    samples = json.load(open(work / "samples.json"))
    assert samples["reward_accuracy"] >= 0.75  # 80 easy pairs (polite vs curt): chance would be 0.5
    # 3: two PPO iterations from total_episodes 16 / batch 8, each logged with finite losses
    rows = [json.loads(line) for line in open(work / "ppo" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("policy_loss", "value_loss", "score_mean", "kl"):
            assert r[key] == r[key] and abs(r[key]) < 1e6, (key, r[key])
    # 4: the policy that was loaded with AutoPeftModelForCausalLM is a LoRA r=32 alpha=8 adapter on every
    # linear layer, whose base is the SFT model, and it produced text
    assert os.path.samefile(samples["policy"], work / "ppo")  # loaded from OUTPUT_DIR itself, as TRL's recipe does
    adapter = json.load(open(os.path.join(samples["policy"], "adapter_config.json")))
    assert (adapter["r"], adapter["lora_alpha"]) == (32, 8)
    # all-linear, as peft records it: every linear layer of both decoder layers by full name, no lm_head
    names = {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(set(adapter["target_modules"])) in (7, 14)
    assert os.path.samefile(adapter["base_model_name_or_path"], work / "base")
    assert len(samples["samples"]) == 3 and any(s["answer"].strip() for s in samples["samples"])


def test_the_config_was_written_in_trl_names_and_mapped(recipe):
    work, proc = recipe
    text = open(work / "ppo_config.yaml").read()
    for key in ("sft_model_path", "reward_model_path", "per_device_train_batch_size", "num_mini_batches",
                "total_episodes", "num_ppo_epochs", "response_length", "cliprange", "use_peft"):
        assert f"\n{key}:" in text, key
    err = proc.stderr
    assert "TRL key cliprange: 0.2 -> clip_low: 0.2" in err
    assert "TRL key total_episodes: 16 -> iterations: 2" in err
    assert "mini_batch_size: 4 (per optimizer step), batch_size: 8" in err
    saved = open(work / "ppo" / "checkpoints" / "step-00000002" / "config.yaml").read()
    for line in ("missing_eos_penalty: 1.0", "lora_r: 32", "lora_alpha: 8", "lora_target_modules: all-linear", "prompt_column: question",
                 "critic_lora_r: 8", "gradient_checkpointing: true", "ppo_epochs: 2"):
        assert line in saved, line
    # the critic trained a LoRA adapter on the reward model, not a second full model
    ckpt = work / "ppo" / "checkpoints" / "step-00000002"
    for critic in (ckpt / "critic", work / "ppo" / "critic"):
        assert (critic / "adapter_model.safetensors").is_file()
        assert not (critic / "model.safetensors").exists()


def test_responses_have_room_to_finish(recipe):
    # Cut off before their EOS, the answers would be scored by the missing-EOS penalty, not by the
    # reward model: response_length must hold the longest answer PPO should learn to give, EOS included.
    import yaml
    from transformers import AutoTokenizer

    work, _ = recipe
    tok = AutoTokenizer.from_pretrained(work / "base")
    chosen = [json.loads(line)["chosen"][-1]["content"] for line in open(os.path.join(ROOT, "examples", "trl_recipe",
                                                                                      "data", "preferences.jsonl"))]
    longest = max(len(tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]) for text in chosen)
    config = yaml.safe_load(open(work / "ppo_config.yaml"))
    assert 20 <= longest <= config["response_length"], (longest, config["response_length"])
