"""TRL adapter: swap TRL's log-prob and entropy helpers for fastppo's kernels.

``patch()`` replaces ``selective_log_softmax``, ``entropy_from_logits`` and (where the TRL
version has it) ``selective_log_softmax_and_entropy`` in ``trl.trainer.utils`` and in every
loaded TRL module that imported them by name (``from ...trainer.utils import
selective_log_softmax``); modules imported later copy the patched names themselves. In TRL 1.16
that covers the experimental trainers (CPO, ORPO, A2PO, SDFT, SDPO, TPO) and any code calling
``trl.trainer.utils``; 1.16's ``GRPOTrainer`` computes log-probs inside its own fused LM head
(``add_fused_lm_head``), which this patch leaves alone. Older TRL trainers (GRPO, RLOO, PPO)
import the two helpers by name and are covered. ``unpatch()`` puts TRL's functions back everywhere,
``patched()`` does both around a block.

The wrappers take TRL's call signatures. Where fastppo has no equivalent (``index`` with a
trailing top-K dimension) they call TRL's original. Outputs are float32 whatever the logits
dtype, as TRL's own GPU kernel returns them.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any, Callable, Iterator

import torch

import fastppo

__all__ = [
    "entropy_from_logits",
    "is_patched",
    "patch",
    "patched",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch",
]

_UTILS = "trl.trainer.utils"
# name -> TRL's original function, filled by patch().
_originals: dict[str, Callable] = {}


def _flat(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> ``[N, V]``: fastppo's ops take 2-D or 3-D logits, TRL's any rank."""
    return logits.reshape(-1, logits.shape[-1])


def _row_mask(row_mask: torch.Tensor | None) -> torch.Tensor | None:
    # TRL skips rows where row_mask == 0; fastppo's mask is "1 where valid".
    return None if row_mask is None else (row_mask != 0).reshape(-1)


def _original(name: str) -> Callable:
    if name in _originals:
        return _originals[name]
    return getattr(importlib.import_module(_UTILS), name)


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` computed by ``fastppo.logprobs_from_logits``.

    log_softmax(logits / temperature)[index] per row, 0 where ``row_mask == 0``.

    Args:
        logits: ``[..., V]``.
        index: ``[...]`` token ids (an ``[..., K]`` index goes to TRL's own function).
        temperature: > 0.
        row_mask: optional ``[...]``; rows where it is 0 give 0 and are not read.
    Returns:
        float32 log-probs of the shape of ``index``.
    """
    if index.shape != logits.shape[:-1]:
        original = _original("selective_log_softmax")
        if row_mask is None and temperature == 1.0:
            return original(logits, index)  # TRL versions before temperature/row_mask existed
        return original(logits, index, temperature=temperature, row_mask=row_mask)
    logprobs = fastppo.logprobs_from_logits(
        _flat(logits), index.reshape(-1), temperature=temperature, mask=_row_mask(row_mask)
    )
    return logprobs.reshape(index.shape)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits`` computed by ``fastppo.entropy_from_logits``.

    ``chunk_size`` is accepted and ignored: fastppo never materialises the softmax.

    Args:
        logits: ``[..., V]``.
    Returns:
        float32 entropies of shape ``logits.shape[:-1]``.
    """
    return fastppo.entropy_from_logits(_flat(logits)).reshape(logits.shape[:-1])


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``selective_log_softmax_and_entropy`` in one fastppo pass over the logits.

    Args:
        logits: ``[..., V]``; index: ``[...]``; row_mask: optional ``[...]``.
        entropy_requires_grad: False detaches the entropy.
        temperature: > 0; both outputs are of softmax(logits / temperature).
    Returns:
        ``(logprobs, entropy)``: float32, shape of ``index``; 0 where ``row_mask == 0``.
    """
    logprobs, entropy = fastppo.logprobs_from_logits(
        _flat(logits),
        index.reshape(-1),
        temperature=temperature,
        return_entropy=True,
        mask=_row_mask(row_mask),
    )
    if not entropy_requires_grad:
        entropy = entropy.detach()
    return logprobs.reshape(index.shape), entropy.reshape(index.shape)


_OURS: dict[str, Callable] = {
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
}


def _trl_modules() -> list[Any]:
    return [m for n, m in list(sys.modules.items()) if m is not None and (n == "trl" or n.startswith("trl."))]


def patch(modules: tuple[str, ...] = ()) -> None:
    """Swap TRL's helpers for fastppo's (idempotent).

    Args:
        modules: extra TRL modules to import first so that they are patched too (for instance
            ``("trl.trainer.grpo_trainer",)``); any TRL module imported later picks up the
            patched names from ``trl.trainer.utils`` by itself.
    """
    utils = importlib.import_module(_UTILS)
    for name in modules:
        importlib.import_module(name)
    for name, ours in _OURS.items():
        original = _originals.get(name, getattr(utils, name, None))
        if original is None:  # this TRL version does not have it
            continue
        _originals[name] = original
        for module in _trl_modules():
            if getattr(module, name, None) is original:
                setattr(module, name, ours)


def unpatch() -> None:
    """Put TRL's own helpers back in every loaded TRL module (a no-op when not patched)."""
    for name, original in _originals.items():
        ours = _OURS[name]
        for module in _trl_modules():
            if getattr(module, name, None) is ours:
                setattr(module, name, original)
    _originals.clear()


def is_patched() -> bool:
    """Whether ``trl.trainer.utils.selective_log_softmax`` is fastppo's right now."""
    utils = sys.modules.get(_UTILS)
    return utils is not None and getattr(utils, "selective_log_softmax", None) is selective_log_softmax


@contextlib.contextmanager
def patched(modules: tuple[str, ...] = ()) -> Iterator[None]:
    """``patch()`` for the duration of a block, then restore what was there before."""
    was_patched = is_patched()
    patch(modules)
    try:
        yield
    finally:
        if not was_patched:
            unpatch()

