"""The trainer's rollout correction: ``fastppo.rollout_correction`` between the rollout engine's
log-probs of the sampled tokens and the trainer's old log-probs, once per iteration.

``--rollout-is`` / ``--rollout-is-threshold`` / ``--rollout-is-lower`` /
``--rollout-is-batch-normalize`` give the policy loss its ``is_weights``; ``--rollout-rs`` /
``--rollout-rs-threshold`` drop rejected tokens (or whole responses) from the mask of every loss
term. The engine's log-probs: vLLM's sampling log-probs (``processed_logprobs``), or, with the
``hf`` engine, the log-probs the trainer's own sampling loop records while it samples (only when a
correction is asked for). The ``rollout_corr/...`` metrics (verl's names) go to metrics.jsonl.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError


def _opt(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def level(config) -> str | None:
    """The IS level of ``config.rollout_is`` (``tis`` is ``token``), None when off."""
    name = config.rollout_is
    return None if name == "none" else ("token" if name == "tis" else name)


def upper(config) -> float:
    return config.rollout_is_threshold if config.rollout_is_cap is None else config.rollout_is_cap


def wanted(config) -> bool:
    """Whether the iteration computes weights or a rejection mask (the hf engine then records its
    sampling log-probs)."""
    return level(config) is not None or config.rollout_rs is not None


def check(config) -> None:
    """``ConfigError`` for rollout-correction options that cannot work (no torch work, no model)."""
    import math

    from fastppo.rollout_correction import parse_rs

    up = upper(config)
    for name, value in (("rollout_is_threshold", config.rollout_is_threshold), ("rollout_is_cap", config.rollout_is_cap),
                        ("rollout_is_lower", config.rollout_is_lower)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ConfigError(f"{_opt(name)} must be a finite number > 0, got {value!r}")
    if config.rollout_is_cap is not None and config.rollout_is_threshold not in (2.0, config.rollout_is_cap):
        raise ConfigError(f"{_opt('rollout_is_cap')} is the older name of {_opt('rollout_is_threshold')}; give one")
    if config.rollout_is_lower is not None and config.rollout_is_lower > up:
        raise ConfigError(f"{_opt('rollout_is_lower')} ({config.rollout_is_lower}) must be <= the upper bound "
                          f"rollout_is_threshold ({up})")
    if config.rollout_rs is None:
        if config.rollout_rs_threshold is not None:
            raise ConfigError(f"{_opt('rollout_rs_threshold')} is given without {_opt('rollout_rs')}")
        return
    if config.rollout_rs_threshold is None:
        raise ConfigError(f"{_opt('rollout_rs')} {config.rollout_rs} needs {_opt('rollout_rs_threshold')}")
    try:
        parse_rs(config.rollout_rs, str(config.rollout_rs_threshold))
    except ValueError as exc:
        raise ConfigError(f"{_opt('rollout_rs')} / {_opt('rollout_rs_threshold')}: {exc}") from None


def apply(config, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor | None, mask: torch.Tensor,
          dist=None) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """``(is_weights or None, loss mask, metrics)`` of one iteration (this process's rows).

    The loss mask is ``mask`` without the rejected tokens (``mask`` itself when nothing can be
    rejected). Metrics: ``rollout_corr/...`` as floats, over every rank's rows under torchrun (the
    weights' batch normalisation is global there too). Nothing without engine log-probs.
    """
    import fastppo

    if rollout_logprobs is None:
        return None, mask, {}
    kw: dict[str, Any] = dict(level=level(config), upper=upper(config), lower=config.rollout_is_lower,
                              mode="truncate" if config.rollout_is_lower is None else "mask",
                              batch_normalize=config.rollout_is_batch_normalize,
                              rs=config.rollout_rs,
                              rs_threshold=None if config.rollout_rs is None else str(config.rollout_rs_threshold))
    weights, keep, metrics = fastppo.rollout_correction(old_logprobs, rollout_logprobs, mask, **kw)
    if dist is not None and dist.enabled:  # [dist] metrics of the global batch
        old, roll, m = dist.gather_rows(old_logprobs, rollout_logprobs, mask)
        _, _, metrics = fastppo.rollout_correction(old, roll, m, **kw)
    values = torch.stack([v.reshape(()).float() for v in metrics.values()]).tolist() if metrics else []
    out = dict(zip(metrics, values))
    if weights is not None:  # the name this metric had before the rollout_corr/ set
        out["rollout_is_weight_mean"] = out["rollout_corr/rollout_is_mean"]
    loss_mask = keep if config.rollout_rs is not None else mask
    return weights, loss_mask, out
