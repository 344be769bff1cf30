"""A trainer state (optimizer, scheduler, samplers, random streams) on disk without pickle.

``torch.save`` writes a pickle, and even ``torch.load(weights_only=True)`` runs an unpickler over
bytes that came from disk (a restricted one, which older torch releases let code through). A
checkpoint is a file anyone may hand a user, so its state is split in two files that cannot carry
code: every tensor goes into a safetensors file under a generated name, and the structure around
the tensors (dicts, lists, numbers, strings) goes into a JSON file in which each tensor is a
reference ``{"__tensor__": name}``.

JSON has only string keys and no tuples, and an optimizer's state dict is keyed by parameter
index (ints) and holds tuples (Adam's betas). A dict whose keys are not all plain strings is
written as ``{"__map__": [[key, value], ...]}`` and a tuple as ``{"__tuple__": [...]}``, so what
is read back equals what was written, key types included. Floats keep NaN and infinities.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

_MARKERS = ("__tensor__", "__map__", "__tuple__")
_SCALARS = (str, int, float, bool, type(None))
MAX_DEPTH = 64  # a trainer state is a few levels deep; a deeper file is not one of ours


class StateFormatError(ValueError):
    """The files do not hold a state written by :func:`save` (damaged, or not ours)."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise StateFormatError(f"state nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        # safetensors stores dense, contiguous, non-shared storage; a clone gives exactly that.
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, depth + 1) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, depth + 1) for v in obj]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) and k not in _MARKERS for k in obj)
        if plain:
            return {k: _encode(v, tensors, depth + 1) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, _SCALARS):
                raise TypeError(f"state dict key {k!r} of type {type(k).__name__} cannot be written as JSON")
        return {"__map__": [[k, _encode(v, tensors, depth + 1)] for k, v in obj.items()]}
    raise TypeError(f"a trainer state holds only tensors, numbers, strings, lists, tuples and dicts; "
                    f"got {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise StateFormatError(f"state nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, list):
        return [_decode(v, tensors, depth + 1) for v in obj]
    if not isinstance(obj, dict):
        if not isinstance(obj, _SCALARS):  # pragma: no cover - json.loads gives nothing else
            raise StateFormatError(f"unexpected {type(obj).__name__} in the state")
        return obj
    if len(obj) == 1 and "__tensor__" in obj:
        name = obj["__tensor__"]
        if not isinstance(name, str) or name not in tensors:
            raise StateFormatError(f"the state refers to a tensor {name!r} that its tensor file lacks")
        return tensors[name]
    if len(obj) == 1 and "__tuple__" in obj and isinstance(obj["__tuple__"], list):
        return tuple(_decode(v, tensors, depth + 1) for v in obj["__tuple__"])
    if len(obj) == 1 and "__map__" in obj and isinstance(obj["__map__"], list):
        out = {}
        for item in obj["__map__"]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], _SCALARS)):
                raise StateFormatError("a __map__ entry is not a [key, value] pair")
            out[item[0]] = _decode(item[1], tensors, depth + 1)
        return out
    if any(k in _MARKERS for k in obj):
        raise StateFormatError(f"malformed entry with keys {sorted(obj)}")
    return {k: _decode(v, tensors, depth + 1) for k, v in obj.items()}


def save(state: dict[str, Any], json_path: str, tensor_path: str) -> None:
    """Write ``state`` as JSON (``json_path``) plus safetensors (``tensor_path``)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, 0)
    save_file(tensors, tensor_path)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(tree, f, allow_nan=True)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise StateFormatError("a JSON object repeats a key")
    return dict(pairs)


def load(json_path: str, tensor_path: str) -> dict[str, Any]:
    """Read a state written by :func:`save`; nothing is unpickled. ``StateFormatError`` (or the
    ``OSError`` of a missing file) when the files are damaged or are not such a state."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(tensor_path, device="cpu")
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise StateFormatError(f"the tensor file cannot be read ({type(exc).__name__}: {exc})") from None
    try:
        with open(json_path, encoding="utf-8") as f:
            tree = json.load(f, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise StateFormatError(f"the state file is not valid JSON ({exc})") from None
    if not isinstance(tree, dict):
        raise StateFormatError("the state file does not hold a JSON object")
    return _decode(tree, tensors, 0)


def equal(a: Any, b: Any) -> bool:
    """Deep equality of two states (tensors by dtype, shape and value; NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        return torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b
