"""The four PPO roles over transformers models: actor, reference, critic, reward.

Shapes used throughout: a rollout is ``[B, L]`` token ids with ``L = P + R`` (left-padded prompt
of width P, right-padded response of width R), an ``attention_mask`` ``[B, L]`` (int64, 1 on real
tokens) and ``position_ids`` ``[B, L]`` counted over real tokens only, so a left-padded prompt sees
the same positions as it would unpadded.
"""

from __future__ import annotations

import copy
import importlib.util
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn

from .config import ConfigError, PPOConfig


def pick_device(config: PPOConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(config.device)
    except RuntimeError:
        raise ConfigError(f"device (--device) must be auto, cpu, cuda or cuda:N; got {config.device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device (--device) {config.device!r} asked for, but torch sees no CUDA device; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device (--device) {config.device!r}: torch sees only {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def pick_attention(config: PPOConfig, device: torch.device) -> str:
    """flash_attention_2 when flash-attn is importable and the run is on a GPU, else sdpa."""
    if config.attn_implementation != "auto":
        return config.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def use_bf16(config: PPOConfig, device: torch.device) -> bool:
    if config.bf16 is not None:
        return bool(config.bf16) and device.type == "cuda"
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, bf16: bool):
    # Master weights stay float32 (AdamW on bf16 weights loses small updates); matmuls run in bf16.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` int64: index of each token among the real tokens of its row (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------
# actor and reference

def load_actor(config: PPOConfig, path: str, device: torch.device, attn: str) -> tuple[nn.Module, nn.Module | None]:
    """Return ``(actor, reference)``; with LoRA the reference is None (the adapter gets disabled)."""
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    actor.to(device)
    reference = None
    if config.lora_r > 0:
        from peft import LoraConfig

        from .config import lora_targets

        lora = LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules=lora_targets(config.lora_target_modules))
        actor = peft_wrap(actor, lora)
    else:
        reference = copy.deepcopy(actor).eval().requires_grad_(False)
    # Dropout stays off for the whole run: the PPO ratio must compare the same function that
    # produced the rollout, and a dropout mask would make it differ from 1 at the first step.
    actor.eval()
    return actor, reference


def peft_wrap(model: nn.Module, peft_config: Any) -> nn.Module:
    """``peft.get_peft_model(model, peft_config)`` without transformers' FutureWarning.

    peft's ``PeftModel.__init__`` asks the model ``is_gradient_checkpointing``, an alias that
    transformers 5.x deprecates (and warns about on every read) in favour of
    ``is_activation_checkpointing``; the warning is about peft's code, not the caller's, so it is
    dropped for this one call, by its message. peft's answer is the same either way (both names
    read the same flag), and ``enable_gradient_checkpointing`` prepares the model itself.
    """
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, peft_config)


# --------------------------------------------------------------------------------------------
# optimizer

_ADAMW_IMPL = "_fastppo_adamw_impl"


def adamw(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``groups`` (the actor's and the critic's parameter groups) on its
    fused implementation, one multi-tensor kernel per step on CPU and CUDA; the foreach one where
    the fused kernel does not take the parameters (a device or dtype it lacks, FSDP2's DTensor
    shards). The per-tensor loop torch falls back to on a CPU costs a Python-level step per
    weight, which shows at a 150k-token vocabulary (issue 22). Same numbers either way, within
    float32 rounding."""
    # torch writes its defaults into the group dicts it is given: a group that went through
    # another optimizer would carry that one's fused/foreach choice over this one's.
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in groups]
    params = [p for g in groups for p in g["params"]]
    opt = None
    if not any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params):
        try:
            opt = torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):
            opt = None
    if opt is None:
        opt = torch.optim.AdamW(groups, weight_decay=weight_decay, foreach=True)
    object.__setattr__(opt, _ADAMW_IMPL, {k: opt.param_groups[0][k] for k in ("fused", "foreach")})
    return opt


def keep_adamw_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict``: torch copies the saved groups' ``fused``/``foreach``
    flags over the ones this run chose (a checkpoint written by the per-tensor AdamW would bring the
    per-tensor loop back), so they are set again, and the step counters moved to the parameters'
    device, where the fused kernel reads them."""
    impl = getattr(optimizer, _ADAMW_IMPL, None)
    if impl is None:
        return
    for group in optimizer.param_groups:
        group.update(impl)
        if impl["fused"]:
            for p in group["params"]:
                st = optimizer.state.get(p)
                if st and torch.is_tensor(st.get("step")) and st["step"].device != p.device:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# gradient checkpointing

_CHECKPOINTED = "_fastppo_checkpointed_layers"


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' per-layer activation checkpointing in ``model`` (a transformers or peft
    model), non-reentrant, for the forwards that :func:`checkpointing` activates.

    Non-reentrant checkpointing needs no input that requires grad, so a LoRA model whose embeddings
    are frozen still gets its gradients; transformers also registers its input-require-grads hook.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing (--gradient-checkpointing): {type(base).__name__} does not "
                          "support gradient checkpointing; leave it off for this model")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ConfigError(f"gradient_checkpointing (--gradient-checkpointing): {type(base).__name__} has no "
                          "checkpointable decoder layers; leave it off for this model")
    object.__setattr__(model, _CHECKPOINTED, layers)  # a plain list: not registered as submodules


@contextmanager
def checkpointing(model: nn.Module) -> Iterator[None]:
    """Within ``with``: the checkpointed layers of ``model`` recompute their activations in backward.

    transformers checkpoints a layer only while the layer is in training mode, and fastppo keeps every
    model in eval mode (no dropout, so the PPO ratio compares the function that sampled). So only the
    decoder-layer modules themselves are flagged as training, their submodules (attention, dropout)
    stay in eval, and only for forwards that build a graph: generation (with its KV cache) and the
    no-grad rollout passes run as before.
    """
    layers = getattr(model, _CHECKPOINTED, None)
    if not layers or not torch.is_grad_enabled():
        yield
        return
    before = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, flag in zip(layers, before):
            m.training = flag


@contextmanager
def reference_policy(actor: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The frozen reference: a separate copy, or the LoRA actor with its adapter switched off."""
    if reference is not None:
        yield reference
    else:
        with actor.disable_adapter():
            yield actor


# Config attributes of causal LMs whose logits are not the plain ``hidden @ lm_head.weight.T``:
# a final-logit softcap (Gemma 2/3) or a scale on the logits (Cohere, Granite). Their log-probs go
# through the model's own logits.
_NOT_A_PLAIN_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_noticed: set[str] = set()


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, output embedding) when the log-probs can come from the last hidden state through
    ``fastppo.linear_logprobs``, else None (after a one-line notice saying why).

    Any ``AutoModelForCausalLM`` (or a peft model around one) whose head is a plain ``nn.Linear``
    qualifies, tied embeddings included; a LoRA adapter on the head itself, a logit softcap or a
    logit scale do not.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    reason = None
    if backbone is None or not isinstance(backbone, nn.Module):
        reason = "no backbone under its base_model_prefix"
    elif type(head) is not nn.Linear:
        reason = f"its output embedding is a {type(head).__name__}, not a plain nn.Linear"
    else:
        for name in _NOT_A_PLAIN_HEAD:
            value = getattr(config, name, None)
            if value not in (None, 1.0, 1):
                reason = f"its config sets {name}={value}"
                break
    if reason is None:
        return backbone, head
    key = f"{type(base).__name__}: {reason}"
    if key not in _noticed:
        _noticed.add(key)
        import sys

        print(f"fastppo: {type(base).__name__} log-probs go through the full logits ({reason})", file=sys.stderr)
    return None


def logits_rows(model: nn.Module, rows: int | torch.Tensor) -> dict[str, Any]:
    """Keyword arguments that make ``model``'s forward apply its LM head only at ``rows`` (an int:
    the last ``rows`` positions; a 1-D int64 tensor: those positions), or ``{}`` for a model whose
    forward has no ``logits_to_keep`` (then it builds logits at every position, as before).

    transformers' causal LMs take ``logits_to_keep`` and slice the hidden states before the head,
    so the ``[B, L, V]`` logits of positions nobody samples or scores are never formed.
    """
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        accepts = "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return {"logits_to_keep": rows} if accepts else {}


def _response_head_inputs(model, parts, seq, attn, pos, prompt_width):
    """(hidden ``[B, R, H]``, weight, bias) at the response positions for the fused head ``parts``."""
    backbone, head = parts
    with checkpointing(model):
        hidden = backbone(input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    hidden = hidden[:, prompt_width - 1 : -1]
    # Under autocast the hidden states are bf16 while the head's weight is float32; the logits
    # path multiplies them in bf16 too.
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    return hidden, weight, bias


def response_policy_loss(model: nn.Module, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
                         prompt_width: int, temperature: float, **loss_kwargs):
    """``fastppo.linear_ppo_loss`` of the response tokens (``loss_kwargs``: its keyword
    arguments), or None unless the head is fused (:func:`fused_head`) and frozen, as a LoRA
    actor's is: then the forward forms d loss / d hidden and the head costs no vocabulary matmul
    in the backward, nor the entropy's gradient matmul when ``ent_coef`` is 0."""
    import fastppo

    parts = fused_head(model)
    if parts is None or parts[1].weight.requires_grad or (parts[1].bias is not None and parts[1].bias.requires_grad):
        return None
    hidden, weight, bias = _response_head_inputs(model, parts, seq, attn, pos, prompt_width)
    return fastppo.linear_ppo_loss(hidden, weight, seq[:, prompt_width:], bias=bias, temperature=temperature,
                                   **loss_kwargs)


def response_logprobs(model: nn.Module, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
                      prompt_width: int, mask: torch.Tensor, temperature: float, fused: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy of the response tokens under ``model``.

    With ``fused`` (and a model :func:`fused_head` accepts) the LM head is applied only at the
    response positions, through ``fastppo.linear_logprobs``: the ``[B, L, V]`` logits never exist.
    Otherwise the model's own logits, sliced to the response.

    Args: seq/attn/pos ``[B, P + R]``; mask ``[B, R]`` bool. Returns two float32 ``[B, R]``
    tensors, 0 at masked positions. The state at position t scores token t + 1, hence the shift.
    """
    import fastppo

    labels = seq[:, prompt_width:]
    parts = fused_head(model) if fused else None
    if parts is not None:
        hidden, weight, bias = _response_head_inputs(model, parts, seq, attn, pos, prompt_width)
        return fastppo.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                       return_entropy=True, mask=mask)
    # Only the R states that score a response token go through the head (position t scores t + 1).
    scored = torch.arange(prompt_width - 1, seq.shape[1] - 1, device=seq.device)
    keep = logits_rows(model, scored)
    with checkpointing(model):
        logits = model(input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False, **keep).logits
    if not keep:
        logits = logits[:, prompt_width - 1 : -1]
    return fastppo.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True, mask=mask)


# --------------------------------------------------------------------------------------------
# critic and reward: a sequence-classification model read at every token, or at the last one

def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone and the linear scoring head of an ``AutoModelForSequenceClassification``, or of a
    peft model around one (then the head is peft's trainable copy wrapper around the linear layer)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    backbone = getattr(model, model.base_model_prefix, None)
    head = getattr(model, "score", None)
    linear = getattr(head, "original_module", head)  # peft's ModulesToSaveWrapper keeps the layer there
    if backbone is None or not isinstance(linear, nn.Linear):
        raise ConfigError(
            f"{type(model).__name__}: expected a decoder sequence-classification model with a "
            f"`{model.base_model_prefix}` backbone and a linear `score` head")
    return backbone, head


class TokenScorer(nn.Module):
    """A sequence-classification model applied at every position: ``[B, L]`` float32 scores.

    Used as the critic (trained, one value per token) and as the reward model (frozen, read at
    the last real token). Keeps the whole ``AutoModelForSequenceClassification`` so that
    ``save_pretrained`` writes a directory transformers loads back as one.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        _split_head(model)  # fail at construction, not at the first forward
        self.model = model

    # Properties rather than submodules, so state_dict() holds each weight once under `model.`.
    @property
    def backbone(self) -> nn.Module:
        return _split_head(self.model)[0]

    @property
    def head(self) -> nn.Module:
        return _split_head(self.model)[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``[B, stop - start]`` float32 scores of positions ``start:stop`` (all by default): the
        head reads only those hidden states (the critic asks for the response positions only)."""
        with checkpointing(self.model):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
        return self.head(hidden[:, start:stop])[..., 0].float()

    def score_last(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                   last: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32: the score at index ``last[b]`` (int64 ``[B]``) of each row."""
        with checkpointing(self.model):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
        # The head reads one hidden state per row, not all L of them.
        picked = hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1]))
        return self.head(picked)[:, 0, 0].float()


def load_critic(config: PPOConfig, path: str, from_reward: bool, device: torch.device, attn: str) -> TokenScorer:
    """Value model: the reward model's backbone and head, or the actor's backbone and a zero head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # Loading a causal LM as a classifier always warns that `score` is new; that is the point here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, attn_implementation=attn, dtype=torch.float32, ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    critic = TokenScorer(model)
    if not from_reward:
        # A zero head starts every value at 0, a neutral baseline, instead of random offsets
        # that the first updates would have to unlearn.
        with torch.no_grad():
            critic.head.weight.zero_()
            if critic.head.bias is not None:
                critic.head.bias.zero_()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None)
    return critic.to(device).eval()


def critic_with_lora(config: PPOConfig, critic: TokenScorer) -> TokenScorer:
    """The critic with its backbone frozen under a LoRA adapter (peft, ``SEQ_CLS``, rank
    ``critic_lora_r``, the actor's target modules and dropout) and its value head trained whole
    (peft's ``modules_to_save``); ``save_pretrained`` then writes the adapter and the head only."""
    import os

    from peft import LoraConfig

    from .config import lora_targets

    lora = LoraConfig(task_type="SEQ_CLS", r=config.critic_lora_r, lora_alpha=config.critic_lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=lora_targets(config.lora_target_modules))
    model = peft_wrap(critic.model, lora)
    for cfg in model.peft_config.values():  # loadable from any working directory, as the actor's adapter
        if cfg.base_model_name_or_path and os.path.isdir(cfg.base_model_name_or_path):
            cfg.base_model_name_or_path = os.path.abspath(cfg.base_model_name_or_path)
    return TokenScorer(model).eval()


def apply_memory_switches(config: PPOConfig, actor: nn.Module, critic: TokenScorer | None) -> TokenScorer | None:
    """``--critic-lora-r`` and ``--gradient-checkpointing`` on the models however they were made (from
    directories or given in memory); returns the critic to use. Call it after the reference copy exists."""
    if critic is not None and config.critic_lora_r > 0 and not hasattr(critic.model, "peft_config"):
        critic = critic_with_lora(config, critic)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(actor)
        if critic is not None:
            enable_gradient_checkpointing(critic.model)
    return critic


def load_reward_model(path: str, device: torch.device, attn: str) -> TokenScorer:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ConfigError(f"reward model {path!r} has num_labels={model.config.num_labels}; expected 1 (a scalar score)")
    return TokenScorer(model).to(device).eval().requires_grad_(False)
