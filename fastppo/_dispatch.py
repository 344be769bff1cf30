"""Backend choice: the Triton kernel or the PyTorch reference, per call.

``FASTPPO_BACKEND`` (or the ``fastppo.use_backend`` context manager, which wins over it):

* ``auto`` (default): the Triton kernel for CUDA tensors when the op has one, else the reference;
* ``triton``: always the kernel; CPU tensors need ``TRITON_INTERPRET=1`` (Triton's interpreter);
* ``torch``: always the reference.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Iterator

import torch

from . import reference

BACKENDS = ("auto", "triton", "torch")
_override: list[str] = []


def current_backend() -> str:
    """The backend in force: the innermost ``use_backend`` block, else ``FASTPPO_BACKEND``."""
    name = _override[-1] if _override else os.environ.get("FASTPPO_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown FASTPPO_BACKEND {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed fastppo calls on backend ``name`` (``auto``, ``triton`` or ``torch``)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def kernel_ops() -> dict[str, str]:
    from fastppo.kernels import KERNEL_OPS

    return dict(KERNEL_OPS)


def has_kernel(op: str) -> bool:
    return op in kernel_ops()


def load_kernel(op: str) -> Callable:
    target = kernel_ops().get(op)
    if target is None:
        raise NotImplementedError(
            f"fastppo.{op} has no Triton kernel yet; use FASTPPO_BACKEND=auto or torch for the reference"
        )
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(f"fastppo.kernels.{module}"), function)


def pick(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for tensors on ``device`` under the current backend."""
    backend = current_backend()
    if backend == "torch":
        return getattr(reference, op).raw
    if backend == "auto":
        if device.type == "cuda" and has_kernel(op):
            return load_kernel(op)
        return getattr(reference, op).raw
    # backend == "triton"
    kernel = load_kernel(op)
    if device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError(
            f"FASTPPO_BACKEND=triton got CPU tensors for fastppo.{op}; Triton kernels run on CPU "
            "only through the interpreter: set TRITON_INTERPRET=1 before starting Python, "
            "move the tensors to a GPU, or use FASTPPO_BACKEND=auto"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fastppo.{op}: the Triton backend supports CUDA (and CPU through the interpreter), got {device}")
    return kernel
