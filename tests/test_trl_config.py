"""--config files written with TRL PPOConfig key names (fastppo.train.trl_compat)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from fastppo.train import trl_compat
from fastppo.train.config import ConfigError, PPOConfig
from fastppo.train.trl_compat import BY_NAME, KEYS, translate

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
FIELDS = {f.name for f in dataclasses.fields(PPOConfig)}
needs_api = pytest.mark.skipif(not {"missing_eos_penalty", "stop_token_id"} <= FIELDS,
                               reason="needs api branch (PPOConfig.missing_eos_penalty / stop_token_id)")


def _parse(argv):
    from fastppo.cli import build_parser
    from fastppo.train.cli import resolve_config

    return resolve_config(build_parser().parse_args(argv))


# --------------------------------------------------------------------------------------------
# the table

# The keys issue 13 names, and the other keys of TRL's PPO recipe files.
NAMED = ["per_device_train_batch_size", "gradient_accumulation_steps", "local_rollout_forward_batch_size",
         "num_ppo_epochs", "num_mini_batches", "cliprange", "cliprange_value", "vf_coef", "kl_coef",
         "response_length", "total_episodes", "learning_rate", "missing_eos_penalty", "stop_token", "stop_token_id",
         "gamma", "lam", "whiten_rewards", "bf16", "report_to", "output_dir", "seed", "temperature", "kl_estimator",
         "num_sample_generations", "sft_model_path", "reward_model_path"]


def test_every_named_trl_key_is_in_the_table_once():
    names = [k.name for k in KEYS]
    assert len(names) == len(set(names))
    assert set(NAMED) <= set(names)
    for key in KEYS:
        assert key.kind in (trl_compat.SAME, trl_compat.RENAMED, trl_compat.DERIVED, trl_compat.IGNORED,
                            trl_compat.FIXED), key
        assert key.note and "\n" not in key.note and "|" not in key.note, key
        if key.kind == trl_compat.SAME:
            assert key.fastppo == key.name
        if key.kind in (trl_compat.SAME, trl_compat.RENAMED, trl_compat.DERIVED):
            for option in key.fastppo.split(", "):
                # stop_token_id / missing_eos_penalty land with the api branch
                assert option in FIELDS or option in ("stop_token_id", "missing_eos_penalty"), (key.name, option)
        if key.kind == trl_compat.FIXED:
            assert key.accept and key.trl_default in key.accept, key  # TRL's own default is always accepted


def test_readme_holds_the_generated_table():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert trl_compat.markdown_table() in text, "regenerate README's table: python -c 'from fastppo.train.trl_compat " \
                                                "import markdown_table; print(markdown_table())'"


# Defaults TRL's PPOConfig sets over TrainingArguments' (trl/experimental/ppo/ppo_config.py).
_PPO_OVERRIDES = {"bf16": None, "logging_steps": 10, "gradient_checkpointing": True}


def test_training_arguments_and_model_config_defaults_are_trls():
    from transformers import TrainingArguments

    trl = pytest.importorskip("trl")
    ta = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    mc = {f.name: f.default for f in dataclasses.fields(trl.ModelConfig)}
    for key in KEYS:
        if key.source == "TrainingArguments":
            assert key.name in ta, key.name
            assert key.trl_default == _PPO_OVERRIDES.get(key.name, ta[key.name]), key.name
        elif key.source == "ModelConfig":
            assert key.name in mc, key.name
            assert key.trl_default == mc[key.name], key.name


def test_ppo_config_defaults_are_trls():
    # trl.experimental.ppo.PPOConfig as of the last TRL that shipped it; TRL 1.16 has none to import.
    expected = {"num_mini_batches": 1, "total_episodes": None, "local_rollout_forward_batch_size": 64,
                "num_sample_generations": 10, "response_length": 53, "stop_token": None, "stop_token_id": None,
                "temperature": 0.7, "missing_eos_penalty": None, "sft_model_path": "EleutherAI/pythia-160m",
                "reward_model_path": "EleutherAI/pythia-160m", "num_ppo_epochs": 4, "whiten_rewards": False,
                "kl_coef": 0.05, "kl_estimator": "k1", "cliprange": 0.2, "vf_coef": 0.1, "cliprange_value": 0.2,
                "gamma": 1.0, "lam": 0.95, "ds3_gather_for_generation": True, "gradient_checkpointing": True,
                "dataset_num_proc": None, "model_adapter_name": None, "ref_adapter_name": None}
    for name, default in expected.items():
        assert BY_NAME[name].source == "PPOConfig" and BY_NAME[name].trl_default == default, name


# --------------------------------------------------------------------------------------------
# translation

def test_batch_sizes_and_episodes_follow_trls_formulas():
    # TRL: local_batch = per_device x grad_accum x num_mini_batches, batch = local x world,
    # mini = batch / num_mini_batches, iterations = ceil(total_episodes / batch).
    data = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_mini_batches": 2,
            "total_episodes": 100}
    out, notes = translate(data, world_size=1)
    assert (out["micro_batch_size"], out["mini_batch_size"], out["batch_size"], out["iterations"]) == (4, 8, 16, 7)
    out, _ = translate(data, world_size=2)
    assert (out["micro_batch_size"], out["mini_batch_size"], out["batch_size"], out["iterations"]) == (4, 16, 32, 4)
    out, _ = translate({"total_episodes": "1e3"}, world_size=1)  # YAML 1.1 reads 1e3 as text
    assert (out["batch_size"], out["iterations"]) == (8, 125)  # TRL's default per-device batch of 8
    cfg = PPOConfig.from_dict(translate(data, world_size=1)[0])
    cfg.check()
    assert cfg.batch_size % cfg.mini_batch_size == 0 and cfg.mini_batch_size % cfg.micro_batch_size == 0


def test_world_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    out, notes = translate({"per_device_train_batch_size": 2})
    assert (out["micro_batch_size"], out["mini_batch_size"], out["batch_size"]) == (2, 8, 8)
    assert any("x 4 processes" in n for n in notes)


def test_renamed_keys_and_one_notice_each():
    data = {"num_ppo_epochs": 3, "cliprange": 0.1, "cliprange_value": 0.3, "response_length": 12,
            "sft_model_path": "m", "reward_model_path": "r", "dataset_name": "p.jsonl", "lr_scheduler_type": "linear",
            "save_steps": 5, "logging_steps": 7, "num_sample_generations": 0, "local_rollout_forward_batch_size": 16,
            "gamma": 0.99, "vf_coef": 0.1}
    out, notes = translate(data, world_size=1)
    assert out == {"ppo_epochs": 3, "clip_low": 0.1, "value_clip": 0.3, "max_new_tokens": 12, "model": "m",
                   "reward_model": "r", "dataset": "p.jsonl", "lr_schedule": "linear", "save_every": 5,
                   "gamma": 0.99, "vf_coef": 0.1}
    for name in data:
        mentions = [n for n in notes if f"TRL key {name}:" in n or f"TRL key {name} " in n]
        # same-name keys (gamma, vf_coef) pass silently; every other key gets exactly one line
        assert len(mentions) == (0 if BY_NAME[name].kind == trl_compat.SAME else 1), (name, notes)
    assert all(n.startswith("fastppo train: config: ") and "\n" not in n for n in notes)
    assert any("TRL key logging_steps ignored" in n for n in notes)
    # the defaults that differ and were left out (temperature: TRL 0.7) are named by the config, not here
    assert not any("keep fastppo's defaults" in n for n in notes)
    line = trl_compat.default_differences(PPOConfig.from_dict(out).to_dict(), set(out))
    assert "temperature 1.0 (TRL temperature 0.7)" in line and "vf_coef" not in line and "ppo_epochs" not in line


def test_run_keys():
    out, notes = translate({"use_cpu": True, "resume_from_checkpoint": True, "overwrite_output_dir": False,
                            "torch_compile": False}, world_size=1)
    assert out == {"device": "cpu", "resume": True, "overwrite": False}
    assert len(notes) == 4 and "TRL key torch_compile ignored" in notes[3]
    assert translate({"use_cpu": False, "resume_from_checkpoint": None}, world_size=1)[0] == {"device": "auto",
                                                                                            "resume": False}


def test_a_fastppo_file_passes_through_silently():
    data = {"batch_size": 16, "clip_low": 0.3, "lora_r": 4, "gamma": 1.0}
    assert translate(data, world_size=1) == (data, [])


def test_peft_and_list_values():
    out, notes = translate({"use_peft": True, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"],
                            "report_to": ["tensorboard"]}, world_size=1)
    assert out == {"lora_r": 16, "lora_alpha": 8, "lora_dropout": 0.05, "lora_target_modules": "q_proj,v_proj",
                   "report_to": "tensorboard"}
    out, _ = translate({"use_peft": False, "lora_r": 32}, world_size=1)
    assert out["lora_r"] == 0
    out, _ = translate({"lora_target_modules": "all-linear", "report_to": "none"}, world_size=1)
    assert out == {"lora_target_modules": "all-linear", "report_to": "none"}
    out, _ = translate({"report_to": None, "model_name_or_path": "base", "save_strategy": "no"}, world_size=1)
    assert out == {"report_to": "none", "model": "base", "save_every": 0}


@pytest.mark.parametrize("data, match", [
    ({"whiten_rewards": True}, r"whiten_rewards: True \(TRL\) has no fastppo equivalent"),
    ({"lr_scheduler_type": "cosine"}, r"lr_scheduler_type 'cosine' has no fastppo equivalent"),
    ({"report_to": ["tensorboard", "wandb"]}, r"choose one"),
    ({"report_to": "all"}, r"choose one"),
    ({"cliprange": 0.1, "clip_low": 0.3}, r"both clip_low: 0.3 and cliprange \(TRL\)"),
    ({"per_device_train_batch_size": 4, "batch_size": 64}, r"both batch_size: 64 and per_device_train_batch_size"),
    ({"total_episodes": 100, "iterations": 3, "batch_size": 10}, r"both iterations: 3 and total_episodes"),
    ({"per_device_train_batch_size": 0}, r"per_device_train_batch_size \(TRL\) must be a whole number >= 1, got 0"),
    ({"total_episodes": 2.5}, r"total_episodes \(TRL\) must be a whole number"),
    ({"stop_token": "</s>"}, r"stop_token: '</s>' \(TRL\) has no fastppo equivalent"),
    ({"adam_beta1": 0.8}, r"adam_beta1: 0.8"),
    ({"optim": "adafactor"}, r"optim: 'adafactor'"),
    ({"use_dora": True}, r"use_dora"),
    ({"warmup_steps": 0.1}, r"warmup_steps 0.1 is a ratio"),
    ({"save_steps": 0.5}, r"save_steps 0.5 is a fraction"),
    ({"use_peft": "yes"}, r"use_peft \(TRL\) must be true or false"),
    ({"resume_from_checkpoint": "out/checkpoint-500"}, r"fastppo resumes from the newest usable checkpoint"),
    ({"use_cpu": "yes"}, r"use_cpu \(TRL\) must be true or false"),
    ({"use_cpu": True, "device": "cuda"}, r"both device: 'cuda' and use_cpu"),
    ({"use_peft": True, "lora_r": 0}, r"use_peft: true \(TRL\) asks for a LoRA actor, but lora_r is 0"),
])
def test_values_fastppo_cannot_honour_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        translate(data, world_size=1)


def test_accepted_fixed_values_say_so():
    out, notes = translate({"whiten_rewards": False, "stop_token": "eos", "adam_epsilon": "1e-8",
                            "optim": "adamw_torch"}, world_size=1)
    assert out == {}
    assert len(notes) == 4 and all("is what fastppo does" in n for n in notes)


# Every option whose fastppo default differs from what TRL's PPOTrainer would use, as
# (option, fastppo default, TRL's value) -- written out by hand from TRL's dataclasses, not from KEYS.
DIFFERING = {"ppo_epochs": (2, 4), "vf_coef": (0.5, 0.1), "max_new_tokens": (16, 53), "temperature": (1.0, 0.7),
             "learning_rate": (1e-5, 5e-5), "lr_schedule": ("constant", "linear"),
             "gradient_checkpointing": (False, True), "seed": (0, 42), "save_every": (0, 500),
             "batch_size": (64, 8), "mini_batch_size": (32, 8), "micro_batch_size": (32, 8), "iterations": (60, None),
             "vllm_sleep": (True, False)}


def _named(line: str) -> set[str]:
    body = line.split("not TRL's: ", 1)[1]
    return {part.split(" ", 1)[0] for part in body.split("; ")}


def test_every_default_that_differs_from_trls_is_named(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    line = trl_compat.default_differences(PPOConfig().to_dict(), set())
    assert line.startswith("fastppo train: config: options left unset keep fastppo's defaults, not TRL's: ")
    assert _named(line) == set(DIFFERING)
    for option, (ours, theirs) in DIFFERING.items():
        assert f"{option} {ours!r}" in line or f"{option} {ours}" in line, option
        if theirs is not None:
            assert f"{theirs}" in line.split(f"{option} ", 1)[1].split(";")[0], option
    # with LoRA on, the LoRA options that differ from TRL's ModelConfig are named too
    lora = PPOConfig(lora_r=8).to_dict()
    assert _named(trl_compat.default_differences(lora, {"lora_r"})) - set(DIFFERING) == {
        "lora_alpha", "lora_dropout", "lora_target_modules"}
    # what the user set is never named
    assert trl_compat.default_differences(PPOConfig(seed=42, vf_coef=0.1).to_dict(), {"seed", "vf_coef"}).count(
        "seed") == 0


def test_python_takes_trls_names_with_the_same_notices(capsys):
    cfg = PPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, total_episodes=40, cliprange=0.1,
                    output_dir="o")
    assert (cfg.micro_batch_size, cfg.mini_batch_size, cfg.batch_size, cfg.iterations) == (4, 8, 8, 5)
    assert cfg.clip_low == 0.1
    err = capsys.readouterr().err.splitlines()
    assert "fastppo train: config: TRL key cliprange: 0.1 -> clip_low: 0.1" in err
    defaults = [ln for ln in err if "keep fastppo's defaults" in ln]
    assert len(defaults) == 1 and "batch_size" not in _named(defaults[0]) and "vf_coef" in _named(defaults[0])
    cfg = PPOConfig.from_dict({"cliprange": 0.3, "num_ppo_epochs": 3})
    assert (cfg.clip_low, cfg.ppo_epochs) == (0.3, 3)
    err = capsys.readouterr().err
    assert "TRL key num_ppo_epochs: 3 -> ppo_epochs: 3" in err and err.count("keep fastppo's defaults") == 1
    cfg.replace(seed=1)  # the same config, changed: not said again
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match=r"unknown config option 'bach_size' \(did you mean batch_size\?\)"):
        PPOConfig(bach_size=8)
    with pytest.raises(ConfigError, match="whiten_rewards"):
        PPOConfig(whiten_rewards=True)


def test_in_memory_models_say_the_defaults_once(capsys):
    from torch import nn

    from fastppo.train import api

    cfg = PPOConfig(output_dir="runs/ppo", learning_rate=5e-6, missing_eos_penalty=1.0)  # README's example
    assert capsys.readouterr().err == ""  # fastppo's own names: nothing to say yet
    api.note_defaults(cfg, None)  # a model from a directory, as fastppo's own command
    assert capsys.readouterr().err == ""
    api.note_defaults(cfg, nn.Linear(1, 1))  # the policy in memory, as TRL's PPOTrainer takes it
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and {"batch_size", "max_new_tokens", "iterations"} <= _named(line)
    assert "learning_rate" not in _named(line)  # set by the user
    api.note_defaults(cfg.replace(lora_r=4), nn.Linear(1, 1))
    assert capsys.readouterr().err == ""


@needs_api
def test_eos_options_map_to_the_api_fields():
    out, notes = translate({"missing_eos_penalty": 1.0, "stop_token_id": 7}, world_size=1)
    cfg = PPOConfig.from_dict(out)
    assert cfg.missing_eos_penalty == 1.0 and cfg.stop_token_id == 7
    assert notes == []  # same names, same meaning: nothing to say


# --------------------------------------------------------------------------------------------
# through files and the command line

TRL_FILE = {"output_dir": "OUT", "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
            "num_mini_batches": 2, "total_episodes": 16, "num_ppo_epochs": 1, "cliprange": 0.15, "kl_coef": 0.02,
            "learning_rate": "5e-6", "response_length": 4, "stop_token": "eos", "report_to": "none", "bf16": False,
            "seed": 5, "logging_steps": 1, "num_sample_generations": 0}


@pytest.mark.parametrize("ext", [".yaml", ".json"])
def test_cli_reads_trl_keys_and_flags_still_win(tmp_path, ext, capsys):
    import yaml

    data = dict(TRL_FILE, output_dir=str(tmp_path / "out"))
    path = tmp_path / f"trl{ext}"
    path.write_text(json.dumps(data) if ext == ".json" else yaml.safe_dump(data).replace("'5e-6'", "5e-6"))
    cfg = _parse(["train", "--config", str(path), "--kl-coef", "0.03"])
    assert (cfg.batch_size, cfg.mini_batch_size, cfg.micro_batch_size, cfg.iterations) == (8, 4, 4, 2)
    assert (cfg.ppo_epochs, cfg.clip_low, cfg.learning_rate, cfg.max_new_tokens, cfg.seed) == (1, 0.15, 5e-6, 4, 5)
    assert cfg.kl_coef == 0.03  # the flag wins over the file
    err = capsys.readouterr().err
    assert "TRL key cliprange: 0.15 -> clip_low: 0.15" in err and "TRL key logging_steps ignored" in err
    defaults = [ln for ln in err.splitlines() if "keep fastppo's defaults" in ln]
    assert len(defaults) == 1  # once, naming what neither the file nor a flag set
    assert {"vf_coef", "temperature"} <= _named(defaults[0])
    assert not _named(defaults[0]) & {"kl_coef", "batch_size", "iterations", "seed", "learning_rate"}
    assert PPOConfig.from_file(path).clip_low == 0.15  # the Python API maps the same names


def test_cli_refuses_in_one_line_with_exit_2(tmp_path, capsys):
    from fastppo.cli import main

    path = tmp_path / "trl.yaml"
    path.write_text("whiten_rewards: true\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "whiten_rewards" in err[0] and err[0].startswith("fastppo train: error:")
    # a TRL file's value-loss clip with a critic-free estimator: the mapping line, then the refusal
    path.write_text("advantage_estimator: rloo\nnum_generations: 2\ncliprange_value: 0.3\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "fastppo train: config: TRL key cliprange_value: 0.3 -> value_clip: 0.3"
    assert len(err) == 2 and err[1].startswith("fastppo train: error: value_clip (--value-clip) is given, but")
    path.write_text("{not json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["train", "--config", str(bad)]) == 2
    assert "is not valid JSON at line 1" in capsys.readouterr().err


def test_a_trl_style_file_trains_the_builtin_task(tmp_path, capsys):
    import yaml

    import fastppo
    from fastppo.cli import main

    data = dict(TRL_FILE, output_dir=str(tmp_path / "out"), total_episodes=8)
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(data))
    with fastppo.use_backend("torch"):
        rc = main(["train", "--config", str(path), "--no-progress", "--no-plot"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(rows) == 1 and all(map(lambda k: rows[0][k] == rows[0][k], ("policy_loss", "value_loss")))
    saved = yaml.safe_load(open(tmp_path / "out" / "checkpoints" / "step-00000001" / "config.yaml"))
    assert (saved["batch_size"], saved["clip_low"], saved["max_new_tokens"]) == (8, 0.15, 4)
