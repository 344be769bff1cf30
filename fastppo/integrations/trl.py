"""TRL adapter: swap TRL's log-prob and entropy helpers, and its chunked LM head, for fastppo's.

``patch()`` replaces, in every loaded TRL module that holds them (under the names TRL itself
binds them to) and so in every trainer that calls them:

* ``trl.trainer.utils.selective_log_softmax`` -> :func:`selective_log_softmax`
  (``fastppo.logprobs_from_logits``; ``[..., K]`` indices included);
* ``trl.trainer.utils.entropy_from_logits`` -> :func:`entropy_from_logits`
  (``fastppo.entropy_from_logits``);
* ``trl.trainer.utils.selective_log_softmax_and_entropy`` ->
  :func:`selective_log_softmax_and_entropy` (one ``fastppo.logprobs_from_logits`` pass);
* ``trl.kernels.selective_log_softmax_and_entropy`` (TRL's Triton kernel, bound in
  ``trl.trainer.utils`` as ``_fused_logprob_entropy``) -> :func:`kernel_selective_log_softmax_and_entropy`;
* ``trl.kernels.ChunkedLogProbFunction`` (bound in ``trl.trainer.utils`` as
  ``_ChunkedLogProbFunction``: the fused LM head that ``add_fused_lm_head`` gives GRPO, RLOO, SFT
  and KTO in TRL 1.16) -> :class:`ChunkedLogProbFunction` (``fastppo.linear_logprobs``).

Modules imported after ``patch()`` copy the patched names themselves; ``unpatch()`` puts TRL's
objects back wherever a fastppo one sits, ``patched()`` does both around a block.

Each wrapper keeps TRL's contract: signature, shapes, output dtype (TRL's PyTorch paths return
the logits' dtype, its Triton kernels float32; fastppo computes in float32 and casts to whatever
TRL would have returned for the same inputs), ``row_mask`` (0 outputs, 0 gradient) and
temperature. Two inputs go back to TRL's own code, because fastppo has no equivalent:
``ChunkedLogProbFunction`` with ``final_logit_softcapping`` (Gemma 2/3) or a ``logit_scale`` that
is not a positive finite number.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from typing import Any, Callable, Iterator

import torch

import fastppo

__all__ = [
    "ChunkedLogProbFunction",
    "TRL_LOSS_TYPES",
    "entropy_from_logits",
    "fastppo_policy_loss",
    "is_patched",
    "kernel_selective_log_softmax_and_entropy",
    "patch",
    "patched",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch",
]

_UTILS = "trl.trainer.utils"
_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Rows per tile of the extra-statistics pass of ChunkedLogProbFunction (TRL's TOKEN_CHUNK_SIZE).
_STATS_ROWS = 4096


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _original(name: str) -> Callable:
    """TRL's own object behind one of our names (whether or not patch() is in force)."""
    for target in _targets():
        if target.ours_name == name and target.original is not None:
            return target.original
    raise LookupError(f"this TRL version has no {name}")


def _trl_output_dtype(logits: torch.Tensor, index: torch.Tensor | None = None,
                      row_mask: torch.Tensor | None = None) -> torch.dtype:
    """The dtype TRL's ``trl.trainer.utils`` helpers return for these inputs.

    Where TRL's Triton kernel takes the call (CUDA, float logits, an index of the logits'
    leading shape) it returns float32; its PyTorch path returns the logits' dtype.
    """
    utils = sys.modules.get(_UTILS)
    supports = getattr(utils, "_supports_trl_loss_kernel", None)
    if supports is not None and getattr(utils, "_fused_logprob_entropy", None) is not None:
        if supports(logits, index, row_mask):
            return torch.float32
    return logits.dtype


def _as_ops_input(logits: torch.Tensor, index: torch.Tensor, row_mask: torch.Tensor | None):
    """``[..., V]`` logits -> the ``[B, T, V]`` / ``[N, V]`` that fastppo's ops take.

    2-D and 3-D logits go in as they are (a strided view is not copied); other ranks are
    reshaped, which copies only when the view cannot be flattened.
    """
    if logits.dim() in (2, 3):
        return logits, index, row_mask
    V = logits.shape[-1]
    flat_mask = None if row_mask is None else row_mask.reshape(-1)
    return logits.reshape(-1, V), index.reshape(-1), flat_mask


def _valid(row_mask: torch.Tensor | None) -> torch.Tensor | None:
    # TRL skips rows where row_mask == 0; fastppo's mask means "valid where != 0", the same rows.
    return None if row_mask is None else row_mask != 0


def _check_temperature(temperature: float) -> None:
    # TRL's own message and type, raised before any work (fastppo's check says the same).
    if temperature <= 0:
        raise ValueError("temperature must be positive")


# --------------------------------------------------------------------------------------------
# trl.trainer.utils helpers
# --------------------------------------------------------------------------------------------


def _top_k_logprobs(logits: torch.Tensor, index: torch.Tensor, temperature: float,
                    row_mask: torch.Tensor | None) -> torch.Tensor:
    """log_softmax(logits / T) at K indices per row, from one normaliser per row.

    fastppo's pass gives the log-prob of one anchor index a per row (the anchor is the index
    with the largest logit among the K, so that it is finite whenever any of them is);
    every other index k shares the row's normaliser: lp_k = lp_a + (z_k - z_a) / T. The logits
    are read once by fastppo plus K gathered values per row. Gradients follow through both
    terms: (onehot(a) - p) / T + (onehot(k) - onehot(a)) / T = (onehot(k) - p) / T.

    bf16/fp16 logits are upcast to float32 first (a float32 copy of ``logits``): the two gradient
    terms must be summed before the sum is rounded to the input dtype, else the anchor's gradient
    is bf16(1 - p_a) - 1, p_a with its low bits lost (up to 2^-9 off per element).

    Args:
        logits: ``[..., V]``; index: ``[..., K]`` int; row_mask: optional ``[..., K]``.
    Returns:
        float32 (float64 for float64 logits) log-probs of the shape of ``index``.
    """
    index = index.long()
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(work)
    valid = None if row_mask is None else row_mask != 0
    row_valid = None if valid is None else valid.any(dim=-1)
    picked = logits.gather(-1, index)  # [..., K] logits at the K indices
    with torch.no_grad():
        # The anchor is chosen among valid entries only (NaN wins argmax: a NaN row stays NaN).
        choose = picked if valid is None else picked.masked_fill(~valid, -math.inf)
        anchor = choose.argmax(dim=-1, keepdim=True)
    anchor_label = index.gather(-1, anchor).squeeze(-1)
    # Rows with no valid entry are not read by fastppo (log-prob 0); their values are dropped below.
    x, label, mask = _as_ops_input(logits, anchor_label, row_valid)
    lp_anchor = fastppo.logprobs_from_logits(x, label, temperature=temperature, mask=mask)
    lp_anchor = lp_anchor.reshape(anchor.shape).to(work)
    z_anchor = picked.gather(-1, anchor)
    # The anchor itself and duplicates of its index take lp_a exactly, and so does -inf next to a -inf
    # anchor (-inf - -inf is NaN). A different index whose logit merely ties the anchor's must not:
    # its value would be right but its gradient would land on the anchor's logit instead of its own.
    same = (index == index.gather(-1, anchor)) | ((picked == z_anchor) & torch.isinf(picked))
    lp = torch.where(same, lp_anchor, lp_anchor + (picked - z_anchor) / temperature)
    if valid is not None:
        lp = torch.where(valid, lp, 0.0)
    return lp


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRL's ``selective_log_softmax``, computed by ``fastppo.logprobs_from_logits``.

    log_softmax(logits / temperature) gathered at ``index``, 0 where ``row_mask == 0``.

    Args:
        logits: ``[..., V]`` float32, bfloat16, float16 or float64.
        index: ``[...]`` (one log-prob per row) or ``[..., K]`` (K per row, e.g. top-K) token ids.
        temperature: > 0.
        row_mask: optional, the shape of ``index``; entries where it is 0 give 0 (and 0 gradient).
    Returns:
        log-probs of the shape of ``index``, in the dtype TRL returns: the logits' dtype (TRL's
        PyTorch path), or float32 where TRL's own Triton kernel would take the call. Computed in
        float32 (float64 for float64 logits) and cast at the end.
    """
    _check_temperature(temperature)
    out_dtype = _trl_output_dtype(logits, index, row_mask)
    if index.dim() == logits.dim() and index.shape[:-1] == logits.shape[:-1]:
        return _top_k_logprobs(logits, index, temperature, row_mask).to(out_dtype)
    x, idx, mask = _as_ops_input(logits, index, row_mask)
    logprobs = fastppo.logprobs_from_logits(x, idx, temperature=temperature, mask=_valid(mask))
    return logprobs.reshape(index.shape).to(out_dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits``, computed by ``fastppo.entropy_from_logits``.

    ``chunk_size`` is accepted and ignored: fastppo never materialises the softmax.

    Args:
        logits: ``[..., V]``.
    Returns:
        entropies of shape ``logits.shape[:-1]``, in the logits' dtype (float32 where TRL's
        Triton kernel would take the call).
    """
    out_dtype = _trl_output_dtype(logits)
    x = logits if logits.dim() in (2, 3) else logits.reshape(-1, logits.shape[-1])
    return fastppo.entropy_from_logits(x).reshape(logits.shape[:-1]).to(out_dtype)


def _logprobs_and_entropy(logits, index, temperature, row_mask):
    x, idx, mask = _as_ops_input(logits, index, row_mask)
    logprobs, entropy = fastppo.logprobs_from_logits(
        x, idx, temperature=temperature, return_entropy=True, mask=_valid(mask)
    )
    return logprobs.reshape(index.shape), entropy.reshape(index.shape)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``trl.trainer.utils.selective_log_softmax_and_entropy`` in one fastppo pass.

    Args:
        logits: ``[..., V]``; index: ``[...]`` int; row_mask: optional ``[...]``.
        entropy_requires_grad: False detaches the entropy.
        temperature: > 0; both outputs are of softmax(logits / temperature).
    Returns:
        ``(logprobs, entropy)``, shape of ``index``, 0 where ``row_mask == 0``; in the logits'
        dtype (float32 where TRL's Triton kernel would take the call).
    """
    _check_temperature(temperature)
    out_dtype = _trl_output_dtype(logits, index, row_mask)
    logprobs, entropy = _logprobs_and_entropy(logits, index, temperature, row_mask)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    return logprobs.to(out_dtype), entropy.to(out_dtype)


# --------------------------------------------------------------------------------------------
# trl.kernels
# --------------------------------------------------------------------------------------------


def kernel_selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's Triton ``trl.kernels.selective_log_softmax_and_entropy``, by fastppo.

    Note the signature: TRL's kernel takes no ``entropy_requires_grad`` (the utils wrapper does).

    Args:
        logits: ``[..., V]`` (TRL's kernel: 1 to 3 dims); index: ``[...]`` int;
        temperature: > 0; row_mask: optional ``[...]`` bool or int.
    Returns:
        ``(logprobs, entropy)``: float32 (as TRL's kernel), shape of ``index``, both
        differentiable, 0 (and 0 gradient) where ``row_mask == 0``.
    """
    _check_temperature(temperature)
    logprobs, entropy = _logprobs_and_entropy(logits, index, temperature, row_mask)
    return logprobs.float(), entropy.float()


def _extra_stats(hidden, weight, bias, targets, inv_t, outputs, chunk):
    """``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` (float32 / bool ``[N]``), no gradient.

    One more chunked pass over the LM head; only when one of them is asked for. The logits tile is
    computed in the compute dtype and then scaled in float32, as in TRL.
    """
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    m = torch.full((N,), -math.inf, **f32)
    s = torch.zeros(N, **f32)
    sq = torch.zeros(N, **f32)
    zsum = torch.zeros(N, **f32)
    before = torch.full((N,), -math.inf, **f32)  # max logit at indices below the target
    zt = torch.full((N,), -math.inf, **f32)
    want_sq, want_mean, want_top1 = ("log_sum_sq_probs" in outputs, "mean_logits" in outputs,
                                     "is_top1" in outputs)
    with torch.no_grad():
        for r0 in range(0, N, _STATS_ROWS):
            r1 = min(r0 + _STATS_ROWS, N)
            h = hidden[r0:r1]
            tgt = targets[r0:r1].long()
            for c0 in range(0, V, chunk):
                c1 = min(c0 + chunk, V)
                z = torch.mm(h, weight[c0:c1].t())
                if bias is not None:
                    z = z + bias[c0:c1]
                z = z.float() * inv_t
                if want_mean:
                    zsum[r0:r1] += z.sum(-1)
                cols = torch.arange(c0, c1, device=dev)
                if want_top1:
                    # argmax takes the first maximum: a tie with an earlier index is not top-1.
                    early = z.masked_fill(cols >= tgt.unsqueeze(-1), -math.inf).amax(-1)
                    before[r0:r1] = torch.maximum(before[r0:r1], early)
                    inside = (tgt >= c0) & (tgt < c1)
                    here = z.gather(-1, (tgt - c0).clamp(0, c1 - c0 - 1).unsqueeze(-1)).squeeze(-1)
                    zt[r0:r1] = torch.where(inside, here, zt[r0:r1])
                if want_sq:
                    new_m = torch.maximum(m[r0:r1], z.amax(-1))
                    scale = torch.exp(m[r0:r1] - new_m)
                    e = torch.exp(z - new_m.unsqueeze(-1))
                    s[r0:r1] = s[r0:r1] * scale + e.sum(-1)
                    sq[r0:r1] = sq[r0:r1] * scale * scale + (e * e).sum(-1)
                    m[r0:r1] = new_m
                elif want_top1:
                    m[r0:r1] = torch.maximum(m[r0:r1], z.amax(-1))
    log_sum_sq = torch.log(sq) - 2 * torch.log(s) if want_sq else None
    mean = zsum / V if want_mean else None
    top1 = (zt >= m) & (zt > before) if want_top1 else None
    return log_sum_sq, mean, top1


class ChunkedLogProbFunction:
    """TRL's ``trl.kernels.ChunkedLogProbFunction``, by ``fastppo.linear_logprobs``.

    Called as TRL calls it, ``ChunkedLogProbFunction.apply(hidden, weight, bias, targets,
    temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...)``:

    * ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``targets`` ``[N]``
      ids in ``[0, V)``; logits are ``logit_scale * (hidden @ weight.T + bias) / temperature``,
      in the autocast dtype under autocast, else in ``hidden``'s dtype (``weight`` and ``bias`` are
      cast to it, as TRL does; gradients come back in each input's own dtype).
    * returns ``(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)``: float32 ``[N]``
      (``is_top1`` bool), each None unless named in ``outputs`` (log-probs always).
      ``logprobs`` and ``entropy`` are differentiable in ``hidden``, ``weight`` and ``bias``
      (fastppo's chunked forward and recomputing backward); the other three are not, and cost
      one more no-grad pass over the head when asked for.
    * ``chunk_size`` sets the vocabulary chunk of that extra pass only; fastppo picks its own.

    ``final_logit_softcapping`` set, or a ``logit_scale`` that is not a positive finite number,
    goes to TRL's own class: fastppo's op has no softcap.
    """

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = _OPTIONAL_OUTPUTS,
    ):
        if final_logit_softcapping is not None or not (math.isfinite(logit_scale) and logit_scale > 0):
            return _original("ChunkedLogProbFunction").apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                logit_scale, outputs,
            )
        _check_temperature(temperature)
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        # logit_scale * z / T == z / (T / logit_scale): one temperature for fastppo.
        temp = temperature / logit_scale
        want_entropy = "entropy" in outputs
        with torch.autocast(dev, enabled=False):
            result = fastppo.linear_logprobs(h, w, targets, bias=b, temperature=temp,
                                             return_entropy=want_entropy)
            logprobs, entropy = result if want_entropy else (result, None)
            extras = (None, None, None)
            if any(name in outputs for name in _OPTIONAL_OUTPUTS[1:]):
                chunk = max(1, min(int(chunk_size), weight.shape[0]))
                extras = _extra_stats(h.detach(), w.detach(), None if b is None else b.detach(),
                                      targets, 1.0 / temp, outputs, chunk)
        logprobs = logprobs.float()
        entropy = None if entropy is None else entropy.float()
        return (logprobs, entropy, *extras)


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------


class _Target:
    """One TRL object to swap: where it is defined, the names TRL binds it to, and ours."""

    def __init__(self, module: str, attr: str, aliases: tuple[str, ...], ours_name: str):
        self.module, self.attr, self.aliases, self.ours_name = module, attr, aliases, ours_name
        self.original: Any = None

    @property
    def ours(self) -> Any:
        return globals()[self.ours_name]


_TARGETS = [
    _Target(_UTILS, "selective_log_softmax", ("selective_log_softmax",), "selective_log_softmax"),
    _Target(_UTILS, "entropy_from_logits", ("entropy_from_logits",), "entropy_from_logits"),
    _Target(_UTILS, "selective_log_softmax_and_entropy", ("selective_log_softmax_and_entropy",),
            "selective_log_softmax_and_entropy"),
    _Target("trl.kernels.logprob_entropy", "selective_log_softmax_and_entropy",
            ("selective_log_softmax_and_entropy", "_fused_logprob_entropy"),
            "kernel_selective_log_softmax_and_entropy"),
    _Target("trl.kernels.chunked_logprob", "ChunkedLogProbFunction",
            ("ChunkedLogProbFunction", "_ChunkedLogProbFunction"), "ChunkedLogProbFunction"),
]


def _targets() -> list[_Target]:
    """The targets with TRL's original filled in (None where this TRL version lacks it)."""
    for t in _TARGETS:
        if t.original is None:
            try:
                module = importlib.import_module(t.module)
            except ImportError:  # e.g. trl.kernels.logprob_entropy without triton, older TRL
                continue
            found = getattr(module, t.attr, None)
            if found is not None and found is not t.ours:
                t.original = found
    return _TARGETS


def _trl_modules() -> list[Any]:
    return [m for n, m in list(sys.modules.items()) if m is not None and (n == "trl" or n.startswith("trl."))]


def _swap(old_of: Callable[[_Target], Any], new_of: Callable[[_Target], Any]) -> None:
    for t in _targets():
        if t.original is None:
            continue
        old, new = old_of(t), new_of(t)
        for module in _trl_modules():
            for name in t.aliases:
                if getattr(module, name, None) is old:
                    setattr(module, name, new)


def patch(modules: tuple[str, ...] = ()) -> None:
    """Swap TRL's helpers, kernel and chunked LM head for fastppo's (idempotent).

    Args:
        modules: extra TRL modules to import first so that they are patched too (for instance
            ``("trl.trainer.grpo_trainer",)``); any TRL module imported later picks up the
            patched names from ``trl.trainer.utils`` / ``trl.kernels`` by itself.
    """
    importlib.import_module(_UTILS)
    for name in modules:
        importlib.import_module(name)
    _swap(lambda t: t.original, lambda t: t.ours)


def unpatch() -> None:
    """Put TRL's own objects back in every loaded TRL module (a no-op when not patched)."""
    _swap(lambda t: t.ours, lambda t: t.original)


def is_patched() -> bool:
    """Whether ``trl.trainer.utils.selective_log_softmax`` is fastppo's right now."""
    utils = sys.modules.get(_UTILS)
    return utils is not None and getattr(utils, "selective_log_softmax", None) is selective_log_softmax


@contextlib.contextmanager
def patched(modules: tuple[str, ...] = ()) -> Iterator[None]:
    """``patch()`` for the duration of a block, then restore what was there before."""
    was_patched = is_patched()
    patch(modules)
    try:
        yield
    finally:
        if not was_patched:
            unpatch()


# --------------------------------------------------------------------------------------------
# TRL's GRPOTrainer loss_type names -> fastppo policy objectives (issue 19)
# --------------------------------------------------------------------------------------------

# TRL 1.16 GRPOConfig.loss_type (with importance_sampling_level="token") -> (fastppo.POLICY_LOSSES
# name, agg, where the numbers differ). TRL's per-token surrogate for grpo/bnpo/dr_grpo/dapo is the
# clipped one of fastppo.policy_loss ("vanilla") without dual clip; what differs is the reduction.
# None: no fastppo objective with that math.
TRL_LOSS_TYPES: dict[str, tuple[str, str, str] | None] = {
    "grpo": ("vanilla", "seq-mean-token-mean",
             "TRL's .mean() over rows counts a row without tokens as 0; fastppo averages over rows with tokens"),
    "bnpo": ("vanilla", "token-mean", ""),
    "dapo": ("vanilla", "token-mean",
             "TRL divides by num_items_in_batch, the generation batch's token count: a token-sum over that "
             "global count, which equals token-mean on one micro-batch of the whole batch"),
    "dr_grpo": ("vanilla", "seq-mean-token-sum-norm",
                "TRL divides by B * max_completion_length: equal when T == max_completion_length and no row "
                "is empty"),
    "cispo": ("cispo", "token-mean", "the cispo objective is registered by fastppo's token-level losses"),
    "sapo": ("sapo", "seq-mean-token-mean", "the sapo objective is registered by fastppo's token-level losses"),
    "luspo": ("vanilla", "seq-mean-token-sum",
              "LUSPO is meant with importance_sampling_level='sequence' (then: gspo, seq-mean-token-sum)"),
    "vespo": None,
}


def fastppo_policy_loss(loss_type: str, importance_sampling_level: str = "token") -> tuple[str, str]:
    """(fastppo policy objective name, agg) for TRL's ``loss_type`` and ``importance_sampling_level``.

    ``importance_sampling_level="sequence"`` (GSPO in TRL) maps the clipped losses to ``gspo``:
    TRL's sequence ratio exp(mean of the valid log-ratios) per row, with the gradient through the
    mean; fastppo's ``gspo`` has the same value, and with ``seq_grad=True`` the same gradient (its
    default, verl's GSPO-token form, agrees for the sequence-level advantages GRPO produces). TRL does not clamp the log-ratio (fastppo: at 10).
    ``ValueError`` for a name with no fastppo equivalent (``vespo``) or an unknown one.
    """
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"unknown TRL loss_type {loss_type!r}; expected one of {', '.join(TRL_LOSS_TYPES)}")
    entry = TRL_LOSS_TYPES[loss_type]
    if entry is None:
        raise ValueError(f"TRL's loss_type {loss_type!r} has no fastppo objective")
    name, agg, _ = entry
    if importance_sampling_level == "sequence":
        if name != "vanilla":
            raise ValueError(f"TRL's {loss_type!r} with importance_sampling_level='sequence' has no fastppo objective")
        return "gspo", agg
    if importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    return name, agg
