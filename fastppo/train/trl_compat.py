"""TRL ``PPOConfig`` key names in a ``fastppo train --config`` file.

People arrive with the configuration of TRL's PPO recipe: one YAML file holding TRL's ``PPOConfig``
(``trl.experimental.ppo``; TRL 1.16 itself ships no PPO trainer any more), the
``transformers.TrainingArguments`` it extends, and TRL's ``ModelConfig`` / ``ScriptArguments``.
:func:`translate` turns such a mapping into fastppo option names, one notice line per TRL key it
mapped or ignored. ``KEYS`` is the whole table, as data: the README's table is generated from it
(:func:`markdown_table`) and a test holds the two together.

Kinds of key:

* ``same``: the same name and meaning in fastppo (``gamma``, ``kl_coef``...); passed through
  silently (a list-valued ``report_to`` or ``lora_target_modules`` is converted).
* ``renamed``: one fastppo option with another name (``cliprange`` -> ``clip_low``).
* ``derived``: fastppo options computed from several TRL keys (the batch sizes, ``total_episodes``).
* ``ignored``: no effect on what fastppo computes (logging, hub, DeepSpeed); a notice, then dropped.
* ``fixed``: fastppo has one behaviour; the values in ``accept`` are taken (with a notice when they
  say something), any other value is refused with a ``ConfigError``, because training would silently
  compute something else than the file asks for (``whiten_rewards: true``, a cosine schedule...).

Keys left out keep *fastppo's* defaults, not TRL's; :func:`default_differences` names in one line
every option whose default differs, so nobody is surprised by ``vf_coef`` 0.5 instead of TRL's 0.1
or a batch of 64 instead of 8 (``fastppo.train.config`` prints it once per config).

This module imports nothing of ``fastppo.train.config`` (which imports it to accept TRL's names).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError

SAME, RENAMED, DERIVED, IGNORED, FIXED = "same", "renamed", "derived", "ignored", "fixed"


@dataclass(frozen=True)
class Key:
    name: str
    """The TRL name."""
    source: str
    """Where TRL defines it: PPOConfig (``trl.experimental.ppo``), TrainingArguments, ModelConfig or
    ScriptArguments (TRL 1.16's and transformers 5's, or older ones' where a key was dropped since)."""
    trl_default: Any
    kind: str
    fastppo: str | None
    """The fastppo option(s) it sets; None when it sets none."""
    note: str
    """One line: how it is mapped, or why it is ignored or refused."""
    accept: tuple = ()
    """``fixed`` keys: the values that match what fastppo does."""
    convert: Callable[[Any], Any] | None = None
    """``same``/``renamed`` keys: value conversion (raises ConfigError for values with no equivalent)."""


# --------------------------------------------------------------------------------------------
# value conversions

def _report_to(value: Any) -> str:
    if isinstance(value, str) or value is None:
        names = [value]
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise ConfigError(f"report_to: expected a name or a list of names, got {value!r}")
    names = [n for n in names if n not in (None, "none")]
    if not names:
        return "none"
    if len(names) > 1 or names[0] == "all":
        raise ConfigError(f"report_to {value!r}: fastppo logs to one of tensorboard, wandb or none; choose one")
    return names[0]


def _target_modules(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"lora_target_modules: expected module names, got {value!r}")
        return ",".join(value)
    return value


def _scheduler(value: Any) -> str:
    table = {"linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
    if value not in table:
        raise ConfigError(f"lr_scheduler_type {value!r} has no fastppo equivalent; fastppo's lr_schedule is "
                          "linear or constant (with warmup_steps); use one of linear, constant, constant_with_warmup")
    return table[value]


def _save_steps(value: Any) -> Any:
    if isinstance(value, float) and 0 < value < 1:
        raise ConfigError(f"save_steps {value} is a fraction of the run; fastppo's save_every counts iterations "
                          "(a TRL PPO step is one iteration): give a whole number")
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _resume(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ConfigError(f"resume_from_checkpoint {value!r}: fastppo resumes from the newest usable checkpoint under "
                      "output_dir; set it to true (or resume: true) and output_dir to that run's directory")


def _use_cpu(value: Any) -> str:
    if not isinstance(value, bool):
        raise ConfigError(f"use_cpu (TRL) must be true or false, got {value!r}")
    return "cpu" if value else "auto"


def _warmup_steps(value: Any) -> Any:
    if isinstance(value, float) and 0 < value < 1:
        raise ConfigError(f"warmup_steps {value} is a ratio of the run; fastppo's warmup_steps counts optimizer "
                          "steps: give a whole number")
    return int(value) if isinstance(value, float) and value.is_integer() else value


# --------------------------------------------------------------------------------------------
# the table

_PPO, _TA, _MC, _SA = "PPOConfig", "TrainingArguments", "ModelConfig", "ScriptArguments"
_GRPO = "GRPOConfig"
_OLD_MC = "ModelConfig (before TRL 1.16)"
_OLD_TA = "TrainingArguments (before transformers 5)"
_BATCH = "batch_size, mini_batch_size, micro_batch_size"

KEYS: tuple[Key, ...] = (
    # --- batch sizes and length of the run
    Key("per_device_train_batch_size", _TA, 8, DERIVED, _BATCH,
        "micro_batch_size = it; mini_batch_size = it x gradient_accumulation_steps x world size; "
        "batch_size = mini_batch_size x num_mini_batches"),
    Key("gradient_accumulation_steps", _TA, 1, DERIVED, _BATCH, "see per_device_train_batch_size"),
    Key("num_mini_batches", _PPO, 1, DERIVED, _BATCH, "see per_device_train_batch_size"),
    Key("total_episodes", _PPO, None, DERIVED, "iterations",
        "iterations = ceil(total_episodes / batch_size) (episodes are responses)"),
    Key("num_train_epochs", _TA, 3.0, IGNORED, None,
        "TRL uses it only without total_episodes (epochs x dataset rows); set total_episodes or iterations"),
    Key("local_rollout_forward_batch_size", _PPO, 64, IGNORED, None,
        "the no-grad rollout forwards run in micro_batch_size chunks"),
    # --- PPO
    Key("num_ppo_epochs", _PPO, 4, RENAMED, "ppo_epochs", "passes over each rollout batch"),
    Key("cliprange", _PPO, 0.2, RENAMED, "clip_low", "the ratio is clipped to [1 - clip_low, 1 + clip_high]; "
        "clip_high defaults to clip_low, as TRL's one cliprange"),
    Key("cliprange_value", _PPO, 0.2, RENAMED, "value_clip", "clipped value loss, the same formula"),
    Key("vf_coef", _PPO, 0.1, SAME, "vf_coef", "value loss weight"),
    Key("kl_coef", _PPO, 0.05, SAME, "kl_coef",
        "KL reward penalty per token, fixed (fastppo's kl_target makes it adaptive)"),
    Key("kl_estimator", _PPO, "k1", SAME, "kl_estimator", "k1 or k3 (fastppo also has abs and k2)"),
    Key("gamma", _PPO, 1.0, SAME, "gamma", "GAE discount"),
    Key("lam", _PPO, 0.95, SAME, "lam", "GAE lambda"),
    Key("whiten_rewards", _PPO, False, FIXED, None,
        "fastppo does not whiten token rewards before GAE (advantages are whitened, as in TRL); true is refused",
        accept=(False,)),
    # --- generation
    Key("response_length", _PPO, 53, RENAMED, "max_new_tokens", "fastppo stops a response at EOS before that"),
    Key("temperature", _PPO, 0.7, SAME, "temperature", "sampling temperature, also used for the log-probs"),
    Key("stop_token", _PPO, None, FIXED, None,
        "fastppo always ends a response at the tokenizer's EOS token ('eos'); with none TRL runs on to "
        "response_length", accept=("eos", None)),
    Key("stop_token_id", _PPO, None, SAME, "stop_token_id", "an extra token id that ends a response"),
    Key("missing_eos_penalty", _PPO, None, SAME, "missing_eos_penalty",
        "subtracted from the score of a response that ends without EOS"),
    Key("num_sample_generations", _PPO, 10, IGNORED, None, "fastppo prints no debugging samples"),
    # --- the rollout engine: GRPOConfig's keys (TRL's PPOConfig samples with transformers' generate)
    Key("use_vllm", _GRPO, False, DERIVED, "rollout_engine",
        "true -> rollout_engine: vllm (vLLM in fastppo's own process); false -> hf"),
    Key("vllm_mode", _GRPO, "colocate", FIXED, None,
        "fastppo runs vLLM colocated in its process; a separate vLLM server is refused", accept=("colocate",)),
    Key("vllm_gpu_memory_utilization", _GRPO, 0.3, SAME, "vllm_gpu_memory_utilization",
        "fraction of GPU memory vLLM may take (CUDA)"),
    Key("vllm_enable_sleep_mode", _GRPO, False, RENAMED, "vllm_sleep",
        "vLLM sleeps during the updates (CUDA); fastppo's default is on"),
    # --- models and data
    Key("sft_model_path", _PPO, "EleutherAI/pythia-160m", RENAMED, "model", "the policy (a local directory)"),
    Key("reward_model_path", _PPO, "EleutherAI/pythia-160m", RENAMED, "reward_model",
        "the reward model; the critic starts from it, as in TRL"),
    Key("model_name_or_path", _MC, None, DERIVED, "model",
        "the model when sft_model_path is not given (TRL loads the tokenizer from it; fastppo from the model)"),
    Key("dataset_name", _SA, None, RENAMED, "dataset", "a local .jsonl/.json/.csv/.parquet file"),
    Key("dataset_train_split", _SA, "train", IGNORED, None, "a local file is one split"),
    Key("dataset_test_split", _SA, "test", IGNORED, None, "fastppo runs no evaluation"),
    Key("trust_remote_code", _OLD_MC, False, FIXED, None, "fastppo loads transformers' own architectures only",
        accept=(False,)),
    Key("dtype", _MC, "float32", IGNORED, None,
        "weights load as float32 and matmuls run in bf16 under bf16 autocast (bf16)"),
    Key("torch_dtype", _OLD_MC, None, IGNORED, None, "as dtype"),
    Key("model_revision", _MC, "main", IGNORED, None, "a local directory has no revisions"),
    Key("attn_implementation", _MC, None, SAME, "attn_implementation", "eager, sdpa, flash_attention_2 (or auto)"),
    # --- LoRA
    Key("use_peft", _MC, False, DERIVED, "lora_r",
        "false: lora_r = 0; true: LoRA with lora_r (TRL's default 16), lora_alpha (32), lora_dropout (0.05)"),
    Key("lora_r", _MC, 16, SAME, "lora_r", "LoRA rank"),
    Key("lora_alpha", _MC, 32, SAME, "lora_alpha", "LoRA alpha"),
    Key("lora_dropout", _MC, 0.05, SAME, "lora_dropout", "LoRA dropout"),
    Key("lora_target_modules", _MC, None, SAME, "lora_target_modules",
        "a list becomes a comma-separated string; TRL's none means peft's per-model default, fastppo's default "
        "is all-linear", convert=_target_modules),
    Key("lora_task_type", _MC, "CAUSAL_LM", FIXED, None, "the actor's adapter is a CAUSAL_LM one",
        accept=("CAUSAL_LM",)),
    Key("lora_modules_to_save", _MC, None, FIXED, None, "not supported", accept=(None,)),
    Key("lora_target_parameters", _MC, None, FIXED, None, "not supported", accept=(None,)),
    Key("use_rslora", _MC, False, FIXED, None, "not supported", accept=(False,)),
    Key("use_dora", _MC, False, FIXED, None, "not supported", accept=(False,)),
    Key("load_in_8bit", _MC, False, FIXED, None, "quantized base models are not supported", accept=(False,)),
    Key("load_in_4bit", _MC, False, FIXED, None, "quantized base models are not supported", accept=(False,)),
    # --- optimizer and schedule
    Key("learning_rate", _TA, 5e-05, SAME, "learning_rate", "AdamW learning rate (actor and critic)"),
    Key("lr_scheduler_type", _TA, "linear", RENAMED, "lr_schedule",
        "linear or constant (constant_with_warmup: constant); others are refused", convert=_scheduler),
    Key("warmup_steps", _TA, 0, SAME, "warmup_steps", "optimizer steps; a ratio (< 1) is refused",
        convert=_warmup_steps),
    Key("warmup_ratio", _OLD_TA, 0.0, FIXED, None, "give warmup_steps (optimizer steps) instead", accept=(0.0,)),
    Key("weight_decay", _TA, 0.0, SAME, "weight_decay", "AdamW weight decay"),
    Key("max_grad_norm", _TA, 1.0, SAME, "max_grad_norm", "clipped for actor and critic separately"),
    Key("optim", _TA, "adamw_torch_fused", FIXED, None, "fastppo uses torch.optim.AdamW",
        accept=("adamw_torch", "adamw_torch_fused", "adamw_hf")),
    Key("adam_beta1", _TA, 0.9, FIXED, None, "AdamW's default", accept=(0.9,)),
    Key("adam_beta2", _TA, 0.999, FIXED, None, "AdamW's default", accept=(0.999,)),
    Key("adam_epsilon", _TA, 1e-08, FIXED, None, "AdamW's default", accept=(1e-08,)),
    # --- precision and memory
    Key("bf16", _TA, None, SAME, "bf16", "bf16 autocast (CUDA); TRL's PPOConfig turns it on unless fp16"),
    Key("fp16", _TA, False, IGNORED, None, "fastppo has no float16 autocast; it runs float32 (or bf16 with bf16)"),
    Key("gradient_checkpointing", _PPO, True, SAME, "gradient_checkpointing",
        "actor and critic; TRL's PPOConfig turns it on by default, fastppo off"),
    Key("gradient_checkpointing_kwargs", _TA, None, IGNORED, None, "fastppo's checkpointing is non-reentrant"),
    Key("ds3_gather_for_generation", _PPO, True, IGNORED, None, "DeepSpeed ZeRO-3 only"),
    Key("use_cpu", _TA, False, RENAMED, "device", "true: cpu; false: auto (CUDA when there is one)",
        convert=_use_cpu),
    Key("torch_compile", _TA, False, IGNORED, None, "the models run eagerly; fastppo's ops are Triton kernels"),
    Key("dataloader_num_workers", _TA, 0, IGNORED, None, "prompts are tokenised once, in process"),
    # --- run, logging, saving
    Key("output_dir", _TA, None, SAME, "output_dir", "metrics, plots, checkpoints"),
    Key("seed", _TA, 42, SAME, "seed", "every random draw of the run"),
    Key("report_to", _TA, "none", SAME, "report_to",
        "tensorboard, wandb or none; a one-name list is taken, several or all are refused", convert=_report_to),
    Key("save_steps", _TA, 500, RENAMED, "save_every", "iterations between checkpoints (a TRL step is an iteration)",
        convert=_save_steps),
    Key("save_strategy", _TA, "steps", DERIVED, "save_every", "no: save_every = 0 (saved at the end only)"),
    Key("resume_from_checkpoint", _TA, None, RENAMED, "resume",
        "true: continue from the newest checkpoint in output_dir; a path is refused", convert=_resume),
    Key("overwrite_output_dir", _OLD_TA, False, RENAMED, "overwrite",
        "clear another run's outputs in output_dir instead of refusing"),
    Key("logging_steps", _TA, 10, IGNORED, None, "every iteration is logged to metrics.jsonl"),
    Key("logging_dir", _OLD_TA, None, IGNORED, None, "TensorBoard events go to output_dir/tensorboard"),
    Key("run_name", _TA, None, IGNORED, None, "wandb takes WANDB_NAME"),
    Key("exp_name", _PPO, "ppo_config", IGNORED, None, "not used"),
    Key("push_to_hub", _TA, False, IGNORED, None,
        "nothing is uploaded; the output directory loads with from_pretrained"),
    Key("hub_model_id", _TA, None, IGNORED, None, "nothing is uploaded"),
    Key("eval_strategy", _TA, "no", IGNORED, None, "fastppo runs no evaluation"),
    Key("eval_steps", _TA, None, IGNORED, None, "fastppo runs no evaluation"),
    Key("per_device_eval_batch_size", _TA, 8, IGNORED, None, "fastppo runs no evaluation"),
    Key("dataset_num_proc", _PPO, None, IGNORED, None, "prompts are tokenised in process"),
    Key("remove_unused_columns", _TA, True, IGNORED, None, "only the prompt column is read"),
    Key("model_adapter_name", _PPO, None, FIXED, None, "one adapter per model", accept=(None,)),
    Key("ref_adapter_name", _PPO, None, FIXED, None,
        "the reference is the actor with its adapter disabled (or a frozen copy)", accept=(None,)),
)

BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}
_BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches")
_NOT_A_DEFAULT = ("model", "reward_model", "dataset", "output_dir")  # paths: TRL's are examples
_LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}  # TRL's ModelConfig


def _shown(value: Any) -> str:
    return "none" if value is None else repr(value) if isinstance(value, str) else str(value)


def _matches(value: Any, accepted: Any) -> bool:
    if accepted is None or isinstance(accepted, bool):
        return value is accepted
    if isinstance(accepted, float):  # YAML 1.1 reads 1e-8 as text
        try:
            return not isinstance(value, bool) and float(value) == accepted
        except (TypeError, ValueError):
            return False
    return value == accepted


def _whole(name: str, value: Any, low: int) -> int:
    """A whole number >= ``low`` (YAML 1.1 reads ``1e4`` as text: accepted when it is whole)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} (TRL) must be a whole number >= {low}, got {value!r}")
    return value


def _set(out: dict[str, Any], given: dict[str, Any], option: str, value: Any, source: str) -> None:
    """Set ``option`` from TRL key(s) ``source``; a fastppo key of the file saying otherwise is an error."""
    if option in given and given[option] != value:
        raise ConfigError(f"the config sets both {option}: {_shown(given[option])} and {source} (TRL), which "
                          f"means {option}: {_shown(value)}; keep one of them")
    out[option] = value


def is_trl_style(data: dict[str, Any]) -> bool:
    """True when ``data`` holds a TRL key that is not also a fastppo option of the same meaning."""
    return any(k in BY_NAME and BY_NAME[k].kind != SAME for k in data)


def translate(data: dict[str, Any], world_size: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Map TRL key names in ``data`` (a config file's mapping) to fastppo options.

    Returns ``(options, notices)``: the mapping with fastppo names only (keys that are neither TRL's
    nor fastppo's are left for ``PPOConfig.from_dict`` to reject), and one line per TRL key mapped
    or ignored (:func:`default_differences` says which defaults differ). ``world_size`` (default:
    the ``WORLD_SIZE`` environment variable that torchrun and accelerate set, else 1) scales the
    global batch sizes as TRL's ``accelerator.num_processes`` does. Raises ``ConfigError`` for a
    value fastppo cannot honour.
    """
    given = {k: v for k, v in data.items() if k not in BY_NAME or BY_NAME[k].kind == SAME}
    out = dict(given)
    notices: list[str] = []

    def note(line: str) -> None:
        notices.append(f"fastppo train: config: {line}")

    # same-name keys: only conversions (a list-valued report_to, lora_target_modules)
    for name in list(out):
        key = BY_NAME.get(name)
        if key is not None and key.convert is not None:
            value = key.convert(out[name])
            if value != out[name]:
                note(f"{name}: {_shown(out[name])} -> {name}: {_shown(value)}")
            out[name] = value

    for name, value in data.items():
        key = BY_NAME.get(name)
        if key is None or key.kind == SAME:
            continue
        if key.kind == RENAMED:
            new = key.convert(value) if key.convert is not None else value
            _set(out, given, key.fastppo, new, name)
            note(f"TRL key {name}: {_shown(value)} -> {key.fastppo}: {_shown(new)}")
        elif key.kind == IGNORED:
            note(f"TRL key {name} ignored: {key.note}")
        elif key.kind == FIXED:
            if not any(_matches(value, a) for a in key.accept):
                accepted = " or ".join(_shown(a) for a in key.accept)
                raise ConfigError(f"{name}: {_shown(value)} (TRL) has no fastppo equivalent: {key.note}; "
                                  f"remove it or set {accepted}")
            note(f"TRL key {name}: {_shown(value)} is what fastppo does ({key.note})")

    # --- LoRA: use_peft switches it; TRL's ModelConfig defaults fill what the file leaves out
    if "use_peft" in data:
        if not isinstance(data["use_peft"], bool):
            raise ConfigError(f"use_peft (TRL) must be true or false, got {data['use_peft']!r}")
        if data["use_peft"]:
            if "lora_r" in given and given["lora_r"] == 0:
                raise ConfigError("use_peft: true (TRL) asks for a LoRA actor, but lora_r is 0, which trains the whole "
                                  "model; set lora_r >= 1 (TRL's default is 16) or use_peft: false")
            filled = {k: v for k, v in _LORA_DEFAULTS.items() if k not in given}
            out.update(filled)
            extra = (f"; {', '.join(f'{k}: {v}' for k, v in filled.items())} (TRL's ModelConfig defaults, not in "
                     "the file)" if filled else "")
            note(f"TRL key use_peft: true -> LoRA actor, lora_r: {out['lora_r']}{extra}")
        else:
            if given.get("lora_r", 0):
                note(f"TRL key use_peft: false -> lora_r: 0 (the file's lora_r {given['lora_r']} is not used)")
            else:
                note("TRL key use_peft: false -> lora_r: 0 (the whole actor is trained)")
            out["lora_r"] = 0

    # --- the rollout engine
    if "use_vllm" in data:
        if not isinstance(data["use_vllm"], bool):
            raise ConfigError(f"use_vllm (TRL) must be true or false, got {data['use_vllm']!r}")
        engine = "vllm" if data["use_vllm"] else "hf"
        _set(out, given, "rollout_engine", engine, "use_vllm")
        note(f"TRL key use_vllm: {_shown(data['use_vllm'])} -> rollout_engine: {engine!r}")

    # --- the model: sft_model_path wins, as in TRL's PPO script
    if "model_name_or_path" in data:
        if "sft_model_path" in data or "model" in given:
            note("TRL key model_name_or_path ignored: the model is "
                 f"{_shown(out.get('model'))}, and fastppo reads the tokenizer from it")
        else:
            out["model"] = data["model_name_or_path"]
            note(f"TRL key model_name_or_path: {_shown(data['model_name_or_path'])} -> model")

    # --- saving
    if "save_strategy" in data:
        strategy = data["save_strategy"]
        if strategy == "no":
            _set(out, given, "save_every", 0, "save_strategy")
            note("TRL key save_strategy: 'no' -> save_every: 0 (one checkpoint, at the end)")
        elif strategy == "steps":
            note("TRL key save_strategy: 'steps' -> checkpoints every save_every iterations")
        else:
            note(f"TRL key save_strategy ignored: {_shown(strategy)} (fastppo saves every save_every iterations "
                 "and at the end)")

    # --- batch sizes: TRL's per-device sizes times the number of processes
    if world_size is None:
        world_size = _whole("WORLD_SIZE (environment)", os.environ.get("WORLD_SIZE", "1"), 1)
    if any(k in data for k in _BATCH_KEYS) or ("total_episodes" in data and "batch_size" not in given):
        per_device, accumulate, minis = (_whole(k, data.get(k, BY_NAME[k].trl_default), 1) for k in _BATCH_KEYS)
        micro = per_device
        mini = per_device * accumulate * world_size
        batch = mini * minis
        for option, value in (("micro_batch_size", micro), ("mini_batch_size", mini), ("batch_size", batch)):
            _set(out, given, option, value, ", ".join(k for k in _BATCH_KEYS if k in data) or "TRL's default batch")
        shown = ", ".join(f"{k}: {data.get(k, BY_NAME[k].trl_default)}" for k in _BATCH_KEYS)
        where = f" x {world_size} processes" if world_size > 1 else ""
        note(f"TRL keys {shown}{where} -> micro_batch_size: {micro} (per forward/backward), "
             f"mini_batch_size: {mini} (per optimizer step), batch_size: {batch} (responses per iteration)")

    if "total_episodes" in data and data["total_episodes"] is not None:
        episodes = _whole("total_episodes", data["total_episodes"], 1)
        batch = out.get("batch_size")
        iterations = math.ceil(episodes / batch)
        _set(out, given, "iterations", iterations, "total_episodes")
        note(f"TRL key total_episodes: {episodes} -> iterations: {iterations} (of batch_size {batch} responses)")

    return out, notices


def _trl_batch() -> tuple[int, int, int, int]:
    """TRL's default ``(micro, mini, batch, processes)`` with no batch key given: 8 per device, one
    accumulation step, one mini-batch, times the processes."""
    world = _whole("WORLD_SIZE (environment)", os.environ.get("WORLD_SIZE", "1"), 1)
    per_device, accumulate, minis = (BY_NAME[k].trl_default for k in _BATCH_KEYS)
    return per_device, per_device * accumulate * world, per_device * accumulate * world * minis, world


def default_differences(values: dict[str, Any], given: set[str]) -> str | None:
    """One line naming every option of ``values`` (a whole fastppo config) that is not in ``given``
    (the options the user set) and whose fastppo default differs from what TRL would use; None when
    there is none. LoRA options count only when LoRA is on (``lora_r`` > 0)."""
    differ = []

    def differs(option: str, theirs: Any, how: str) -> None:
        if option not in given and option in values and values[option] != theirs:
            differ.append(f"{option} {_shown(values[option])} ({how})")

    for key in KEYS:
        if key.kind not in (SAME, RENAMED) or key.fastppo in _NOT_A_DEFAULT or key.trl_default is None:
            continue
        if key.source in (_MC, _OLD_MC) and not values.get("lora_r"):
            continue
        try:
            theirs = key.convert(key.trl_default) if key.convert is not None else key.trl_default
        except ConfigError:
            theirs = key.trl_default
        differs(key.fastppo, theirs, f"TRL {key.name} {_shown(key.trl_default)}")
    if values.get("lora_r"):
        differs("lora_target_modules", None, "TRL lora_target_modules none: peft's choice per model type")
    micro, mini, batch, world = _trl_batch()
    times = f" x {world} processes" if world > 1 else ""
    differs("batch_size", batch, f"TRL {batch}: per_device_train_batch_size {micro} x gradient_accumulation_steps 1 x "
                                 f"num_mini_batches 1{times}")
    differs("mini_batch_size", mini, f"TRL {mini}: per_device_train_batch_size x gradient_accumulation_steps{times}")
    differs("micro_batch_size", micro, f"TRL per_device_train_batch_size {micro}")
    differs("iterations", None, "TRL: without total_episodes, num_train_epochs 3 passes over the dataset")
    if not differ:
        return None
    return ("fastppo train: config: options left unset keep fastppo's defaults, not TRL's: " + "; ".join(differ))


def markdown_table() -> str:
    """The README's table of every TRL key, generated from ``KEYS``."""
    how = {SAME: "same", RENAMED: "renamed", DERIVED: "computed", IGNORED: "ignored", FIXED: "checked"}
    lines = ["| TRL key | TRL default | fastppo | how |", "|---|---|---|---|"]
    for k in KEYS:
        target = f"`{k.fastppo}`" if k.fastppo else "-"
        if k.kind == FIXED:
            target = "- (accepts " + ", ".join(f"`{_shown(a)}`" for a in k.accept) + ")"
        lines.append(f"| `{k.name}` | `{_shown(k.trl_default)}` | {target} | {how[k.kind]}: {k.note} |")
    return "\n".join(lines)
