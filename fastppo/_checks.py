"""Input validation shared by both backends.

Every public op runs exactly one of these checks before it picks a backend, so the reference and
the kernels see the same, already-validated inputs. Each check takes the op's own arguments and
raises ``ValueError`` that names what was expected and what was given.

The only data-dependent check (labels inside [0, V)) needs a device-to-host copy; it is skipped
when ``FASTPPO_VALUE_CHECKS=0`` for callers who cannot afford the synchronisation, and under
``torch.compile`` / export tracing (a branch on tensor data cannot be traced): there the ops
behave as with ``FASTPPO_VALUE_CHECKS=0``, every implementation clamps labels into [0, V - 1],
so a bad label gives a meaningless but memory-safe value. Every other check reads only shapes,
dtypes, devices and Python numbers, which tracing sees as constants (or guards).

Under ``torch.compile`` the ops call their check through :func:`run`, so that a bad input raises
the same ``ValueError`` as in eager, ``fullgraph=True`` included (see :func:`run`).
"""

from __future__ import annotations

import math
import operator
import os
from numbers import Real
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ESTIMATORS = ("k1", "abs", "k2", "k3")
AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(_dim(s) for s in t.shape) + "]"


def _dim(size) -> str:
    # operator.index: dynamo cannot str() a symbolic size (dynamic=True), but specialises it to
    # its int here (on the way to an error only).
    return str(operator.index(size))


def _is_tensor(name: str, t) -> torch.Tensor:
    if t is None:
        raise ValueError(f"{name} is required: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float_tensor(name: str, t) -> torch.Tensor:
    _is_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {t.dtype}"
        )
    return t


def _same(named: Iterable[tuple[str, torch.Tensor | None]], attr: str, describe: str, again: str, rule: str) -> None:
    """All given tensors agree on ``attr`` (device, dtype or shape); None entries are skipped."""
    items = [(n, t) for n, t in named if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if getattr(t, attr) != getattr(first, attr):
            show = _shape if attr == "shape" else (lambda x: getattr(x, attr))
            raise ValueError(f"{name} {describe} {show(t)} but {first_name} {again} {show(first)}; {rule}")


def _same_device(named) -> None:
    _same(named, "device", "is on", "is on", "all inputs must be on one device")


def _same_dtype(named) -> None:
    _same(named, "dtype", "has dtype", "has", "the floating inputs of one op must share a dtype")


def _same_shape(named) -> None:
    _same(named, "shape", "has shape", "has", "expected equal shapes")


def _token_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be [B, T] (2-D), got shape {_shape(t)}")


def _mask(name: str, mask, like: torch.Tensor, like_name: str) -> None:
    _is_tensor(name, mask)
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be a bool or real tensor (valid where mask != 0), got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} has shape {_shape(mask)} but {like_name} has {_shape(like)}; expected equal shapes"
        )
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but {like_name} is on {like.device}")


def _number(name: str, x, *, low=None, high=None, low_open=False, allow_none=False) -> None:
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, (Real, torch.SymFloat, torch.SymInt)):
        raise ValueError(f"{name} must be a real number, got {x!r}")
    x = float(x)
    # Not math.isfinite: under torch.compile with dynamic shapes a Python float may arrive as a
    # symbolic float, which comparisons handle and math.isfinite cannot.
    if not (x == x and abs(x) != math.inf):
        raise ValueError(f"{name} must be finite, got {x}")
    if low is not None and (x <= low if low_open else x < low):
        op = ">" if low_open else ">="
        raise ValueError(f"{name} must be {op} {low}, got {x}")
    if high is not None and x > high:
        raise ValueError(f"{name} must be <= {high}, got {x}")


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


class TracedValueError(ValueError, AssertionError):
    """The ``ValueError`` of a check that failed while ``torch.compile`` traced the op.

    A ``ValueError`` raised in code that dynamo traces becomes a graph break, which
    ``fullgraph=True`` turns into ``torch._dynamo.exc.Unsupported``; dynamo lets an
    ``AssertionError`` out of the compiler untouched, hence the second base. Catch it as
    ``ValueError``.
    """


def _raise_traced(message: str) -> None:
    raise TracedValueError(message)


# What ``torch.compiler.assume_constant_result`` does to a function, without importing dynamo
# (which imports triton) when fastppo is imported: dynamo then calls it for real, with the message
# as a constant, instead of tracing it, so the exception leaves the compiler as it is.
_raise_traced._dynamo_marked_constant = True


def run(check, *args, **kwargs) -> None:
    """``check(*args, **kwargs)``; under ``torch.compile`` its ``ValueError`` (same message)
    reaches the caller as a :class:`TracedValueError`, ``fullgraph=True`` included."""
    if not torch.compiler.is_compiling():
        check(*args, **kwargs)
        return
    try:
        check(*args, **kwargs)
    except ValueError as e:
        _raise_traced(str(e))


def value_checks_enabled() -> bool:
    return os.environ.get("FASTPPO_VALUE_CHECKS", "1").strip().lower() not in ("0", "false", "no", "off")


def _label_range(labels, mask, vocab: int, what: str) -> None:
    """ValueError if a valid label lies outside [0, vocab); one host synchronisation.

    Not under tracing (checked first, before the environment is read): see the module docstring.
    """
    if torch.compiler.is_compiling() or not value_checks_enabled() or labels.numel() == 0:
        return
    valid = labels if mask is None else labels[mask != 0]
    if valid.numel() > 0:
        lo, hi = int(valid.min()), int(valid.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"labels must lie in [0, {vocab}) ({what}) at valid positions, got values from {lo} to {hi}"
            )


# --------------------------------------------------------------------------------------------
# One check per op, with the op's own signature.
# --------------------------------------------------------------------------------------------


def logprobs_from_logits(
    logits, labels, *, temperature=1.0, return_entropy=False, mask=None, inplace_backward=False
) -> None:
    _float_tensor("logits", logits)
    _is_tensor("labels", labels)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, T, V] or [N, V], got shape {_shape(logits)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {_shape(logits)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels have shape {_shape(labels)} but logits {_shape(logits)} need labels of shape "
            f"[{', '.join(_dim(s) for s in logits.shape[:-1])}]"
        )
    _same_device([("logits", logits), ("labels", labels)])
    if mask is not None:
        _mask("mask", mask, labels, "labels")
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be True or False, got {return_entropy!r}")
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be True or False, got {inplace_backward!r}")
    _number("temperature", temperature, low=0.0, low_open=True)
    _label_range(labels, mask, logits.shape[-1], "the vocabulary of the logits")


def entropy_from_logits(logits, *, temperature=1.0, inplace_backward=False) -> None:
    _float_tensor("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, T, V] or [N, V], got shape {_shape(logits)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {_shape(logits)}")
    _number("temperature", temperature, low=0.0, low_open=True)
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be True or False, got {inplace_backward!r}")


def kl_penalty(logprobs, ref_logprobs, estimator="k1", *, clamp=None) -> None:
    _float_tensor("logprobs", logprobs)
    _float_tensor("ref_logprobs", ref_logprobs)
    _same_shape([("logprobs", logprobs), ("ref_logprobs", ref_logprobs)])
    _same_device([("logprobs", logprobs), ("ref_logprobs", ref_logprobs)])
    _same_dtype([("logprobs", logprobs), ("ref_logprobs", ref_logprobs)])
    _choice("KL estimator", estimator, ESTIMATORS)
    _number("clamp", clamp, low=0.0, low_open=True, allow_none=True)


def shape_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1") -> None:
    _float_tensor("logprobs", logprobs)
    _token_2d("logprobs", logprobs)
    _float_tensor("ref_logprobs", ref_logprobs)
    _float_tensor("scores", scores)
    _same_shape([("logprobs", logprobs), ("ref_logprobs", ref_logprobs)])
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(
            f"scores must be [B] = [{_dim(logprobs.shape[0])}] (one score per row of logprobs), got shape {_shape(scores)}"
        )
    _mask("mask", mask, logprobs, "logprobs")
    _same_device([("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("scores", scores)])
    _same_dtype([("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("scores", scores)])
    _number("kl_coef", kl_coef)
    _choice("KL estimator", estimator, ESTIMATORS)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=False) -> None:
    _float_tensor("rewards", rewards)
    _token_2d("rewards", rewards)
    _float_tensor("values", values)
    _same_shape([("rewards", rewards), ("values", values)])
    _mask("mask", mask, rewards, "rewards")
    _same_device([("rewards", rewards), ("values", values)])
    _same_dtype([("rewards", rewards), ("values", values)])
    _number("gamma", gamma, low=0.0, high=1.0)
    _number("lam", lam, low=0.0, high=1.0)
    if not isinstance(whiten, bool):
        raise ValueError(f"whiten must be True or False, got {whiten!r}")


def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8) -> None:
    _float_tensor("x", x)
    _mask("mask", mask, x, "x")
    if not isinstance(shift_mean, bool):
        raise ValueError(f"shift_mean must be True or False, got {shift_mean!r}")
    _number("eps", eps, low=0.0, low_open=True)


OPTIONAL_TENSORS = ("is_weights", "entropy")


def _loss_common(named_floats, mask, agg) -> None:
    """Checks shared by the losses. Only ``is_weights`` and ``entropy`` may be None."""
    for name, t in named_floats:
        if t is not None or name not in OPTIONAL_TENSORS:
            _float_tensor(name, t)
    first_name, first = named_floats[0]
    _token_2d(first_name, first)
    _same_shape(named_floats)
    _mask("mask", mask, first, first_name)
    _same_device(named_floats)
    _same_dtype(named_floats)
    _choice("aggregation (agg)", agg, AGG_MODES)


def _token_objective(logprobs, old_logprobs, advantages, mask, agg, is_weights) -> None:
    """The tensors and agg of every token-level policy loss (policy_loss and the verl objectives)."""
    _loss_common(
        [
            ("logprobs", logprobs),
            ("old_logprobs", old_logprobs),
            ("advantages", advantages),
            ("is_weights", is_weights),
        ],
        mask,
        agg,
    )


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    is_weights=None,
) -> None:
    _token_objective(logprobs, old_logprobs, advantages, mask, agg, is_weights)
    _number("clip_low", clip_low, low=0.0, high=1.0)
    _number("clip_high", clip_high, low=0.0, allow_none=True)
    _number("dual_clip", dual_clip, low=1.0, low_open=True, allow_none=True)


def value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean") -> None:
    _loss_common(
        [("values", values), ("old_values", old_values), ("returns", returns)],
        mask,
        agg,
    )
    _number("clip", clip, low=0.0, allow_none=True)


def aggregate(loss_mat, mask, agg="token-mean") -> None:
    _loss_common([("loss_mat", loss_mat)], mask, agg)


def compute_advantages(
    scores, logprobs, ref_logprobs, values, mask, *, kl_coef, estimator="k1", gamma=1.0, lam=0.95, whiten=True
) -> None:
    shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)
    _float_tensor("values", values)
    _same_shape([("logprobs", logprobs), ("values", values)])
    _same_device([("logprobs", logprobs), ("values", values)])
    _same_dtype([("logprobs", logprobs), ("values", values)])
    _number("gamma", gamma, low=0.0, high=1.0)
    _number("lam", lam, low=0.0, high=1.0)
    if not isinstance(whiten, bool):
        raise ValueError(f"whiten must be True or False, got {whiten!r}")


def ppo_loss(
    logprobs,
    old_logprobs,
    advantages,
    values,
    old_values,
    returns,
    mask,
    *,
    entropy=None,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    value_clip=0.2,
    vf_coef=0.5,
    ent_coef=0.0,
    agg="token-mean",
    is_weights=None,
) -> None:
    _loss_common(
        [
            ("logprobs", logprobs),
            ("old_logprobs", old_logprobs),
            ("advantages", advantages),
            ("values", values),
            ("old_values", old_values),
            ("returns", returns),
            ("entropy", entropy),
            ("is_weights", is_weights),
        ],
        mask,
        agg,
    )
    _number("clip_low", clip_low, low=0.0, high=1.0)
    _number("clip_high", clip_high, low=0.0, allow_none=True)
    _number("dual_clip", dual_clip, low=1.0, low_open=True, allow_none=True)
    _number("value_clip", value_clip, low=0.0, allow_none=True)
    _number("vf_coef", vf_coef)
    _number("ent_coef", ent_coef)


# --------------------------------------------------------------------------------------------
# linear_logprobs (issue 10): the fused LM head
# --------------------------------------------------------------------------------------------

_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def linear_logprobs(
    hidden, weight, labels, *, bias=None, temperature=1.0, return_entropy=False, mask=None, chunk_size=None
) -> None:
    _float_tensor("hidden", hidden)
    _float_tensor("weight", weight)
    _is_tensor("labels", labels)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [N, H], got shape {_shape(hidden)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H] (an LM head's nn.Linear weight), got shape {_shape(weight)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have a vocabulary dimension V >= 1, got shape {_shape(weight)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {_shape(weight)} but hidden has H = {_dim(hidden.shape[-1])}; expected weight of "
            f"shape [V, {_dim(hidden.shape[-1])}]"
        )
    if labels.dtype not in _LABEL_DTYPES:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels have shape {_shape(labels)} but hidden {_shape(hidden)} needs labels of shape "
            f"[{', '.join(_dim(s) for s in hidden.shape[:-1])}]"
        )
    if bias is not None:
        _float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{_dim(weight.shape[0])}] (one per row of weight), got shape {_shape(bias)}")
    _same_device([("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias)])
    _same_dtype([("hidden", hidden), ("weight", weight), ("bias", bias)])
    if mask is not None:
        _mask("mask", mask, labels, "labels")
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be True or False, got {return_entropy!r}")
    _number("temperature", temperature, low=0.0, low_open=True)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    _label_range(labels, mask, weight.shape[0], "the rows of weight")


def linear_ppo_loss(
    hidden, weight, labels, *, old_logprobs, advantages, mask, bias=None, temperature=1.0, clip_low=0.2,
    clip_high=None, dual_clip=None, agg="token-mean", is_weights=None, ent_coef=0.0, ref_logprobs=None,
    kl_coef=0.0, kl_estimator="k3", chunk_size=None,
) -> None:
    if isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H] (the loss aggregates per sequence), got shape {_shape(hidden)}")
    linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, mask=mask, chunk_size=chunk_size)
    _loss_common([("old_logprobs", old_logprobs), ("advantages", advantages), ("is_weights", is_weights)], mask, agg)
    _number("clip_low", clip_low, low=0.0, high=1.0)
    _number("clip_high", clip_high, low=0.0, allow_none=True)
    _number("dual_clip", dual_clip, low=1.0, low_open=True, allow_none=True)
    if tuple(old_logprobs.shape) != tuple(labels.shape):
        raise ValueError(f"old_logprobs has shape {_shape(old_logprobs)} but labels {_shape(labels)}; expected the same")
    _same_device([("hidden", hidden), ("old_logprobs", old_logprobs)])
    if ref_logprobs is not None:
        _float_tensor("ref_logprobs", ref_logprobs)
        _same_shape([("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)])
        _same_device([("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)])
        _same_dtype([("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)])
    _number("ent_coef", ent_coef)
    _number("kl_coef", kl_coef)
    _choice("KL estimator (kl_estimator)", kl_estimator, ESTIMATORS)


# --------------------------------------------------------------------------------------------
# Critic-free advantages (issue 11, item 5)
# --------------------------------------------------------------------------------------------

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "grpo_passk", "opo", "gpg")


def group_advantages(scores, group_size, mask, *, estimator="grpo", norm_by_std=True, eps=1e-6) -> None:
    _float_tensor("scores", scores)
    _is_tensor("mask", mask)
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be a bool or real tensor (valid where mask != 0), got {mask.dtype}")
    _token_2d("mask", mask)
    B = mask.shape[0]
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must be [B] = [{_dim(B)}] (one score per row of mask), got shape {_shape(scores)}")
    _same_device([("scores", scores), ("mask", mask)])
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (responses per prompt), got {group_size!r}")
    if B % group_size != 0:
        raise ValueError(
            f"group_size must divide the batch: B = {_dim(B)} rows is not a whole number of groups of {group_size}"
        )
    _choice("group estimator", estimator, GROUP_ESTIMATORS)
    if not isinstance(norm_by_std, bool):
        raise ValueError(f"norm_by_std must be True or False, got {norm_by_std!r}")
    _number("eps", eps, low=0.0, low_open=True)


def reinforce_pp_advantages(rewards, mask, *, gamma=1.0) -> None:
    _float_tensor("rewards", rewards)
    _token_2d("rewards", rewards)
    _mask("mask", mask, rewards, "rewards")
    _number("gamma", gamma, low=0.0, high=1.0)


# Token-level policy objectives of verl 0.9.1 (issue 19; fastppo.policy_objectives)


def _dppo(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, clip_ratio_c=3.0,
          agg="token-mean", is_weights=None) -> None:
    _token_objective(logprobs, old_logprobs, advantages, mask, agg, is_weights)
    # Divergence thresholds (a probability gap for TV, nats for the binary KL), not ratio clips.
    _number("clip_low", clip_low, low=0.0)
    _number("clip_high", clip_high, low=0.0, allow_none=True)
    _number("clip_ratio_c", clip_ratio_c, low=0.0, low_open=True)


dppo_tv_loss = _dppo
dppo_kl_loss = _dppo


def sapo_loss(logprobs, old_logprobs, advantages, mask, *, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean",
              is_weights=None) -> None:
    _token_objective(logprobs, old_logprobs, advantages, mask, agg, is_weights)
    _number("tau_pos", tau_pos, low=0.0, low_open=True)
    _number("tau_neg", tau_neg, low=0.0, low_open=True)


def gpg_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None) -> None:
    _token_objective(logprobs, old_logprobs, advantages, mask, agg, is_weights)


def cispo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, agg="token-mean",
               is_weights=None) -> None:
    _token_objective(logprobs, old_logprobs, advantages, mask, agg, is_weights)
    _number("clip_low", clip_low, low=0.0, high=1.0)
    _number("clip_high", clip_high, low=0.0, allow_none=True)


def dro_loss(logprobs, old_logprobs, advantages, mask, *, beta=None, agg="token-mean", is_weights=None) -> None:
    _token_objective(logprobs, old_logprobs, advantages, mask, agg, is_weights)
    if beta is None:
        raise ValueError("dro needs beta > 0 (verl's policy_loss.dro_beta, which has no default), got None")
    _number("beta", beta, low=0.0, low_open=True)
