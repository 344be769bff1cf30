"""Liger-Kernel adapter: Liger's fused linear cross entropy by ``fastppo.linear_logprobs``.

``patch()`` replaces, in every loaded Liger (and verl, TRL) module that holds them:

* ``liger_kernel.ops.LigerFusedLinearCrossEntropyFunction`` -> :class:`LigerFusedLinearCrossEntropyFunction`
  (what ``liger_fused_linear_cross_entropy``, ``LigerFusedLinearCrossEntropyLoss`` and Liger's
  patched model forwards call: the SFT loss from hidden states);
* ``liger_kernel.ops.LigerFusedLinearScaledCrossEntropyFunction`` ->
  :class:`LigerFusedLinearScaledCrossEntropyFunction` (per-token NLL and entropy at a
  temperature: the fused-linear log-prob piece, used by verl's ``FusedLinearForPPO`` with the
  ``liger`` backend).

:func:`liger_fused_linear_cross_entropy` is Liger's functional form, callable without patching.

Each keeps Liger's signature, outputs and their dtypes: per-token losses in float32, 0 at
``ignore_index`` rows (whatever their hidden state holds), ``reduction`` ``mean`` over the
non-ignored tokens / ``sum`` / ``none``, the z-loss ``lse_square_scale * logsumexp^2`` (added to
the loss, and returned with ``return_z_loss``), ``use_token_scaling`` (each token's loss times
its detached probability), a bias. The logsumexp comes without another vocabulary pass:
lse = z_label - logprob, with z_label = h . W[label] (+ b[label]) one dot product per row.

Inputs fastppo has no equivalent for go to Liger's own code, unchanged: a class weight
(``ce_weight``), ``label_smoothing``, ``softcap``, ``return_token_accuracy`` /
``return_predicted_tokens`` (an argmax over the vocabulary), and ``selected_token_ids``.
Liger's RL losses (``LigerFusedLinearGRPOLoss`` and friends) take one advantage per sequence
and are not replaced; ``fastppo.linear_ppo_loss`` is the per-token counterpart.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any, Iterator

import torch

import fastppo

__all__ = [
    "LigerFusedLinearCrossEntropyFunction",
    "LigerFusedLinearScaledCrossEntropyFunction",
    "is_patched",
    "liger_fused_linear_cross_entropy",
    "patch",
    "patched",
    "unpatch",
]

_OPS = "liger_kernel.ops"
_REDUCTIONS = ("mean", "sum", "none")
# Liger's LigerFusedLinearCrossEntropyFunction.forward arguments after ctx, in order.
_FLCE_ARGS = ("bias", "ce_weight", "ignore_index", "lse_square_scale", "label_smoothing", "reduction", "softcap",
              "return_z_loss", "accum_dtype", "use_token_scaling", "return_token_accuracy",
              "return_predicted_tokens", "ce_impl", "ce_mode", "chunk_mem_const")
_FLCE_DEFAULTS = dict(bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
                      reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None, use_token_scaling=False,
                      return_token_accuracy=False, return_predicted_tokens=False, ce_impl=None, ce_mode=None,
                      chunk_mem_const=1)


def _original(name: str) -> Any:
    """Liger's own class behind one of ours (whether or not patch() is in force)."""
    if name in _saved:
        return _saved[name]
    found = getattr(importlib.import_module(_OPS), name)
    if found is globals()[name]:
        raise LookupError(f"liger_kernel.ops.{name} is fastppo's and Liger's original was not kept")
    return found


def _rows(_input, weight, target, ignore_index):
    """``(valid [M] bool, labels with ignored rows set to 0)``; checks Liger's 2-D contract."""
    if not isinstance(_input, torch.Tensor) or _input.dim() != 2:
        raise ValueError(f"input must be [M, H]; got {getattr(_input, 'shape', type(_input).__name__)}")
    if not isinstance(target, torch.Tensor) or target.shape != _input.shape[:1]:
        raise ValueError(f"target must be [M] = [{_input.shape[0]}]; got {getattr(target, 'shape', None)}")
    valid = target != ignore_index
    return valid, target.masked_fill(~valid, 0)


def _label_logits(_input, weight, bias, labels, valid):
    """z_label = h . W[label] (+ b[label]) per row, float32, 0 at ignored rows (never read)."""
    h = torch.where(valid.unsqueeze(1), _input, 0).float()
    z = (h * weight.index_select(0, labels).float()).sum(-1)
    if bias is not None:
        z = z + bias.index_select(0, labels).float()
    return torch.where(valid, z, 0.0)


def _flce(_input, weight, target, **kw):
    """``(loss, z_loss, token_accuracy, predicted_tokens)`` as Liger returns them."""
    reduction = kw["reduction"]
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")
    valid, labels = _rows(_input, weight, target, kw["ignore_index"])
    bias = kw["bias"]
    lp = fastppo.linear_logprobs(_input, weight, labels, bias=bias, mask=valid)
    loss = -lp
    scale = float(kw["lse_square_scale"])
    z_loss = None
    if scale != 0.0 or kw["return_z_loss"]:
        lse = torch.where(valid, _label_logits(_input, weight, bias, labels, valid) - lp, 0.0)
        z_loss = scale * lse * lse
    if kw["use_token_scaling"]:
        # Each token's loss (and z-loss) times its own probability, as a constant.
        p = torch.where(valid, lp.detach().exp(), 0.0)
        loss = loss * p
        z_loss = None if z_loss is None else z_loss * p
    if reduction == "mean":
        n = max(int(valid.sum()), 1)  # Liger reads the count on the host too
        loss = loss / n
        z_loss = None if z_loss is None else z_loss / n
    if z_loss is not None:
        loss = loss + z_loss
    if reduction != "none":
        loss = loss.sum()
    z_out = None
    if kw["return_z_loss"]:
        z_out = z_loss.to(_input.dtype)
        if reduction != "none":
            z_out = z_out.sum()
    return loss, z_out, None, None


def _needs_liger(kw) -> bool:
    return (kw["ce_weight"] is not None or float(kw["label_smoothing"]) != 0.0 or kw["softcap"] is not None
            or bool(kw["return_token_accuracy"]) or bool(kw["return_predicted_tokens"]))


class LigerFusedLinearCrossEntropyFunction:
    """Liger's ``LigerFusedLinearCrossEntropyFunction`` by ``fastppo.linear_logprobs``.

    ``apply(input [M, H], weight [V, H], target [M], bias=None, ce_weight=None, ignore_index=-100,
    lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False,
    accum_dtype=None, use_token_scaling=False, return_token_accuracy=False,
    return_predicted_tokens=False, ce_impl=None, ce_mode=None, chunk_mem_const=1)`` ->
    ``(loss, z_loss, token_accuracy, predicted_tokens)``: loss float32 (``[M]`` with
    ``reduction="none"``, else 0-d), z_loss in the input dtype or None, the last two None.
    Differentiable in input, weight and bias. ``accum_dtype``, ``ce_impl``, ``ce_mode`` and
    ``chunk_mem_const`` tune Liger's kernels and change nothing here (fastppo accumulates in float32).
    """

    supports_inner_impl_dispatch = True  # Liger's functional form then passes all 18 arguments

    @staticmethod
    def apply(_input, weight, target, *args):
        if len(args) > len(_FLCE_ARGS):
            raise TypeError(f"LigerFusedLinearCrossEntropyFunction.apply takes at most {3 + len(_FLCE_ARGS)} arguments")
        kw = dict(_FLCE_DEFAULTS, **dict(zip(_FLCE_ARGS, args)))
        if _needs_liger(kw):
            return _original("LigerFusedLinearCrossEntropyFunction").apply(_input, weight, target, *args)
        return _flce(_input, weight, target, **kw)


def liger_fused_linear_cross_entropy(
    input, weight, target, bias=None, ce_weight=None, ignore_index: int = -100, lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0, reduction: str = "mean", softcap=None, return_z_loss: bool = False,
    accum_dtype=None, use_token_scaling: bool = False, return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False, chunk_mem_const: int = 1,
):
    """Liger's ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy``, by fastppo.

    Returns the loss alone, or Liger's ``CrossEntropyOutput`` when any ``return_*`` flag is set.
    """
    loss, z_loss, acc, pred = LigerFusedLinearCrossEntropyFunction.apply(
        input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction,
        softcap, return_z_loss, accum_dtype, use_token_scaling, return_token_accuracy, return_predicted_tokens,
        None, None, chunk_mem_const,
    )
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return loss
    from liger_kernel.transformers.functional import CrossEntropyOutput

    return CrossEntropyOutput(loss=loss, z_loss=z_loss, token_accuracy=acc, predicted_tokens=pred)


class LigerFusedLinearScaledCrossEntropyFunction:
    """Liger's ``LigerFusedLinearScaledCrossEntropyFunction`` by ``fastppo.linear_logprobs``.

    ``apply(input [M, H], weight [V, H], target [M], temperature=1.0, ignore_index=-100,
    m_tiles_per_cluster=1, return_entropy=False, selected_token_ids=None)`` -> ``nll`` ``[M]``
    float32, or ``(nll, entropy)`` with the entropy in the input dtype (Liger's fallback
    contract), both 0 at ``ignore_index`` rows and differentiable. ``selected_token_ids`` goes to
    Liger's own code.
    """

    @staticmethod
    def apply(_input, weight, target, temperature=1.0, ignore_index=-100, m_tiles_per_cluster=1,
              return_entropy=False, selected_token_ids=None):
        if selected_token_ids is not None:
            return _original("LigerFusedLinearScaledCrossEntropyFunction").apply(
                _input, weight, target, temperature, ignore_index, m_tiles_per_cluster, return_entropy,
                selected_token_ids,
            )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a real number; got {type(temperature).__name__}")
        valid, labels = _rows(_input, weight, target, ignore_index)
        out = fastppo.linear_logprobs(_input, weight, labels, temperature=float(temperature),
                                      return_entropy=bool(return_entropy), mask=valid)
        if not return_entropy:
            return -out
        lp, ent = out
        return -lp, ent.to(_input.dtype)


# --------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------

_NAMES = ("LigerFusedLinearCrossEntropyFunction", "LigerFusedLinearScaledCrossEntropyFunction")
_saved: dict[str, Any] = {}
_PREFIXES = ("liger_kernel", "verl", "trl")


def _holders() -> list[Any]:
    return [m for n, m in list(sys.modules.items())
            if m is not None and any(n == p or n.startswith(p + ".") for p in _PREFIXES)]


def _swap(pairs: list[tuple[Any, Any]]) -> None:
    """Every attribute of a loaded Liger / verl / TRL module that holds ``old`` now holds ``new``
    (verl binds Liger's class under another name, ``_LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY``)."""
    for module in _holders():
        namespace = getattr(module, "__dict__", {})
        for attr, value in list(namespace.items()):
            for old, new in pairs:
                if value is old:
                    setattr(module, attr, new)


def patch() -> None:
    """Swap Liger's fused linear cross entropy classes for fastppo's (idempotent). Modules
    imported later that take the names from ``liger_kernel.ops`` get ours too."""
    ops = importlib.import_module(_OPS)
    pairs = []
    for name in _NAMES:
        original = _saved.get(name, getattr(ops, name))
        if original is globals()[name]:
            continue
        _saved[name] = original
        pairs.append((original, globals()[name]))
    _swap(pairs)


def unpatch() -> None:
    """Liger's classes back wherever ours sit (a no-op when not patched)."""
    _swap([(globals()[name], _saved[name]) for name in _NAMES if name in _saved])
    _saved.clear()


def is_patched() -> bool:
    ops = sys.modules.get(_OPS)
    return ops is not None and getattr(ops, _NAMES[0], None) is LigerFusedLinearCrossEntropyFunction


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """``patch()`` for the duration of a block, then restore what was there before."""
    was = is_patched()
    patch()
    try:
        yield
    finally:
        if not was:
            unpatch()
