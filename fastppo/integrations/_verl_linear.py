"""verl's fused LM head, ``verl.utils.kernel.linear_cross_entropy``, backed by ``fastppo.linear_logprobs``.

verl's actor calls ``linear_cross_entropy(hidden, weight, labels, temperature, reduction)`` when
``use_fused_kernels`` is on with the ``triton`` backend (``forward_with_triton_backend`` in
``verl.models.transformers``, and the Megatron forwards in ``verl.models.mcore``). verl's own
implementation is a set of CUDA-only Triton kernels (its host code asserts ``hidden.is_cuda``);
this one gives the same numbers on any device, through the chunked loops of
``fastppo.linear_logprobs`` (and so the frozen-head path, two vocabulary matmuls, under LoRA).

Installed by ``fastppo.integrations.verl.install(linear_cross_entropy=True)`` (opt-in); the
functions here do the swapping so that ``verl.py`` only calls them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch

import fastppo

__all__ = ["linear_cross_entropy", "install", "uninstall", "installed"]

_MODULE = "verl.utils.kernel.linear_cross_entropy"
_ATTR = "linear_cross_entropy"
_REDUCTIONS = ("none", "sum", "mean")

# attribute -> verl's original object, for uninstall().
_saved: dict[str, Any] = {}


def _verl_original():
    """verl's own ``linear_cross_entropy`` (whether or not install() is in force)."""
    if _ATTR in _saved:
        return _saved[_ATTR]
    module = importlib.import_module(_MODULE)
    original = getattr(module, _ATTR)
    if original is linear_cross_entropy:  # installed by someone who did not keep the original
        return module.LinearCrossEntropy.apply
    return original


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``linear_cross_entropy`` by ``fastppo.linear_logprobs``: ``(logprobs, entropy)``.

    * ``hidden``: ``[..., H]`` (verl passes ``[B, T, H]`` or ``[T, H]``), any float dtype;
      ``weight``: ``[V, H]`` (the LM head); ``labels``: ``hidden``'s leading shape, integers in
      ``[0, V)``.
    * ``logprobs``: log_softmax(hidden @ weight.T / temperature)[label], float32, flattened to
      ``[N]`` as verl returns it (``reduction="none"``), or its sum / mean over the N tokens as a
      0-d tensor (``"sum"`` / ``"mean"``; the mean of no token is 0). ``entropy``: ``[N]`` float32,
      never reduced (verl's contract). Both differentiable in ``hidden`` and ``weight``; a
      head that needs no gradient takes fastppo's frozen-head path.

    ``dist_process_group`` (a tensor-parallel vocabulary shard) goes to verl's own CUDA kernels:
    fastppo has no cross-rank reduction. Bad input raises ``ValueError`` (verl asserts).
    """
    if dist_process_group is not None:
        return _verl_original()(hidden, weight, labels, temperature, reduction, dist_process_group)
    if not isinstance(reduction, str) or reduction.lower() not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a real number; got {type(temperature).__name__}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden must be a tensor [..., H]")
    H = hidden.shape[-1]
    hidden2 = hidden.reshape(-1, H)
    labels1 = labels.reshape(-1)
    if labels1.shape[0] != hidden2.shape[0]:
        raise ValueError(
            f"labels must hold one label per row of hidden: hidden {tuple(hidden.shape)} has "
            f"{hidden2.shape[0]} rows, labels {tuple(labels.shape)} has {labels1.shape[0]}"
        )
    logprobs, entropy = fastppo.linear_logprobs(
        hidden2, weight, labels1, temperature=float(temperature), return_entropy=True
    )
    reduction = reduction.lower()
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.sum() / max(logprobs.shape[0], 1)
    return logprobs, entropy


def _verl_modules():
    return [(name, m) for name, m in list(sys.modules.items())
            if m is not None and (name == "verl" or name.startswith("verl."))]


def install() -> None:
    """Point ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` and every loaded verl
    module that imported it by name (``verl.models.mcore.model_forward_fused``, ...) at
    :func:`linear_cross_entropy`. Modules imported later, and verl's HF forwards (which import it
    inside the function), pick up the patched attribute themselves. Idempotent."""
    module = importlib.import_module(_MODULE)
    original = _saved.get(_ATTR, getattr(module, _ATTR))
    if original is linear_cross_entropy:
        return
    _saved[_ATTR] = original
    for _, m in _verl_modules():
        if getattr(m, _ATTR, None) is original:
            setattr(m, _ATTR, linear_cross_entropy)


def uninstall() -> None:
    """verl's own function back wherever ours sits (modules imported after install() too)."""
    original = _saved.pop(_ATTR, None)
    if original is None:
        return
    for _, m in _verl_modules():
        if getattr(m, _ATTR, None) is linear_cross_entropy:
            setattr(m, _ATTR, original)


def installed() -> bool:
    module = sys.modules.get(_MODULE)
    return module is not None and getattr(module, _ATTR, None) is linear_cross_entropy
