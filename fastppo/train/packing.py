"""Padding-free forwards and token-budget micro-batches (``--padding-free``, ``--micro-batch-tokens``).

A rollout is ``[B, P + R]``: prompts left-padded to the longest prompt, responses right-padded to
the longest response. With response lengths that spread from a few tokens to ``max_new_tokens``,
half or more of those positions are padding, and every forward of an iteration (old and reference
log-probs, values, reward-model scores, each update's actor and critic passes) computes them.

Packed, each micro-batch's sequences (the real prompt tokens followed by the real response tokens,
no padding) are laid end to end into a few rows as wide as its longest sequence (first-fit
decreasing), with ``position_ids`` that restart at 0 for each sequence and no ``attention_mask``.
transformers then builds a block-diagonal causal mask for sdpa and eager
(``masking_utils.find_packed_sequence_indices``) and runs flash-attention's varlen kernels, so each
token attends to its own sequence only; ``use_cache=False`` is required (with a cache the packed
detection is skipped). Rows at most as wide as the longest sequence keep the attention cost at or
below the padded one (a single row of all sequences would pay (sum of lengths)^2 on sdpa/eager).
What the ops need is gathered back into the ``[B, R]`` layout: the hidden state (or logits) before
each response token, the critic's value there, the reward model's score at the last token. The
numbers are those of the padded forwards up to float rounding (``tests/test_train_packing.py``).

Whether a model takes packed rows is checked, not assumed: :class:`Packing` runs each model once
on two short sequences packed into one row and separately, and a model whose outputs differ (or
that raises) runs padded, with a one-line notice.

``--micro-batch-tokens N`` groups the rows of a mini-batch (and of the rollout's no-grad forwards)
by first-fit decreasing so that no group holds more than N real tokens (prompt + response); a
sequence longer than N gets a group of its own, with a notice. Each group's loss is weighted by its
share of the mini-batch as the aggregation needs (valid tokens for ``token-mean``, rows with a
valid token for ``seq-mean-*``, 1 for ``token-sum``), so the accumulated gradient is the mini-batch's.
Under torchrun the rows are balanced by tokens across ranks, so a rank whose sampled rows were long
does not leave the others waiting. The rollout's forwards gather the global batch's ids
(:meth:`Packing.forward_rows`), each rank runs its :func:`rank_partition` share (longest first onto
the rank with the fewest tokens so far, computed alike on every rank from the global lengths) and
one all-reduce gives each rank its own rows' results back (:meth:`Packing.own_rows`). Advantages
(group estimators included) are computed on the rows each rank sampled; then the update tensors are
gathered once per iteration (:func:`gather_update_rows`) and each mini-batch's rows are split among
the ranks the same way. Each rank groups its share into the same number of groups, balanced by
tokens, padding with zero-weighted groups where it holds fewer, so every rank meets the same FSDP2
collectives.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .models import autocast, checkpointing, fused_head


# --------------------------------------------------------------------------------------------
# grouping

def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped so that each group's sum is at most ``capacity`` (an item
    larger than ``capacity`` alone in its group): longest first, each into the first group with
    room. Groups come out in the order they were opened, each listing its items longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for g, left in enumerate(room):
            if n <= left:
                groups[g].append(i)
                room[g] -= n
                break
        else:
            groups.append([i])
            room.append(capacity - n)
    return groups


def balanced_groups(lengths: list[int], k: int) -> list[list[int]]:
    """Indices of ``lengths`` in exactly ``k`` groups of near-equal sums: longest first, each into
    the group with the smallest sum so far (some groups stay empty when there are fewer items)."""
    groups: list[list[int]] = [[] for _ in range(k)]
    sums = [0] * k
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        g = min(range(k), key=lambda g: (sums[g], g))
        groups[g].append(i)
        sums[g] += lengths[i]
    return groups


def rank_partition(lengths: list[int], world: int) -> list[list[int]]:
    """Indices of ``lengths`` split among ``world`` ranks with near-equal sums, each rank's list in
    increasing order. Greedy (longest first onto the lightest rank, ties to the lower index), so the
    same on every rank given the same lengths; every index exactly once; the heaviest rank exceeds
    the lightest by at most the longest item (and so the mean by less than it)."""
    if world < 1:
        raise ValueError(f"rank_partition: world must be >= 1, got {world}")
    return [sorted(g) for g in balanced_groups(lengths, world)]


def budget_groups(lengths: list[int], budget: int, k: int | None = None) -> list[list[int]]:
    """Groups of at most ``budget`` tokens (an item over it alone); with ``k`` (at least the number
    first-fit decreasing needs) exactly ``k`` groups, balanced when that still respects the budget."""
    groups = first_fit_decreasing(lengths, budget)
    if k is None or k == len(groups):
        return groups
    balanced = balanced_groups(lengths, k)
    if all(len(g) <= 1 or sum(lengths[i] for i in g) <= budget for g in balanced):
        return balanced
    return groups + [[] for _ in range(k - len(groups))]


# --------------------------------------------------------------------------------------------
# the global batch for the updates (torchrun with a token budget)

@dataclass
class UpdateRows:
    """The tensors the update phase reads: this rank's own rows (``whole`` false) or, gathered by
    :func:`gather_update_rows`, the global batch's in rank order (``whole`` true). ``seq``, ``attn``,
    ``pos`` ``[B, P + R]`` (prompt width ``width``); the others ``[B, R]`` or None."""

    width: int
    seq: torch.Tensor
    attn: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor | None
    returns: torch.Tensor | None
    ref_logprobs: torch.Tensor
    is_weights: torch.Tensor | None
    whole: bool = False


def _all_gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    import torch.distributed as dist

    # gloo gathers no bool tensors: as bytes, and back.
    send = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()
    parts = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(parts, send)
    out = torch.cat(parts)
    return out.bool() if t.dtype == torch.bool else out


@dataclass
class ForwardRows:
    """The rows the rollout's no-grad forwards read: this rank's own (``whole`` false) or the global
    batch's in rank order (``whole`` true, see :func:`gather_rows`). ``seq``, ``attn``, ``pos``
    ``[B, P + R]`` (prompt width ``width``), ``mask`` bool ``[B, R]``; ``own``: this rank's rows
    as ``(first, count)``, ``resp``: its own response width."""

    width: int
    seq: torch.Tensor
    attn: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    own: tuple[int, int]
    resp: int
    whole: bool = False


def gather_rows(width: int, seq: torch.Tensor, attn: torch.Tensor, world: int, pad_id: int
                ) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, R, seq, attn, pos)`` of the global batch: every rank's ``seq``/``attn`` ``[b, width + resp]``
    re-padded to the global prompt width ``P`` (on the left) and response width ``R`` (on the right),
    concatenated in rank order; position ids rebuilt from the attention mask. A collective."""
    import torch.distributed as dist

    from .models import position_ids_from

    resp = seq.shape[1] - width
    widths = torch.tensor([width, resp], dtype=torch.int64, device=seq.device)
    everyone = [torch.empty_like(widths) for _ in range(world)]
    dist.all_gather(everyone, widths)
    p_max = max(int(w[0]) for w in everyone)
    r_max = max(int(w[1]) for w in everyone)
    pads = (p_max - width, r_max - resp)
    g_seq = _all_gather_rows(torch.nn.functional.pad(seq, pads, value=pad_id), world)
    g_attn = _all_gather_rows(torch.nn.functional.pad(attn, pads, value=0), world)
    return p_max, r_max, g_seq, g_attn, position_ids_from(g_attn)


def gather_update_rows(rows: UpdateRows, world: int, pad_id: int) -> UpdateRows:
    """Every rank's :class:`UpdateRows` concatenated in rank order (a collective: all ranks call it).

    Each rank's prompts are left-padded to its own longest prompt and its responses right-padded
    to its own longest response; here they are re-padded to the global widths (pad ids, attention
    0, per-token tensors 0 / false past each response), which is the one-process layout, and the
    position ids are rebuilt from the attention mask. Every rank holds the same number of rows."""
    F = torch.nn.functional
    resp = rows.seq.shape[1] - rows.width
    p_max, r_max, g_seq, g_attn, g_pos = gather_rows(rows.width, rows.seq, rows.attn, world, pad_id)

    def response(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if t.shape[1] != resp:
            raise ValueError(f"gather_update_rows: a per-token tensor has {t.shape[1]} columns, the responses {resp}")
        padded = F.pad(t.to(torch.uint8), (0, r_max - resp)).bool() if t.dtype == torch.bool else F.pad(t, (0, r_max - resp))
        return _all_gather_rows(padded, world)

    return UpdateRows(p_max, g_seq, g_attn, g_pos, response(rows.mask),
                      response(rows.old_logprobs), response(rows.advantages), response(rows.old_values),
                      response(rows.returns), response(rows.ref_logprobs), response(rows.is_weights), whole=True)


# --------------------------------------------------------------------------------------------
# the packed layout of one micro-batch

@dataclass
class Layout:
    """``b`` padded rows laid out packed.

    input_ids, position_ids: int64 ``[rows, width]`` (``width``: the longest sequence); the tail of
    a row after its last sequence holds pad ids at positions that start a sequence of their own
    (their outputs are never read). index: int64 ``[b, R]`` into the flattened ``rows * width``
    positions, the state before each response token (any position of the row's sequence where the
    response is masked); last: int64 ``[b]``, each sequence's last real token.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    last: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def build_layout(seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, width: int, pad_id: int) -> Layout | None:
    """The packed :class:`Layout` of padded rows ``seq``/``attn``/``pos`` ``[b, P + R]`` (prompt width
    ``P = width``), or None when a row has no prompt token (nothing before its first response token
    to score it from: such a batch runs padded). One host sync (the lengths)."""
    b, total = seq.shape
    valid = attn != 0
    n = valid.sum(1)
    p = valid[:, :width].sum(1)
    if b == 0:
        return None
    lengths, prompts = torch.stack([n, p]).tolist()
    if min(prompts) == 0:
        return None
    cap = max(lengths)
    rows = first_fit_decreasing(lengths, cap)
    base = [0] * b
    for r, members in enumerate(rows):
        offset = r * cap
        for i in members:
            base[i] = offset
            offset += lengths[i]
    dev = seq.device
    base_t = torch.tensor(base, dtype=torch.long, device=dev)
    dest = (base_t[:, None] + pos)[valid]
    ids = torch.full((len(rows) * cap,), pad_id, dtype=seq.dtype, device=dev)
    ids[dest] = seq[valid]
    # Tail positions count on from the row's width: a jump from the last sequence, so a sequence of its own.
    positions = torch.arange(cap, device=dev).repeat(len(rows))
    positions[dest] = pos[valid].to(positions.dtype)
    index = base_t[:, None] + pos[:, width - 1:total - 1]
    index = torch.where(valid[:, width:], index, base_t[:, None])
    last = base_t + n - 1
    return Layout(ids.view(len(rows), cap), positions.view(len(rows), cap), index, last)


class Batch:
    """One micro-batch in both layouts: the padded rows (``seq``, ``attn``, ``pos`` ``[b, P + R]``,
    prompt width ``width``) and, built on first use and shared by the models, the packed one."""

    def __init__(self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, width: int, pad_id: int):
        self.seq, self.attn, self.pos, self.width, self.pad_id = seq, attn, pos, width, pad_id
        self._layout: Layout | None | bool = False

    @property
    def layout(self) -> Layout | None:
        if self._layout is False:
            self._layout = build_layout(self.seq, self.attn, self.pos, self.width, self.pad_id)
        return self._layout  # type: ignore[return-value]

    @property
    def labels(self) -> torch.Tensor:
        return self.seq[:, self.width:]


# --------------------------------------------------------------------------------------------
# packed forwards

def _hidden(model: nn.Module, backbone: nn.Module, lay: Layout) -> torch.Tensor:
    """``[rows * width, H]`` last hidden states of the packed rows."""
    with checkpointing(model):
        hidden = backbone(input_ids=lay.input_ids, attention_mask=None, position_ids=lay.position_ids,
                          use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def _head(parts, hidden: torch.Tensor):
    head = parts[1]
    # Under autocast the hidden states are bf16 while the head is float32, as in the padded path.
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    return weight, bias


def packed_logprobs(model: nn.Module, lay: Layout, labels: torch.Tensor, mask: torch.Tensor, temperature: float,
                    fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``models.response_logprobs`` from packed rows: float32 ``[b, R]`` log-probs and entropy."""
    import fastppo

    parts = fused_head(model)
    if parts is not None:
        hidden = _hidden(model, parts[0], lay)[lay.index]
        if not fused:
            # --no-fused-head: real logits, but only for the states that score a response token (the
            # sequences packed around them differ per row, so logits_to_keep's columns cannot say it).
            logits = parts[1](hidden)
            return fastppo.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True,
                                                mask=mask)
        weight, bias = _head(parts, hidden)
        return fastppo.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                       return_entropy=True, mask=mask)
    # A model whose head cannot be told apart from its backbone: logits at every packed position.
    with checkpointing(model):
        logits = model(input_ids=lay.input_ids, attention_mask=None, position_ids=lay.position_ids,
                       use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1])[lay.index]
    return fastppo.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True, mask=mask)


def packed_policy_loss(model: nn.Module, lay: Layout, labels: torch.Tensor, temperature: float, **loss_kwargs):
    """``models.response_policy_loss`` from packed rows (None unless the head is fused and frozen)."""
    import fastppo

    parts = fused_head(model)
    if parts is None or parts[1].weight.requires_grad or (parts[1].bias is not None and parts[1].bias.requires_grad):
        return None
    hidden = _hidden(model, parts[0], lay)[lay.index]
    weight, bias = _head(parts, hidden)
    return fastppo.linear_ppo_loss(hidden, weight, labels, bias=bias, temperature=temperature, **loss_kwargs)


def _hooked(model: nn.Module, fn: Callable, *args):
    """``fn(model, *args)``, through FSDP2's forward hooks when ``model`` is sharded."""
    from .distributed import call_method

    return call_method(model, fn, *args)


# --------------------------------------------------------------------------------------------
# the support check

def _probe_ids(vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = (torch.arange(9, device=device) * 7 + 5) % max(vocab, 1)
    return ids[:5], ids[5:]


def _compare(run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor], vocab: int,
             device: torch.device, bf16: bool) -> str | None:
    """Why two sequences packed into one row do not give their separate outputs, or None."""
    a, b = _probe_ids(vocab, device)
    pa, pb = torch.arange(len(a), device=device), torch.arange(len(b), device=device)
    try:
        with torch.no_grad(), autocast(device, bf16):
            alone_a = run(a[None], pa[None], torch.ones_like(a)[None]).float()
            alone_b = run(b[None], pb[None], torch.ones_like(b)[None]).float()
            packed = run(torch.cat([a, b])[None], torch.cat([pa, pb])[None], None).float()
    except Exception as exc:  # noqa: BLE001 - a model that does not take position_ids without a mask
        return f"its packed forward raised {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    alone = torch.cat([alone_a, alone_b], dim=1)
    if packed.shape != alone.shape:
        return f"its packed output has shape {tuple(packed.shape)}, the separate ones {tuple(alone.shape)}"
    scale = float(alone.abs().max().clamp(min=1.0))
    err = float((packed - alone).abs().max())
    tol = (3e-2 if bf16 else 1e-4) * scale
    if not err <= tol:
        return f"two sequences packed into one row differ from their separate forwards by {err:.3g} (> {tol:.2g})"
    return None


def _vocab(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", None) or 32)


def probe_causal_lm(model: nn.Module, device: torch.device, bf16: bool = False) -> str | None:
    """Why ``model`` (a causal LM, or a peft model around one) cannot run packed, or None."""
    def run(ids, pos, attn):
        return model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits

    return _compare(run, _vocab(model), device, bf16)


def probe_scorer(scorer: nn.Module, device: torch.device, bf16: bool = False) -> str | None:
    """Why a ``TokenScorer`` (critic, reward model) cannot run packed, or None."""
    return _compare(lambda ids, pos, attn: scorer(ids, attn, pos)[..., None], _vocab(scorer.model), device, bf16)


# --------------------------------------------------------------------------------------------
# what the trainer calls

class Packing:
    """The trainer's forwards, packed where the model takes it, padded otherwise.

    Built once per trainer after the models are loaded and sharded: with ``padding_free`` each
    model (actor, separate reference, critic, reward model) is probed once (all ranks alike); a
    model that fails runs padded, with a one-line notice.
    """

    def __init__(self, trainer, *, enabled: bool | None = None):
        cfg = trainer.config
        self.trainer = trainer
        self.dist = trainer.dist
        self.budget: int | None = getattr(cfg, "micro_batch_tokens", None) or None
        self.pad_id = trainer.tokenizer.pad_token_id
        enabled = getattr(cfg, "padding_free", True) if enabled is None else enabled
        self.enabled = bool(enabled)
        self._packed: dict[int, bool] = {}
        self._over_budget_noticed = False
        # Real tokens (prompt + response) of this rank's passes in the current iteration: "sampled",
        # the update's rows it sampled; "updated", those it ran (after the balancing); the same for
        # the rollout's forwards ("forward_sampled", "forward_run"; 0 unless balanced).
        self.token_counts = {"sampled": 0, "updated": 0, "forward_sampled": 0, "forward_run": 0}
        if not self.enabled:
            return
        dev, bf16 = trainer.device, trainer.bf16
        checks = [("actor", trainer.actor, probe_causal_lm)]
        if trainer.reference is not None:
            checks.append(("reference", trainer.reference, probe_causal_lm))
        if trainer.critic is not None:
            checks.append(("critic", trainer.critic, probe_scorer))
        if getattr(trainer, "reward_model", None) is not None:
            checks.append(("reward model", trainer.reward_model, probe_scorer))
        for role, model, probe in checks:
            why = probe(model, dev, bf16)
            self._packed[id(model)] = why is None
            if why is not None and self.dist.is_main:
                base = model.model if hasattr(model, "backbone") else model
                base = base.get_base_model() if hasattr(base, "get_base_model") else base
                print(f"fastppo train: padding-free: the {role} ({type(base).__name__}) runs on padded rows: {why}",
                      file=sys.stderr, flush=True)

    def packs(self, model: nn.Module) -> bool:
        """Whether ``model``'s forwards run packed (a LoRA actor's reference is the actor itself)."""
        return self.enabled and self._packed.get(id(model), False)

    def batch(self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, width: int) -> Batch:
        return Batch(seq, attn, pos, width, self.pad_id)

    # -- forwards ----------------------------------------------------------------------------
    def logprobs(self, model: nn.Module, batch: Batch, mask: torch.Tensor, temperature: float, fused: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropy of the response tokens, float32 ``[b, R]``, 0 where ``mask`` is false."""
        from . import distributed

        lay = batch.layout if self.packs(model) else None
        if lay is None:
            return distributed.response_logprobs(model, batch.seq, batch.attn, batch.pos, batch.width, mask,
                                                 temperature, fused)
        if fused and fused_head(model) is not None:
            return _hooked(model, packed_logprobs, lay, batch.labels, mask, temperature, True)
        return packed_logprobs(model, lay, batch.labels, mask, temperature, fused)

    def policy_loss(self, model: nn.Module, batch: Batch, temperature: float, **loss_kwargs):
        """``fastppo.linear_ppo_loss`` of the response tokens through a frozen fused head, or None."""
        from .models import response_policy_loss

        lay = batch.layout if self.packs(model) else None
        if lay is None:
            return response_policy_loss(model, batch.seq, batch.attn, batch.pos, batch.width, temperature,
                                        **loss_kwargs)
        return packed_policy_loss(model, lay, batch.labels, temperature, **loss_kwargs)

    def values(self, critic: nn.Module, batch: Batch) -> torch.Tensor:
        """The critic's float32 ``[b, R]`` values at the states before the response tokens."""
        lay = batch.layout if self.packs(critic) else None
        if lay is None:
            return critic(batch.seq, batch.attn, batch.pos, batch.width - 1, -1)
        return critic(lay.input_ids, None, lay.position_ids).reshape(-1)[lay.index]

    def score_last(self, scorer: nn.Module, batch: Batch) -> torch.Tensor:
        """``[b]`` float32: the reward model's score at each row's last real token."""
        lay = batch.layout if self.packs(scorer) else None
        if lay is None:
            last = batch.width + (batch.attn[:, batch.width:] != 0).long().sum(1) - 1
            return scorer.score_last(batch.seq, batch.attn, batch.pos, last)
        return scorer(lay.input_ids, None, lay.position_ids).reshape(-1)[lay.last]

    # -- the rollout forwards' rows -----------------------------------------------------------
    def forward_rows(self, width: int, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
                     ) -> ForwardRows:
        """The rows of the rollout's no-grad forwards: this rank's own, or under torchrun with a token
        budget the global batch, which :meth:`forward_groups` (``whole``) splits among the ranks by
        tokens; :meth:`own_rows` brings the results back to the rows each rank sampled."""
        self.token_counts = {"sampled": 0, "updated": 0, "forward_sampled": 0, "forward_run": 0}
        b, resp = seq.shape[0], seq.shape[1] - width
        if self.budget is None or not self.dist.enabled:
            return ForwardRows(width, seq, attn, pos, mask, (0, b), resp)
        p_max, _, g_seq, g_attn, g_pos = gather_rows(width, seq, attn, self.dist.world, self.pad_id)
        self.token_counts["forward_sampled"] = int((attn != 0).sum())
        return ForwardRows(p_max, g_seq, g_attn, g_pos, g_attn[:, p_max:] != 0, (self.dist.rank * b, b), resp,
                           whole=True)

    def own_rows(self, rows: ForwardRows, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Each ``[B, R]`` result of the forwards on ``rows`` as this rank's ``[b, resp]`` rows. With
        ``whole`` each row was computed by one rank and is 0 on the others: a sum over the ranks
        (exact: x + 0) gives every rank every row."""
        if not rows.whole:
            return list(tensors)
        import torch.distributed as dist

        first, count = rows.own
        out = []
        for t in tensors:
            if t is not None:
                dist.all_reduce(t)
                t = t[first:first + count, :rows.resp].contiguous()
            out.append(t)
        return out

    # -- the update phase's rows --------------------------------------------------------------
    def update_rows(self, width: int, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
                    mask: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    old_values: torch.Tensor | None, returns: torch.Tensor | None, ref_logprobs: torch.Tensor,
                    is_weights: torch.Tensor | None) -> UpdateRows:
        """The rows the updates read (shapes as :class:`UpdateRows`): this rank's own, or under
        torchrun with a token budget the global batch (gathered once here), whose mini-batches
        :meth:`micro_batches` then splits among the ranks by tokens."""
        rows = UpdateRows(width, seq, attn, pos, mask, old_logprobs, advantages, old_values, returns, ref_logprobs,
                          is_weights)
        if self.budget is None or not self.dist.enabled:
            return rows
        return gather_update_rows(rows, self.dist.world, self.pad_id)

    # -- grouping ----------------------------------------------------------------------------
    def _lengths(self, attn: torch.Tensor) -> list[int]:
        return (attn != 0).sum(1).tolist()

    def _notice_over_budget(self, lengths: list[int]) -> None:
        longest = max(lengths, default=0)
        if self.budget is not None and longest > self.budget and not self._over_budget_noticed:
            self._over_budget_noticed = True
            if self.dist.is_main:
                print(f"fastppo train: micro_batch_tokens (--micro-batch-tokens) {self.budget}: a sequence of "
                      f"{longest} tokens is longer; it gets a micro-batch of its own", file=sys.stderr, flush=True)

    def forward_groups(self, attn: torch.Tensor, micro_size: int, *, collective: bool = True, whole: bool = False
                       ) -> list[tuple[torch.Tensor, bool]]:
        """Row groups for the no-grad forwards of a rollout ``attn`` ``[B, L]``: ``[(rows, keep)]``.

        Without a token budget: ``micro_size`` rows at a time, in order. With one: groups of at most
        ``micro_batch_tokens`` real tokens; under torchrun (``collective``: the model is sharded)
        every rank runs the same number, the extra ones on row 0 with ``keep`` false. ``whole``
        (``attn`` holds the global batch, see :meth:`forward_rows`): this rank's share of the rows
        by :func:`rank_partition` of their tokens.
        """
        b = attn.shape[0]
        dev = attn.device
        if self.budget is None:
            return [(rows, True) for rows in torch.arange(b, device=dev).split(micro_size)]
        lengths = self._lengths(attn)
        self._notice_over_budget(lengths)
        if whole:
            # Every rank's share is known here: the group count needs no collective.
            shares = rank_partition(lengths, self.dist.world)
            mine = shares[self.dist.rank]
            k = max(len(first_fit_decreasing([lengths[i] for i in share], self.budget)) for share in shares)
            groups = [[mine[j] for j in g] for g in budget_groups([lengths[i] for i in mine], self.budget, k) if g]
            self.token_counts["forward_run"] = sum(lengths[i] for i in mine)
        else:
            groups = [g for g in first_fit_decreasing(lengths, self.budget) if g]
            k = len(groups)
            if collective and self.dist.enabled:
                k = self._max_over_ranks(k)
        out = [(torch.tensor(sorted(g), dtype=torch.long, device=dev), True) for g in groups]
        out += [(torch.zeros(1, dtype=torch.long, device=dev), False)] * (k - len(groups))
        return out

    def _max_over_ranks(self, k: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([k], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def micro_batches(self, mini: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor, micro_size: int, agg: str,
                      *, whole: bool = False) -> list[tuple[torch.Tensor, float, Any]]:
        """``[(rows, loss_weight, stats_weight)]`` for one mini-batch, as
        ``distributed.Distributed.micro_batches`` gives them; with a token budget the rows are
        grouped by tokens and each group weighted by its exact share of the mini-batch.

        ``whole`` (under torchrun, ``mask``/``attn`` hold the global batch, see :meth:`update_rows`):
        the mini-batch's rows are split among the ranks by :func:`rank_partition` of their tokens
        and ``rows`` index the global tensors; otherwise each rank takes the rows it sampled."""
        from .distributed import _by_kind, _const, _row_normalisers

        if self.budget is None:
            return self.dist.micro_batches(mini, mask, micro_size, agg)
        d = self.dist
        n_local = mask.shape[0] // d.world if whole else mask.shape[0]
        shares: list[list[int]] | None = None
        if d.enabled:
            owner = torch.div(mini, n_local, rounding_mode="floor")
            sampled = mini[owner == d.rank]
            if whole:
                mini_lengths = self._lengths(attn[mini])
                shares = rank_partition(mini_lengths, d.world)
                local = mini[torch.tensor(shares[d.rank], dtype=torch.long, device=mini.device)]
                self.token_counts["sampled"] += int((attn[sampled] != 0).sum())
            else:
                local = sampled - d.rank * n_local
        else:
            local = mini
        tokens, per_row = _row_normalisers(mask, agg)
        if shares is not None:
            # Every rank knows every rank's share: the totals and the group count need no collective.
            totals = torch.stack([tokens[mini].sum(), (per_row if per_row is not None else tokens)[mini].sum()])
            lengths = [mini_lengths[i] for i in shares[d.rank]]
            self._notice_over_budget(mini_lengths)
            k = max(len(first_fit_decreasing([mini_lengths[i] for i in share], self.budget)) for share in shares)
            groups = [g for g in budget_groups(lengths, self.budget, k) if g]
            self.token_counts["updated"] += sum(lengths)
        else:
            totals = torch.stack([tokens[local].sum(), (per_row if per_row is not None else tokens)[local].sum()])
            lengths = self._lengths(attn[local]) if local.numel() else []
            self._notice_over_budget(lengths)
            groups = [g for g in first_fit_decreasing(lengths, self.budget) if g]
            k = len(groups)
            if d.enabled:
                import torch.distributed as dist

                dist.all_reduce(totals)
                k = self._max_over_ranks(k)
                groups = [g for g in budget_groups(lengths, self.budget, k) if g]
        total_tokens, total = (float(x) for x in totals.clamp(min=1))
        out = []
        for g in groups:
            rows = local[torch.tensor(sorted(g), dtype=torch.long, device=local.device)]
            w_tok = float(tokens[rows].sum()) / total_tokens
            if per_row is None:
                w, stat = 1.0, _by_kind(w_tok, 1.0)
            else:
                w = float(per_row[rows].sum()) / total
                stat = _by_kind(w_tok, w)
            out.append((rows, w * d.world, stat))
        # A rank holding fewer groups runs zero-weighted passes: every rank meets the same collectives.
        out += [(torch.zeros(1, dtype=torch.long, device=mask.device), 0.0, _const(0.0))] * (k - len(groups))
        return out
