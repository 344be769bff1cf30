"""Test harness shared by every test module.

* Kernels run natively on CUDA when a GPU is present, else on the CPU through Triton's
  interpreter. ``TRITON_INTERPRET`` must be set before triton is first imported, so it is set
  here, at collection time, before any test module imports a kernel.
* ``rng``: a fresh random seed per test (printed with any failure; ``FASTPPO_TEST_SEED=N``
  reproduces one).
* ``kernel_device``: where kernel tests run; ``run_kernel`` calls an op on the Triton backend with
  its outputs poisoned, so an element the kernel never writes shows up as NaN.
* ``tests/helpers.py`` (from ``fastppo.testing``): ``TOL`` per input dtype and ``assert_close``.
"""

from __future__ import annotations

import os
import secrets

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastppo  # noqa: E402
from fastppo.kernels._common import poisoned_outputs  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"

@pytest.fixture
def rng(request) -> torch.Generator:
    seed = int(os.environ.get("FASTPPO_TEST_SEED", secrets.randbits(31)))
    request.node.user_properties.append(("seed", seed))
    gen = torch.Generator().manual_seed(seed)
    return gen


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("random seed", f"FASTPPO_TEST_SEED={value} reproduces this run"))


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture
def run_kernel():
    """Call ``fn(*args, **kwargs)`` on the Triton backend with every kernel output poisoned."""

    def run(fn, *args, **kwargs):
        with fastppo.use_backend("triton"), poisoned_outputs():
            return fn(*args, **kwargs)

    return run


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow; set FASTPPO_SLOW=1")
    slow = os.environ.get("FASTPPO_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not slow:
            item.add_marker(skip_slow)


@pytest.fixture
def torch_backend():
    """Trainer tests: the reference backend (the trainer runs on CPU tensors), and the thread count
    restored afterwards (the built-in config sets 1 thread; the rest of the suite keeps its own)."""
    threads = torch.get_num_threads()
    with fastppo.use_backend("torch"):
        yield
    torch.set_num_threads(threads)
