"""The trainer's policy objective: ``policy_loss`` (a name of ``fastppo.POLICY_LOSSES``, verl's
``loss_mode`` names) and ``policy_loss_options`` resolved to ``(fn, options)`` once, before the run.

``vanilla`` keeps the trainer's fused path (``fastppo.ppo_loss`` / ``linear_ppo_loss``) with
clip_low / clip_high / dual_clip. Any other registered objective is called as
``fn(logprobs, old_logprobs, advantages, mask, agg=loss_agg, is_weights=..., **options)``; it
takes clip_low / clip_high from the config when it has options of those names (verl feeds its
``clip_ratio`` to them too) and the option is not given in ``policy_loss_options``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from .errors import ConfigError


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null", ""):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        number = float(text)
    except ValueError:
        return text.strip()
    return int(number) if low.lstrip("+-").isdigit() else number


def options_text(options: Any) -> str:
    """A config file's mapping as the ``name=value,...`` text of the flag (text stays as it is)."""
    if isinstance(options, Mapping):
        return ",".join(f"{k}={'none' if v is None else v}" for k, v in options.items())
    return options


def parse_options(text: str) -> dict[str, Any]:
    """``"beta=0.1,clip_high=none"`` -> ``{"beta": 0.1, "clip_high": None}``."""
    options: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name.isidentifier():
            raise ConfigError(f"policy_loss_options (--policy-loss-options) must be name=value pairs separated by "
                              f"commas, got {item.strip()!r}")
        if name in options:
            raise ConfigError(f"policy_loss_options (--policy-loss-options) gives {name} twice")
        options[name] = _value(value)
    return options


def resolve(config) -> tuple[Callable | None, dict[str, Any]]:
    """``(fn, options)`` for the config's policy objective (``fn`` None for ``vanilla``, which keeps
    the fused ppo_loss path); ``ConfigError`` with a one-line reason when it cannot run."""
    import torch

    import fastppo

    name = config.policy_loss
    options = parse_options(config.policy_loss_options)
    try:
        fn = fastppo.get_policy_loss(name)
    except ValueError as e:
        raise ConfigError(f"policy_loss (--policy-loss): {e}") from None
    if name == "vanilla":
        if options:
            raise ConfigError("policy_loss vanilla takes its options from --clip-low, --clip-high and --dual-clip; "
                              f"remove --policy-loss-options {config.policy_loss_options!r}")
        return None, {}
    params = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    params -= {"agg", "is_weights"}
    unknown = sorted(set(options) - params)
    if unknown:
        raise ConfigError(f"policy_loss {name} has no option {', '.join(unknown)}; its options: "
                          f"{', '.join(sorted(params)) or 'none'}")
    if config.dual_clip is not None and "dual_clip" not in params:
        raise ConfigError(f"dual_clip (--dual-clip) is set, but policy_loss {name} has no dual clip; "
                          "leave it unset or use vanilla")
    for clip in ("clip_low", "clip_high"):
        if clip in params and clip not in options:
            options[clip] = getattr(config, clip)
    # One call on a 1-token batch: the objective's own checks (a missing dro beta, a negative
    # temperature, an aggregation it refuses) stop the run here, not at its first update.
    z = torch.zeros(1, 1)
    try:
        with fastppo.use_backend("torch"):
            fn(z - 1.0, z - 1.0, z, torch.ones(1, 1, dtype=torch.bool), agg=config.loss_agg, **options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"policy_loss {name} with options {options}: {e}") from None
    return fn, options
