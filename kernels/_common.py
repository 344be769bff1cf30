"""Helpers shared by the kernel launchers. Imports torch only (never triton).

Every launcher allocates its outputs with :func:`new_output`. Inside :func:`poisoned_outputs`
(used by the tests) those outputs are pre-filled with NaN, or with a sentinel for integer
dtypes, so a kernel that forgets to write an element fails its comparison instead of passing on
whatever zeros the allocator happened to return.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_poison_depth = 0


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill every kernel output allocated inside this block with NaN (or -7 for integers)."""
    global _poison_depth
    _poison_depth += 1
    try:
        yield
    finally:
        _poison_depth -= 1


def poisoning() -> bool:
    return _poison_depth > 0


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; poisoned inside :func:`poisoned_outputs`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_depth:
        out.fill_(float("nan") if dtype.is_floating_point else -7)
    return out


@contextlib.contextmanager
def overriding(store: dict, sizes: dict) -> Iterator[None]:
    """Entries of ``store`` (a launcher's block-size overrides) set to ``sizes`` inside the block,
    put back as they were after it, also on an error."""
    saved = dict(store)
    store.update(sizes)
    try:
        yield
    finally:
        store.clear()
        store.update(saved)


def output_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The contract's output dtype: float32, or float64 when an input is float64."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32
