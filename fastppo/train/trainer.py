"""``PPOTrainer``: rollout, scoring, advantages and clipped updates, with all PPO math in fastppo ops.

One iteration:

1. sample ``batch_size / num_generations`` prompts, each repeated ``num_generations`` times in
   consecutive rows, left-pad them, sample one response per row (temperature, top-p, stop at EOS
   or ``max_new_tokens``) with the actor;
2. without grad: old log-probs (actor), reference log-probs (frozen copy, or the LoRA actor with
   its adapter disabled), values (critic, ``gae`` only), scores (reward model or reward function);
3. advantages, by ``advantage_estimator``: ``gae``: ``fastppo.compute_advantages`` (KL-shaped token
   rewards, GAE, whitening); ``grpo``/``rloo``: ``fastppo.group_advantages`` of the scores within
   each prompt's group; ``reinforce++``: ``fastppo.shape_rewards`` then
   ``fastppo.reinforce_pp_advantages``;
4. ``ppo_epochs`` passes over shuffled mini-batches, each accumulated over micro-batches:
   ``fastppo.ppo_loss`` (clipped policy + clipped value - entropy bonus; critic-free modes:
   ``fastppo.policy_loss`` - entropy bonus), plus ``kl_loss_coef`` times the aggregated
   ``fastppo.kl_penalty`` when set, gradient clipping, AdamW;
5. the KL controller updates its coefficient; metrics are logged; a checkpoint may be written.

At the end of a finished run the policy (adapter or whole model), its tokenizer and the critic are
written into ``output_dir`` itself, where ``AutoPeftModelForCausalLM`` / ``AutoModelForCausalLM``
load them (``checkpoint.save_final``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import random
import sys
import time
from typing import Any, Callable, Sequence

import torch

import fastppo

from . import api
from . import builtin, checkpoint, objective, rollout
from . import distributed  # [dist] several processes (torchrun); a no-op for one
from . import packing, rollout_correction
from .config import ConfigError, PPOConfig, lora_targets
from .data import (CHAT_TEMPLATE_MODES, PromptSampler, dataset_format, encode_prompts, left_pad, load_prompts,
                   prompt_text, prompts_from_dataset)
from .metrics import MetricsLog, explained_variance, masked_mean, peak_memory_mb, plot_metrics, read_metrics
from .models import (TokenScorer, adamw, apply_memory_switches, autocast, keep_adamw_implementation, load_actor,
                     load_critic, load_reward_model, logits_rows, pick_attention, pick_device, position_ids_from,
                     reference_policy, response_logprobs, response_policy_loss, use_bf16)

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


class TrainingStopped(RuntimeError):
    """A run that cannot go on and stopped on purpose; the message is one line for the user."""


class TrainingDiverged(TrainingStopped):
    """``max_skipped_steps`` optimizer steps in a row had a NaN/inf loss or gradient norm, or the
    weights became NaN/inf; no checkpoint was written from that state."""


class DiskFull(TrainingStopped):
    """A checkpoint, the final model or the metrics could not be written: no space left (ENOSPC)."""


class KLController:
    """Coefficient of the KL penalty: fixed, or adaptive (Ziegler et al. 2019, section 2.2).

    The adaptive rule moves the coefficient by at most 20% of ``n / horizon`` per update, in
    the direction that brings the observed KL per sequence back to ``target``.
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value = float(init)
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon


# --------------------------------------------------------------------------------------------
# validation: everything that can be checked without loading weights

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _group_estimate(name: str, scores: torch.Tensor, k: int, mask: torch.Tensor) -> torch.Tensor:
    """The outcome advantages of the group estimator ``name`` (verl's names; see
    ``fastppo.estimators``): one score per response, K = ``k`` consecutive responses per prompt.
    The batch statistics of gpg, reinforce_plus_plus_baseline and gdpo are this process's rows."""
    from fastppo import estimators

    if name == "reinforce_plus_plus_baseline":
        return estimators.reinforce_pp_baseline_advantages(scores, k, mask)
    if name == "gdpo":  # one reward component: GRPO whitened over the batch
        return estimators.gdpo_advantages(scores, k, mask)
    name = {"grpo_vectorized": "grpo", "rloo_vectorized": "rloo"}.get(name, name)
    return fastppo.group_advantages(scores, k, mask, estimator=name)


def _need_model_dir(path: str, what: str):
    """The model's ``PretrainedConfig``; ``ConfigError`` unless ``path`` is a loadable model directory."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} does not exist (expected a directory written by save_pretrained)")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"{what} {path!r} has no config.json; is it a transformers model directory?")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{what} {path!r}: config.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"{what} {path!r}: config.json must be a JSON object with a model_type (as "
                          "save_pretrained writes it)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - unknown model_type, values transformers rejects
        raise ConfigError(f"{what} {path!r}: config.json is not a configuration transformers can load "
                          f"({' '.join(str(exc).split())[:200]})") from None
    if not any(os.path.isfile(os.path.join(path, w)) for w in _WEIGHTS):
        raise ConfigError(f"{what} {path!r} holds no weights (expected one of {', '.join(_WEIGHTS)})")
    return config


def _sampled_logprob(logits: torch.Tensor, probs: torch.Tensor, token: torch.Tensor, truncated: bool) -> torch.Tensor:
    """log of the probability ``token`` was drawn with: log_softmax of the (temperature-scaled)
    ``logits`` or, after top_p truncation, of the kept mass renormalised (``probs`` holds the kept
    probabilities, 0 elsewhere), as vLLM's processed log-probs."""
    if truncated:
        return torch.log(probs.gather(-1, token[:, None]).squeeze(1)) - torch.log(probs.sum(-1))
    return torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(1)


def _kv_cache(out) -> dict[str, Any]:
    """The keyword that hands a forward's KV cache to the next step. transformers 5.25 renamed
    ``past_key_values`` (argument and output field) to ``cache``; the old name warns and goes
    in 5.40, and versions before 5.25 know only the old one: follow the output's own field."""
    if "cache" in getattr(out, "__dataclass_fields__", {}):
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def _context_length(model_config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(model_config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def _check_lora_targets(config: PPOConfig, model_config, where: str) -> None:
    """Every LoRA target must name a linear/embedding/conv module of the actor (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    targets = lora_targets(config.lora_target_modules)
    if targets == "all-linear":
        return
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception as exc:  # noqa: BLE001 - not a causal LM architecture
        raise ConfigError(f"model {where!r} cannot be built as a causal LM ({' '.join(str(exc).split())[:200]})") from None
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, kinds) or type(m).__name__ == "Conv1D"}
    for t in targets:
        if t.rsplit(".", 1)[-1] not in names:
            raise ConfigError(f"lora_target_modules (--lora-target-modules): {t!r} is not a linear layer of {where!r}; "
                              f"choose from {', '.join(sorted(names))}, or all-linear")


def _check_output_dir(path: str) -> None:
    """``output_dir`` must be a writable directory or creatable as one."""
    from .._args import unwritable

    why = unwritable(path)
    if why:
        raise ConfigError(f"output_dir (--output-dir) {path!r}: {why}")


def _vocab_mismatch(a, b) -> str | None:
    """Why tokenizer ``b`` reads ``a``'s token ids differently, or None. Tokens that only ``b`` has
    (a pad token it added, say) change nothing for the ids ``a`` produces."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return None
    missing = [t for t in va if t not in vb]
    if len(missing) > len(va) // 2:
        return f"vocabularies of {len(va)} and {len(vb)} tokens"
    differ = [t for t in va if vb.get(t, va[t]) != va[t]]
    if differ:
        return f"{len(differ)} tokens map to different ids (e.g. {differ[:3]})"
    if missing:
        return f"{len(missing)} of the actor's tokens are not in it (e.g. {missing[:3]})"
    return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def _check_shared_tokenizer(actor_tok, actor_config, path: str, what: str, other_config, actor_name: str) -> None:
    """A reward model or critic directory must read the actor's token ids as the actor does.

    With a tokenizer of its own, the two vocabularies are compared. Without one (a model saved
    without its tokenizer, as trainers often leave it) there is nothing to compare but the models:
    its embedding must have a row for every id the actor can produce.
    """
    from transformers import AutoTokenizer

    other = None
    if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        try:
            other = AutoTokenizer.from_pretrained(path)
        except Exception:  # noqa: BLE001 - broken tokenizer files: judge by the model sizes below
            other = None
        if other is not None and len(other.get_vocab()) <= 1:
            other = None  # an empty tokenizer built from a config alone says nothing
    if other is not None:
        why = _vocab_mismatch(actor_tok, other)
        if why:
            raise ConfigError(f"{what} {path!r} uses a different tokenizer from the actor {actor_name} "
                              f"({why}); it reads the actor's token ids, so both must share one tokenizer")
        return
    mine = getattr(actor_config, "vocab_size", None)
    theirs = getattr(other_config, "vocab_size", None)
    if isinstance(mine, int) and isinstance(theirs, int) and theirs < mine:
        raise ConfigError(f"{what} {path!r} has no tokenizer of its own and embeds {theirs} token ids, but the actor "
                          f"{actor_name} produces ids up to {mine - 1} (vocab_size {mine}); it reads the actor's "
                          "token ids, so it must come from a model with the actor's vocabulary")


def _check_output_is_no_input(config: PPOConfig, *objects) -> None:
    """The final model is written into output_dir (and --overwrite clears model files there): it must
    not be the directory a model is read from."""
    out = os.path.realpath(config.output_dir)
    inputs = [(what, getattr(config, what)) for what in ("model", "reward_model", "critic_model")]
    inputs += [("the model given", api.local_dir(m)) for m in objects if m is not None]
    for what, path in inputs:
        if path is not None and os.path.realpath(path) == out:
            raise ConfigError(f"output_dir (--output-dir) {config.output_dir!r} is where {what} is read from; the "
                              "trained model is written into output_dir, so choose another directory")


def _check_added_options(config: PPOConfig) -> None:
    """Ranges of the options the Python API and TRL users brought (chat template, stop token, EOS penalty)."""
    if config.chat_template not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"chat_template (--chat-template) must be one of {', '.join(CHAT_TEMPLATE_MODES)}; "
                          f"got {config.chat_template!r}")
    if config.stop_token_id is not None and config.stop_token_id < 0:
        raise ConfigError(f"stop_token_id (--stop-token-id) must be a token id >= 0 or none, got {config.stop_token_id}")
    if config.missing_eos_penalty is not None and not config.missing_eos_penalty >= 0:
        raise ConfigError(f"missing_eos_penalty (--missing-eos-penalty) must be a finite number >= 0 or none (it is "
                          f"subtracted from the score), got {config.missing_eos_penalty}")


def validate(config: PPOConfig, reward_fn: RewardFn | None = None, *, model=None, reward_model=None,
             value_model=None, tokenizer=None, train_dataset=None) -> None:
    """Raise ``ConfigError`` for anything that would fail later: bad values, missing files,
    a reward model or critic that does not share the actor's tokenizer, a new run into a directory
    that holds another run. ``model``, ``reward_model``, ``value_model``, ``tokenizer`` and
    ``train_dataset`` are those given to ``PPOTrainer`` in memory."""
    from transformers import AutoTokenizer

    config.check()
    objective.resolve(config)
    _check_added_options(config)
    _check_output_dir(config.output_dir)
    api.check_objects(model, reward_model, value_model, tokenizer, train_dataset, config)
    _check_output_is_no_input(config, model, reward_model, value_model)
    checkpoint.check_run_dir(config)
    device = pick_device(config)
    if config.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attn_implementation (--attn-implementation) flash_attention_2 needs the flash-attn "
                              "package (pip install 'fastppo[flash]'); use auto, sdpa or eager")
        if device.type != "cuda":
            raise ConfigError("attn_implementation (--attn-implementation) flash_attention_2 needs a CUDA device; "
                              "use auto, sdpa or eager")
    model_configs = {}
    if config.model is not None:
        model_configs["model"] = _need_model_dir(config.model, "model")
    if model is not None:
        model_configs["model"] = api.base_of(model).config
    has_reward = reward_fn is not None or config.reward_model is not None or config.reward is not None
    if (config.model is not None or model is not None) and not (has_reward or reward_model is not None):
        where = f"model {config.model!r}" if config.model is not None else "the model"
        raise ConfigError(f"{where} needs a reward: pass reward_model (a sequence-classification model or its "
                          "directory), reward (a built-in reward name) or a reward function")
    if reward_model is not None and has_reward:
        raise ConfigError("reward_model was given together with another reward source (reward_fn, config.reward, "
                          "config.reward_model); give one")
    if reward_fn is not None and (config.reward_model is not None or config.reward is not None):
        raise ConfigError("a reward function was given together with reward_model/reward; give one reward source")
    if config.reward is not None and config.reward not in builtin.REWARDS:
        raise ConfigError(f"unknown built-in reward {config.reward!r}; choose one of {sorted(builtin.REWARDS)}")
    if config.dataset is not None:
        if not os.path.exists(config.dataset):
            raise ConfigError(f"dataset file {config.dataset!r} does not exist")
        if not os.path.isfile(config.dataset):
            raise ConfigError(f"dataset {config.dataset!r} is not a file")
        dataset_format(config.dataset)
    elif config.model is not None and train_dataset is None:
        raise ConfigError(f"model {config.model!r} needs prompts: pass dataset (a .jsonl/.json/.csv/.parquet file)")
    for path, what in ((config.reward_model, "reward_model"), (config.critic_model, "critic_model")):
        if path is not None:
            model_configs[what] = _need_model_dir(path, what)
    for obj, what in ((reward_model, "reward_model"), (value_model, "critic_model")):
        if obj is not None:
            model_configs[what] = obj.config
    if "model" not in model_configs:
        model_configs["model"] = builtin.build_model_config(**builtin.model_overrides(config))
    vocab = getattr(model_configs["model"], "vocab_size", None)
    if config.stop_token_id is not None and isinstance(vocab, int) and config.stop_token_id >= vocab:
        raise ConfigError(f"stop_token_id (--stop-token-id) {config.stop_token_id} is not a token id of the model "
                          f"(vocab_size {vocab}: ids 0 to {vocab - 1})")
    need = config.max_prompt_length + config.max_new_tokens
    for what, mc in model_configs.items():
        ctx = _context_length(mc)
        if ctx is not None and need > ctx:
            where = ("the built-in model" if what == "model" and config.model is None and model is None else
                     f"{what} {getattr(config, what)!r}" if getattr(config, what) is not None else f"the {what} given")
            raise ConfigError(f"max_prompt_length ({config.max_prompt_length}) + max_new_tokens ({config.max_new_tokens}) "
                              f"= {need} tokens exceeds the context of {where} ({ctx} positions); lower "
                              "--max-prompt-length or --max-new-tokens")
    if config.rollout_engine == "vllm":  # [dist] under torchrun each rank runs its own engine on its rows
        rollout.check_servable(model_configs["model"], config.model or (
            "the model given" if model is not None else "the built-in model"), device.type)
    if (config.lora_r > 0 and not (model is not None and api.is_peft(model))) or config.critic_lora_r > 0:
        _check_lora_targets(config, model_configs["model"], config.model or (
            "the model given" if model is not None else "the built-in model"))
    if config.reward_model is not None:
        n = getattr(model_configs["reward_model"], "num_labels", 1)
        if n != 1:
            raise ConfigError(f"reward_model {config.reward_model!r} has num_labels={n}; expected 1 (a scalar score)")
    if config.model is not None or model is not None:
        name = repr(config.model) if config.model is not None else "(the model given)"
        actor_tok = tokenizer
        if actor_tok is None:
            source = config.model if config.model is not None else api.local_dir(model)
            try:
                actor_tok = AutoTokenizer.from_pretrained(source)
            except Exception as exc:  # noqa: BLE001 - missing or broken tokenizer files
                raise ConfigError(f"model {source!r}: cannot load its tokenizer "
                                  f"({' '.join(str(exc).split())[:200]}); pass tokenizer=") from None
        if actor_tok.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {name} has no EOS token; generation could never stop")
        for path, what in ((config.reward_model, "reward_model"), (config.critic_model, "critic_model")):
            if path is not None:
                _check_shared_tokenizer(actor_tok, model_configs["model"], path, what, model_configs[what], name)


# --------------------------------------------------------------------------------------------

class PPOTrainer:
    """PPO for a causal LM against a reward model or a reward function.

    Args:
        config: the run's ``PPOConfig`` (``args=`` as TRL names it). ``config.model=None`` and no
            ``model`` selects the built-in task.
        reward_fn: optional ``(prompts, completions) -> scores`` (lists of str in, B floats out),
            used instead of ``config.reward_model`` / ``config.reward``.
        model: the policy in memory, an ``AutoModelForCausalLM`` (or a peft model: its adapter is
            trained), instead of ``config.model``; a path means ``config.model``.
        ref_model: the frozen reference; default a copy of ``model``, or with LoRA the same model
            with its adapter disabled (no second copy).
        reward_model, value_model: ``AutoModelForSequenceClassification`` models with one label
            (or their directories). The critic defaults to a trainable copy of the reward model, else
            the policy's backbone with a zero head.
        tokenizer: the policy's tokenizer (``processing_class=`` as TRL names it); needed with an
            in-memory model unless it was loaded from a local directory that holds one.
        train_dataset: a ``datasets.Dataset`` or a list of dicts (or a file path); the prompts are
            text, chat ``messages`` or token ``input_ids`` (see ``data.prompts_from_dataset``).
        peft_config: a peft config (``LoraConfig``) that wraps ``model`` for training.

    Attributes after construction: ``actor`` (a transformers or peft model), ``reference`` (None
    with LoRA), ``critic`` (``TokenScorer``; None for the critic-free estimators), ``reward_model`` (or None), ``optimizer``,
    ``scheduler``, ``step`` (iterations done).
    """

    def __init__(self, config: PPOConfig | None = None, reward_fn: RewardFn | None = None, *, model=None,
                 ref_model=None, reward_model=None, value_model=None, tokenizer=None, train_dataset=None,
                 peft_config=None, args: PPOConfig | None = None, processing_class=None):
        from transformers import AutoTokenizer

        if config is not None and args is not None:
            raise ConfigError("give the configuration once: config or args (TRL's name for it)")
        if tokenizer is not None and processing_class is not None:
            raise ConfigError("give the tokenizer once: tokenizer or processing_class (TRL's name for it)")
        config = config if config is not None else args if args is not None else PPOConfig()
        tokenizer = tokenizer if tokenizer is not None else processing_class
        # Directory paths given as arguments mean what the matching config options mean.
        paths = {k: v for k, v in (("model", model), ("reward_model", reward_model), ("critic_model", value_model),
                                   ("dataset", train_dataset)) if isinstance(v, (str, os.PathLike))}
        if paths:
            config = config.replace(**{k: os.fspath(v) for k, v in paths.items()})
            model, reward_model, value_model, train_dataset = (
                None if isinstance(v, (str, os.PathLike)) else v for v in (model, reward_model, value_model, train_dataset))
        if peft_config is not None or (model is not None and api.is_peft(model)):
            # The config records the adapter (lora_r > 0): checkpoints then hold and resume an adapter.
            config = config.replace(**api.adapter_settings(model if peft_config is None else None, peft_config))
        validate(config, reward_fn, model=model, reward_model=reward_model, value_model=value_model,
                 tokenizer=tokenizer, train_dataset=train_dataset)
        api.note_defaults(config, model)
        self.config = config
        # (None, {}) for vanilla, which keeps the fused ppo_loss / linear_ppo_loss path.
        self._objective = objective.resolve(config)
        cfg = config
        self.dist = distributed.Distributed.setup(cfg)  # [dist] process group from the launcher's env
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if self.dist.is_main:  # [dist] one rank clears and marks the directory; the others wait until it has
            if cfg.overwrite:
                removed = checkpoint.clear_outputs(cfg.output_dir)
                if removed:
                    print(f"fastppo train: --overwrite: removed the previous run's {', '.join(removed)} from "
                          f"{cfg.output_dir}", file=sys.stderr)
            # Written before anything else: --overwrite later removes only what this lists.
            checkpoint.record_outputs(cfg.output_dir)
        self.dist.barrier()

        if model is not None:
            self.model_path = api.local_dir(model)  # None: built in memory, nothing to reload it from
            self.dataset_path = cfg.dataset
        elif cfg.model is None:
            with self.dist.main_first():  # [dist] one rank writes the built-in files, the others read them
                model_dir, prompts_file = builtin.materialize(os.path.join(cfg.output_dir, "builtin"), seed=cfg.seed,
                                                             **builtin.model_overrides(cfg))
            self.model_path = model_dir
            self.dataset_path = cfg.dataset or (None if train_dataset is not None else prompts_file)
        else:
            self.model_path, self.dataset_path = cfg.model, cfg.dataset

        self.device = self.dist.pick_device(pick_device(cfg))  # [dist] cuda:LOCAL_RANK
        self.dist.check_backend(self.device)
        if self.device.type == "cpu" and cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        self.bf16 = use_bf16(cfg, self.device)
        if cfg.bf16 and not self.bf16:
            print(f"fastppo train: --bf16 is ignored on {self.device.type} (bfloat16 autocast needs a CUDA device); "
                  "the run computes in float32", file=sys.stderr)
        attn = pick_attention(cfg, self.device)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

        # Prompts first: a bad dataset should fail before gigabytes of weights are read.
        if train_dataset is not None:
            raw = prompts_from_dataset(train_dataset, cfg.prompt_column)
        else:
            raw = load_prompts(self.dataset_path, cfg.prompt_column)
        self.prompts = raw
        self.prompt_ids = encode_prompts(self.tokenizer, raw, cfg.max_prompt_length, cfg.chat_template)
        self.sampler = PromptSampler(len(raw), cfg.seed)
        critic_object = value_model if value_model is not None else reward_model if reward_model is not None else (
            model if cfg.critic_model is None and cfg.reward_model is None else None)
        self.fingerprint = checkpoint.fingerprint(cfg, self.model_path, raw, objects={
            "actor": model, "reward_model": reward_model,
            "critic": critic_object if cfg.advantage_estimator == "gae" else None})
        candidates = checkpoint.checkpoints(cfg.output_dir) if cfg.resume else []
        checkpoint.precheck(self, candidates)  # a different run's directory is refused before any weights load

        if model is None and ref_model is None and peft_config is None:
            self.actor, self.reference = load_actor(cfg, self.model_path, self.device, attn)
        else:
            if model is None:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(self.model_path, attn_implementation=attn,
                                                             dtype=torch.float32)
            self.actor, self.reference = api.prepare_actor(cfg, model, ref_model, peft_config, self.device)
        # The adapter records its base model by absolute path: AutoPeftModelForCausalLM.from_pretrained(output_dir)
        # then loads from any working directory.
        api.set_adapter_base(self.actor, self.model_path)
        self.critic = None  # grpo, rloo, reinforce++: no critic is loaded, trained or saved
        if cfg.advantage_estimator == "gae":
            if value_model is not None:
                self.critic = TokenScorer(value_model).to(self.device).eval()
            elif cfg.critic_model is None and reward_model is not None:
                # As from a reward-model directory: the critic starts as a trainable copy of the reward model.
                self.critic = TokenScorer(copy.deepcopy(reward_model)).to(self.device).eval().requires_grad_(True)
            elif model is not None and cfg.critic_model is None and cfg.reward_model is None:
                self.critic = api.critic_from_actor(self.actor, self.device, attn)
            else:
                critic_path = cfg.critic_model or cfg.reward_model or self.model_path
                self.critic = load_critic(cfg, critic_path, from_reward=critic_path == cfg.reward_model,
                                          device=self.device, attn=attn)
        self.critic = apply_memory_switches(cfg, self.actor, self.critic)  # --critic-lora-r, --gradient-checkpointing
        if reward_model is not None:
            self.reward_model = TokenScorer(reward_model).to(self.device).eval().requires_grad_(False)
        else:
            self.reward_model = load_reward_model(cfg.reward_model, self.device, attn) if cfg.reward_model else None
        if reward_fn is not None:
            self.reward_fn: RewardFn | None = reward_fn
        elif cfg.reward is not None:
            self.reward_fn = builtin.make_reward(cfg.reward, cfg)
        elif self.reward_model is None:
            self.reward_fn = builtin.make_reward("sentiment", cfg)
        else:
            self.reward_fn = None

        self.dist.shard(self)  # [dist] FSDP2 before the optimizer sees the parameters
        actor_params = [p for p in self.actor.parameters() if p.requires_grad]
        groups = [{"params": actor_params, "lr": cfg.learning_rate}]
        if self.critic is not None:
            critic_params = [p for p in self.critic.parameters() if p.requires_grad]
            groups.append({"params": critic_params, "lr": cfg.critic_learning_rate or cfg.learning_rate})
        self.optimizer = adamw(groups, cfg.weight_decay)  # fused, else foreach: never the per-tensor loop
        self.total_updates = cfg.iterations * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.skipped_in_a_row = 0  # optimizer steps skipped for a non-finite loss or gradient norm
        self.diverged: str | None = None  # why the last iteration stopped the run
        # Newest usable checkpoint; unusable ones (truncated, empty, missing parts) are skipped with a warning.
        resume = distributed.resume if self.dist.enabled else checkpoint.resume  # [dist] into FSDP2 shards
        self.resumed_from: str | None = resume(self, candidates)
        self.resumed_from = self._resume_finite(resume, candidates, self.resumed_from)
        self.rollout = rollout.make_engine(self)  # built from the restored weights on a resume
        # --padding-free: each model checked once on packed rows; --micro-batch-tokens groups
        self.packing = packing.Packing(self)

    # ----------------------------------------------------------------------------------------
    def _lr_factor(self, update: int) -> float:
        warm = self.config.warmup_steps
        if warm and update < warm:
            return (update + 1) / warm
        if self.config.lr_schedule == "linear":
            return max(0.0, 1.0 - (update - warm) / max(1, self.total_updates - warm))
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"format": checkpoint.FORMAT, "step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "kl_coef": self.kl.value, "sampler": self.sampler.state_dict(),
                "shuffle_gen": self.shuffle_gen.get_state(), "rng": checkpoint.rng_state(),
                "config": self.config.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        keep_adamw_implementation(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl.value = float(state["kl_coef"])
        self.sampler.load_state_dict(state["sampler"])
        self.shuffle_gen.set_state(state["shuffle_gen"])
        checkpoint.set_rng_state(state["rng"])
        self.step = int(state["step"])

    def _resume_finite(self, resume, candidates: list[str], path: str | None) -> str | None:
        """``path``, the checkpoint ``resume(self, candidates)`` loaded, unless its weights hold
        NaN/inf: then the next usable one before it (each skipped with a warning, as a damaged
        one is); ``ConfigError`` when none is left."""
        while path is not None:
            bad = self._nonfinite_weights()
            if bad is None:
                return path
            if self.dist.is_main:  # [dist] every rank took the same decision; one says so
                print(f"fastppo train: warning: skipped checkpoint {os.path.basename(path)}: {bad}; falling back "
                      "to the one before it", file=sys.stderr, flush=True)
            candidates = candidates[candidates.index(path) + 1:]
            if not candidates:
                raise ConfigError(f"--resume: no usable checkpoint under {os.path.dirname(path)} "
                                  f"({os.path.basename(path)}: {bad}); remove them to start over, or choose another "
                                  "--output-dir")
            path = resume(self, candidates)
        return path

    def _nonfinite_weights(self) -> str | None:
        """Which trainable weights (actor, critic) hold a NaN or inf, or None; one host sync, and
        under torchrun one decision for all ranks (each checks its shards)."""
        flags, roles = [], []
        for role, module in (("actor", self.actor), ("critic", self.critic)):
            if module is None:
                continue
            local = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters() if p.requires_grad]
            finite = [torch.isfinite(p).all().to(self.device) for p in local if p.numel()]
            flags.append(~torch.stack(finite).all() if finite else
                         torch.zeros((), dtype=torch.bool, device=self.device))
            roles.append(role)
        flags = torch.stack(flags).float()
        if self.dist.enabled:  # [dist]
            import torch.distributed as dist

            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = [role for role, f in zip(roles, flags.tolist()) if f]
        return f"the {' and '.join(bad)} weights hold NaN or inf" if bad else None

    def save_checkpoint(self) -> str:
        """Write a checkpoint of this step (atomically); ``TrainingDiverged`` instead of writing
        weights that hold NaN or inf."""
        bad = self._nonfinite_weights()
        if bad:
            raise TrainingDiverged(f"training diverged at iteration {self.step}: {bad}; no checkpoint was written "
                                   "from them")
        if self.dist.is_main:
            checkpoint.record_outputs(self.config.output_dir, f"checkpoints/step-{self.step:08d}/")
        if self.dist.enabled:  # [dist] all ranks write one checkpoint together
            return distributed.save(self, self.step)
        return checkpoint.save(self, self.step)

    def _sync(self) -> float:
        # Phase timings on a GPU are meaningless without waiting for the queued kernels.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, logprobs: bool = False
                 ) -> tuple[torch.Tensor, ...]:
        """Sample one response per prompt with a KV cache.

        Args: prompt_ids, prompt_mask: int64 ``[B, P]``, left-padded; ``logprobs``: also return the
        sampler's log-prob of each sampled token.
        Returns: ``(responses, mask)``: int64 ``[B, R]`` (pad after EOS) and bool ``[B, R]``, true
        up to and including the first EOS (or ``stop_token_id``); ``R <= max_new_tokens`` (stops once
        every row is done). With ``logprobs``, a third float32 ``[B, R]``: log of the probability the
        token was drawn with (after temperature and top_p), 0 at masked positions.
        """
        cfg, tok = self.config, self.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        stop = eos if cfg.stop_token_id is None else cfg.stop_token_id
        b = prompt_ids.shape[0]
        attn = prompt_mask.clone()
        pos = position_ids_from(attn)
        done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
        out_tokens, out_mask, out_lp = [], [], []
        with autocast(self.device, self.bf16):
            # Only the last prompt position samples: logits_to_keep=1 spares the [B, P, V] logits.
            out = self.actor(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True,
                             **logits_rows(self.actor, 1))
        next_pos = pos[:, -1:] + 1
        for step in range(cfg.max_new_tokens):
            logits = out.logits[:, -1, :].float() / cfg.temperature
            probs = torch.softmax(logits, dim=-1)
            if cfg.top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                # Drop a token when the tokens strictly more likely already reach top_p mass.
                drop = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            nxt = torch.multinomial(probs, 1).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            if logprobs:  # the rollout engine's log-probs, for fastppo.train.rollout_correction
                out_lp.append(torch.where(done, 0.0, _sampled_logprob(logits, probs, nxt, cfg.top_p < 1.0)))
            out_tokens.append(nxt)
            out_mask.append(~done)
            done = done | (nxt == stop)  # stop_token_id, or EOS again when none is set
            done = done | (nxt == eos)
            if self.dist.all_done(done):  # [dist] every rank's rows: equal forward counts under FSDP2
                break
            if step == cfg.max_new_tokens - 1:  # the last token sampled: a further forward would go unread
                break
            attn = torch.cat([attn, out_mask[-1].long()[:, None]], dim=1)
            with autocast(self.device, self.bf16):
                out = self.actor(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos,
                                 use_cache=True, **_kv_cache(out))
            next_pos = next_pos + 1
        if logprobs:
            return torch.stack(out_tokens, 1), torch.stack(out_mask, 1), torch.stack(out_lp, 1)
        return torch.stack(out_tokens, 1), torch.stack(out_mask, 1)

    @torch.no_grad()
    def score(self, prompts: list[Any], seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
              responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32 scores from the reward model (at the last response token) or function."""
        if self.reward_model is not None:
            out = torch.zeros(seq.shape[0], dtype=torch.float32, device=seq.device)
            width = seq.shape[1] - responses.shape[1]
            with autocast(self.device, self.bf16):
                # the reward model is whole on every rank: no rank needs the others' forward count
                for rows, _ in self.packing.forward_groups(attn, self.config.micro_batch_size, collective=False):
                    batch = self.packing.batch(seq[rows], attn[rows], pos[rows], width)
                    out[rows] = self.packing.score_last(self.reward_model, batch).float()
            return out
        completions = [self.tokenizer.decode(r[m].tolist(), skip_special_tokens=True)
                       for r, m in zip(responses.cpu(), mask.cpu())]
        scores = self.reward_fn([prompt_text(p, self.tokenizer) for p in prompts], completions)
        scores = torch.as_tensor([float(s) for s in scores], dtype=torch.float32)
        if scores.shape != (len(prompts),):
            raise ValueError(f"reward function returned {scores.shape[0]} scores for {len(prompts)} completions")
        if not torch.isfinite(scores).all():
            raise ValueError(f"reward function returned non-finite scores: {scores.tolist()}")
        return scores.to(self.device)

    def penalize_missing_eos(self, scores: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``scores - missing_eos_penalty`` for each response whose last token is neither EOS nor
        ``stop_token_id`` (it was cut off by ``max_new_tokens``); the scores unchanged without a penalty.

        Args: scores float32 ``[B]``; responses int64 ``[B, R]``; mask bool ``[B, R]``.
        """
        penalty = self.config.missing_eos_penalty
        if penalty is None:
            return scores
        if responses.shape[1] == 0:
            return scores - penalty
        last = (mask.long().sum(1) - 1).clamp(min=0)
        final = responses.gather(1, last[:, None]).squeeze(1)
        ended = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        for t in {self.tokenizer.eos_token_id, self.config.stop_token_id} - {None}:
            ended = ended | (final == t)
        ended = ended & mask.any(1)  # an empty response ended nothing
        return torch.where(ended, scores, scores - penalty)

    # ----------------------------------------------------------------------------------------
    def iteration(self) -> dict[str, Any]:
        """Run one PPO iteration; returns its metrics (also what goes into metrics.jsonl)."""
        cfg, dev = self.config, self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = self._sync()

        # batch_size counts responses: each prompt is repeated num_generations times in consecutive
        # rows, the group layout fastppo.group_advantages reads.
        k = cfg.num_generations
        idx = [i for i in self.sampler.next(cfg.batch_size // k) for _ in range(k)]
        idx = self.dist.local_rows(idx)  # [dist] this rank's share of the global batch
        prompts = [self.prompts[i] for i in idx]
        prompt_ids, prompt_mask = left_pad([self.prompt_ids[i] for i in idx], self.tokenizer.pad_token_id, dev)
        sampled = self.rollout.generate(prompt_ids, prompt_mask)  # rollout.HFEngine: self.generate
        responses, mask = sampled.responses, sampled.mask
        width = prompt_ids.shape[1]
        seq = torch.cat([prompt_ids, responses], 1)
        attn = torch.cat([prompt_mask, mask.long()], 1)
        pos = position_ids_from(attn)
        t1 = self._sync()

        # [dist] a reward that fails on one rank stops every rank here, with its message
        scores = self.dist.together(self.score, prompts, seq, attn, pos, responses, mask)
        scores = self.penalize_missing_eos(scores, responses, mask)
        t2 = self._sync()

        # Micro-batched like the updates: a rollout-sized forward would hold B x T x V logits at once.
        # (packed rows where the models take them; groups of micro_batch_tokens when set)
        # [dist] with micro_batch_tokens: the global batch's rows, split among the ranks by tokens
        fwd = self.packing.forward_rows(width, seq, attn, pos, mask)
        zeros = torch.zeros(fwd.mask.shape, dtype=torch.float32, device=dev)
        old_logprobs, entropy, ref_logprobs = zeros.clone(), zeros.clone(), zeros.clone()
        old_values = zeros.clone() if self.critic is not None else None
        with torch.no_grad(), autocast(dev, self.bf16):
            for rows, keep in self.packing.forward_groups(fwd.attn, cfg.micro_batch_size, whole=fwd.whole):
                batch = self.packing.batch(fwd.seq[rows], fwd.attn[rows], fwd.pos[rows], fwd.width)
                m_ = fwd.mask[rows]
                lp, ent = self.packing.logprobs(self.actor, batch, m_, cfg.temperature, cfg.fused_head)
                with reference_policy(self.actor, self.reference) as ref:
                    rlp, _ = self.packing.logprobs(ref, batch, m_, cfg.temperature, cfg.fused_head)
                v = self.packing.values(self.critic, batch) if self.critic is not None else None
                if not keep:  # [dist] a pass that only keeps this rank's forward count equal to the others'
                    continue
                old_logprobs[rows], entropy[rows], ref_logprobs[rows] = lp.float(), ent.float(), rlp.float()
                if v is not None:
                    old_values[rows] = torch.where(m_, v, 0.0)
        old_logprobs, entropy, ref_logprobs, old_values = self.packing.own_rows(fwd, old_logprobs, entropy, ref_logprobs,
                                                                                old_values)
        mismatch = rollout.correction(cfg, old_logprobs, sampled, self.dist)  # rollout engine vs trainer
        # Importance weights and rejected tokens (--rollout-is / --rollout-rs): loss_mask is mask less those.
        is_weights, loss_mask, corr = rollout_correction.apply(cfg, old_logprobs, sampled.logprobs, mask, self.dist)
        mismatch.update(corr)
        shaped = scores.clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip else scores
        kl_coef_used = self.kl.value
        if cfg.advantage_estimator == "gae":
            advantages, returns, rewards, kl = fastppo.compute_advantages(
                shaped, old_logprobs, ref_logprobs, old_values, mask, kl_coef=kl_coef_used,
                estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam,
                whiten=cfg.whiten_advantages and not self.dist.enabled)
            if cfg.whiten_advantages and self.dist.enabled:  # [dist] statistics of the global batch
                advantages = self.dist.masked_whiten(advantages, mask)
        elif cfg.advantage_estimator in ("reinforce++", "reinforce_plus_plus"):
            rewards, kl = fastppo.shape_rewards(shaped, old_logprobs, ref_logprobs, mask, kl_coef=kl_coef_used,
                                                estimator=cfg.kl_estimator)
            advantages, returns = self.dist.reinforce_pp_advantages(rewards, mask, gamma=cfg.gamma)  # [dist] global whitening
        else:  # grpo, rloo, ...: outcome advantages within each prompt's group; no KL reward penalty
            advantages = _group_estimate(cfg.advantage_estimator, shaped, k, mask)
            returns = None
            kl = torch.where(mask, fastppo.kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator), 0.0)
            kl_coef_used = 0.0
            rewards = torch.zeros_like(old_logprobs)
            last = (mask.long().sum(1) - 1).clamp(min=0)
            rewards[torch.arange(rewards.shape[0], device=dev), last] = shaped.to(rewards.dtype)
            rewards = torch.where(mask, rewards, 0.0)
        # [dist] with micro_batch_tokens every rank gets the global batch here (advantages done) and
        # takes a token-balanced share of each mini-batch (packing.Packing.micro_batches)
        upd = self.packing.update_rows(width, seq, attn, pos, loss_mask, old_logprobs, advantages, old_values, returns,
                                       ref_logprobs, is_weights)
        t3 = self._sync()

        # Statistics stay tensors until the iteration ends: the only host sync of an update is the
        # one finiteness check per optimizer step.
        stats_sum: dict[str, torch.Tensor] = {}
        n_updates = skipped = 0
        t_fwd = t_bwd = 0.0
        grad_norms = []
        self.diverged = None
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=self.shuffle_gen).to(dev)
            for mini in order.split(cfg.mini_batch_size):
                self.optimizer.zero_grad(set_to_none=True)
                step_stats: dict[str, torch.Tensor] = {}
                loss_finite = torch.ones((), dtype=torch.bool, device=dev)
                # [dist] with N ranks: this rank's rows of the global mini-batch, weighted by their
                # share of its tokens (see distributed.Distributed.micro_batches)
                for micro, weight, stats_weight in self.packing.micro_batches(mini, upd.mask, upd.attn, cfg.micro_batch_size,
                                                                              cfg.loss_agg, whole=upd.whole):
                    ta = self._sync()
                    loss, stats = self._loss(micro, upd.seq, upd.attn, upd.pos, upd.width, upd.mask, upd.old_logprobs,
                                             upd.advantages, upd.old_values, upd.returns, upd.ref_logprobs,
                                             upd.is_weights)
                    tb = self._sync()
                    # Each micro-batch loss is aggregated over its own rows; weighting it by its share
                    # of the mini-batch's rows makes the accumulated gradient that of the whole
                    # mini-batch: exactly for the seq-mean modes, up to uneven lengths for token-mean.
                    (loss * weight).backward()
                    loss_finite = loss_finite & torch.isfinite(loss.detach())  # a device op: no sync here
                    t_fwd += tb - ta
                    t_bwd += self._sync() - tb
                    for k, v in stats.items():
                        step_stats[k] = step_stats.get(k, 0.0) + v.detach().float() * stats_weight(k)
                tb = self._sync()
                norms = self._clip_grads()
                bad = self._nonfinite(loss_finite, norms)
                if bad is None:
                    self.optimizer.step()
                    self.scheduler.step()
                    n_updates += 1
                    self.skipped_in_a_row = 0
                    grad_norms.append(norms["actor"])
                    for k, v in step_stats.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + v
                else:
                    # The step is dropped whole: weights, optimizer moments and the learning-rate
                    # schedule stay as they were, so the next mini-batch starts from good weights.
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    self.skipped_in_a_row += 1
                    for k in step_stats:  # the row keeps its keys; null when no step was taken
                        stats_sum.setdefault(k, torch.zeros((), device=dev))
                    if self.skipped_in_a_row >= cfg.max_skipped_steps:
                        self.diverged = (f"training diverged at iteration {self.step + 1}: {bad} in "
                                         f"{self.skipped_in_a_row} optimizer steps in a row (max_skipped_steps "
                                         f"{cfg.max_skipped_steps}), which were skipped")
                t_bwd += self._sync() - tb
                if self.diverged:
                    break
            if self.diverged:
                break
        if n_updates and not self.diverged:
            # Finite gradients can still overflow the weights (an absurd learning rate); caught here,
            # not by the next iteration's sampling with a message about probabilities.
            bad = self._nonfinite_weights()
            if bad:
                self.diverged = f"training diverged at iteration {self.step + 1}: after its updates {bad}"
        t4 = self._sync()
        time_weight_sync = self.rollout.sync_weights()  # the engine serves the updated actor next iteration

        self.step += 1
        if self.dist.enabled:  # [dist] metrics over the global batch, the same on every rank
            stats_sum = self.dist.sum_stats(stats_sum)
            scores, kl, rewards, mask, entropy, advantages, old_values, returns = self.dist.gather_rows(
                scores, kl, rewards, mask, entropy, advantages, old_values, returns)
        valid = mask.float()
        kl_seq = float((kl * valid).sum(1).mean())
        self.kl.update(kl_seq, cfg.batch_size)
        n_tokens = int(valid.sum())
        row = {
            "step": self.step,
            # ppo_loss stats, mean over the updates taken (a skipped step's are NaN or meaningless)
            **{k: float(v) / n_updates if n_updates else float("nan") for k, v in stats_sum.items()},
            "score_mean": float(scores.mean()),
            "score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "reward_mean": float((rewards * valid).sum(1).mean()),
            "kl": kl_seq,
            "kl_coef": kl_coef_used,
            "entropy": masked_mean(entropy, mask),
            "advantage_mean": masked_mean(advantages, mask),
            "response_length": float(valid.sum(1).mean()),
            "grad_norm": float(torch.stack(grad_norms).float().mean()) if grad_norms else float("nan"),
            "skipped_steps": skipped,
            "lr": self.scheduler.get_last_lr()[0],
            "time_generate": t1 - t0,
            "time_score": t2 - t1,
            "time_forward": t3 - t2 + t_fwd,
            "time_backward": t_bwd,
            "time_iteration": t4 - t0,
            "tokens_per_s": n_tokens / max(t4 - t0, 1e-9),
            "generate_tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
            "peak_memory_mb": self.dist.max(peak_memory_mb(dev)),  # [dist] the largest rank's
            "time_weight_sync": time_weight_sync,
            **mismatch,
        }
        if self.critic is not None:  # critic-free runs have no values to report
            row["explained_variance"] = explained_variance(old_values, returns, mask)
            row["value_mean"] = masked_mean(old_values, mask)
        return row

    def _loss(self, micro, seq, attn, pos, width, mask, old_logprobs, advantages, old_values, returns,
              ref_logprobs, is_weights=None):
        cfg = self.config
        m = mask[micro]
        w = None if is_weights is None else is_weights[micro]
        batch = self.packing.batch(seq[micro], attn[micro], pos[micro], width)
        with autocast(self.device, self.bf16):
            fused = None
            objective_fn, objective_options = self._objective
            if cfg.fused_head and objective_fn is None and not distributed.sharded_fused(self.actor):
                # A frozen fused head (LoRA): the whole policy objective from the hidden states.
                fused = self.packing.policy_loss(
                    self.actor, batch, cfg.temperature,
                    old_logprobs=old_logprobs[micro], advantages=advantages[micro], mask=m, clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg=cfg.loss_agg, ent_coef=cfg.ent_coef,
                    ref_logprobs=ref_logprobs[micro] if cfg.kl_loss_coef else None, kl_coef=cfg.kl_loss_coef,
                    kl_estimator=cfg.kl_estimator, is_weights=w)
            if fused is None:
                logprobs, entropy = self.packing.logprobs(self.actor, batch, m, cfg.temperature, cfg.fused_head)
            if self.critic is not None:
                values = self.packing.values(self.critic, batch)
        if fused is not None:
            return self._fused_loss(fused, values if self.critic is not None else None, m, micro, old_values, returns)
        if objective_fn is not None:
            # Another registered objective (fastppo.POLICY_LOSSES): its loss, the entropy bonus and
            # the value loss as ppo_loss adds them, and its stats under the trainer's names.
            pg_loss, pg = objective_fn(logprobs, old_logprobs[micro], advantages[micro], m, agg=cfg.loss_agg,
                                       is_weights=w, **objective_options)
            ent = fastppo.aggregate(entropy if cfg.ent_coef else entropy.detach(), m, cfg.loss_agg)
            loss = pg_loss - cfg.ent_coef * ent if cfg.ent_coef else pg_loss
            stats = {"policy_loss": pg_loss.detach(), "entropy": ent.detach()}
            # Every built-in objective reports clipfrac, clipfrac_lower and approx_kl (the
            # metrics.jsonl columns); the defaults cover one registered by a user with fewer.
            stats.update({k: v.detach() for k, v in pg.items()})
            stats.setdefault("clipfrac", torch.zeros((), device=loss.device))
            stats.setdefault("clipfrac_lower", torch.zeros((), device=loss.device))
            if "approx_kl" not in stats:
                stats["approx_kl"] = fastppo.aggregate((old_logprobs[micro] - logprobs).detach(), m, "token-mean")
            if self.critic is not None:
                values = torch.where(m, values, 0.0)
                vf_loss, vf = fastppo.value_loss(values, old_values[micro], returns[micro], m, clip=cfg.value_clip,
                                                 agg=cfg.loss_agg)
                loss = loss + cfg.vf_coef * vf_loss
                stats.update(value_loss=vf_loss.detach(), value_clipfrac=vf["clipfrac"])
        elif self.critic is not None:
            values = torch.where(m, values, 0.0)
            loss, stats = fastppo.ppo_loss(
                logprobs, old_logprobs[micro], advantages[micro], values, old_values[micro], returns[micro], m,
                entropy=entropy if cfg.ent_coef else entropy.detach(), clip_low=cfg.clip_low,
                clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, value_clip=cfg.value_clip, vf_coef=cfg.vf_coef,
                ent_coef=cfg.ent_coef, agg=cfg.loss_agg, is_weights=w)
        else:  # critic-free: the clipped policy loss and the entropy bonus, as ppo_loss without its value term
            pg_loss, pg = fastppo.policy_loss(logprobs, old_logprobs[micro], advantages[micro], m,
                                              clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                              dual_clip=cfg.dual_clip, agg=cfg.loss_agg, is_weights=w)
            ent = fastppo.aggregate(entropy if cfg.ent_coef else entropy.detach(), m, cfg.loss_agg)
            loss = pg_loss - cfg.ent_coef * ent if cfg.ent_coef else pg_loss
            stats = {"policy_loss": pg_loss.detach(), "entropy": ent.detach(), **pg}
        if cfg.kl_loss_coef:
            # The KL as a loss term: differentiable in logprobs through fastppo.kl_penalty.
            kl_loss = fastppo.aggregate(fastppo.kl_penalty(logprobs, ref_logprobs[micro], cfg.kl_estimator), m,
                                        cfg.loss_agg)
            loss = loss + cfg.kl_loss_coef * kl_loss
            stats["kl_loss"] = kl_loss.detach()
        return loss, stats

    def _fused_loss(self, fused, values, m, micro, old_values, returns):
        """:meth:`_loss` from ``linear_ppo_loss``'s (loss, stats), plus the value loss: the same
        loss and stats as the log-probs path."""
        cfg = self.config
        loss, s = fused
        stats = {"policy_loss": s["policy_loss"]}
        if values is not None:
            values = torch.where(m, values, 0.0)
            vf_loss, vf = fastppo.value_loss(values, old_values[micro], returns[micro], m, clip=cfg.value_clip,
                                             agg=cfg.loss_agg)
            loss = loss + cfg.vf_coef * vf_loss
            stats["value_loss"] = vf_loss.detach()
        stats.update(entropy=s["entropy"], clipfrac=s["clipfrac"], clipfrac_lower=s["clipfrac_lower"],
                     approx_kl=s["approx_kl"])
        if values is not None:
            stats["value_clipfrac"] = vf["clipfrac"]
        if cfg.kl_loss_coef:
            stats["kl_loss"] = s["kl"]
        return loss, stats

    def _clip_grads(self) -> dict[str, torch.Tensor]:
        """The gradient norm before clipping of each parameter group (``actor``, ``critic``): float
        scalars on the device, global under FSDP2 (the same on every rank)."""
        # Actor and critic clipped separately: the value loss' large early gradients must not
        # shrink the policy's step (they share one optimizer, not one gradient scale).
        norms = {}
        for role, group in zip(("actor", "critic"), self.optimizer.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params:  # [dist] a DTensor under FSDP2
                norms[role] = self.dist.grad_norm(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        norms.setdefault("actor", torch.zeros((), device=self.device))
        return norms

    def _nonfinite(self, loss_finite: torch.Tensor, norms: dict[str, torch.Tensor]) -> str | None:
        """What makes this optimizer step unusable (a NaN/inf loss or gradient norm), or None.

        One host sync per optimizer step. The norms are global already; a loss is per rank, so under
        torchrun the flags are max-reduced first and every rank takes the same decision.
        """
        flags = torch.stack([~loss_finite.to(self.device)] + [~torch.isfinite(n) for n in norms.values()]).float()
        if self.dist.enabled:  # [dist]
            import torch.distributed as dist

            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.tolist()
        if not any(flags):
            return None
        names = ["the loss"] + [f"the {role} gradient norm" for role in norms]
        bad = [name for name, f in zip(names, flags) if f]
        return " and ".join(bad) + (" were" if len(bad) > 1 else " was") + " NaN or inf"

    # ----------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run the remaining iterations; returns ``{"history", "first_score", "last_score", ...}``.

        SIGINT (Ctrl-C) or SIGTERM during a run lets the current iteration finish and be logged,
        writes a checkpoint and returns early with ``"interrupted"`` set to the signal's name
        (a second signal stops at once, without a checkpoint). Handlers are only installed when
        called from the main thread, and the previous ones are put back on return.

        Raises ``TrainingDiverged`` after ``max_skipped_steps`` optimizer steps in a row with a
        NaN/inf loss or gradient norm (or weights that became NaN/inf), and ``DiskFull`` when a
        checkpoint, the final model, the metrics or the plot cannot be written for want of space;
        neither leaves a checkpoint of the state it stopped in.
        """
        from tqdm.auto import tqdm

        from .report import Reporter, open_reporter

        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True)
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        main = self.dist.is_main  # [dist] rank 0 alone writes metrics, reports and plots
        if main:
            reports = {"tensorboard": "tensorboard/", "wandb": "wandb/"}.get(cfg.report_to)
            checkpoint.record_outputs(cfg.output_dir, "metrics.jsonl", *(["metrics.png"] if cfg.plot else []),
                                      *([reports] if reports else []))
        log = self._write("metrics.jsonl", cfg.output_dir, self.resumed_from, MetricsLog, metrics_path,
                          keep_up_to=self.step if self.resumed_from else None) if main else None
        reporter = open_reporter(cfg, first_step=self.step + 1) if main else Reporter()  # no-op
        rows: list[dict[str, Any]] = []
        bar = tqdm(total=cfg.iterations, initial=self.step, disable=not (cfg.progress and main), desc="ppo",
                   unit="it", dynamic_ncols=True, file=sys.stderr)
        last_ckpt = self.resumed_from
        model_dir = None
        stop = _StopOnSignal()
        try:
            with stop:
                # [dist] a signal seen by any rank stops all of them at the same iteration
                while self.step < cfg.iterations:
                    stop.signal = self.dist.agree_stop(stop.signal)
                    if stop.signal:
                        break
                    row = self.iteration()
                    rows.append(row)
                    if log is not None:
                        self._write("metrics.jsonl", cfg.output_dir, last_ckpt, log.write, row)
                    reporter.log(row)
                    bar.update(1)
                    bar.set_postfix(score=f"{row['score_mean']:.3f}", kl=f"{row['kl']:.3f}",
                                    len=f"{row['response_length']:.1f}")
                    if self.diverged:  # logged above (skipped_steps); nothing of this state is saved
                        last = f"the last good checkpoint, {last_ckpt}, is intact" if last_ckpt else \
                            "no checkpoint had been written yet"
                        raise TrainingDiverged(f"{self.diverged}; {last} (lower the learning rate or the loss "
                                               "coefficients)")
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.iterations:
                        last_ckpt = self._save_checkpoint(last_ckpt)
                if last_ckpt is None or not last_ckpt.endswith(f"step-{self.step:08d}"):
                    # atomic: a second signal here leaves no half checkpoint
                    last_ckpt = self._save_checkpoint(last_ckpt)
                # The finished policy where the next step of a recipe looks for it: output_dir itself.
                if self.step >= cfg.iterations:
                    if self.dist.enabled:  # [dist] the sharded modules hold no whole weights: rank 0
                        if main:           # copies the full ones its last checkpoint gathered
                            self._write("the final model", cfg.output_dir, last_ckpt, checkpoint.save_final, self,
                                        source=last_ckpt)
                        self.dist.barrier()
                        model_dir = cfg.output_dir
                    else:
                        model_dir = self._write("the final model", cfg.output_dir, last_ckpt, checkpoint.save_final,
                                                self)
        finally:
            bar.close()
            reporter.close()
        history = read_metrics(metrics_path) if main else rows
        plot_path = None
        if cfg.plot and history and main:
            plot_path = os.path.join(cfg.output_dir, "metrics.png")
            self._write("metrics.png", cfg.output_dir, last_ckpt, plot_metrics, history, plot_path)
        return {
            "history": history,
            "first_score": history[0]["score_mean"] if history else float("nan"),
            "last_score": history[-1]["score_mean"] if history else float("nan"),
            "checkpoint": last_ckpt,
            "model_dir": model_dir,
            "metrics": metrics_path,
            "plot": plot_path,
            "interrupted": stop.signal if self.step < cfg.iterations else None,
        }

    def _save_checkpoint(self, last: str | None) -> str:
        root = checkpoint.checkpoint_root(self.config.output_dir)
        return self._write(f"checkpoint step-{self.step:08d}", root, last, self.save_checkpoint)

    def _write(self, what: str, where: str, last: str | None, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; a write that fails for want of space becomes one ``DiskFull`` line
        saying what was written where, and which checkpoint is still whole (``last``)."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not checkpoint.disk_full(exc):
                raise
            kept = f"the previous checkpoint, {last}, is intact" if last else "no checkpoint had been written yet"
            raise DiskFull(f"no space left on device (ENOSPC) while writing {what} in {os.path.abspath(where)}; "
                           f"{kept}; free some space, then continue with --resume") from exc


class _StopOnSignal:
    """Within ``with``: the first SIGINT/SIGTERM sets ``signal`` (its name); the second raises KeyboardInterrupt."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        import signal

        name = signal.Signals(signum).name
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = name
        print(f"\nfastppo train: {name} received: finishing this iteration and writing a checkpoint "
              "(send it again to stop at once, without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                num = getattr(signal, name)
                self._previous[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for num, handler in self._previous.items():
            signal.signal(num, handler)
        self._previous.clear()
        return False
