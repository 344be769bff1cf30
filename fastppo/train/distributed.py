"""Data-parallel PPO over ``torch.distributed``: ``torchrun --nproc-per-node N -m fastppo train ...``.

A run is distributed when the launcher's environment says so (``WORLD_SIZE`` > 1, as torchrun and
``accelerate launch`` set it) or when the caller already initialised a process group. Then:

* the process group comes from the environment (gloo on CPU, NCCL on CUDA, rank ``r`` on
  ``cuda:LOCAL_RANK``), with a timeout (``FASTPPO_DIST_TIMEOUT`` seconds, default 600) so a lost
  peer ends in an error, never a hang;
* every rank draws the same global batch of prompts (the sampler is seeded alike on all ranks) and
  keeps its contiguous slice of ``batch_size / N`` rows: N ranks together see exactly the batch one
  process would, with each prompt's ``num_generations`` responses on one rank;
* actor, reference (a separate frozen copy) and critic are sharded with FSDP2
  (``torch.distributed.fsdp.fully_shard``: each transformer block, then the whole model); the
  reward model stays whole on every rank (frozen, inference only);
* advantage whitening uses the mean and variance over the valid tokens of the global batch (sums
  all-reduced in float64), the same numbers ``fastppo.masked_whiten`` gives one process;
* the update walks the global mini-batches of the one-process run (one shared shuffle); each rank
  takes the rows of each mini-batch it holds, and each micro-batch's loss is weighted by its share
  of the global mini-batch: valid tokens over the global count for ``token-mean``, rows with a
  token over the global count for the ``seq-mean-*`` modes, 1 for ``token-sum``. The gradients
  FSDP2 averages over ranks are thus the gradients of the global mini-batch's loss, as one process
  computes it with one micro-batch per mini-batch (verl's data-parallel semantics). A rank holding
  fewer micro-batches of a mini-batch than another runs zero-weighted ones, so all ranks meet the
  same collectives;
* metrics are computed over the gathered global batch and written by rank 0 only; checkpoints are
  the one-process layout (``actor/``, ``critic/`` and the trainer state, written by rank 0 from
  full state dicts, nothing in them unpickled when read), which any number of ranks, a one-process
  ``--resume`` and ``from_pretrained`` read.

Nothing here runs for a one-process run: :class:`Distributed` then answers as a single rank would
and the trainer's code paths are the ones it always had.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .config import ConfigError

_FUSED_METHOD = "fastppo_response_logprobs"
_CALL_METHOD = "fastppo_call"


def launched() -> bool:
    """True when a launcher asked for several processes or a process group is already up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def launcher() -> str | None:
    """``torchrun --nproc-per-node M`` (and ``--nnodes K`` beyond one machine) when this process
    was started as one of several; None otherwise. For the "resume with" line."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        return None
    if world <= 1:
        return None
    nodes = f" --nnodes {world // local}" if local and world // local > 1 else ""
    return f"torchrun{nodes} --nproc-per-node {local}"


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("FASTPPO_DIST_TIMEOUT", "600")
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"FASTPPO_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ConfigError(f"FASTPPO_DIST_TIMEOUT must be > 0 seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


class Distributed:
    """The process group as the trainer sees it; a single process is world size 1, rank 0."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.rank, self.world = 0, 1
        self.local_rank = 0
        self.mesh = None
        self.fsdp = False
        self.started_group = False
        if enabled:
            import torch.distributed as dist

            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------------------------------
    # setup

    @classmethod
    def setup(cls, config) -> "Distributed":
        """Join (or start) the process group the environment describes; world size 1 otherwise."""
        if not launched():
            return cls(False)
        import torch.distributed as dist

        started = False
        if not dist.is_initialized():
            want_cuda = config.device != "cpu" and torch.cuda.is_available()
            if want_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if want_cuda else "gloo", timeout=_timeout())
            started = True
        self = cls(True)
        self.started_group = started
        n, b, k = self.world, config.batch_size, config.num_generations
        if (b // k) % n:
            raise ConfigError(f"batch_size ({b}) / num_generations ({k}) = {b // k} prompts per iteration must be a "
                              f"multiple of the number of ranks ({n}): each rank takes a whole share of the prompts")
        return self

    def pick_device(self, device: torch.device) -> torch.device:
        """Rank r uses ``cuda:LOCAL_RANK`` on CUDA; the CPU otherwise."""
        if not self.enabled or device.type != "cuda":
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def check_backend(self, device: torch.device) -> None:
        import torch.distributed as dist

        if not self.enabled:
            return
        backend = dist.get_backend()
        if device.type == "cpu" and "gloo" not in str(backend):
            raise ConfigError(f"a CPU run needs the gloo backend; the process group uses {backend}")

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block, then the others (files one process should write, the others read)."""
        if self.enabled and not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.enabled and self.is_main:
                self.barrier()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        """Leave the process group if this object started it."""
        if self.enabled and self.started_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.started_group = False

    # ---------------------------------------------------------------------------------------
    # models

    def shard(self, trainer) -> None:
        """FSDP2 over the actor, a separate reference and the critic; then per-rank random streams.

        Called after the models load and before the optimizer is built (it must see the sharded
        parameters). Rank 0 keeps the random stream a single process would have; rank r > 0
        draws from its own, so ranks sample different responses.
        """
        if not self.enabled:
            return
        from torch.distributed.device_mesh import init_device_mesh

        import warnings

        # FSDP2 warns that an in-place op on a module's output would skip its pre-backward hook; the
        # trainer never writes into model outputs (it always builds new tensors from them).
        warnings.filterwarnings("ignore", message=r".*returned a view tensor.*")
        self.mesh = init_device_mesh(trainer.device.type, (self.world,))
        self.fsdp = True
        trainer.actor = _fully_shard(trainer.actor, self.mesh)
        if trainer.reference is not None:
            trainer.reference = _fully_shard(trainer.reference, self.mesh)
        if trainer.critic is not None:
            trainer.critic = _fully_shard(trainer.critic, self.mesh)
        seed_rank(trainer.config.seed, self.rank)

    # ---------------------------------------------------------------------------------------
    # rollout

    @contextmanager
    def unsharded(self, model: nn.Module) -> Iterator[None]:
        """Within the block ``model``'s FSDP2 parameters stay gathered: generation's one forward
        per token then costs no all-gather (as a rollout engine holds the full weights)."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
        for m in units:
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    def local_rows(self, rows: list[Any]) -> list[Any]:
        """This rank's contiguous share of the global batch's rows."""
        if not self.enabled:
            return rows
        n = len(rows) // self.world
        return rows[self.rank * n:(self.rank + 1) * n]

    def together(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on every rank, then a failure flag shared by all: when it raised
        on any rank, that rank re-raises its error and every other rank raises one naming it, so
        user code (a reward function, a reward server) failing on one rank stops all of them at
        the same point with its message, instead of leaving them waiting in the next collective."""
        if not self.enabled:
            return fn(*args, **kwargs)
        import torch.distributed as dist

        error: BaseException | None = None
        result = None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = exc
        mine = None if error is None else f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
        if failed:
            r, m = failed[0]
            raise RuntimeError(f"rank {self.rank} stopped: rank {r} failed: {m}")
        return result

    def all_done(self, done: torch.Tensor) -> bool:
        """Generation stops when every row of every rank is done: the same number of forward
        passes on all ranks (FSDP2 all-gathers in each), and one response width for the batch."""
        flag = done.all()
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = flag.to(torch.int32).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                      eps: float = 1e-8) -> torch.Tensor:
        """``fastppo.masked_whiten`` with the statistics of the global batch.

        Mean and unbiased variance over the valid positions of all ranks' rows (float64 sums,
        all-reduced), then ``(x - mean) * rsqrt(var + eps)`` at this rank's positions; fewer than
        two valid positions in all: ``x - mean`` unscaled. Returns float32, 0 at masked positions.
        """
        import fastppo

        if not self.enabled:
            return fastppo.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
        import torch.distributed as dist

        valid = mask != 0
        xf = x.to(torch.float64)
        xv = torch.where(valid, xf, 0.0)
        sums = torch.stack([valid.to(torch.float64).sum(), xv.sum()])
        dist.all_reduce(sums)
        n = sums[0]
        mean = sums[1] / n.clamp(min=1)
        centered = xv - mean
        sq = torch.where(valid, centered.square(), 0.0).sum().reshape(1)
        dist.all_reduce(sq)
        var = sq[0] / (n - 1).clamp(min=1)
        scale = torch.where(n >= 2, torch.rsqrt(var + eps), torch.ones_like(var))
        out = centered * scale
        if not shift_mean:
            out = out + mean
        return torch.where(valid, out, 0.0).to(torch.float32)

    def reinforce_pp_advantages(self, rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float):
        """``fastppo.reinforce_pp_advantages`` whitened over the global batch: the return-to-go is
        ``fastppo.gae`` with values 0 and lam 1 (per row, no communication), then global whitening."""
        import fastppo

        if not self.enabled:
            return fastppo.reinforce_pp_advantages(rewards, mask, gamma=gamma)
        _, returns = fastppo.gae(rewards, torch.zeros_like(rewards, dtype=torch.float32), mask, gamma=gamma, lam=1.0)
        return self.masked_whiten(returns, mask), returns

    # ---------------------------------------------------------------------------------------
    # update

    def micro_batches(self, mini: torch.Tensor, mask: torch.Tensor, micro_size: int, agg: str
                      ) -> list[tuple[torch.Tensor, float, Any]]:
        """``[(rows, loss_weight, stats_weight), ...]`` for one mini-batch; ``stats_weight(name)``
        weighs the micro-batch's statistic ``name``.

        ``mini``: the global row indices of the mini-batch (a slice of the shared shuffle);
        ``mask``: this rank's ``[B / N, T]`` response mask. ``rows`` index this rank's tensors.
        One process: ``mini`` split into micro-batches weighted by their share of its rows (the
        trainer's own rule). N ranks: see the module docstring; ``loss_weight`` includes the
        factor N that undoes FSDP2's averaging of gradients over ranks, ``stats_weight`` does not
        (all-reduced sums of the weighted statistics are the global ones): the loss terms weigh as
        the loss does, the token fractions and means (``TOKEN_STATS``) by valid tokens whatever the
        aggregation.
        """
        if not self.enabled:
            return [(m, m.numel() / mini.numel(), _const(m.numel() / mini.numel())) for m in mini.split(micro_size)]
        import torch.distributed as dist

        n_local = mask.shape[0]
        lo = self.rank * n_local
        owner = torch.div(mini, n_local, rounding_mode="floor")
        local = mini[owner == self.rank] - lo
        counts = torch.bincount(owner.cpu(), minlength=self.world)
        steps = max(1, max(-(-int(c) // micro_size) for c in counts))
        tokens, per_row = _row_normalisers(mask, agg)
        totals = torch.stack([tokens[local].sum(), (per_row if per_row is not None else tokens)[local].sum()])
        dist.all_reduce(totals)
        total_tokens, total = (float(x) for x in totals.clamp(min=1))
        out = []
        parts = list(local.split(micro_size)) if local.numel() else []
        for i in range(steps):
            if i < len(parts):
                rows = parts[i]
                w = 1.0 if per_row is None else float(per_row[rows].sum().item()) / total
                w_tok = float(tokens[rows].sum().item()) / total_tokens
                if per_row is None:  # token-sum: its loss terms are sums, shared among ranks as they are
                    stat = _by_kind(w_tok, 1.0)
                else:
                    stat = _by_kind(w_tok, w)
                out.append((rows, w * self.world, stat))
            else:  # this rank holds fewer rows of the mini-batch: a zero-weighted pass keeps the collectives aligned
                out.append((torch.zeros(1, dtype=torch.long, device=mask.device), 0.0, _const(0.0)))
        return out

    def grad_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """A plain tensor of the global gradient norm (FSDP2's clip_grad_norm_ returns a DTensor)."""
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ---------------------------------------------------------------------------------------
    # metrics

    def gather_rows(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Each ``[B / N, ...]`` tensor of every rank, concatenated in rank order into ``[B, ...]``
        (right-padded with zeros when widths differ). None stays None. For metrics only."""
        if not self.enabled:
            return list(tensors)
        import torch.distributed as dist

        mine = [None if t is None else t.detach().cpu() for t in tensors]
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        out = []
        for i, t in enumerate(tensors):
            if t is None:
                out.append(None)
                continue
            parts = [e[i] for e in everyone]
            if parts[0].dim() >= 2:
                width = max(p.shape[1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) if p.shape[1] < width else p
                         for p in parts]
            out.append(torch.cat(parts).to(t.device))
        return out

    def sum_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted statistics summed over ranks (same keys on every rank)."""
        if not self.enabled or not stats:
            return stats
        import torch.distributed as dist

        keys = sorted(stats)
        t = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).reshape(()).cpu() for k in keys])
        dist.all_reduce(t)
        return {k: t[i] for i, k in enumerate(keys)}

    def max(self, value: float) -> float:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def agree_stop(self, signal: str | None) -> str | None:
        """At an iteration boundary: a stop signal seen by any rank stops every rank (all save the
        same checkpoint and exit alike), so no rank runs ahead into collectives the others left."""
        if not self.enabled:
            return signal
        import torch.distributed as dist

        names = (None, "SIGINT", "SIGTERM")
        t = torch.tensor([names.index(signal) if signal in names else 2], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return names[int(t.item())]

    def object_from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# Statistics of fastppo.ppo_loss / policy_loss / value_loss that are fractions or means over valid
# tokens whatever the loss aggregation; the others (loss terms) follow the aggregation.
TOKEN_STATS = frozenset({"clipfrac", "clipfrac_lower", "approx_kl", "value_clipfrac"})


def _row_normalisers(mask: torch.Tensor, agg: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of ``mask`` [B, T]: (valid tokens [B] float64, what ``agg`` divides by per row:
    tokens for token-mean, 1 for a row with a valid token for the seq-mean modes, None for
    token-sum). Shared by the plain and the token-budget micro-batch weights."""
    valid = mask != 0
    tokens = valid.sum(1).to(torch.float64)
    if agg == "token-mean":
        per_row = tokens
    elif agg.startswith("seq-mean"):
        per_row = valid.any(1).to(torch.float64)
    else:  # token-sum: a sum over tokens needs no normaliser
        per_row = None
    return tokens, per_row


def _const(w: float):
    return lambda name: w


def _by_kind(token_weight: float, loss_weight: float):
    return lambda name: token_weight if name in TOKEN_STATS else loss_weight


def seed_rank(seed: int, rank: int) -> None:
    """Rank 0 keeps ``seed``'s stream; rank r > 0 gets its own (sampling must differ between ranks)."""
    if rank == 0:
        return
    s = seed + 1_000_003 * rank
    random.seed(s)
    torch.manual_seed(s)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the classes transformers lists in ``_no_split_modules``)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _reshard_after_forward() -> bool:
    raw = os.environ.get("FASTPPO_FSDP_RESHARD_AFTER_FORWARD", "1").strip().lower()
    if raw not in ("0", "1", "true", "false"):
        raise ConfigError(f"FASTPPO_FSDP_RESHARD_AFTER_FORWARD must be 1 or 0, got {raw!r}")
    return raw in ("1", "true")


def _fully_shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # Resharding each block after its forward (the default) keeps one block's full weights at a
    # time; 0 keeps them gathered until the backward (ZeRO-2-like: fewer all-gathers, more memory,
    # and a frozen reference then stays gathered for good).
    reshard = _reshard_after_forward()
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh)
    # The fused head reads the backbone's last hidden state and the LM head's weight outside the
    # model's forward; as a registered forward method it runs inside FSDP2's all-gather of the
    # root's parameters (embeddings, final norm, head) and its gradients are reduce-scattered.
    setattr(model, _FUSED_METHOD, _fused_logprobs.__get__(model))
    register_fsdp_forward_method(model, _FUSED_METHOD)
    # Any other function of the whole model outside its forward (the packed fused head): the same hooks.
    setattr(model, _CALL_METHOD, _call.__get__(model))
    register_fsdp_forward_method(model, _CALL_METHOD)
    return model


def _call(model, fn, *args):
    return fn(model, *args)


def call_method(model: nn.Module, fn, *args):
    """``fn(model, *args)``, inside FSDP2's forward hooks of ``model`` when it is sharded (its root
    parameters, such as the embeddings and the LM head, are gathered for ``fn``)."""
    if hasattr(model, _CALL_METHOD):
        return getattr(model, _CALL_METHOD)(fn, *args)
    return fn(model, *args)


def _fused_logprobs(model, seq, attn, pos, mask, prompt_width, temperature):
    from .models import response_logprobs as plain

    return plain(model, seq, attn, pos, prompt_width, mask, temperature, True)


def sharded_fused(model: nn.Module) -> bool:
    """Whether the fused head of ``model`` runs through FSDP2's hooks (its registered method)."""
    return hasattr(model, _FUSED_METHOD)


def response_logprobs(model: nn.Module, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
                      prompt_width: int, mask: torch.Tensor, temperature: float, fused: bool = True):
    """``models.response_logprobs``, through FSDP2's hooks when ``model`` is sharded."""
    from .models import fused_head
    from .models import response_logprobs as plain

    if fused and hasattr(model, _FUSED_METHOD) and fused_head(model) is not None:
        return getattr(model, _FUSED_METHOD)(seq, attn, pos, mask, prompt_width, temperature)
    return plain(model, seq, attn, pos, prompt_width, mask, temperature, fused)


# --------------------------------------------------------------------------------------------
# checkpoints


def _modules(trainer) -> nn.ModuleDict:
    """Every trained module under one root, so state-dict keys (FQNs) name actor and critic apart."""
    mods = {"actor": trainer.actor}
    if trainer.critic is not None:
        mods["critic"] = trainer.critic
    return nn.ModuleDict(mods)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: only the adapter is trained and saved; the frozen base comes from the model directory.
    return StateDictOptions(ignore_frozen_params=True, **kw)


def _optimizer_to_ids(full: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An FQN-keyed full optimizer state dict in ``optimizer.state_dict()``'s layout (parameter
    ids by position), so a one-process ``--resume`` loads it as its own."""
    ids: dict[str, int] = {}
    groups = []
    for group in full["param_groups"]:
        g = dict(group)
        g["params"] = [ids.setdefault(name, len(ids)) for name in group["params"]]
        groups.append(g)
    state = {ids[name]: s for name, s in full["state"].items() if name in ids}
    return {"state": state, "param_groups": groups}


def _optimizer_from_ids(plain: dict[str, Any], optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`_optimizer_to_ids`: positions to FQNs (``names``, in parameter order)."""
    groups = []
    for group in plain["param_groups"]:
        g = dict(group)
        g["params"] = [names[i] for i in group["params"]]
        groups.append(g)
    return {"state": {names[i]: s for i, s in plain["state"].items()}, "param_groups": groups}


def _param_names(trainer) -> list[str]:
    """FQNs under :func:`_modules` of the optimizer's parameters, in the optimizer's order."""
    root = _modules(trainer)
    by_id = {id(p): n for n, p in root.named_parameters()}
    return [by_id[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]


def _gather_rng(d: Distributed) -> list[dict[str, Any]]:
    import torch.distributed as dist

    from . import checkpoint

    everyone: list[Any] = [None] * d.world
    dist.all_gather_object(everyone, checkpoint.rng_state())
    return everyone


def save(trainer, step: int) -> str:
    """A checkpoint written by all ranks together; returns its directory (on every rank).

    The one-process layout, written by rank 0 from full state dicts gathered over the ranks:
    ``actor/`` and ``critic/`` (safetensors), the trainer state (JSON plus safetensors, the optimizer in one-process layout, every rank's random generators), ``fingerprint.json``,
    ``config.yaml``. No file holds a pickle, so it is read back exactly as
    safely as a one-process checkpoint (``torch.distributed.checkpoint``'s format is not used: its
    ``.metadata`` and the non-tensor entries of its shards are unpickled when read). Any number of
    ranks, or one process, resumes it. The directory appears under its final name only when whole.
    """
    import yaml
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from . import checkpoint

    d: Distributed = trainer.dist
    cfg = trainer.config
    root = checkpoint.checkpoint_root(cfg.output_dir)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{d.object_from_main(os.getpid())}")
    if d.is_main:
        os.makedirs(root, exist_ok=True)
        checkpoint._tidy(root)
        os.makedirs(tmp)
    d.barrier()
    mods = _modules(trainer)
    full = get_model_state_dict(mods, options=_options(full_state_dict=True, cpu_offload=True))
    full_optim = get_optimizer_state_dict(mods, trainer.optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    rngs = _gather_rng(d)
    if d.is_main:
        actor_sd = {k[len("actor."):]: v for k, v in full.items() if k.startswith("actor.")}
        _save_actor(trainer, os.path.join(tmp, "actor"), actor_sd)
        trainer.tokenizer.save_pretrained(os.path.join(tmp, "actor"))
        if trainer.critic is not None:
            critic_sd = {k[len("critic.model."):]: v for k, v in full.items() if k.startswith("critic.model.")}
            trainer.critic.model.save_pretrained(os.path.join(tmp, "critic"), state_dict=critic_sd)
        state = {"format": checkpoint.FORMAT, "step": trainer.step,
                 "optimizer": _optimizer_to_ids(full_optim, trainer.optimizer),
                 "scheduler": trainer.scheduler.state_dict(), "kl_coef": trainer.kl.value,
                 "sampler": trainer.sampler.state_dict(), "shuffle_gen": trainer.shuffle_gen.get_state(),
                 "rng": rngs[0], "rng_ranks": rngs, "world_size": d.world, "config": cfg.to_dict()}
        checkpoint.write_state(state, tmp)
        with open(os.path.join(tmp, checkpoint.FINGERPRINT), "w", encoding="utf-8") as f:
            json.dump(trainer.fingerprint, f, indent=1, sort_keys=True)
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    del full, full_optim
    if d.is_main:
        checkpoint.fsync_tree(tmp)
        if os.path.exists(final):
            old = os.path.join(root, f".old-step-{step:08d}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            checkpoint._fsync(root, directory=True)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        checkpoint._fsync(root, directory=True)
    d.barrier()
    return final


def _save_actor(trainer, path: str, state_dict: dict[str, torch.Tensor]) -> None:
    # The sharded module cannot hand save_pretrained its own weights (they are DTensor shards);
    # the gathered ones are passed in. A peft model picks its adapter's tensors out of them.
    trainer.actor.save_pretrained(path, state_dict=state_dict)


def resume(trainer, candidates: list[str]) -> str | None:
    """Load the newest usable checkpoint of ``candidates`` on every rank; returns its path.

    Every rank reads the checkpoint with the one-process reader (``checkpoint.read``: safetensors
    weights, the trainer state from JSON plus safetensors) and keeps its FSDP2
    shard of the full weights and optimizer, so a checkpoint written by any number of ranks, or by
    one process, loads. A ``dcp/`` folder that earlier multi-process checkpoints also held
    is never read (``torch.distributed.checkpoint`` unpickles it); their safe files still resume.
    The random generators of each rank come back when the number of ranks is the one it was
    written with; otherwise every rank starts a fresh stream (seeded from the seed, the step and
    its rank), with a notice: the run continues correctly but samples other responses than the
    uninterrupted run would have.
    """
    from . import checkpoint
    from .checkpoint import CheckpointError

    d: Distributed = trainer.dist

    def load(path: str) -> None:
        # All ranks decide together, before any collective of the load: a file one rank could not
        # read skips the checkpoint everywhere.
        loaded, why = None, None
        try:
            loaded = checkpoint.read(trainer, path)
        except CheckpointError as exc:
            why = str(exc)
        bad = next((w for w in _all_objects(d, why) if w), None)
        if bad:
            raise CheckpointError(bad)
        bad = next((w for w in _all_objects(d, _load(trainer, path, loaded)) if w), None)
        if bad:
            raise CheckpointError(bad)

    return checkpoint.load_newest(candidates, trainer.fingerprint, load, announce=d.is_main)


def _all_objects(d: Distributed, obj: Any) -> list[Any]:
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    everyone: list[Any] = [None] * d.world
    dist.all_gather_object(everyone, obj)
    return everyone


def _load(trainer, path: str, loaded: dict[str, Any]) -> str | None:
    """Put what ``checkpoint.read`` read from ``path`` into the sharded modules, the optimizer and
    the trainer; the reason it does not fit, or None."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from . import checkpoint

    d: Distributed = trainer.dist
    state = loaded["state"]
    mods = _modules(trainer)
    try:
        # LoRA: the checkpoint holds the adapter only; the frozen base weights are already in place.
        lora = trainer.config.lora_r > 0
        critic_lora = getattr(trainer.config, "critic_lora_r", 0) > 0
        actor = _adapter_keys(trainer.actor, loaded["actor"], "actor") if lora else loaded["actor"]
        full = {f"actor.{k}": v for k, v in actor.items()}
        if loaded["critic"] is not None:
            critic = loaded["critic"]
            if critic_lora:
                critic = _adapter_keys(trainer.critic.model, critic, "critic")
            full.update({f"critic.model.{k}": v for k, v in critic.items()})
        set_model_state_dict(mods, full, options=_options(full_state_dict=True, strict=not (lora or critic_lora)))
        optim = _optimizer_from_ids(state["optimizer"], trainer.optimizer, _param_names(trainer))
        set_optimizer_state_dict(mods, trainer.optimizer, optim, options=_options(full_state_dict=True))
        from .models import keep_adamw_implementation

        keep_adamw_implementation(trainer.optimizer)
    except checkpoint.CheckpointError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - shapes or keys that do not fit, alike on every rank
        return f"its weights do not fit this run: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.kl.value = float(state["kl_coef"])
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.shuffle_gen.set_state(state["shuffle_gen"])
    trainer.step = int(state["step"])
    rngs = state.get("rng_ranks")
    if rngs is not None and len(rngs) == d.world:
        checkpoint.set_rng_state(rngs[d.rank])
    elif d.world == 1:
        checkpoint.set_rng_state(state["rng"])
    else:
        if d.is_main:
            checkpoint.ranks_notice(path, state, d.world)
        random.seed(trainer.config.seed + 7919 * trainer.step)
        torch.manual_seed(trainer.config.seed + 7919 * trainer.step)
        seed_rank(trainer.config.seed + 7919 * trainer.step, d.rank)
    return None


def _adapter_keys(model: nn.Module, saved: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """A saved LoRA adapter's tensors (``checkpoint.read``'s, as peft writes them) under
    ``model``'s own parameter names (``model``: the peft model); ``CheckpointError`` unless every
    trained parameter of ``model`` gets one (``set_model_state_dict`` with LoRA is not strict: a
    name that matched nothing would be skipped silently)."""
    from .checkpoint import CheckpointError

    # peft writes lora_A.default.weight as lora_A.weight and a trained head copy
    # (modules_to_save, e.g. the critic's value head) score.modules_to_save.default.weight as score.weight.
    own = [k for k, p in model.named_parameters() if p.requires_grad]
    out = {}
    for k in own:
        short = k.replace(".modules_to_save.default.", ".").replace(".default.", ".")
        if short in saved:
            out[k] = saved[short]
    if len(out) != len(own) or len(saved) != len(own):
        raise CheckpointError(f"{what}/ holds an adapter that does not fit this LoRA configuration")
    return out
