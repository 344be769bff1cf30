"""Bad inputs for the ``fastppo`` command: each one ends in one line on stderr and exit code 2.

The cases run in-process through ``fastppo.cli.main`` (fast), a few as a real subprocess, and
all of them as subprocesses with ``FASTPPO_SLOW=1``. Run as a script, the file drives every case
as a user would (one subprocess each) and prints the figures: cases tried, clean errors,
tracebacks, runs wrongly accepted, hangs::

    .venv/bin/python tests/test_train_cli.py [-j 2] [--only SUBSTR]

Each case is ``(id, argv, expected)``: ``argv`` may hold ``{placeholders}`` filled in by
``make_files``; ``expected`` is a substring the one-line error must contain. A case passes when
the command exits 2 with exactly one line on stderr, no traceback, and that substring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

# A run that is (wrongly) accepted must stay short.
QUICK = ["--iterations", "1", "--batch-size", "4", "--mini-batch-size", "4", "--micro-batch-size", "4",
         "--max-new-tokens", "2", "--no-progress", "--no-plot", "--output-dir", "{out}"]
MODEL = ["--model", "{model}", "--dataset", "{prompts}", "--reward", "sentiment"]


def T(*args: str) -> list[str]:
    """A ``fastppo train`` command line: the quick settings, then ``args`` (later flags win)."""
    return ["train", *QUICK, *args]


CASES: list[tuple[str, list[str], str]] = [
    # --- numbers out of range, NaN, inf ---------------------------------------------------------
    ("iterations-0", T("--iterations", "0"), "iterations"),
    ("iterations-neg", T("--iterations", "-1"), "iterations"),
    ("iterations-inf-flag", T("--iterations", "inf"), "--iterations"),
    ("iterations-float-flag", T("--iterations", "1.5"), "--iterations"),
    ("iterations-inf-yaml", ["train", "--config", "{yaml_inf}", *QUICK[2:]], "iterations"),
    ("batch-size-0", T("--batch-size", "0"), "batch_size"),
    ("batch-size-neg", T("--batch-size", "-4"), "batch_size"),
    ("mini-batch-0", T("--mini-batch-size", "0"), "mini_batch_size"),
    ("micro-batch-0", T("--micro-batch-size", "0"), "micro_batch_size"),
    ("batch-not-multiple", T("--batch-size", "10", "--mini-batch-size", "4", "--micro-batch-size", "2"),
     "multiple"),
    ("micro-larger-than-mini", T("--micro-batch-size", "8"), "micro_batch_size"),
    ("max-new-tokens-0", T("--max-new-tokens", "0"), "max_new_tokens"),
    ("max-prompt-length-0", T("--max-prompt-length", "0"), "max_prompt_length"),
    ("ppo-epochs-0", T("--ppo-epochs", "0"), "ppo_epochs"),
    ("lr-0", T("--learning-rate", "0"), "learning_rate"),
    ("lr-neg", T("--learning-rate", "-1e-5"), "learning_rate"),
    ("lr-nan", T("--learning-rate", "nan"), "learning_rate"),
    ("lr-inf", T("--learning-rate", "inf"), "learning_rate"),
    ("critic-lr-neg", T("--critic-learning-rate", "-1"), "critic_learning_rate"),
    ("critic-lr-0", T("--critic-learning-rate", "0"), "critic_learning_rate"),
    ("weight-decay-neg", T("--weight-decay", "-0.1"), "weight_decay"),
    ("weight-decay-nan", T("--weight-decay", "nan"), "weight_decay"),
    ("warmup-neg", T("--warmup-steps", "-1"), "warmup_steps"),
    ("lr-schedule-unknown", T("--lr-schedule", "cosine"), "lr_schedule"),
    ("grad-norm-0", T("--max-grad-norm", "0"), "max_grad_norm"),
    ("grad-norm-neg", T("--max-grad-norm", "-1"), "max_grad_norm"),
    ("grad-norm-nan", T("--max-grad-norm", "nan"), "max_grad_norm"),
    ("gamma-above-1", T("--gamma", "1.5"), "gamma"),
    ("gamma-neg", T("--gamma", "-0.1"), "gamma"),
    ("lam-2", T("--lam", "2"), "lam"),
    ("lam-nan", T("--lam", "nan"), "lam"),
    ("clip-low-neg", T("--clip-low", "-0.2"), "clip_low"),
    ("clip-low-nan", T("--clip-low", "nan"), "clip_low"),
    ("clip-low-1.5", T("--clip-low", "1.5"), "clip_low"),
    ("clip-high-neg", T("--clip-high", "-0.1"), "clip_high"),
    ("dual-clip-below-1", T("--dual-clip", "0.5"), "dual_clip"),
    ("value-clip-neg", T("--value-clip", "-1"), "value_clip"),
    ("vf-coef-neg", T("--vf-coef", "-1"), "vf_coef"),
    ("vf-coef-nan", T("--vf-coef", "nan"), "vf_coef"),
    ("ent-coef-nan", T("--ent-coef", "nan"), "ent_coef"),
    ("loss-agg-unknown", T("--loss-agg", "mean"), "loss_agg"),
    ("kl-estimator-unknown", T("--kl-estimator", "k4"), "kl_estimator"),
    ("kl-coef-neg", T("--kl-coef", "-0.1"), "kl_coef"),
    ("kl-coef-nan", T("--kl-coef", "nan"), "kl_coef"),
    ("kl-target-0", T("--kl-target", "0"), "kl_target"),
    ("kl-target-neg", T("--kl-target", "-1"), "kl_target"),
    ("kl-target-nan", T("--kl-target", "nan"), "kl_target"),
    ("kl-horizon-0", T("--kl-horizon", "0"), "kl_horizon"),
    ("kl-horizon-neg", T("--kl-horizon", "-5"), "kl_horizon"),
    ("score-clip-neg", T("--score-clip", "-1"), "score_clip"),
    ("score-clip-0", T("--score-clip", "0"), "score_clip"),
    ("score-clip-nan", T("--score-clip", "nan"), "score_clip"),
    ("temperature-0", T("--temperature", "0"), "temperature"),
    ("temperature-neg", T("--temperature", "-1"), "temperature"),
    ("temperature-nan", T("--temperature", "nan"), "temperature"),
    ("top-p-0", T("--top-p", "0"), "top_p"),
    ("top-p-1.5", T("--top-p", "1.5"), "top_p"),
    ("top-p-nan", T("--top-p", "nan"), "top_p"),
    ("seed-neg", T("--seed", "-1"), "seed"),
    ("seed-huge", T("--seed", "99999999999999999999999"), "seed"),
    ("save-every-neg", T("--save-every", "-1"), "save_every"),
    ("num-threads-neg", T("--num-threads", "-1"), "num_threads"),
    ("batch-size-text", T("--batch-size", "abc"), "--batch-size"),
    ("unknown-flag", T("--bogus-flag", "1"), "--bogus-flag"),
    # --- devices, attention, LoRA -----------------------------------------------------------
    ("device-tpu", T("--device", "tpu"), "device"),
    ("device-cuda-absent", T("--device", "cuda:7"), "device"),
    ("device-empty", T("--device", ""), "device"),
    ("attn-unknown", T("--attn-implementation", "flash"), "attn_implementation"),
    ("attn-flash2-on-cpu", T("--attn-implementation", "flash_attention_2", "--device", "cpu"), "flash"),
    ("lora-r-neg", T("--lora-r", "-1"), "lora_r"),
    ("lora-targets-missing", T("--lora-r", "4", "--lora-target-modules", "nonexistent_proj"), "nonexistent_proj"),
    ("lora-targets-empty", T("--lora-r", "4", "--lora-target-modules", " , "), "lora_target_modules"),
    ("lora-alpha-0", T("--lora-r", "4", "--lora-alpha", "0"), "lora_alpha"),
    ("lora-dropout-1.5", T("--lora-r", "4", "--lora-dropout", "1.5"), "lora_dropout"),
    ("lora-dropout-nan", T("--lora-r", "4", "--lora-dropout", "nan"), "lora_dropout"),
    # --- output directory -------------------------------------------------------------------
    ("output-dir-is-file", T("--output-dir", "{file}"), "output_dir"),
    ("output-dir-under-file", T("--output-dir", "{file}/sub"), "output_dir"),
    ("output-dir-empty", T("--output-dir", ""), "output_dir"),
    *([("output-dir-in-proc", T("--output-dir", "/proc/fastppo-out"), "cannot create files in '/proc'")]
      if os.path.isdir("/proc/self") else []),  # Linux: no file can be created there, whatever the bits say
    # --- models -----------------------------------------------------------------------------
    ("model-missing", T(*MODEL, "--model", "{tmp}/no-such-model"), "does not exist"),
    ("model-no-config", T(*MODEL, "--model", "{empty_dir}"), "config.json"),
    ("model-config-not-json", T(*MODEL, "--model", "{model_badjson}"), "config.json"),
    ("model-config-empty-object", T(*MODEL, "--model", "{model_emptyjson}"), "config.json"),
    ("model-config-unknown-type", T(*MODEL, "--model", "{model_unknowntype}"), "config.json"),
    ("model-config-list", T(*MODEL, "--model", "{model_listjson}"), "config.json"),
    ("model-no-weights", T(*MODEL, "--model", "{model_noweights}"), "weights"),
    ("model-needs-reward", ["train", *QUICK, "--model", "{model}", "--dataset", "{prompts}"], "needs a reward"),
    ("reward-unknown", T("--reward", "nope"), "reward"),
    ("reward-model-missing", ["train", *QUICK, "--model", "{model}", "--dataset", "{prompts}",
                              "--reward-model", "{tmp}/no-rm"], "reward_model"),
    ("reward-model-2-labels", ["train", *QUICK, "--model", "{model}", "--dataset", "{prompts}",
                               "--reward-model", "{rm2}"], "num_labels"),
    ("critic-config-not-json", T(*MODEL, "--critic-model", "{model_badjson}"), "config.json"),
    ("context-too-long", T("--max-prompt-length", "250", "--max-new-tokens", "16"), "context"),
    ("max-new-tokens-huge", T("--max-new-tokens", "1000"), "context"),
    # --- datasets ---------------------------------------------------------------------------
    ("dataset-missing", T(*MODEL, "--dataset", "{tmp}/none.jsonl"), "does not exist"),
    ("dataset-empty-jsonl", T(*MODEL, "--dataset", "{empty_jsonl}"), "dataset"),
    ("dataset-empty-csv", T(*MODEL, "--dataset", "{empty_csv}"), "dataset"),
    ("dataset-header-only-csv", T(*MODEL, "--dataset", "{header_csv}"), "dataset"),
    ("dataset-malformed-jsonl", T(*MODEL, "--dataset", "{bad_jsonl}"), "dataset"),
    ("dataset-not-utf8", T(*MODEL, "--dataset", "{latin1_jsonl}"), "dataset"),
    ("dataset-bad-parquet", T(*MODEL, "--dataset", "{bad_parquet}"), "dataset"),
    ("dataset-txt", T(*MODEL, "--dataset", "{txt}"), "dataset"),
    ("dataset-no-column", T(*MODEL, "--dataset", "{other_column_jsonl}"), "column"),
    ("dataset-null-prompts", T(*MODEL, "--dataset", "{null_jsonl}"), "prompt"),
    ("dataset-number-prompts", T(*MODEL, "--dataset", "{number_jsonl}"), "prompt"),
    ("dataset-is-dir", T(*MODEL, "--dataset", "{dir_jsonl}"), "dataset"),
    ("prompt-column-empty", T(*MODEL, "--prompt-column", ""), "prompt_column"),
    ("chat-template-unknown", T(*MODEL, "--chat-template", "chatml"), "chat_template"),
    # --- generation -------------------------------------------------------------------------
    ("critic-lora-r-neg", T("--critic-lora-r", "-1"), "critic_lora_r"),
    ("critic-lora-alpha-nan", T("--critic-lora-r", "4", "--critic-lora-alpha", "nan"), "--critic-lora-alpha"),
    ("critic-lora-without-critic", T("--critic-lora-r", "4", "--advantage-estimator", "grpo", "--num-generations", "2"),
     "uses no critic"),
    ("stop-token-neg", T("--stop-token-id", "-1"), "stop_token_id"),
    ("stop-token-outside-vocab", T("--stop-token-id", "40"), "stop_token_id"),
    ("stop-token-text", T("--stop-token-id", "eos"), "--stop-token-id"),
    ("missing-eos-penalty-neg", T("--missing-eos-penalty", "-1"), "missing_eos_penalty"),
    ("missing-eos-penalty-nan", T("--missing-eos-penalty", "nan"), "missing_eos_penalty"),
    # --- config files -----------------------------------------------------------------------
    ("yaml-malformed", ["train", "--config", "{yaml_malformed}", *QUICK], "{yaml_malformed}"),
    ("yaml-not-utf8", ["train", "--config", "{yaml_latin1}", *QUICK], "UTF-8"),
    ("toml-malformed", ["train", "--config", "{toml_malformed}", *QUICK], "{toml_malformed}"),
    ("toml-not-utf8", ["train", "--config", "{toml_latin1}", *QUICK], "UTF-8"),
    ("yaml-list", ["train", "--config", "{yaml_list}", *QUICK], "mapping"),
    ("yaml-text-int", ["train", "--config", "{yaml_text_int}", *QUICK[2:]], "iterations"),
    ("yaml-list-value", ["train", "--config", "{yaml_list_value}", *QUICK], "learning_rate"),
    ("yaml-extra-not-map", ["train", "--config", "{yaml_extra}", *QUICK], "extra"),
    ("yaml-bool-int", ["train", "--config", "{yaml_bool_int}", *QUICK[2:]], "iterations"),
    ("yaml-text-bool", ["train", "--config", "{yaml_text_bool}", *QUICK], "whiten_advantages"),
    ("yaml-unknown-key", ["train", "--config", "{yaml_unknown}", *QUICK], "batch_sise"),
    ("yaml-int-key", ["train", "--config", "{yaml_int_key}", *QUICK], "{yaml_int_key}"),
    ("yaml-null-int", ["train", "--config", "{yaml_null_int}", *QUICK[2:]], "iterations"),
    ("config-missing", ["train", "--config", "{tmp}/none.yaml", *QUICK], "does not exist"),
    ("config-json-malformed", ["train", "--config", "{json_cfg}", *QUICK], "not valid JSON"),
    ("config-is-dir", ["train", "--config", "{dir_yaml}", *QUICK], "{dir_yaml}"),
    ("json-5000-deep", ["train", "--config", "{json_deep}", *QUICK], "nests lists/mappings too deeply"),
    ("json-extra-40-deep", ["train", "--config", "{json_extra_deep}", *QUICK], "more than 32 levels"),
    ("yaml-duplicate-key", ["train", "--config", "{yaml_dup}", *QUICK], "gives 'ppo_epochs' twice (lines 1 and 3)"),
    ("json-duplicate-key", ["train", "--config", "{json_dup}", *QUICK], "gives 'ppo_epochs' twice"),
    ("yaml-duplicate-dash-key", ["train", "--config", "{yaml_dash_dup}", *QUICK], "gives 'ppo_epochs' twice"),
    ("yaml-duplicate-extra-key", ["train", "--config", "{yaml_dup_extra}", *QUICK], "gives 'words' twice"),
    ("yaml-duplicate-flow-key", ["train", "--config", "{yaml_dup_flow}", *QUICK], "gives 'a' twice (line 1)"),
    ("yaml-alias-bomb", ["train", "--config", "{yaml_bomb}", *QUICK], "more than 10000 values"),
    ("config-over-1-mib", ["train", "--config", "{yaml_big}", *QUICK], "at most 1048576"),
    ("trl-use-peft-lora-r-0", ["train", "--config", "{yaml_peft0}", *QUICK], "lora_r is 0"),
    # --- options a critic-free estimator does not use, given explicitly ------------------------
    ("grpo-kl-coef", T("--advantage-estimator", "grpo", "--num-generations", "2", "--kl-coef", "0.1"), "kl_coef"),
    ("grpo-lam", T("--advantage-estimator", "grpo", "--num-generations", "2", "--lam", "0.9"), "lam (--lam)"),
    ("rloo-gamma", T("--advantage-estimator", "rloo", "--num-generations", "2", "--gamma", "0.9"), "gamma"),
    ("rloo-vf-coef", T("--advantage-estimator", "rloo", "--num-generations", "2", "--vf-coef", "0.1"), "vf_coef"),
    ("reinforce-value-clip", T("--advantage-estimator", "reinforce++", "--value-clip", "0.3"), "value_clip"),
    ("reinforce-lam-other-value", T("--advantage-estimator", "reinforce++", "--lam", "0.9"), "lam (--lam)"),
    ("grpo-vf-coef-in-file", ["train", "--config", "{yaml_grpo_vf}", *QUICK], "vf_coef (--vf-coef) is given"),
    # --- resume -----------------------------------------------------------------------------
    ("resume-pickle-payload", ["train", *QUICK, "--output-dir", "{pickled_run}", "--resume", "--iterations", "3"],
     "trainer_state.json"),
    ("resume-other-config", ["train", *QUICK, "--output-dir", "{good_run}", "--resume", "--iterations", "3",
                             "--learning-rate", "0.5"], "learning_rate"),
    ("new-run-into-a-run", ["train", *QUICK, "--output-dir", "{good_run}"], "--overwrite"),
    ("resume-and-overwrite", T("--resume", "--overwrite"), "overwrite"),
    # --- bench and verify -------------------------------------------------------------------
    ("bench-reps-0", ["bench", "--quick", "--ops", "gae", "--reps", "0"], "--reps"),
    ("bench-reps-neg", ["bench", "--quick", "--ops", "gae", "--reps", "-1"], "--reps"),
    ("bench-reps-text", ["bench", "--quick", "--ops", "gae", "--reps", "abc"], "--reps"),
    ("bench-ops-unknown", ["bench", "--quick", "--ops", "nope", "--reps", "1"], "nope"),
    ("bench-ops-empty", ["bench", "--quick", "--ops", "", "--reps", "1"], "--ops"),
    ("bench-json-dir", ["bench", "--quick", "--ops", "gae", "--reps", "1", "--json", "{tmp}"], "--json"),
    ("bench-json-under-file", ["bench", "--quick", "--ops", "gae", "--reps", "1", "--json", "{file}/x.json"],
     "--json"),
    *([("bench-json-in-proc", ["bench", "--quick", "--ops", "gae", "--reps", "1", "--json", "/proc/x.json"],
        "cannot create files in '/proc'")] if os.path.isdir("/proc/self") else []),
    ("verify-seed-neg", ["verify", "--ops", "gae", "--seed", "-1"], "--seed"),
    ("verify-seed-huge", ["verify", "--ops", "gae", "--seed", str(2**70)], "--seed"),
    ("verify-ops-comma", ["verify", "--ops", ","], "--ops"),
    ("verify-ops-empty", ["verify", "--ops", ""], "--ops"),
    ("verify-json-dir", ["verify", "--ops", "gae", "--seed", "1", "--json", "{tmp}"], "--json"),
    ("verify-json-missing-dir", ["verify", "--ops", "gae", "--seed", "1", "--json", "{tmp}/no/such/x.json"],
     "--json"),
    ("no-command-flag", ["--bogus"], "--bogus"),
    ("unknown-command", ["nope"], "nope"),
]


def make_files(tmp: str) -> dict[str, str]:
    """Write the files the cases name; returns the placeholder mapping."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from fastppo.train import builtin

    os.makedirs(tmp, exist_ok=True)
    p = {"tmp": tmp}
    model, prompts = builtin.materialize(os.path.join(tmp, "builtin"), seed=0)
    p.update(model=model, prompts=prompts)

    def write(name: str, data: str | bytes) -> str:
        path = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return path

    p["file"] = write("a-file", "not a directory\n")
    p["empty_dir"] = os.path.join(tmp, "empty-dir")
    os.makedirs(p["empty_dir"], exist_ok=True)

    def model_with_config(name: str, text: str) -> str:
        d = os.path.join(tmp, name)
        os.makedirs(d, exist_ok=True)
        write(os.path.join(name, "config.json"), text)
        return d

    p["model_badjson"] = model_with_config("m-badjson", '{"model_type": "llama", ')
    p["model_emptyjson"] = model_with_config("m-emptyjson", "{}")
    p["model_unknowntype"] = model_with_config("m-unknowntype", '{"model_type": "no-such-architecture"}')
    p["model_listjson"] = model_with_config("m-listjson", "[1, 2]")
    with open(os.path.join(model, "config.json")) as f:
        p["model_noweights"] = model_with_config("m-noweights", f.read())
    for name in os.listdir(model):
        if name.startswith("tokenizer") or name.endswith("special_tokens_map.json"):
            with open(os.path.join(model, name), "rb") as src:
                write(os.path.join("m-noweights", name), src.read())

    rm2 = os.path.join(tmp, "rm2")
    if not os.path.isdir(rm2):
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(builtin.build_model_config(num_labels=2)).save_pretrained(rm2)
        builtin.build_tokenizer().save_pretrained(rm2)
    p["rm2"] = rm2

    p["empty_jsonl"] = write("empty.jsonl", "")
    p["empty_csv"] = write("empty.csv", "")
    p["header_csv"] = write("header.csv", "prompt\n")
    p["bad_jsonl"] = write("bad.jsonl", '{"prompt": "the movie was"}\n{"prompt": "it was\n')
    p["latin1_jsonl"] = write("latin1.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    p["bad_parquet"] = write("bad.parquet", "PAR1 this is not parquet")
    p["txt"] = write("prompts.txt", "the movie was\n")
    p["other_column_jsonl"] = write("other.jsonl", '{"title": "x", "text": "the movie was"}\n')
    p["null_jsonl"] = write("null.jsonl", '{"prompt": "the movie was"}\n{"prompt": null}\n')
    p["number_jsonl"] = write("number.jsonl", '{"prompt": 1}\n{"prompt": 2}\n')
    p["dir_jsonl"] = os.path.join(tmp, "dir.jsonl")
    os.makedirs(p["dir_jsonl"], exist_ok=True)

    p["yaml_inf"] = write("inf.yaml", "iterations: .inf\n")
    p["yaml_malformed"] = write("malformed.yaml", "batch_size: [8\nlr: 1\n")
    p["yaml_latin1"] = write("latin1.yaml", "output_dir: caf\xe9\n".encode("latin-1"))
    p["toml_malformed"] = write("malformed.toml", "batch_size = = 8\n")
    p["toml_latin1"] = write("latin1.toml", 'output_dir = "caf\xe9"\n'.encode("latin-1"))
    p["yaml_list"] = write("list.yaml", "- 1\n- 2\n")
    p["yaml_text_int"] = write("text-int.yaml", "iterations: ten\n")
    p["yaml_list_value"] = write("list-value.yaml", "learning_rate: [1, 2]\n")
    p["yaml_extra"] = write("extra.yaml", "extra: 5\n")
    p["yaml_bool_int"] = write("bool-int.yaml", "iterations: true\n")
    p["yaml_text_bool"] = write("text-bool.yaml", "whiten_advantages: maybe\n")
    p["yaml_unknown"] = write("unknown.yaml", "batch_sise: 8\n")
    p["yaml_int_key"] = write("int-key.yaml", "1: 2\n")
    p["yaml_null_int"] = write("null-int.yaml", "iterations: null\n")
    p["json_cfg"] = write("cfg.json", "{\"batch_size\": 8,")
    p["json_deep"] = write("deep.json", "[" * 5000 + "]" * 5000)
    p["json_extra_deep"] = write("extra-deep.json", '{"extra": ' + '{"a": ' * 40 + "1" + "}" * 41)
    p["yaml_dup"] = write("dup.yaml", "ppo_epochs: 1\nseed: 3\nppo_epochs: 4\n")
    p["json_dup"] = write("dup.json", '{"ppo_epochs": 1, "ppo_epochs": 4}')
    p["yaml_dash_dup"] = write("dash-dup.yaml", "ppo-epochs: 1\nppo_epochs: 4\n")
    p["yaml_dup_flow"] = write("dup-flow.yaml", "extra: {a: 1, a: 2}\n")
    p["yaml_dup_extra"] = write("dup-extra.yaml", "extra:\n  words: [good]\n  words: [bad]\n")
    # 600 bytes that expand to 9**6 values through aliases (a "billion laughs")
    bomb = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcde", "bcdef"):
        bomb.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    p["yaml_bomb"] = write("bomb.yaml", "extra:\n" + "".join(f"  {line}\n" for line in bomb))
    p["yaml_big"] = write("big.yaml", "# padding\n" * 120_000 + "seed: 1\n")
    p["yaml_peft0"] = write("peft0.yaml", "use_peft: true\nlora_r: 0\n")
    p["yaml_grpo_vf"] = write("grpo-vf.yaml", "advantage_estimator: grpo\nnum_generations: 2\nvf_coef: 0.1\n")
    p["dir_yaml"] = os.path.join(tmp, "dir.yaml")
    os.makedirs(p["dir_yaml"], exist_ok=True)
    p["out"] = os.path.join(tmp, "out")
    p["good_run"] = os.path.join(tmp, "good-run")
    p["pickled_run"] = os.path.join(tmp, "pickled-run")
    p["marker"] = os.path.join(tmp, "PWNED")
    return p


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: the planted code of the security test."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payload(state_path: str, marker: str) -> None:
    import torch

    torch.save({"step": 1, "payload": Payload(marker)}, state_path)


def make_runs(p: dict[str, str], python: str) -> None:
    """A finished 1-iteration run (with a checkpoint) and a copy whose trainer state is a payload."""
    import shutil

    if not os.path.isdir(os.path.join(p["good_run"], "checkpoints")):
        argv = [a.format(**p) for a in T("--output-dir", p["good_run"])]
        subprocess.run([python, "-m", "fastppo", *argv], check=True, capture_output=True)
    shutil.rmtree(p["pickled_run"], ignore_errors=True)
    shutil.copytree(p["good_run"], p["pickled_run"])
    plant_payload(os.path.join(p["pickled_run"], "checkpoints", "step-00000001", "trainer_state.json"), p["marker"])


def run_case(case, p: dict[str, str], python: str, timeout: float = 300) -> dict:
    cid, argv, expected = case
    argv = [a.format(**p) for a in argv]
    expected = expected.format(**p)
    t0 = time.time()
    try:
        r = subprocess.run([python, "-m", "fastppo", *argv], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, "(timed out)"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return {"id": cid, "rc": rc, "lines": len(lines), "traceback": "Traceback (most recent call last)" in err,
            "clean": rc == 2 and len(lines) == 1 and "Traceback" not in err and expected in err,
            "stderr": err.strip()[-400:], "seconds": round(time.time() - t0, 1)}


def main() -> int:
    import argparse
    from concurrent.futures import ThreadPoolExecutor

    ap = argparse.ArgumentParser()
    ap.add_argument("-j", type=int, default=2)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--tmp", default="/tmp/fastppo-cli-cases")
    ap.add_argument("--only", default="")
    ap.add_argument("--json")
    a = ap.parse_args()
    p = make_files(a.tmp)
    make_runs(p, a.python)
    cases = [c for c in CASES if a.only in c[0]]
    with ThreadPoolExecutor(a.j) as ex:
        results = list(ex.map(lambda c: run_case(c, p, a.python), cases))
    for r in results:
        status = "clean" if r["clean"] else ("TRACEBACK" if r["traceback"] else
                                              "ACCEPTED" if r["rc"] == 0 else "HANG" if r["rc"] is None else "unclear")
        first = r["stderr"].splitlines()[-1] if r["stderr"] else ""
        print(f"{r['id']:<28} rc={r['rc']!s:<4} lines={r['lines']:<3} {status:<9} {r['seconds']:>5}s  {first[:150]}")
    n = len(results)
    clean = sum(r["clean"] for r in results)
    tb = sum(r["traceback"] for r in results)
    acc = sum(r["rc"] == 0 for r in results)
    hang = sum(r["rc"] is None for r in results)
    print(f"\n{n} bad inputs: {clean} clean one-line errors (exit 2), {tb} tracebacks, {acc} accepted (exit 0), "
          f"{hang} hangs, {os.path.exists(p['marker'])=}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if clean == n else 1


# --------------------------------------------------------------------------------------------
# the tests

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("transformers")
    p = make_files(str(tmp_path_factory.mktemp("cli-cases")))
    return p


@pytest.fixture(scope="module")
def runs(files):
    """The finished run and the one with a planted payload, written in-process (quicker than a subprocess)."""
    import shutil

    import fastppo
    from fastppo.cli import main as cli_main

    with fastppo.use_backend("torch"):
        argv = [a.format(**files) for a in T("--output-dir", files["good_run"])]
        assert cli_main(argv) == 0
    shutil.copytree(files["good_run"], files["pickled_run"])
    plant_payload(os.path.join(files["pickled_run"], "checkpoints", "step-00000001", "trainer_state.json"),
                  files["marker"])
    return files


@pytest.fixture(autouse=True)
def _threads():
    import torch

    n = torch.get_num_threads()  # the built-in task's config sets 1 thread, process-wide
    yield
    torch.set_num_threads(n)


def _in_process(argv: list[str], capture) -> tuple[int, str]:
    from fastppo.cli import main as cli_main

    capture.readouterr()
    try:
        rc = cli_main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capture.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(case, runs, capfd):
    cid, argv, expected = case
    p = runs
    rc, err = _in_process([a.format(**p) for a in argv], capfd)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (cid, rc, err)
    assert len(lines) == 1, (cid, err)
    assert "Traceback" not in err
    assert expected.format(**p) in lines[0], (cid, lines[0])
    assert not os.path.exists(p["marker"]), "the planted pickle payload ran"


def test_cli_as_a_user_runs_it(runs):
    """Exit code and stderr of the real command, including the .inf that used to hang."""
    from concurrent.futures import ThreadPoolExecutor

    picked = [c for c in CASES if c[0] in ("iterations-inf-yaml", "score-clip-neg", "bench-reps-0")]
    with ThreadPoolExecutor(len(picked)) as ex:
        results = list(ex.map(lambda c: run_case(c, runs, sys.executable, timeout=120), picked))
    for r in results:
        assert r["clean"], r


@pytest.mark.slow
def test_every_bad_input_as_a_subprocess(runs):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda c: run_case(c, runs, sys.executable), CASES))
    assert [r for r in results if not r["clean"]] == []


def test_a_fresh_run_over_another_run_is_refused_unless_overwrite(runs, tmp_path, capsys):
    import shutil

    import fastppo

    out = str(tmp_path / "again")
    shutil.copytree(runs["good_run"], out)
    argv = [a.format(**runs) for a in T("--output-dir", out)]
    rc, err = _in_process(argv, capsys)
    assert rc == 2 and "holds another run (checkpoints, critic, metrics.jsonl, model.safetensors)" in err and "--overwrite" in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-00000001"]  # untouched
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 99, "score_mean": 5.0}\n')  # a line no new run may keep
    with fastppo.use_backend("torch"):
        rc, err = _in_process([*argv, "--overwrite"], capsys)
    assert rc == 0, err
    assert "removed the previous run's" in err
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1]


def test_debug_shows_the_traceback(capsys):
    from fastppo.cli import main as cli_main

    with pytest.raises(Exception, match="kl_horizon"):
        cli_main(["train", "--kl-horizon", "0", "--debug"])


def test_help_shows_the_defaults_a_plain_run_uses(capsys):
    from fastppo.cli import main as cli_main
    from fastppo.train import builtin

    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    plain = builtin.default_config()
    assert f"default: {plain.iterations} for the built-in task (no --model), 60 with --model" in text
    assert f"default: {plain.learning_rate} for the built-in task" in text
    assert "default: sentiment for the built-in task (no --model), none with --model" in text
    assert "(default: 0.95)" in text  # lam: the same either way


def _resolve(argv):
    from fastppo.cli import build_parser
    from fastppo.train.cli import resolve_config

    return resolve_config(build_parser().parse_args(argv))


def test_critic_free_estimators_refuse_only_what_the_user_gave(tmp_path):
    # The built-in task's own kl_coef (0.05) and the defaults of lam, vf_coef, value_clip were not
    # given by anyone: no refusal. reinforce++ shapes its rewards with kl_coef and discounts by gamma.
    cfg = _resolve(["train", "--advantage-estimator", "grpo", "--num-generations", "2"])
    cfg.check()
    assert (cfg.kl_coef, cfg.lam, cfg.vf_coef, cfg.value_clip) == (0.05, 0.95, 0.5, 0.2)
    cfg = _resolve(["train", "--advantage-estimator", "reinforce++", "--kl-coef", "0.2", "--gamma", "0.9",
                    "--value-clip", "none"])
    assert (cfg.kl_coef, cfg.gamma, cfg.value_clip) == (0.2, 0.9, None)
    from fastppo.train import PPOConfig
    from fastppo.train.config import ConfigError

    f = tmp_path / "c.yaml"
    f.write_text("advantage_estimator: grpo\nnum_generations: 2\n")
    assert PPOConfig.from_file(f).lam == 0.95
    with pytest.raises(ConfigError, match=r"lam \(--lam\) is given, but advantage_estimator .* grpo does not use it"):
        PPOConfig.from_file(f, lam=0.9)


def test_a_critic_free_runs_own_config_yaml_is_a_valid_config(tmp_path, capsys):
    # A checkpoint's config.yaml lists every option, lam and vf_coef included, at the values the
    # run took without anyone giving them: reused as --config (built-in task or a model's defaults)
    # it must load, with one line naming them as without effect; a value that differs is refused.
    import yaml

    from fastppo.train import PPOConfig, builtin
    from fastppo.train.config import ConfigError

    for cfg, load in ((builtin.default_config(advantage_estimator="grpo", num_generations=2),
                       lambda f: _resolve(["train", "--config", str(f)])),
                      (PPOConfig(advantage_estimator="rloo", num_generations=2), PPOConfig.from_file)):
        f = tmp_path / "config.yaml"
        f.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        capsys.readouterr()
        again = load(f)
        notes = capsys.readouterr().err.splitlines()
        assert len(notes) == 1 and notes[0].startswith("fastppo train: config: ") and "lam: 0.95" in notes[0]
        assert notes[0].endswith(f"(the defaults) have no effect with advantage_estimator {cfg.advantage_estimator}")
        assert (again.advantage_estimator, again.lam, again.kl_coef) == (cfg.advantage_estimator, 0.95, 0.05)
        f.write_text(yaml.safe_dump(dict(cfg.to_dict(), kl_coef=0.2), sort_keys=False))
        with pytest.raises(ConfigError, match=r"^kl_coef \(--kl-coef\) is given, but .* its KL term is --kl-loss-coef\); remove it"):
            load(f)


def test_a_model_run_says_its_threads_and_lora_warns_nothing(runs, capfd):
    # With --model, torch's default thread count applies (the built-in task sets 1): the first line
    # says how many. peft's wrapping under transformers 5 must not open the run with a FutureWarning.
    import warnings

    import torch

    import fastppo

    argv = [a.format(**runs) for a in T(*MODEL, "--lora-r", "2", "--critic-lora-r", "2",
                                        "--output-dir", "{tmp}/lora-run")]
    from fastppo.cli import main as cli_main

    torch.set_num_threads(2)  # as torch's default on a 2-core machine (the autouse fixture restores it)
    capfd.readouterr()
    with fastppo.use_backend("torch"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli_main(argv)
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "device: cpu (2 threads, --num-threads sets it);" in out, out
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    assert "FutureWarning" not in err


def test_yaml_merge_keys_may_still_override(tmp_path):
    # `<<: *base` then a key of its own is YAML's way to override, not a key given twice.
    from fastppo.train import PPOConfig

    f = tmp_path / "c.yaml"
    f.write_text("extra:\n  base: &b {words: [good], weight: 1}\n  tuned: {<<: *b, weight: 2}\n")
    assert PPOConfig.from_file(f).extra["tuned"] == {"words": ["good"], "weight": 2}


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    from fastppo.train import PPOConfig

    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 1e-5\nkl_coef: '0.1'\n")  # YAML 1.1 reads both as text
    cfg = PPOConfig.from_file(f)
    assert cfg.learning_rate == 1e-5 and cfg.kl_coef == 0.1
    cfg.check()


if __name__ == "__main__":
    sys.exit(main())
