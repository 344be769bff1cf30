"""``ConfigError``, on its own so that ``config`` and ``trl_compat`` both raise it without
importing each other."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model is loaded or step is taken."""
