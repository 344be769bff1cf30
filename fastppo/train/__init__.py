"""PPO end to end: ``PPOConfig``, ``PPOTrainer`` and the built-in task behind ``fastppo train``.

Importing ``fastppo`` does not import this package. The names below load on first use, so that
``fastppo --help`` stays as quick as before (the trainer pulls in torch and, when it runs,
transformers).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": ".config",
    "PPOConfig": ".config",
    "KLController": ".trainer",
    "PPOTrainer": ".trainer",
    "validate": ".trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
