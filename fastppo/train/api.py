"""In-memory models for ``PPOTrainer(config, model=..., reward_model=..., value_model=..., ...)``.

TRL users hold their policy, reward model and value model as transformers (or peft) objects and
their prompts as a ``datasets.Dataset``; these helpers turn them into the trainer's roles the way
``models.py`` does for directories: the actor (full, or LoRA through ``peft_config`` / a
``PeftModel``), its reference (a frozen copy, or the adapter disabled), the critic and the reward.
"""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Any

import torch
from torch import nn

from .config import ConfigError, PPOConfig


def is_peft(model: nn.Module) -> bool:
    """A peft model (its reference is the same model with the adapter disabled)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def base_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if is_peft(model) else model


def local_dir(model: nn.Module | None) -> str | None:
    """The absolute directory a model was loaded from, when it is one on this machine."""
    path = getattr(getattr(base_of(model), "config", None), "_name_or_path", None) if model is not None else None
    return os.path.abspath(path) if isinstance(path, str) and path and os.path.isdir(path) else None


def embedding_rows(model: nn.Module) -> int | None:
    """How many token ids the model can read: its input embedding's rows."""
    emb = base_of(model).get_input_embeddings() if hasattr(base_of(model), "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def check_objects(model, reward_model, value_model, tokenizer, train_dataset, config: PPOConfig) -> None:
    """``ConfigError`` for in-memory inputs that cannot work together (before anything moves)."""
    for what, obj in (("model", model), ("reward_model", reward_model), ("value_model", value_model)):
        if obj is not None and not isinstance(obj, nn.Module):
            raise ConfigError(f"{what} must be a transformers model (an nn.Module) or a directory path, "
                              f"got {type(obj).__name__}")
    if model is not None and config.model is not None:
        raise ConfigError(f"model was given both in memory and as config.model {config.model!r}; give one")
    if reward_model is not None and config.reward_model is not None:
        raise ConfigError("reward_model was given both in memory and as config.reward_model; give one")
    if value_model is not None and config.critic_model is not None:
        raise ConfigError("value_model was given both in memory and as config.critic_model; give one")
    if train_dataset is not None and config.dataset is not None:
        raise ConfigError("train_dataset was given together with config.dataset; give one")
    if value_model is not None and config.advantage_estimator != "gae":
        raise ConfigError(f"value_model is given, but advantage_estimator (--advantage-estimator) "
                          f"{config.advantage_estimator} uses no critic; leave it out or use gae")
    for what, obj in (("reward_model", reward_model), ("value_model", value_model)):
        if obj is None:
            continue
        n = getattr(getattr(obj, "config", None), "num_labels", 1)
        if n != 1:
            raise ConfigError(f"{what} has num_labels={n}; expected 1 (a scalar score per position)")
        if not isinstance(getattr(obj, "score", None), nn.Linear):
            raise ConfigError(f"{what} ({type(obj).__name__}) must be a sequence-classification model with a linear "
                              "`score` head, as AutoModelForSequenceClassification(num_labels=1) builds")
    if model is not None:
        if tokenizer is None and local_dir(model) is None:
            raise ConfigError("an in-memory model needs its tokenizer: pass tokenizer= (TRL's processing_class)")
        if train_dataset is None and config.dataset is None:
            raise ConfigError("an in-memory model needs prompts: pass train_dataset= (a datasets.Dataset or a list "
                              "of dicts) or config.dataset (a file)")
    rows = embedding_rows(model) if model is not None else None
    for what, obj in (("reward_model", reward_model), ("value_model", value_model)):
        other = embedding_rows(obj) if obj is not None else None
        if rows and other and other < rows:
            raise ConfigError(f"{what} embeds {other} token ids but the policy can produce {rows}; it reads the "
                              "policy's token ids, so both must share one tokenizer")


def note_defaults(config: PPOConfig, model: nn.Module | None) -> None:
    """With the policy in memory, as TRL's ``PPOTrainer`` takes it, say once (stderr) which options
    the config leaves at fastppo's defaults where TRL's differ (a batch of 64 responses, not 8...)."""
    if model is not None:
        from .config import note_trl_defaults

        note_trl_defaults(config)


def adapter_settings(model: nn.Module | None, peft_config: Any) -> dict[str, Any]:
    """The ``PPOConfig`` LoRA options that describe an adapter given as ``peft_config`` or inside a
    ``PeftModel`` (empty without one), so that the run's config, checkpoints and fingerprint say
    it trains an adapter. A non-LoRA peft method counts as rank 1."""
    cfg = peft_config
    if cfg is None and model is not None and is_peft(model):
        cfg = model.peft_config[getattr(model, "active_adapter", None) or next(iter(model.peft_config))]
    if cfg is None:
        return {}
    out: dict[str, Any] = {"lora_r": int(getattr(cfg, "r", 1) or 1)}
    alpha = getattr(cfg, "lora_alpha", None)
    if isinstance(alpha, (int, float)) and alpha >= 1 and float(alpha).is_integer():
        out["lora_alpha"] = int(alpha)
    dropout = getattr(cfg, "lora_dropout", None)
    if isinstance(dropout, (int, float)) and 0 <= dropout < 1:
        out["lora_dropout"] = float(dropout)
    targets = getattr(cfg, "target_modules", None)
    if isinstance(targets, (list, set, tuple)) and targets:
        out["lora_target_modules"] = ",".join(sorted(targets))
    elif targets == "all-linear":
        out["lora_target_modules"] = "all-linear"
    return out


def prepare_actor(config: PPOConfig, model: nn.Module, ref_model: nn.Module | None, peft_config: Any,
                  device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """``(actor, reference)`` from a model in memory.

    A ``PeftModel`` trains its adapter; ``peft_config`` (a peft ``LoraConfig`` ...) or ``config.lora_r``
    wraps a plain model in one. The reference is ``ref_model`` when given, else the adapter disabled
    (peft), else a frozen copy of the starting model.
    """
    if peft_config is not None and is_peft(model):
        raise ConfigError("model is already a peft model; leave peft_config out (or pass the base model)")
    from .models import peft_wrap

    if peft_config is not None:
        model = peft_wrap(model, peft_config)
    elif config.lora_r > 0 and not is_peft(model):
        from peft import LoraConfig

        from .config import lora_targets

        model = peft_wrap(model, LoraConfig(
            task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=lora_targets(config.lora_target_modules)))
    model.to(device)
    if ref_model is not None:
        reference = ref_model.to(device).eval().requires_grad_(False)
    elif is_peft(model):
        reference = None
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    # Dropout off for the whole run: the PPO ratio must compare the function that made the rollout.
    model.eval()
    return model, reference


def set_adapter_base(actor: nn.Module, path: str | None) -> None:
    """Write ``path`` (absolute) as the adapter's base model, so ``AutoPeftModelForCausalLM`` finds
    the base from any working directory."""
    if not is_peft(actor) or path is None:
        return
    for cfg in actor.peft_config.values():
        cfg.base_model_name_or_path = os.path.abspath(path)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a model, LoRA layers left out and their wrapped weights under their own names."""
    out = {}
    for name, t in base_of(model).state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t
    return out


def critic_from_actor(actor: nn.Module, device: torch.device, attn: str):
    """A value model on the starting actor's backbone with a zero head (every value starts at 0)."""
    from transformers import AutoModelForSequenceClassification

    from .models import TokenScorer

    base = base_of(actor)
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = 1
    cfg._attn_implementation = attn
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = getattr(cfg, "eos_token_id", None)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=base.dtype)
    prefix = model.base_model_prefix
    state = {k: v for k, v in _plain_state(actor).items() if k.startswith(prefix + ".")}
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("score.")]
    if missing:
        raise ConfigError(f"cannot build a value model from the policy ({type(base).__name__}): its backbone lacks "
                          f"{missing[:3]}; pass value_model=")
    critic = TokenScorer(model)
    with torch.no_grad():
        critic.head.weight.zero_()
        if critic.head.bias is not None:
            critic.head.bias.zero_()
    return critic.to(device).eval()


def identity(model: nn.Module | None) -> dict[str, Any] | None:
    """What a checkpoint's fingerprint records of a model given in memory: its config and a sample
    of its starting weights (LoRA weights left out: a resumed run reads them from the checkpoint)."""
    if model is None:
        return None
    data = base_of(model).config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "_attn_implementation"):
        data.pop(key, None)
    digest = hashlib.sha256()
    for name, t in sorted(_plain_state(model).items()):
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:256], flat[-256:]]).float().cpu()
        digest.update(f"{name}:{tuple(t.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    import json

    return {"config": json.loads(json.dumps(data, default=str)), "weights_sample_sha256": digest.hexdigest()}
