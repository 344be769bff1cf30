"""Drop-in adapters that put fastppo's ops behind the APIs of other RLHF trainers.

* ``fastppo.integrations.verl``: a policy loss for verl's registry (``loss_mode=fastppo``),
  verl's ``compute_gae_advantage_return`` and ``compute_value_loss`` with verl's numbers, and
  ``install()`` / ``uninstall()`` (opt-in: verl's fused LM head ``linear_cross_entropy``).
* ``fastppo.integrations.openrlhf``: ``PolicyLoss`` and ``ValueLoss`` modules and
  ``get_advantages_and_returns`` with OpenRLHF's signatures and numbers.
* ``fastppo.integrations.trl``: ``patch()`` / ``unpatch()`` / ``patched()`` swapping TRL's
  ``selective_log_softmax``, ``entropy_from_logits``, ``selective_log_softmax_and_entropy`` (utils
  and ``trl.kernels``) and ``trl.kernels.ChunkedLogProbFunction`` (GRPO's fused LM head) for fastppo's.
* ``fastppo.integrations.liger``: ``patch()`` / ``unpatch()`` / ``patched()`` swapping Liger-Kernel's
  fused linear cross entropy (and its per-token scaled form) for ``fastppo.linear_logprobs``.

The peers are optional extras: none of these modules imports its peer at import time except
``fastppo.integrations.verl``, which installs itself into verl when verl is importable (that
is what verl's ``external_lib`` hook relies on; ``FASTPPO_VERL_INSTALL`` controls it). The
submodules are not imported here, so ``import fastppo.integrations`` imports no peer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

from fastppo._checks import AGG_MODES

__all__ = ["liger", "openrlhf", "trl", "verl"]


# Glue shared by the adapters (private: the adapters' own modules are the public API).


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from an ActorConfig dataclass, an omegaconf DictConfig or a plain dict."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _promote(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Cast to one floating dtype: verl mixes dtypes freely, fastppo's ops insist on one."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [None if t is None else t.to(dtype) for t in tensors]


def _as_float(x: Any) -> float:
    # verl types gamma and lam as tensors but passes floats; a 0-d tensor is read once, here.
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _global_aggregate(
    run: Callable[[str], tuple[torch.Tensor, dict]],
    mask: torch.Tensor,
    mode: str,
    *,
    dp_size: int | None = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
    require_global: bool = True,
) -> tuple[torch.Tensor, dict]:
    """verl 0.9's ``agg_loss`` on top of a fastppo loss.

    ``run(agg)`` evaluates the fastppo loss with aggregation ``agg``. Without global-batch
    figures verl's modes are fastppo's own; with them verl divides local sums by the global token
    or sequence count and multiplies by ``dp_size`` (DDP averages gradients over ranks), which is
    a local ``token-sum`` (or sum of row means) rescaled.

    Args:
        mask: ``[B, T]`` response mask.
        mode: one of verl's ``loss_agg_mode`` names.
        require_global: raise, as verl does, when ``dp_size > 1`` comes without the global count
            (OpenRLHF quietly normalises locally instead).
    Returns:
        ``(loss, stats)``: 0-d loss and the stats of ``run``.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {', '.join(AGG_MODES)}")
    dp_size = 1 if dp_size is None else dp_size

    def local_only(what: str) -> None:
        if require_global and dp_size > 1:
            raise ValueError(f"loss_agg_mode {mode!r} with dp_size={dp_size} needs the global {what}, got None")

    if mode == "token-mean":
        if batch_num_tokens is None:
            local_only("batch_num_tokens")
            return run("token-mean")
        loss, stats = run("token-sum")
        return loss / batch_num_tokens * dp_size, stats
    if mode == "token-sum":
        loss, stats = run("token-sum")
        return loss * dp_size, stats
    if mode == "seq-mean-token-mean":
        loss, stats = run("seq-mean-token-mean")
        if global_batch_size is None:
            local_only("global_batch_size")
            return loss, stats
        # fastppo gives the mean of the row means; verl wants their sum over the global count.
        rows = (mask.sum(dim=-1) > 0).sum()
        return loss * rows / global_batch_size * dp_size, stats
    # seq-mean-token-sum and seq-mean-token-sum-norm: rows without tokens add 0 to the sum.
    if global_batch_size is None:
        local_only("global_batch_size")
        loss, stats = run("seq-mean-token-sum")
    else:
        loss, stats = run("token-sum")
        loss = loss / global_batch_size * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss, stats
