"""Checkpoints that a crash can never leave half-written.

``OUTPUT_DIR/checkpoints/step-00000012/`` holds

* ``actor/``: ``save_pretrained`` of the policy (the full model, or only the LoRA adapter, which
  ``peft.PeftModel.from_pretrained(base, path)`` loads back) and the tokenizer;
* ``critic/``: ``save_pretrained`` of the critic, an ``AutoModelForSequenceClassification``;
* ``trainer_state.pt``: step, optimizer, scheduler, KL coefficient, prompt sampler, and every
  random generator, so a resumed run draws the same numbers the uninterrupted run would have;
* ``config.yaml``: the configuration that wrote it.

Everything is written into a hidden temporary directory next to the final one and then renamed;
a rename within one filesystem is atomic, so a directory named ``step-*`` is always complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def latest_checkpoint(output_dir: str) -> str | None:
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _NAME.match(name))]
    return os.path.join(root, max(steps)[1]) if steps else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save(trainer, step: int) -> str:
    """Write the trainer's state at ``step`` atomically; returns the checkpoint directory."""
    import yaml

    root = checkpoint_root(trainer.config.output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    # Leftovers of writes that crashed; one run writes into one output_dir at a time.
    for name in os.listdir(root):
        if name.startswith(".tmp-step-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}")
    trainer.actor.save_pretrained(os.path.join(tmp, "actor"))
    trainer.tokenizer.save_pretrained(os.path.join(tmp, "actor"))
    trainer.critic.model.save_pretrained(os.path.join(tmp, "critic"))
    torch.save(trainer.state_dict(), os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(trainer.config.to_dict(), f, sort_keys=False)
    if os.path.exists(final):
        # Same step saved twice (a resumed run ending where it started): swap, then drop the old.
        old = final + f".old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    return final


def load(trainer, path: str) -> int:
    """Restore weights, optimizer, scheduler and generators from ``path``; returns its step."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    actor_dir = os.path.join(path, "actor")
    if trainer.config.lora_r > 0:
        from peft import set_peft_model_state_dict

        adapter = os.path.join(actor_dir, "adapter_model.safetensors")
        if not os.path.isfile(adapter):
            raise FileNotFoundError(f"checkpoint {path!r} holds no LoRA adapter; was it written with lora_r=0?")
        result = set_peft_model_state_dict(trainer.actor, load_file(adapter, device=str(trainer.device)))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"adapter in {path!r} does not fit this LoRA config: {result.unexpected_keys[:5]}")
    else:
        saved = AutoModelForCausalLM.from_pretrained(actor_dir, dtype=torch.float32)
        trainer.actor.load_state_dict(saved.state_dict())
    saved_critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(path, "critic"), dtype=torch.float32)
    trainer.critic.model.load_state_dict(saved_critic.state_dict())
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
    trainer.load_state_dict(state)
    return int(state["step"])
