"""Checkpoints that a crash can never leave half-written, and that can never run code when read.

``OUTPUT_DIR/checkpoints/step-00000012/`` holds

* ``actor/``: ``save_pretrained`` of the policy (the full model, or only the LoRA adapter, which
  ``peft.PeftModel.from_pretrained(base, path)`` loads back) and the tokenizer;
* ``critic/``: ``save_pretrained`` of the critic, an ``AutoModelForSequenceClassification`` (with
  ``critic_lora_r``, its LoRA adapter and the value head, for ``PeftModel.from_pretrained``)
  (absent for the critic-free estimators grpo, rloo and reinforce++, which have no critic);
* ``trainer_state.json`` + ``trainer_state.safetensors``: step, optimizer, scheduler, KL
  coefficient, prompt sampler, and every random generator, so a resumed run draws the same
  numbers the uninterrupted run would have. The structure is JSON and the tensors are
  safetensors (``safestate``): nothing in a checkpoint is ever unpickled, not even by
  ``torch.load(weights_only=True)``'s restricted unpickler, so no planted payload can run.
  Weights are read from safetensors files only. Several ranks write this same layout
  (``distributed.save``, with every rank's generators) and read it with :func:`read`; a
  ``dcp/`` folder (``torch.distributed.checkpoint``, which unpickles) or a ``trainer_state.pt``
  (format 2, a pickle) is never read;
* ``fingerprint.json``: what the run must share with a run that resumes it (every option that
  changes the experiment, the model configs and a hash of the prompts);
* ``config.yaml``: the configuration that wrote it.

At the end of a finished run ``save_final`` also writes the policy and its tokenizer into
``OUTPUT_DIR`` itself and the critic into ``OUTPUT_DIR/critic``; ``check_run_dir`` keeps a new run
out of a directory that holds another one unless ``overwrite`` (``clear_outputs``) or ``resume``.
Every path a run writes in ``OUTPUT_DIR`` is listed in ``OUTPUT_DIR/fastppo_run.json``
(``record_outputs``) before it is written; ``overwrite`` removes those and nothing else.

Everything is written into a hidden temporary directory next to the final one, every file and
directory in it is fsync'ed, and it is then renamed; a rename within one filesystem is atomic,
so a directory named ``step-*`` is always complete. ``--resume`` still checks each checkpoint
as it reads it and falls back to the newest one that reads back whole.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from typing import Any, Callable

import torch

from . import safestate
from .api import is_peft
from .config import ConfigError

_NAME = re.compile(r"^step-(\d+)$")
_OLD = re.compile(r"^(?:\.old-(step-\d+)-\d+|(step-\d+)\.old-\d+)$")  # the second: written by fastppo 0.1
STATE = "trainer_state.json"  # the structure of the trainer state; its tensors are in STATE_TENSORS
STATE_TENSORS = "trainer_state.safetensors"
FINGERPRINT = "fingerprint.json"
FORMAT = 3  # 3: JSON + safetensors; 2 was trainer_state.pt (a pickle read with weights_only=True) and
# 1 a pickle with numpy arrays: neither is ever read (unpickling is what a checkpoint must not need)

# Options a resumed run may change: how long and where it runs, not what it computes.
RUNTIME_OPTIONS = frozenset({
    "iterations", "resume", "output_dir", "save_every", "progress", "plot", "report_to", "device", "attn_implementation",
    "bf16", "num_threads", "fused_head", "gradient_checkpointing",
    "model", "critic_model", "reward_model", "dataset"})  # paths: their contents count


# Options added after checkpoints of this FORMAT were first written, with the value that a
# checkpoint lacking them was written with (so older checkpoints still resume).
_ADDED_OPTIONS = {"advantage_estimator": "gae", "num_generations": 1, "kl_loss_coef": 0.0,
                  "critic_lora_r": 0, "critic_lora_alpha": 16}


class CheckpointError(Exception):
    """A checkpoint directory that does not read back whole (truncated, empty or missing files)."""


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def _tidy(root: str) -> None:
    """Drop what crashed writes left behind; put back a checkpoint a crash left renamed aside."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".tmp-step-"):
            shutil.rmtree(path, ignore_errors=True)
        elif (m := _OLD.match(name)):
            final = os.path.join(root, m.group(1) or m.group(2))
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
            else:  # the crash came between the two renames of a same-step save: the old one is the good one
                os.rename(path, final)


def checkpoints(output_dir: str) -> list[str]:
    """Checkpoint directories under ``output_dir``, newest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    _tidy(root)
    steps = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _NAME.match(name))]
    return [os.path.join(root, name) for _, name in sorted(steps, reverse=True)]


def latest_checkpoint(output_dir: str) -> str | None:
    found = checkpoints(output_dir)
    return found[0] if found else None


# --------------------------------------------------------------------------------------------
# random generators, as tensors and plain values

def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np

        name, key, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["name"], s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


# --------------------------------------------------------------------------------------------
# fingerprint: what a resumed run must share with the run that wrote the checkpoint

def _model_identity(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        data = json.load(f)
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"):
        data.pop(key, None)
    # Two fine-tunes of one base share a config.json: a cheap sample of the weight files tells them apart.
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")):
            file = os.path.join(path, name)
            size = os.path.getsize(file)
            digest.update(f"{name}:{size}:".encode())
            with open(file, "rb") as f:
                digest.update(f.read(1 << 16))
                f.seek(max(0, size - (1 << 16)))
                digest.update(f.read(1 << 16))
    return {"config": data, "weights_sample_sha256": digest.hexdigest()}


def fingerprint(config, model_path: str | None, prompts: list[Any],
                objects: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON-able description of the experiment: options, model configs, prompts.

    ``objects`` maps roles (``actor``, ``critic``, ``reward_model``) to models given in memory, which
    stand in for the directory of that role.
    """
    from .api import identity

    objects = objects or {}
    options = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_OPTIONS}
    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    critic_path = config.critic_model or config.reward_model or model_path
    if getattr(config, "advantage_estimator", "gae") != "gae":
        critic_path = None  # critic-free: no critic model is part of the experiment

    def role(name: str, path: str | None) -> dict[str, Any] | None:
        return identity(objects[name]) if objects.get(name) is not None else _model_identity(path)

    critic = role("critic", critic_path) if critic_path is not None or objects.get("critic") is not None else None
    return {"options": json.loads(json.dumps(options, default=str)), "actor": role("actor", model_path),
            "critic": critic, "reward_model": role("reward_model", config.reward_model),
            "prompts": {"count": len(prompts), "sha256": digest}}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for name in sorted(set(old.get("options", {})) | set(new["options"])):
        # Options added after a checkpoint was written read as their default there.
        a = old.get("options", {}).get(name, _ADDED_OPTIONS.get(name, "unset"))
        b = new["options"].get(name, "unset")
        if a != b:
            out.append(f"{name} is {b!r} now, was {a!r}")
    for role in ("actor", "critic", "reward_model"):
        a, b = old.get(role) or {}, new[role] or {}
        if a != b:
            ca, cb = a.get("config") or {}, b.get("config") or {}
            keys = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
            what = (f"config.json: {', '.join(keys[:4])}" if keys else "its weights" if a and b else
                    "given now" if b else "not given now")
            out.append(f"the {role.replace('_', ' ')} model differs ({what})")
    if old.get("prompts") != new["prompts"]:
        out.append(f"the prompts differ ({new['prompts']['count']} now, {old.get('prompts', {}).get('count')} then)")
    return out


def check_fingerprint(path: str, expected: dict[str, Any]) -> bool:
    """Raise ``ConfigError`` when ``path`` was written by a different experiment; False if it has none."""
    try:
        with open(os.path.join(path, FINGERPRINT), encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(found, dict):
        return False
    diff = _differences(found, expected)
    if diff:
        more = f" (and {len(diff) - 2} more)" if len(diff) > 2 else ""
        raise ConfigError(
            f"--resume: {path} was written by a different run: {'; '.join(diff[:2])}{more}; resume with the "
            "options, models and prompts it was written with, or choose another --output-dir")
    return True


# --------------------------------------------------------------------------------------------
# writing

def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # pragma: no cover - platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in _WRITE_FAILED:  # the data never reached the disk: the write failed
            raise
        # otherwise a filesystem without fsync on directories
    finally:
        os.close(fd)


def fsync_tree(top: str) -> None:
    """fsync every file, then every directory bottom-up, under ``top`` (``top`` included)."""
    for dirpath, _, files in os.walk(top, topdown=False):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath, directory=True)


_WRITE_FAILED = (errno.ENOSPC, errno.EDQUOT, errno.EIO)
# How a full disk reads when a writer reports it without an errno: safetensors' IoError (its Rust
# io::Error, "StorageFull"), and torch's zip writer, whose short write surfaces as a position
# mismatch ("[enforce fail at inline_container.cc:672] . unexpected pos N vs M") or a failed write.
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "storagefull", "os error 28",
                  "unexpected pos", "file write failed")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a write that failed for want of
    space: ``OSError`` ENOSPC/EDQUOT, or the torch/safetensors forms of it (``_NO_SPACE_TEXT``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return True
        elif any(text in str(exc).lower() for text in _NO_SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def save(trainer, step: int) -> str:
    """Write the trainer's state at ``step`` atomically; returns the checkpoint directory.

    A write that fails (a full disk) removes the partial temporary directory and raises: the
    previous checkpoints are untouched."""
    import yaml

    root = checkpoint_root(trainer.config.output_dir)
    os.makedirs(root, exist_ok=True)
    _tidy(root)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}")
    try:
        trainer.actor.save_pretrained(os.path.join(tmp, "actor"))
        trainer.tokenizer.save_pretrained(os.path.join(tmp, "actor"))
        if trainer.critic is not None:  # critic-free estimators (grpo, rloo, reinforce++) have none to save
            trainer.critic.model.save_pretrained(os.path.join(tmp, "critic"))
        write_state(trainer.state_dict(), tmp)
        with open(os.path.join(tmp, FINGERPRINT), "w", encoding="utf-8") as f:
            json.dump(trainer.fingerprint, f, indent=1, sort_keys=True)
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(trainer.config.to_dict(), f, sort_keys=False)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial files took
        raise
    if os.path.exists(final):
        # Same step saved twice (a run resumed from an older checkpoint reaching a step that an
        # unusable checkpoint holds): move the old one aside, put the new one in, drop the old.
        # A crash in between leaves `.old-step-N-PID`, which _tidy puts back as step-N.
        old = os.path.join(root, f".old-step-{step:08d}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        _fsync(root, directory=True)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root, directory=True)
    return final


# --------------------------------------------------------------------------------------------
# reading

_STATE_KEYS = ("format", "step", "optimizer", "scheduler", "kl_coef", "sampler", "shuffle_gen", "rng")


def write_state(state: dict[str, Any], directory: str) -> None:
    """Write a trainer state into ``directory`` as STATE (JSON) and STATE_TENSORS (safetensors)."""
    safestate.save(state, os.path.join(directory, STATE), os.path.join(directory, STATE_TENSORS))


def _read_state(path: str) -> dict[str, Any]:
    file, tensors = os.path.join(path, STATE), os.path.join(path, STATE_TENSORS)
    for name, f in ((STATE, file), (STATE_TENSORS, tensors)):
        if not os.path.isfile(f):
            old = " (only a trainer_state.pt of an older fastppo, a pickle, which is never read)" \
                if os.path.isfile(os.path.join(path, "trainer_state.pt")) else ""
            raise CheckpointError(f"{name} is missing{old}")
    try:
        state = safestate.load(file, tensors)
    except (OSError, ValueError) as exc:  # a damaged file, or one that is not a state of ours
        why = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"the trainer state ({STATE}, {STATE_TENSORS}) cannot be read ({type(exc).__name__}: "
                              f"{why}); nothing in it was run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{STATE} is not a fastppo checkpoint of format {FORMAT}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{STATE} lacks {missing}")
    return state


def _read_model(cls, directory: str, what: str) -> dict[str, torch.Tensor]:
    from transformers.utils import logging as hf_logging

    if not os.path.isdir(directory):
        raise CheckpointError(f"{what}/ is missing")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(directory, dtype=torch.float32, use_safetensors=True,
                                          output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - missing, empty or truncated weights, a broken config.json
        raise CheckpointError(f"{what}/ cannot be loaded: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "unexpected_keys") and v}
    if bad:
        raise CheckpointError(f"{what}/ does not hold the whole model: {bad}")
    return model.state_dict()


def _read_adapter(model, directory: str, what: str, option: str) -> dict[str, torch.Tensor]:
    """The LoRA adapter (and peft's modules_to_save) in ``directory``, checked against ``model``'s."""
    from peft import get_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(adapter):
        raise CheckpointError(f"{what}/ holds no LoRA adapter (was it written with {option}=0?)")
    try:
        weights = load_file(adapter)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what}/adapter_model.safetensors cannot be read: {exc}") from None
    want = get_peft_model_state_dict(model)
    if set(weights) != set(want) or any(weights[k].shape != want[k].shape for k in want):
        raise CheckpointError(f"{what}/ holds an adapter that does not fit this LoRA configuration")
    return weights


def read(trainer, path: str) -> dict[str, Any]:
    """Everything in ``path``, checked and in memory; raises ``CheckpointError`` if any part is unusable."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    state = _read_state(path)
    actor_dir = os.path.join(path, "actor")
    if trainer.config.lora_r > 0:
        actor = _read_adapter(trainer.actor, actor_dir, "actor", "lora_r")
    else:
        actor = _read_model(AutoModelForCausalLM, actor_dir, "actor")
    critic = None
    if trainer.critic is not None and getattr(trainer.config, "critic_lora_r", 0) > 0:
        critic = _read_adapter(trainer.critic.model, os.path.join(path, "critic"), "critic", "critic_lora_r")
    elif trainer.critic is not None:
        critic = _read_model(AutoModelForSequenceClassification, os.path.join(path, "critic"), "critic")
    return {"actor": actor, "critic": critic, "state": state}


def apply(trainer, loaded: dict[str, Any]) -> int:
    if trainer.config.lora_r > 0:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.actor, {k: v.to(trainer.device) for k, v in loaded["actor"].items()})
    else:
        trainer.actor.load_state_dict(loaded["actor"])
    if trainer.critic is not None and getattr(trainer.config, "critic_lora_r", 0) > 0:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.critic.model, {k: v.to(trainer.device) for k, v in loaded["critic"].items()})
    elif trainer.critic is not None:
        trainer.critic.model.load_state_dict(loaded["critic"])
    trainer.load_state_dict(loaded["state"])
    return int(loaded["state"]["step"])


def load(trainer, path: str) -> int:
    """Restore weights, optimizer, scheduler and generators from ``path``; returns its step."""
    return apply(trainer, read(trainer, path))


def precheck(trainer, candidates: list[str]) -> None:
    """Before any weights load: refuse a directory whose newest readable fingerprint differs."""
    for path in candidates:
        if check_fingerprint(path, trainer.fingerprint):
            return


def load_newest(candidates: list[str], fingerprint: dict[str, Any], load: Callable[[str], None],
                announce: bool = True) -> str | None:
    """Call ``load(path)`` on ``candidates`` (newest first) until one neither has another
    fingerprint nor raises ``CheckpointError``; returns that path (``None`` without candidates).

    Each skipped checkpoint is a warning on stderr (where ``announce``: one rank speaks for all);
    ``ConfigError`` if there are candidates and none is usable. Shared by the single-process and
    the multi-process resume, which differ only in how one checkpoint loads.
    """
    skipped: list[str] = []
    for path in candidates:
        try:
            if not check_fingerprint(path, fingerprint):  # ConfigError when it differs
                raise CheckpointError(f"{FINGERPRINT} is missing or unreadable")
            load(path)
        except CheckpointError as exc:
            skipped.append(f"{os.path.basename(path)}: {exc}")
            continue
        if announce:  # only when falling back; a refusal says it all in its one line
            for line in skipped:
                print(f"fastppo train: warning: skipped checkpoint {line}; resuming from {os.path.basename(path)}",
                      file=sys.stderr, flush=True)
        return path
    if skipped:
        raise ConfigError(f"--resume: no usable checkpoint under {os.path.dirname(candidates[0])} "
                          f"({'; '.join(skipped)}); remove them to start over, or choose another --output-dir")
    return None


def ranks_notice(path: str, state: dict[str, Any], world: int) -> None:
    """One line on stderr when ``path`` (its trainer ``state``) was written by another number of
    processes than the ``world`` resuming it (and nothing when it is the same)."""
    written = int(state.get("world_size", 1))
    if written == world:
        return
    what = ("rank 0's random stream continues (the other ranks' are dropped)" if world == 1
            else "each rank starts a fresh random stream")
    print(f"fastppo train: notice: resuming a checkpoint written by {written} "
          f"{'ranks' if written > 1 else 'process'} on {world} {'processes' if world > 1 else 'process'} "
          f"({os.path.basename(path)}): weights, optimizer and schedule resume exactly; {what}",
          file=sys.stderr, flush=True)


def resume(trainer, candidates: list[str]) -> str | None:
    """Load the newest usable checkpoint of ``candidates`` (newest first), warning about each one
    skipped; ``ConfigError`` if there are some and none is usable. Returns the path loaded."""

    def load(path: str) -> None:
        loaded = read(trainer, path)
        try:
            trainer.step = apply(trainer, loaded)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"its state does not fit this run: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:160]}") from None
        ranks_notice(path, loaded["state"], 1)

    return load_newest(candidates, trainer.fingerprint, load)


# --------------------------------------------------------------------------------------------
# the run directory: one run per directory, and the final model in it

# Clearing the directory changes nothing a run computes; nor does when a diverging run gives up.
RUNTIME_OPTIONS = RUNTIME_OPTIONS | {"overwrite", "max_skipped_steps"}
_ADDED_OPTIONS.update({"chat_template": "auto", "stop_token_id": None, "missing_eos_penalty": None})
# Packed rows and token-budget micro-batches change how the forwards are laid out, not the numbers.
RUNTIME_OPTIONS = RUNTIME_OPTIONS | {"padding_free", "micro_batch_tokens"}

RUN_MARKER = "fastppo_run.json"
_FINAL_TMP = re.compile(r"^\.tmp-final-\d+")


def _marker(output_dir: str) -> dict[str, Any] | None:
    """The run marker of ``output_dir`` (None when there is none); ``ConfigError`` if unreadable."""
    path = os.path.join(output_dir, RUN_MARKER)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"output_dir (--output-dir) {output_dir!r}: {RUN_MARKER} cannot be read ({exc}); it lists "
                          "what a fastppo run wrote there, so nothing can be cleared safely: remove the run's files "
                          "yourself, or choose another --output-dir") from None
    if not (isinstance(data, dict) and isinstance(data.get("written"), list)
            and all(isinstance(n, str) for n in data["written"])):
        raise ConfigError(f"output_dir (--output-dir) {output_dir!r}: {RUN_MARKER} is not a fastppo run marker "
                          "(expected an object with a list of paths under 'written')")
    return data


def record_outputs(output_dir: str, *paths: str) -> None:
    """Add ``paths`` (relative to ``output_dir``; a trailing ``/`` for a directory the run writes
    whole) to the run marker, creating it (so a run's start writes it with none). Called before
    each write: a crash in between leaves a listed path that does not exist, never an unlisted one."""
    data = _marker(output_dir) or {"fastppo_run": 1, "written": []}
    new = [p for p in paths if p not in data["written"]]
    file = os.path.join(output_dir, RUN_MARKER)
    if not new and os.path.exists(file):
        return
    data["written"] += new
    os.makedirs(output_dir, exist_ok=True)
    tmp = f"{file}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, file)


def _listed(output_dir: str, path: str) -> str | None:
    """The absolute path of a marker entry; None for one that would leave ``output_dir`` (the marker
    is a plain file anyone can edit: it never makes fastppo delete outside its directory)."""
    top = os.path.realpath(output_dir)
    rel = path.rstrip("/")
    if not rel or os.path.isabs(rel):
        return None
    # The parent resolved, the name not: a listed path that is now a link is removed as a link.
    full = os.path.join(os.path.realpath(os.path.join(top, os.path.dirname(rel))), os.path.basename(rel))
    return full if full.startswith(top + os.sep) and os.path.basename(rel) not in (".", "..") else None


def previous_outputs(output_dir: str) -> list[str]:
    """Names in ``output_dir`` that another run wrote there (empty when there is none)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name == "checkpoints":
            if os.path.isdir(path) and any(_NAME.match(n) for n in os.listdir(path)):
                found.append(name)
        elif name in ("metrics.jsonl", "adapter_config.json", "model.safetensors", "model.safetensors.index.json",
                      "critic"):
            found.append(name)
    return found


def check_run_dir(config) -> None:
    """``ConfigError`` for a new run (no ``resume``, no ``overwrite``) into another run's directory,
    and for ``overwrite`` of a directory holding files that no fastppo run recorded as its own."""
    if config.resume and config.overwrite:
        raise ConfigError("resume (--resume) continues the run in output_dir and overwrite (--overwrite) clears it; "
                          "give one of them")
    if config.overwrite and os.path.isdir(config.output_dir) and _marker(config.output_dir) is None:
        found = sorted(os.listdir(config.output_dir))
        if found:
            more = f" and {len(found) - 6} more" if len(found) > 6 else ""
            raise ConfigError(f"overwrite (--overwrite): output_dir (--output-dir) {config.output_dir!r} holds "
                              f"{', '.join(found[:6])}{more} but no {RUN_MARKER}, so no fastppo run recorded writing "
                              "them; --overwrite only removes what a fastppo run wrote: move them away, or choose "
                              "another --output-dir")
    if config.resume or config.overwrite:
        return
    found = previous_outputs(config.output_dir)
    if found:
        raise ConfigError(f"output_dir (--output-dir) {config.output_dir!r} holds another run ({', '.join(found)}); "
                          "pass --resume to continue it, --overwrite to replace it, or choose another --output-dir")


def clear_outputs(output_dir: str) -> list[str]:
    """Remove what the run marker lists (never other files, even inside the run's own directories),
    the temporary files fastppo's writers leave, and directories this leaves empty; returns the
    top-level names removed."""
    data = _marker(output_dir) if os.path.isdir(output_dir) else None
    if data is None:
        return []
    removed: set[str] = set()
    parents: set[str] = set()
    for entry in data["written"]:
        path = _listed(output_dir, entry)
        if path is None or not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.add(entry.split("/", 1)[0])
        parents.add(os.path.dirname(path))
    for name in os.listdir(output_dir):  # a crash between a write and its rename
        if _FINAL_TMP.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    root = os.path.realpath(checkpoint_root(output_dir))
    if os.path.isdir(root):
        for name in os.listdir(root):  # what save() leaves when a crash cuts it short
            if name.startswith(".tmp-step-") or _OLD.match(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        parents.add(root)
    top = os.path.realpath(output_dir)
    for parent in sorted(parents, key=len, reverse=True):  # deepest first
        while parent != top and parent.startswith(top + os.sep):
            try:
                os.rmdir(parent)  # only when empty: a user's file keeps its directory
            except OSError:
                break
            parent = os.path.dirname(parent)
    os.remove(os.path.join(output_dir, RUN_MARKER))
    record_outputs(output_dir)  # the run about to start owns nothing here yet
    return sorted(removed)


def save_final(trainer, source: str | None = None) -> str:
    """Write the trained policy (the LoRA adapter, or the whole model) and its tokenizer into
    ``output_dir`` itself, and the critic into ``output_dir/critic``; returns ``output_dir``.

    ``source``: a checkpoint directory of the same step to copy ``actor/`` and ``critic/`` from
    instead of saving the live modules (a multi-process run's modules are FSDP2 shards; its
    checkpoint holds the gathered weights).

    Everything is written into a hidden directory first and then moved in, so a crash leaves
    either the previous files or the new ones, never a half-written weights file.
    """
    out = trainer.config.output_dir
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".tmp-final-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if source is not None:
            shutil.copytree(os.path.join(source, "actor"), tmp)
        else:
            trainer.actor.save_pretrained(tmp)
        trainer.tokenizer.save_pretrained(tmp)
        if trainer.critic is not None:
            if source is not None:
                shutil.copytree(os.path.join(source, "critic"), os.path.join(tmp, "critic"))
            else:
                trainer.critic.model.save_pretrained(os.path.join(tmp, "critic"))
            trainer.tokenizer.save_pretrained(os.path.join(tmp, "critic"))
        readme = os.path.join(tmp, "README.md")  # peft's model card template; never overwrite the user's README
        if os.path.exists(readme):
            os.remove(readme)
        fsync_tree(tmp)
        # Listed file by file (critic/ too), so --overwrite later spares what a user puts beside them.
        record_outputs(out, *sorted(os.path.relpath(os.path.join(d, f), tmp).replace(os.sep, "/")
                                    for d, _, files in os.walk(tmp) for f in files))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: the previous files are still in place
        raise
    # A full model and an adapter in one directory would make from_pretrained pick one silently;
    # only ones a fastppo run wrote are removed.
    stale = (("adapter_config.json", "adapter_model.safetensors") if not is_peft(trainer.actor)
             else ("model.safetensors", "model.safetensors.index.json"))
    listed = set((_marker(out) or {"written": []})["written"])
    for name in stale:
        if name in listed and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    # File by file, each replaced atomically: a directory (critic/) is merged, not swapped, so
    # files a user keeps in it stay.
    for dirpath, _, files in os.walk(tmp):
        target = os.path.join(out, os.path.relpath(dirpath, tmp))
        os.makedirs(target, exist_ok=True)
        for name in files:
            os.replace(os.path.join(dirpath, name), os.path.join(target, name))
        _fsync(target, directory=True)
    shutil.rmtree(tmp, ignore_errors=True)
    _fsync(out, directory=True)
    if is_peft(trainer.actor):
        base = next(iter(trainer.actor.peft_config.values())).base_model_name_or_path
        if not base:  # a local directory is stored absolute, a hub name as it is; nothing names this one
            print(f"fastppo train: note: the adapter in {out} names no base model (it was built in memory); save "
                  "the base model and set base_model_name_or_path in adapter_config.json to load it with "
                  "AutoPeftModelForCausalLM", file=sys.stderr)
    return out
