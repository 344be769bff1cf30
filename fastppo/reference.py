"""Plain-PyTorch references of every fastppo op: the ground truth the kernels are held to.

Readable first, fast second. Each function validates its inputs (the same checks the
dispatching ``fastppo.<op>`` runs) and then computes the contract of ``DESIGN.md`` in the most
direct way. The unvalidated body is reachable as ``fastppo.reference.<op>.raw``; the
dispatcher calls that after its own single validation.

Dtypes: inputs may be float32, bfloat16 or float16 and every floating output is float32.
float64 inputs are accepted too and computed and returned in float64, so that tests can take
the ground truth in float64 from the very same code.

Notation: token tensors are ``[B, T]`` over response positions and ``mask`` is 1 (or True)
where the token is a real response token.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _checks

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_penalty",
    "shape_rewards",
    "gae",
    "masked_whiten",
    "policy_loss",
    "value_loss",
    "aggregate",
    "compute_advantages",
    "ppo_loss",
    "compute_dtype",
    "linear_logprobs",
    "linear_ppo_loss",
    "group_advantages",
    "reinforce_pp_advantages",
    "dppo_tv_loss",
    "dppo_kl_loss",
    "sapo_loss",
    "gpg_loss",
    "cispo_loss",
    "dro_loss",
]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (the contract's output dtype)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def valid_positions(mask: torch.Tensor) -> torch.Tensor:
    """The contract's mask rule: a position is valid where ``mask != 0``.

    A float mask of 2, 0.5 or -1 marks a valid token, and so does NaN (NaN != 0); a mask is never a
    weight (weights are ``is_weights``).
    """
    return mask != 0


def _validated(check):
    """Run ``check`` with the op's arguments, then the op; keep the bare op as ``.raw``."""

    def wrap(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            _checks.run(check, *args, **kwargs)
            return fn(*args, **kwargs)

        op.raw = fn
        return op

    return wrap


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------


# log p below which p = exp(log p) is 0 in float32 and float64 (exp(-745) underflows float64).
_LOG_P_FLOOR = -1e4


def _logprob_rows(x: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Log-prob, entropy and the row statistics of the rows of ``x / temperature``.

    Args:
        x: ``[N, V]`` logits in the compute dtype (float32, or float64).
        labels: ``[N]`` int64 in [0, V).
    Returns:
        ``[N]`` log-prob, ``[N]`` entropy, and, detached, the ``[N]`` row max ``m`` of the raw
        logits and the ``[N]`` log-sum ``L``, all in ``x``'s dtype, such that

            log p_v = (x_v - m) / temperature - L,   L = log sum_v exp((x_v - m) / temperature)

        (the statistics the closed-form backward :func:`_dlogits_from_rows` starts from; the
        kernels save the same two numbers per row).

    Everything is computed from z' = (x - max(x)) / temperature: at |x| ~ 1e4 the float32 spacing
    is ~1e-3, so lse(z) - z[label] or lse(z) - sum p z subtract two numbers of that size and lose
    the answer (an entropy of 2.75 for a row whose entropy is 1.95). The max is subtracted before
    the division, so the only rounding is that of the small differences. The shift cancels exactly
    in both formulas, so the max is detached (a NaN row keeps a NaN max: NaN still propagates).
    """
    row_max = x.detach().amax(dim=-1, keepdim=True)
    # A row of all -inf would give -inf - -inf = NaN; keep it -inf as plain log_softmax does.
    row_max = torch.where(torch.isneginf(row_max), 0.0, row_max)
    shifted = (x - row_max) / temperature
    lse = torch.logsumexp(shifted, dim=-1)
    logprobs = torch.gather(shifted, -1, labels.long().unsqueeze(-1)).squeeze(-1) - lse
    p = torch.exp(shifted - lse.unsqueeze(-1))
    # H = lse' - sum_v p_v z'_v. A -inf logit has p = 0 and contributes nothing; zeroing it first
    # keeps 0 * -inf from turning into NaN in the forward and in the backward.
    shifted_finite = shifted.masked_fill(torch.isneginf(shifted), 0.0)
    entropy = lse - (p * shifted_finite).sum(-1)
    return logprobs, entropy, row_max.squeeze(-1), lse.detach()


def _dlogits_from_rows(x, labels, row_max, log_sum, entropy, grad_logprob, grad_entropy, temperature):
    """d x of the log-prob and entropy of :func:`_logprob_rows`, in closed form, without autograd.

    From the saved row statistics (no second pass of the forward), with z = x / T:

        log p_v = (x_v - m) / T - L
        d x_v   = [(onehot_v(label) - p_v) * g_logprob - p_v * (log p_v + H) * g_entropy] / T

    (d log p_label / d z = onehot - p and d H / d z = -p (log p + H); m carries no gradient, the
    shift cancels). A -inf logit has p = 0 and gets 0, never NaN; a NaN in a row makes m or L NaN
    and the whole row's gradient NaN, as autograd of the forward would.

    Args:
        x: ``[N, V]`` logits in the compute dtype (float32, or float64).
        labels: ``[N]`` int64 in [0, V), or None with ``grad_logprob`` None.
        row_max, log_sum, entropy: ``[N]`` from the forward (``entropy`` only with ``grad_entropy``).
        grad_logprob, grad_entropy: ``[N]`` incoming gradients in the compute dtype, or None.
    Returns:
        ``[N, V]`` d x in the compute dtype.
    """
    log_p = x - row_max.unsqueeze(1)
    log_p /= temperature
    log_p -= log_sum.unsqueeze(1)
    # Below -1e4, p = exp(log p) is exactly 0 in float32 and float64 alike, so the floor changes
    # nothing but a -inf logit's log p, whose p * log p is then 0 (its limit), not 0 * -inf = NaN.
    # clamp_ keeps NaN.
    log_p.clamp_(min=_LOG_P_FLOOR)
    p = torch.exp(log_p)
    # Collected per row: d z = p * (a * log p + b) + onehot * g_logprob, a = -g_entropy and
    # b = -(g_logprob + g_entropy * H). In place: p is the only [N, V] buffer besides log p.
    b = torch.zeros_like(row_max)
    if grad_logprob is not None:
        b -= grad_logprob
    if grad_entropy is not None:
        b -= grad_entropy * entropy
        grad = torch.addcmul(b.unsqueeze(1), log_p, -grad_entropy.unsqueeze(1), out=log_p).mul_(p)
    else:
        grad = p.mul_(b.unsqueeze(1))
    if grad_logprob is not None:
        grad.scatter_add_(1, labels.unsqueeze(1), grad_logprob.unsqueeze(1))
    if temperature != 1.0:
        grad /= temperature
    return grad


def _safe_labels(labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Labels clamped into [0, V): with ``FASTPPO_VALUE_CHECKS=0`` an out-of-range label is not
    caught, and the result for it is meaningless, but it must never index outside the row."""
    return labels.long().clamp(0, vocab - 1)


def _rows_of(logits, labels, mask):
    """(``[N, V]`` logits in the compute dtype, ``[N]`` safe labels, ``[N]`` valid or None).

    Masked rows may hold garbage (even NaN); they are replaced by zeros (label 0) before any
    arithmetic, so that neither outputs nor gradients can see it. ``labels`` None: zeros (the
    entropy alone)."""
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    if labels is None:
        flat_labels = torch.zeros(flat_logits.shape[0], dtype=torch.long, device=logits.device)
    else:
        flat_labels = labels.reshape(-1)
    valid = None
    if mask is not None:
        valid = mask.reshape(-1) != 0
        flat_logits = torch.where(valid.unsqueeze(1), flat_logits, 0.0)
        flat_labels = torch.where(valid, flat_labels, 0)
    return flat_logits.to(compute_dtype(logits)), _safe_labels(flat_labels, vocab), valid


def _logprobs_with_stats(logits, labels, temperature, mask=None):
    """``(logprobs, entropy, row_max, log_sum)``, each of shape ``logits.shape[:-1]``, in the
    compute dtype (see :func:`_logprob_rows`); ``labels`` None gives the entropy alone (the
    log-prob is then that of label 0). Masked positions give 0 log-prob and entropy."""
    x, lab, valid = _rows_of(logits, labels, mask)
    lp, ent, row_max, log_sum = _logprob_rows(x, lab, temperature)
    if valid is not None:
        lp = torch.where(valid, lp, 0.0)
        ent = torch.where(valid, ent, 0.0)
    shape = logits.shape[:-1]
    return lp.reshape(shape), ent.reshape(shape), row_max.reshape(shape), log_sum.reshape(shape)


def _masked_dlogits(x, labels, valid, row_max, log_sum, entropy, grad_logprob, grad_entropy, temperature):
    """:func:`_dlogits_from_rows` of ``[N, V]`` rows ``x`` whose masked rows (``valid`` False;
    None: all valid) get exactly 0, whatever they or their incoming gradients hold. The
    statistics and gradients may have any shape of N elements."""
    def flat(t):
        return None if t is None else t.reshape(-1).to(x.dtype)

    g_lp, g_ent = flat(grad_logprob), flat(grad_entropy)
    if valid is not None:
        g_lp = None if g_lp is None else torch.where(valid, g_lp, 0.0)
        g_ent = None if g_ent is None else torch.where(valid, g_ent, 0.0)
    dz = _dlogits_from_rows(x, labels, flat(row_max), flat(log_sum), flat(entropy), g_lp, g_ent, temperature)
    if valid is not None:
        dz.masked_fill_(~valid.unsqueeze(1), 0.0)
    return dz


def _logprobs_backward(logits, labels, mask, temperature, row_max, log_sum, entropy, grad_logprob, grad_entropy):
    """d logits of ``logprobs_from_logits`` / ``entropy_from_logits`` from the saved statistics
    of :func:`_logprobs_with_stats` (shape ``logits.shape[:-1]``), no second forward.

    ``grad_logprob`` / ``grad_entropy``: incoming gradients of the shape of the statistics, or
    None. Masked rows get exactly 0 whatever they (or their incoming gradients) hold. Returns d
    logits with the shape and dtype of ``logits``.
    """
    vocab = logits.shape[-1]
    x = logits.reshape(-1, vocab).to(compute_dtype(logits))
    lab = None if labels is None else _safe_labels(labels.reshape(-1), vocab)
    valid = None if mask is None else mask.reshape(-1) != 0
    # Masked rows are not replaced first (one [N, V] pass less): whatever they hold, NaN or
    # inf, _masked_dlogits overwrites their d logits with exact zeros.
    grad = _masked_dlogits(x, lab, valid, row_max, log_sum, entropy, grad_logprob, grad_entropy, temperature)
    return grad.to(logits.dtype).reshape(logits.shape)


@_validated(_checks.logprobs_from_logits)
def logprobs_from_logits(
    logits, labels, *, temperature=1.0, return_entropy=False, mask=None, inplace_backward=False
):
    """Per-token log-probability of ``labels`` under ``softmax(logits / temperature)``.

    logprob[t] = z[t, labels[t]] - log(sum_v exp(z[t, v])),   z = logits / temperature
    entropy[t] = -sum_v p[t, v] log p[t, v]                   p = softmax(z[t])

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, float32 / bfloat16 / float16.
        labels: integer tensor of shape ``logits.shape[:-1]``; already aligned with the logits
            (the logits at position t score ``labels[t]``). Values at masked positions are ignored.
        temperature: > 0; the logits are divided by it.
        return_entropy: also return the entropy.
        mask: optional bool or 0/1 tensor of the shape of ``labels``; masked positions give 0
            (and 0 gradient) whatever their logits rows hold (the kernels do not even read them).
        inplace_backward: the kernels may write the gradient of the logits into the logits'
            own storage (saving one logits-sized buffer; the logits are garbage afterwards, so
            only for callers that no longer need them). The reference ignores it.

    Returns:
        float32 log-probs of the shape of ``labels``, or ``(logprobs, entropy)``.
    """
    lp, ent, _, _ = _logprobs_with_stats(logits, labels, temperature, mask)
    lp = lp.reshape(labels.shape)
    if return_entropy:
        return lp, ent.reshape(labels.shape)
    return lp


@_validated(_checks.entropy_from_logits)
def entropy_from_logits(logits, *, temperature=1.0, inplace_backward=False):
    """Entropy of ``softmax(logits / temperature)`` over the last dimension.

    H[t] = log(sum_v exp(z[t, v])) - sum_v p[t, v] z[t, v],   z = logits / temperature

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, float32 / bfloat16 / float16.
        inplace_backward: as for ``logprobs_from_logits``; the reference ignores it.
    Returns:
        float32 tensor of shape ``logits.shape[:-1]``.
    """
    return _logprobs_with_stats(logits, None, temperature)[1]


# --------------------------------------------------------------------------------------------
# KL penalty and reward shaping
# --------------------------------------------------------------------------------------------


# How many Taylor terms 1/k! (k = 2 ..) of exp(r) - r - 1 ``_k3`` sums on -1 < r < 2: up to
# 2^(n-1) / (n+1)! relative, below the dtype's rounding at n = 14 (float32), 23 (float64).
_K3_TERMS = {torch.float32: 14, torch.float64: 23}


def _k3(r: torch.Tensor) -> torch.Tensor:
    """exp(r) - r - 1 to about 1 ulp of r's dtype (float32 or float64), differentiable.

    The direct formula loses every digit as r -> 0 (0 in float32 at |r| = 1e-4, where the value is
    5e-9) and expm1(r) - r still loses log2(2 / |r|) bits, so -1 < r < 2 sums the Taylor series
    r^2 (1/2! + r/3! + ...) instead (alternating below 0: at most a factor 2 of cancellation);
    outside, expm1(r) - r cancels at most a factor 2.7 (at r = -1). Its autograd gradient (the
    series' derivative; exp(r) - 1 outside) stays within ~2 ulps of expm1(r).
    """
    small = (r > -1.0) & (r < 2.0)
    # The series sees 0 where it is not used: a large r would give r^n = inf, and its zero
    # gradient through where() would become 0 * inf = NaN.
    s = torch.where(small, r, 0.0)
    p = torch.zeros_like(s)
    for k in range(_K3_TERMS[r.dtype], 1, -1):
        p = p * s + 1.0 / math.factorial(k)
    return torch.where(small, s * s * p, torch.expm1(r) - r)


@_validated(_checks.kl_penalty)
def kl_penalty(logprobs, ref_logprobs, estimator="k1", *, clamp=None):
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    With d = logprobs - ref_logprobs:
        k1:  d
        abs: |d|
        k2:  0.5 * d^2
        k3:  exp(-d) + d - 1      (= exp(r) - r - 1 with r = ref - lp; low variance, >= 0)

    k3 is computed so that it stays accurate to ~1 ulp where the formula cancels (small |d|, see
    ``_k3``); its gradient 1 - exp(-d) likewise. No clamping unless ``clamp=c`` is given, which
    clamps the estimate to [-c, c].
    Returns float32 of the input shape.
    """
    dtype = compute_dtype(logprobs, ref_logprobs)
    d = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if estimator == "k1":
        kl = d
    elif estimator == "abs":
        kl = d.abs()
    elif estimator == "k2":
        kl = 0.5 * d.square()
    else:  # k3
        r = -d
        if clamp is not None:
            # exp(r) - r - 1 >= r^2 / 2, so past r = sqrt(2 clamp) the estimate is clamped anyway.
            # Capping r there first keeps exp from overflowing float32 (at r > 88), whose
            # backward would turn the clamp's zero gradient into 0 * inf = NaN.
            # (A where(), not clamp(): a NaN or inf r keeps autograd's NaN gradient.)
            cap = math.sqrt(2.0 * clamp) + 1.0
            r = torch.where(torch.isfinite(r) & (r > cap), cap, r)
        kl = _k3(r)
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def last_valid_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the last valid position of every row of a ``[B, T]`` mask, and whether one exists."""
    m = valid_positions(mask)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, -1).amax(dim=1) if m.shape[1] > 0 else torch.full(
        (m.shape[0],), -1, device=m.device, dtype=torch.long
    )
    return last.clamp(min=0), last >= 0


@_validated(_checks.shape_rewards)
@torch.no_grad()
def shape_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1"):
    """Token rewards: a KL penalty at every valid token plus the sequence score at the last one.

    kl[b, t]      = kl_penalty(logprobs, ref_logprobs, estimator)[b, t] at valid t, else 0
    rewards[b, t] = -kl_coef * kl[b, t]  (+ scores[b] if t is the last valid position of row b)

    A row with no valid position gets no score (all zeros). Rollout data: the outputs carry no
    gradient.

    Args:
        scores: ``[B]``, one scalar reward per sequence.
        logprobs, ref_logprobs: ``[B, T]`` log-probs of the sampled tokens under policy and reference.
        mask: ``[B, T]`` bool or 0/1.
    Returns:
        ``(rewards, kl)``, both float32 ``[B, T]``.
    """
    m = valid_positions(mask)
    kl = kl_penalty.raw(logprobs, ref_logprobs, estimator)
    kl = torch.where(m, kl, 0.0)
    rewards = -kl_coef * kl
    if m.shape[1] == 0:  # no position to put a score on
        return rewards, kl
    last, has_valid = last_valid_index(m)
    is_last = torch.arange(m.shape[1], device=m.device) == last.unsqueeze(1)
    # where(), not scatter_add of a zeroed score: the score of a row with no valid token may be NaN.
    bonus = torch.where(is_last & has_valid.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1), 0.0)
    return rewards + bonus, kl


# --------------------------------------------------------------------------------------------
# GAE and whitening
# --------------------------------------------------------------------------------------------


@_validated(_checks.masked_whiten)
@torch.no_grad()
def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    """Whiten ``x`` with the mean and unbiased variance of its valid positions.

    n    = sum(mask)
    mean = sum(x * mask) / n
    var  = sum((x - mean)^2 * mask) / (n - 1)                 (Bessel's correction)
    out  = (x - mean) * rsqrt(var + eps)   at every position    (+ mean if not shift_mean)

    With n < 2 there is no variance: the result is x - mean unscaled (x itself with
    ``shift_mean=False``), and with n = 0 it is 0 everywhere. Masked positions of the output are 0
    whatever x holds there. Never NaN or inf unless x is NaN or inf at a valid position.
    Returns float32 of the shape of ``x``; carries no gradient.
    """
    out_dtype = compute_dtype(x)
    # The statistics are taken in float64: the square of a float32 of 1e20 overflows float32.
    xf = x.to(torch.float64)
    valid = valid_positions(mask)
    n = valid.to(torch.float64).sum()
    # Written without .item(): whitening sits on the hot path and must not wait for the host.
    # where(), not x * mask: an inf at a masked position would turn the sums into NaN.
    xv = torch.where(valid, xf, 0.0)
    mean = xv.sum() / n.clamp(min=1)
    centered = xv - mean
    var = torch.where(valid, centered.square(), 0.0).sum() / (n - 1).clamp(min=1)
    scale = torch.where(n >= 2, torch.rsqrt(var + eps), 1.0)
    out = centered * scale
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0).to(out_dtype)


@_validated(_checks.gae)
@torch.no_grad()
def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=False):
    """Generalised advantage estimation by a reverse scan over the valid positions.

    Walking t = T-1 ... 0 and visiting valid positions only (masked positions are skipped, and
    the next value and running advantage carry across a masked gap):

        delta[t] = rewards[t] + gamma * V(next valid) - values[t]    (V(next valid) = 0 at the end)
        A[t]     = delta[t] + gamma * lam * A(next valid)            (A(next valid) = 0 at the end)
        R[t]     = A[t] + values[t]

    Worked example (gamma = lam = 1): the critic predicts V(S3) = 1.2 at the last token and the
    final reward is 2, so A3 = 2 + 0 - 1.2 = 0.8 and R3 = 2.

    With ``whiten=True`` the advantages are whitened as ``masked_whiten`` does (returns are not).
    Masked positions of both outputs are 0. Rollout data: the outputs carry no gradient.

    Args:
        rewards, values: ``[B, T]`` float.
        mask: ``[B, T]`` bool or 0/1.
    Returns:
        ``(advantages, returns)``, both float32 ``[B, T]``.
    """
    dtype = compute_dtype(rewards, values)
    m = valid_positions(mask)
    # Masked positions may hold NaN or inf; they are skipped by the scan, never read.
    r = torch.where(m, rewards.to(dtype), 0.0)
    v = torch.where(m, values.to(dtype), 0.0)
    B, T = r.shape
    advantages = torch.zeros(B, T, dtype=dtype, device=r.device)
    next_value = torch.zeros(B, dtype=dtype, device=r.device)
    next_adv = torch.zeros(B, dtype=dtype, device=r.device)
    for t in reversed(range(T)):
        valid = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv, 0.0)
        next_value = torch.where(valid, v[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    returns = torch.where(m, advantages + v, 0.0)
    if whiten:
        advantages = masked_whiten.raw(advantages, m)
    return advantages, returns


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


@_validated(_checks.aggregate)
def aggregate(loss_mat, mask, agg="token-mean"):
    """Reduce a ``[B, T]`` per-token loss to a scalar over the valid tokens (verl 0.9's modes).

    token-mean:              sum(L * m) / sum(m)
    token-sum:               sum(L * m)
    seq-mean-token-mean:     mean over rows with a valid token of  sum_t(L * m) / sum_t(m)
    seq-mean-token-sum:      mean over rows with a valid token of  sum_t(L * m)
    seq-mean-token-sum-norm: seq-mean-token-sum / T

    An empty mask gives 0, not NaN (T = 0 included). A mask counts tokens (``mask != 0``), it
    never weighs them. Returns a 0-d float32 tensor.
    """
    dtype = compute_dtype(loss_mat)
    valid = valid_positions(mask)
    m = valid.to(dtype)
    # where(), not multiplication: a masked position may hold inf or NaN and must not leak.
    masked = torch.where(valid, loss_mat.to(dtype), 0.0)
    if agg == "token-mean":
        return masked.sum() / m.sum().clamp(min=1)
    if agg == "token-sum":
        return masked.sum()
    row_count = m.sum(dim=1)
    row_sum = masked.sum(dim=1)
    has_tokens = row_count > 0
    n_rows = has_tokens.to(dtype).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        per_row = torch.where(has_tokens, row_sum / row_count.clamp(min=1), 0.0)
        return per_row.sum() / n_rows
    seq_mean_token_sum = row_sum.sum() / n_rows
    if agg == "seq-mean-token-sum":
        return seq_mean_token_sum
    return seq_mean_token_sum / max(loss_mat.shape[1], 1)  # seq-mean-token-sum-norm


def _masked_fraction(flags: torch.Tensor, mask: torch.Tensor, dtype) -> torch.Tensor:
    m = valid_positions(mask)
    return (flags & m).to(dtype).sum() / m.to(dtype).sum().clamp(min=1)


@_validated(_checks.policy_loss)
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
):
    """PPO clipped surrogate objective (verl's "vanilla" policy loss).

    log_ratio = clamp(logprobs - old_logprobs, -20, 20),  ratio = exp(log_ratio)
    L[t]      = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
    dual clip (c > 1), tokens with A < 0:   L[t] = min(L[t], -A * c)
    L[t]     *= is_weights[t]   (when given)
    loss      = aggregate(L, mask, agg)

    clip_high defaults to clip_low. Statistics (0-d tensors, fractions of valid tokens):
        clipfrac:       the clipped term is strictly larger than the unclipped one
        clipfrac_lower: A < 0 and the dual-clip bound -A * c is strictly smaller (0 without dual clip)
        approx_kl:      masked mean of -log_ratio

    Args:
        logprobs: ``[B, T]`` current log-probs (differentiable).
        old_logprobs, advantages: ``[B, T]``; is_weights: optional ``[B, T]``.
        mask: ``[B, T]`` bool or 0/1.
    Returns:
        ``(loss, stats)``: 0-d float32 loss and a dict of detached 0-d float32 statistics.
    """
    dtype = compute_dtype(logprobs, old_logprobs, advantages, is_weights)
    if clip_high is None:
        clip_high = clip_low
    valid = valid_positions(mask)
    # Masked positions may hold NaN or inf in any input. Zero them before any arithmetic: a
    # where() after the fact keeps the forward clean but not the backward (0 * NaN = NaN).
    lp = torch.where(valid, logprobs.to(dtype), 0.0)
    adv = torch.where(valid, advantages.to(dtype), 0.0)
    log_ratio = torch.clamp(lp - torch.where(valid, old_logprobs.to(dtype), 0.0), -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    clipfrac = _masked_fraction(clipped > unclipped, mask, dtype)
    if dual_clip is not None:
        lower_bound = -adv * dual_clip
        negative = adv < 0
        clipfrac_lower = _masked_fraction((per_token > lower_bound) & negative, mask, dtype)
        per_token = torch.where(negative, torch.minimum(per_token, lower_bound), per_token)
    else:
        clipfrac_lower = torch.zeros((), dtype=dtype, device=lp.device)
    if is_weights is not None:
        per_token = per_token * torch.where(valid, is_weights.to(dtype), 0.0)
    loss = aggregate.raw(per_token, mask, agg)
    approx_kl = aggregate.raw(-log_ratio.detach(), mask, "token-mean")
    stats = {
        "clipfrac": clipfrac.detach(),
        "clipfrac_lower": clipfrac_lower.detach(),
        "approx_kl": approx_kl,
    }
    return loss, stats


@_validated(_checks.value_loss)
def value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean"):
    """Clipped value loss.

    v_clipped = clamp(values, old_values - clip, old_values + clip)
    L[t]      = max((values - returns)^2, (v_clipped - returns)^2)       ((values - returns)^2 if clip is None)

    (verl's and TRL's form: inside the band v_clipped *is* values, so no rounding tie can count as
    clipped, as ``old + clamp(v - old)`` would.)
    loss      = 0.5 * aggregate(L, mask, agg)

    Statistics: ``clipfrac``, the fraction of valid tokens where the clipped error is strictly
    larger than the unclipped one (0 without clipping).

    Args:
        values: ``[B, T]`` current value predictions (differentiable).
        old_values, returns: ``[B, T]``; mask: ``[B, T]`` bool or 0/1.
    Returns:
        ``(loss, stats)``: 0-d float32 loss and ``{"clipfrac": 0-d tensor}``.
    """
    dtype = compute_dtype(values, old_values, returns)
    valid = valid_positions(mask)
    # Masked positions may hold NaN or inf: zeroed before any arithmetic (see policy_loss).
    v = torch.where(valid, values.to(dtype), 0.0)
    R = torch.where(valid, returns.to(dtype), 0.0)
    unclipped = (v - R).square()
    if clip is None:
        per_token = unclipped
        clipfrac = torch.zeros((), dtype=dtype, device=v.device)
    else:
        old = torch.where(valid, old_values.to(dtype), 0.0)
        v_clipped = torch.clamp(v, old - clip, old + clip)
        clipped = (v_clipped - R).square()
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = _masked_fraction(clipped > unclipped, mask, dtype)
    loss = 0.5 * aggregate.raw(per_token, mask, agg)
    return loss, {"clipfrac": clipfrac.detach()}


# --------------------------------------------------------------------------------------------
# Composite ops: the whole advantage pass and the whole PPO objective
# --------------------------------------------------------------------------------------------


@_validated(_checks.compute_advantages)
@torch.no_grad()
def compute_advantages(
    scores, logprobs, ref_logprobs, values, mask, *, kl_coef, estimator="k1", gamma=1.0, lam=0.95, whiten=True
):
    """KL-shaped rewards, GAE and (optionally) whitening in one call.

    rewards, kl         = shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
    advantages, returns = gae(rewards, values, mask, gamma, lam, whiten)

    Args:
        scores: ``[B]``; logprobs, ref_logprobs, values: ``[B, T]``; mask: ``[B, T]`` bool or 0/1.
    Returns:
        ``(advantages, returns, rewards, kl)``, all float32 ``[B, T]``, 0 at masked positions;
        rollout data, so none carries a gradient.
    """
    rewards, kl = shape_rewards.raw(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)
    advantages, returns = gae.raw(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    return advantages, returns, rewards, kl


@_validated(_checks.ppo_loss)
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
):
    """The whole PPO objective: clipped policy loss + value loss - entropy bonus.

    loss = policy_loss(...) + vf_coef * value_loss(..., clip=value_clip) - ent_coef * aggregate(entropy, mask, agg)

    The entropy term is left out when ``entropy`` is None. Differentiable in ``logprobs``,
    ``values`` and ``entropy``.

    Returns:
        ``(loss, stats)``: 0-d float32 loss; stats (detached 0-d tensors) ``policy_loss``,
        ``value_loss``, ``entropy`` (0 without entropy), ``clipfrac``, ``clipfrac_lower``,
        ``approx_kl``, ``value_clipfrac``.
    """
    pg_loss, pg_stats = policy_loss.raw(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        is_weights=is_weights,
    )
    vf_loss, vf_stats = value_loss.raw(values, old_values, returns, mask, clip=value_clip, agg=agg)
    loss = pg_loss + vf_coef * vf_loss
    if entropy is not None:
        ent = aggregate.raw(entropy, mask, agg)
        loss = loss - ent_coef * ent
    else:
        ent = torch.zeros_like(pg_loss)
    stats = {
        "policy_loss": pg_loss.detach(),
        "value_loss": vf_loss.detach(),
        "entropy": ent.detach(),
        "clipfrac": pg_stats["clipfrac"],
        "clipfrac_lower": pg_stats["clipfrac_lower"],
        "approx_kl": pg_stats["approx_kl"],
        "value_clipfrac": vf_stats["clipfrac"],
    }
    return loss, stats


# --------------------------------------------------------------------------------------------
# Log-probabilities straight from hidden states (the fused LM head, issue 10)
# --------------------------------------------------------------------------------------------


@_validated(_checks.linear_logprobs)
def linear_logprobs(
    hidden, weight, labels, *, bias=None, temperature=1.0, return_entropy=False, mask=None, chunk_size=None
):
    """``logprobs_from_logits(hidden @ weight.T + bias, labels, ...)``: log-probs from hidden states.

    logits[t] = hidden[t] @ weight.T + bias                   (an LM head; tied embeddings too)
    z[t]      = (logits[t] - max_v logits[t, v]) / temperature
    logprob   = z[t, labels[t]] - log(sum_v exp(z[t, v]))
    entropy   = log(sum_v exp(z[t, v])) - sum_v p[t, v] z[t, v],   p = softmax(z[t])

    This reference builds the full ``[N, V]`` logits (in float32, float64 for float64 inputs);
    ``fastppo.linear_logprobs`` gives the same numbers in vocabulary chunks without them.

    Frozen head (LoRA: ``weight`` and ``bias`` need no gradient, ``hidden`` does; eager mode): the
    chunked paths then accumulate, in the forward, d logprob / d hidden = (W[label] -
    sum_v p_v W_v) / T and d entropy / d hidden = -sum_v p_v (log p_v + H) W_v / T, so the
    backward is a per-row combination with no matmul over the vocabulary (two vocabulary-sized
    matmuls in all, three with entropy, instead of three). The price: the forward keeps one
    ``[N_valid, H]`` float32 tensor (two with entropy) until the backward.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]`` float32 / bfloat16 / float16.
        weight: ``[V, H]`` of the same dtype (``lm_head.weight``, or the input embedding's
            weight for tied embeddings).
        labels: integer, shape ``hidden.shape[:-1]``, aligned with ``hidden`` (the hidden state
            at position t scores ``labels[t]``).
        bias: optional ``[V]``.
        temperature: > 0; the logits are divided by it.
        return_entropy: also return the entropy.
        mask: optional bool or 0/1 of the shape of ``labels`` (valid where ``mask != 0``): masked
            rows give 0 and get 0 gradient whatever they hold.
        chunk_size: vocabulary columns per chunk for the chunked paths; the reference ignores it.

    Returns:
        float32 log-probs of the shape of ``labels``, or ``(logprobs, entropy)``. Differentiable
        in ``hidden``, ``weight`` and ``bias``.
    """
    lp, ent, _, _ = _linear_logprobs_with_stats(hidden, weight, labels, bias, temperature, mask)
    if return_entropy:
        return lp, ent
    return lp


def _linear_rows(hidden, weight, labels, bias, mask):
    """The reference's full logits: (``[N, V]`` logits and ``[N, H]`` rows of ``hidden``, both
    in the compute dtype, ``[N]`` safe labels, ``[N]`` bool valid rows or None)."""
    dtype = compute_dtype(hidden, weight, bias)
    H = hidden.shape[-1]
    V = weight.shape[0]
    h = hidden.reshape(-1, H)
    # Out-of-range labels only get here with FASTPPO_VALUE_CHECKS=0; clamped so nothing reads
    # outside the vocabulary (the value is then meaningless).
    lab = labels.reshape(-1).long().clamp(0, V - 1)
    valid = None
    if mask is not None:
        valid = mask.reshape(-1) != 0
        # Masked rows may hold anything (NaN, inf); they never reach the matmul.
        h = torch.where(valid.unsqueeze(1), h, 0.0)
    h = h.to(dtype)
    logits = h @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits, h, lab, valid


def _linear_logprobs_with_stats(hidden, weight, labels, bias, temperature, mask):
    """``(logprobs, entropy, row_max, log_sum)`` of ``linear_logprobs``, each of the shape of
    ``labels``, in the compute dtype; the statistics as in :func:`_logprob_rows`, of the logits
    ``hidden @ weight.T + bias``. Masked positions give 0 log-prob and entropy."""
    logits, _, lab, valid = _linear_rows(hidden, weight, labels, bias, mask)
    # The row max first, then the temperature: exact for logits of magnitude 1e4.
    lp, ent, row_max, log_sum = _logprob_rows(logits, lab, temperature)
    if valid is not None:
        lp = torch.where(valid, lp, 0.0)
        ent = torch.where(valid, ent, 0.0)
    shape = labels.shape
    return lp.reshape(shape), ent.reshape(shape), row_max.reshape(shape), log_sum.reshape(shape)


def _linear_logprobs_backward(hidden, weight, labels, bias, mask, temperature, row_max, log_sum, entropy,
                              grad_logprob, grad_entropy, need_hidden, need_weight, need_bias):
    """(d hidden, d weight, d bias) of ``linear_logprobs`` from the statistics of
    :func:`_linear_logprobs_with_stats`, each None where not asked for (or no bias).

    The logits were not kept, so the one matmul ``hidden @ weight.T + bias`` runs again, but not
    the softmax: with d z from :func:`_dlogits_from_rows`,

        d hidden = d z @ weight,   d weight = d z^T @ hidden,   d bias = sum_rows d z

    in the compute dtype, rounded once to each input's dtype. Masked rows get 0 d z, so they add
    nothing anywhere and their d hidden rows are 0, whatever they hold.
    """
    logits, h, lab, valid = _linear_rows(hidden, weight, labels, bias, mask)
    dz = _masked_dlogits(logits, lab, valid, row_max, log_sum, entropy, grad_logprob, grad_entropy, temperature)
    d_hidden = (dz @ weight.to(dz.dtype)).to(hidden.dtype).reshape(hidden.shape) if need_hidden else None
    d_weight = (dz.T @ h).to(weight.dtype) if need_weight else None
    d_bias = dz.sum(0).to(bias.dtype) if need_bias and bias is not None else None
    return d_hidden, d_weight, d_bias


@_validated(_checks.linear_ppo_loss)
def linear_ppo_loss(
    hidden,
    weight,
    labels,
    *,
    old_logprobs,
    advantages,
    mask,
    bias=None,
    temperature=1.0,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    agg="token-mean",
    is_weights=None,
    ent_coef=0.0,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    chunk_size=None,
):
    """The clipped PPO policy objective straight from hidden states, per-token advantages.

    logprobs, entropy = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                        return_entropy=True, mask=mask)
    loss = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                       agg, is_weights)
           - ent_coef * aggregate(entropy, mask, agg)
           + kl_coef * aggregate(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask, agg)

    (the KL term only with ``ref_logprobs``). This reference builds the full logits;
    ``fastppo.linear_ppo_loss`` gives the same numbers in vocabulary chunks, and with a frozen
    head (LoRA) the loss's d hidden is formed in the forward from the per-row vectors of
    ``linear_logprobs``' frozen-head path scaled by each token's d loss / d logprob and
    d loss / d entropy: the forward keeps one ``[N_valid, H]`` float32 tensor (two, briefly, with
    entropy) and the backward is a scale of it.

    Args:
        hidden: ``[B, T, H]`` float32 / bfloat16 / float16; weight ``[V, H]`` of its dtype;
            labels ``[B, T]`` integer; bias optional ``[V]``; temperature > 0; chunk_size as in
            ``linear_logprobs``.
        old_logprobs, advantages: ``[B, T]`` float (one dtype); is_weights, ref_logprobs:
            optional ``[B, T]`` of that dtype; mask: ``[B, T]`` bool or 0/1 (required).
        clip_low, clip_high, dual_clip, agg: as in ``policy_loss``; ent_coef, kl_coef: the
            weights of the entropy bonus and the KL loss; kl_estimator: as in ``kl_penalty``.
    Returns:
        ``(loss, stats)``: a 0-d float32 loss (float64 for float64 inputs), differentiable in
        ``hidden``, ``weight`` and ``bias``; stats (detached 0-d tensors): ``policy_loss``,
        ``entropy`` (aggregated like the loss; reported whatever ent_coef, its gradient taken
        only when ent_coef != 0), ``kl`` (0 without ref_logprobs),
        ``clipfrac``, ``clipfrac_lower``, ``approx_kl``.
    """
    lp, ent = linear_logprobs.raw(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True,
                                  mask=mask)
    return ppo_objective(lp, ent, old_logprobs, advantages, mask, ref_logprobs, clip_low=clip_low,
                         clip_high=clip_high, dual_clip=dual_clip, agg=agg, is_weights=is_weights,
                         ent_coef=ent_coef, kl_coef=kl_coef, kl_estimator=kl_estimator)


def ppo_objective(lp, ent, old_logprobs, advantages, mask, ref_logprobs, *, clip_low, clip_high, dual_clip, agg,
                  is_weights, ent_coef, kl_coef, kl_estimator, ops=None):
    """The loss part of :func:`linear_ppo_loss` from ``[B, T]`` log-probs and entropy (or None).

    ``ops(name)`` gives the implementation of ``policy_loss``, ``aggregate`` and ``kl_penalty``
    (the Triton path passes its kernels); default: this module's.
    """
    get = ops or (lambda name: globals()[name].raw)
    loss, pg = get("policy_loss")(lp, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                  dual_clip=dual_clip, agg=agg, is_weights=is_weights)
    stats = {"policy_loss": loss.detach()}
    stats["entropy"] = torch.zeros_like(stats["policy_loss"])
    if ent is not None:
        ent_agg = get("aggregate")(ent if ent_coef != 0.0 else ent.detach(), mask, agg)
        if ent_coef != 0.0:
            loss = loss - ent_coef * ent_agg
        stats["entropy"] = ent_agg.detach()
    stats["kl"] = torch.zeros_like(stats["policy_loss"])
    if ref_logprobs is not None:
        # Masked positions of ref_logprobs may hold anything: replaced by the log-prob itself
        # (0 there), so that not even the gradient's 0 * NaN can reach a valid row.
        ref = torch.where(valid_positions(mask), ref_logprobs, lp.detach().to(ref_logprobs.dtype))
        kl_agg = get("aggregate")(get("kl_penalty")(lp, ref.to(lp.dtype), kl_estimator), mask, agg)
        loss = loss + kl_coef * kl_agg
        stats["kl"] = kl_agg.detach()
    stats.update(pg)
    return loss, stats


# --------------------------------------------------------------------------------------------
# Critic-free advantages: GRPO, Dr. GRPO, RLOO and REINFORCE++ (issue 11)
# --------------------------------------------------------------------------------------------


def _group_unit(s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The unit in which a group's statistics are taken, ``[G, 1]``: 1, or where the members'
    mean |score| is finite and beyond 2^40, the power of two at or below it.

    ``s``: ``[G, K]`` scores, 0 at non-members; ``n``: ``[G, 1]`` member counts. The square of a
    float32 score beyond about 1e19 overflows; in units every |score| is below 2n, so the
    variance of scores up to float32's max is finite, and a power-of-two unit rounds nothing.
    The mean is summed from |s| * 2^-64, which cannot overflow. An inf or NaN member keeps unit 1:
    its group is NaN either way. (The Triton kernel picks the same unit.)
    """
    mean_abs = (s.abs() * 2.0**-64).sum(dim=1, keepdim=True) / n.clamp(min=1)
    big = (mean_abs >= 2.0**-24) & torch.isfinite(mean_abs)
    exponent = torch.frexp(torch.where(big, mean_abs, 1.0)).exponent
    return torch.where(big, torch.exp2((exponent - 1).to(s.dtype)) * 2.0**64, 1.0)


@_validated(_checks.group_advantages)
@torch.no_grad()
def group_advantages(scores, group_size, mask, *, estimator="grpo", norm_by_std=True, eps=1e-6):
    """Outcome advantages from the scores of K responses to one prompt, broadcast over the tokens.

    Layout: consecutive rows form a group, rows ``g*K .. g*K+K-1`` are the K = ``group_size``
    responses to prompt g (``B`` must be a multiple of K). A row with no valid token is not a
    member of its group (its score, whatever it holds, NaN included, is ignored) and its output
    row is 0. With the n members s_1 .. s_n of a group:

        mean = sum_j s_j / n
        std  = sqrt(sum_j (s_j - mean)^2 / (n - 1))              (unbiased, as torch.std)

        grpo:     a_i = (s_i - mean) / (std + eps)                (norm_by_std=True)
                  a_i =  s_i - mean                               (norm_by_std=False)
        dr_grpo:  a_i =  s_i - mean                               (Dr. GRPO: no std division)
        rloo:     a_i =  s_i - mean_{j != i} s_j  =  (s_i - mean) * n / (n - 1)

        out[b, t] = a_b at valid t (mask != 0), 0 elsewhere.

    A group with a single member has no baseline (verl's rule): mean 0 and std 1, so grpo gives
    s / (1 + eps) and dr_grpo, rloo, opo give s, gpg alpha * s; grpo_passk, which compares the
    best response with the second best, gives a lone member 0 (verl raises there). ``norm_by_std`` is read by ``grpo`` only (verl's
    ``norm_adv_by_std_in_grpo``); ``eps`` by ``grpo`` with std only. These are the numbers of
    verl 0.9.1's ``compute_grpo_outcome_advantage`` / ``compute_rloo_outcome_advantage`` with
    ``index`` = row // K and the score summed from the token rewards.

        grpo_passk: only the best member i* (the first of the group's maximal scores) gets
                  a_i* = (s_max - s_second) / (std + eps)  (norm_by_std=True; without std:
                  s_max - s_second), every other member 0       (Pass@k training, arXiv 2503.19595)
        opo:      a_i = s_i - sum_j |y_j| s_j / sum_j |y_j|  (|y_j| = valid tokens of row j: the
                  length-weighted baseline of On-Policy RL with Optimal reward baseline, 2505.23585)
        gpg:      a_i = alpha * (s_i - mean), alpha = (members of the whole batch) / (members
                  whose score != 0, at least 1)              (GPG, arXiv 2504.02546; verl's alpha)

    Worked example, one group of K = 4 with scores 1, 0, 0, 1: mean 0.5, std = sqrt(1/3) = 0.577;
    grpo gives +0.866, -0.866, -0.866, +0.866; dr_grpo +0.5, -0.5, -0.5, +0.5; rloo compares each
    with the mean of the other three (1/3, 2/3, 2/3, 1/3): +0.667, -0.667, -0.667, +0.667;
    grpo_passk gives (1 - 1) / 0.577 = 0 to row 0 (the first best, tied with row 3) and 0 to the
    rest; gpg with two of four nonzero scores: alpha = 2, so +1, -1, -1, +1. With scores 3, 1, 0, 0
    grpo_passk gives row 0 (3 - 1) / std(3, 1, 0, 0) = 2 / 1.414 = 1.414. opo with lengths
    1, 3, 1, 3 on scores 1, 0, 0, 1: baseline (1 + 3) / 8 = 0.5, advantages +0.5, -0.5, -0.5, +0.5.

    A NaN or inf score of a member makes its whole group NaN (and only its group); gpg's alpha
    is a batch statistic, a NaN score counts as nonzero there. grpo_passk without std: an inf
    best score gives inf to that row and 0 to the others (the literal formula), a NaN score
    makes its group NaN. Any finite
    scores are fine, up to float32's max: the statistics are taken in a power-of-two unit of the
    scores (:func:`_group_unit`), so the sum of squares does not overflow. Rollout data: the
    output carries no gradient.

    Args:
        scores: ``[B]`` float, one scalar reward per response.
        group_size: K, responses per prompt; a positive integer dividing B.
        mask: ``[B, T]`` bool or 0/1 (valid where ``mask != 0``).
    Returns:
        float32 ``[B, T]`` advantages.
    """
    dtype = compute_dtype(scores)
    valid = valid_positions(mask)
    B = valid.shape[0]
    member = valid.any(dim=1).view(-1, group_size)  # [G, K]: rows with a valid token
    s = torch.where(member, scores.to(dtype).view(-1, group_size), 0.0)
    n = member.to(dtype).sum(dim=1, keepdim=True)
    unit = _group_unit(s, n)
    u = s / unit
    mean = u.sum(dim=1, keepdim=True) / n.clamp(min=1)
    centered = torch.where(member, u - mean, 0.0)
    std = (centered.square().sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    several = n >= 2
    # Statistics and centred scores are in units; a lone member (mean 0, std 1) is not.
    if estimator == "grpo_passk":
        adv = _passk(u, member, std, unit, several, norm_by_std, eps)
    elif estimator == "opo":
        length = valid.sum(dim=1).to(dtype).view(-1, group_size)  # 0 for non-members
        baseline = (length * u).sum(dim=1, keepdim=True) / length.sum(dim=1, keepdim=True).clamp(min=1)
        adv = torch.where(several, (u - baseline) * unit, s)
    elif estimator == "gpg":
        raw = scores.to(dtype).view(-1, group_size)
        nonzero = (member & (raw != 0)).sum()  # NaN != 0: a NaN score counts, as in verl
        alpha = member.sum().to(dtype) / nonzero.clamp(min=1).to(dtype)
        adv = alpha * torch.where(several, (u - mean) * unit, s)
    elif estimator == "rloo":
        adv = torch.where(several, (u - mean) * n / (n - 1).clamp(min=1) * unit, s)
    elif estimator == "grpo" and norm_by_std:
        adv = torch.where(several, (u - mean) / (std + eps / unit), s / (1.0 + eps))
    else:
        adv = torch.where(several, (u - mean) * unit, s)
    adv = torch.where(member, adv, 0.0).reshape(B, 1)
    return torch.where(valid, adv, 0.0)


def _passk(u, member, std, unit, several, norm_by_std, eps):
    """grpo_passk's row advantages ``[G, K]`` from the scores in units ``u`` (see group_advantages)."""
    K = u.shape[1]
    nan = (member & torch.isnan(u)).any(dim=1, keepdim=True)
    lowest = torch.tensor(-math.inf, dtype=u.dtype, device=u.device)
    top = torch.where(member, u, lowest)
    best = top.max(dim=1, keepdim=True).values
    slot = torch.arange(K, device=u.device).expand_as(u)
    # The first member holding the maximum; an index past the group when there is none.
    first = torch.where(member & (top == best), slot, K).min(dim=1, keepdim=True).values
    second = torch.where(slot == first, lowest, top).max(dim=1, keepdim=True).values
    gap = best - second
    gap = gap / (std + eps / unit) if norm_by_std else gap * unit
    adv = torch.where((slot == first) & several, gap, 0.0)
    return torch.where(nan & member, math.nan, adv)


@_validated(_checks.reinforce_pp_advantages)
@torch.no_grad()
def reinforce_pp_advantages(rewards, mask, *, gamma=1.0):
    """REINFORCE++: the discounted return-to-go of the token rewards, whitened over the batch.

    Walking t = T-1 ... 0 over the valid positions only (a masked gap is skipped: the running
    return carries across it undiscounted, verl's rule for observation tokens):

        R[t]  = rewards[t] + gamma * R(next valid)              (R(next valid) = 0 at the end)
        A     = masked_whiten(R, mask)                           (batch mean, unbiased var, eps 1e-8)

    ``rewards`` are the KL-shaped token rewards (``shape_rewards``: -kl_coef * kl at every valid
    token plus the score at the last). This is ``gae`` with values 0 and lam = 1, whitened.

    Worked example (gamma = 1): two rows of rewards [0, 1] and [0, 3] give returns [1, 1] and
    [3, 3]; mean 2, unbiased std sqrt(4/3) = 1.155, advantages -0.866 and +0.866.

    Masked positions of both outputs are 0 whatever the rewards hold there. verl 0.9.1's
    ``compute_reinforce_plus_plus_outcome_advantage`` gives the same numbers. Rollout data: the
    outputs carry no gradient.

    Args:
        rewards: ``[B, T]`` float token rewards.
        mask: ``[B, T]`` bool or 0/1.
    Returns:
        ``(advantages, returns)``, both float32 ``[B, T]``.
    """
    dtype = compute_dtype(rewards)
    valid = valid_positions(mask)
    r = torch.where(valid, rewards.to(dtype), 0.0)  # masked positions are never read
    returns = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=dtype, device=r.device)
    for t in reversed(range(r.shape[1])):
        running = torch.where(valid[:, t], r[:, t] + gamma * running, running)
        returns[:, t] = torch.where(valid[:, t], running, 0.0)
    return masked_whiten.raw(returns, valid), returns


# --------------------------------------------------------------------------------------------
# Token-level policy objectives of verl 0.9.1: dppo_tv, dppo_kl, sapo, gpg, cispo, dro (issue 19)
# --------------------------------------------------------------------------------------------
#
# Each is a per-token term L[t] of (lp, old, A), times is_weights[t] when given, reduced by
# ``aggregate``. Only ``logprobs`` carries a gradient; "sg" marks a factor held constant (detached)
# in the backward. Statistics are fastppo's, as ``policy_loss`` and every registered objective
# names them: ``clipfrac``, ``clipfrac_lower``, ``approx_kl`` (verl's metrics ``pg_clipfrac``,
# ``pg_clipfrac_lower``, ``ppo_kl``), masked means over the valid tokens, all three for every
# objective (0 for a fraction the objective has no clip for).


def _token_inputs(logprobs, old_logprobs, advantages, mask, is_weights):
    """(dtype, valid, lp, old, A, w or None, log_ratio = lp - old), masked positions zeroed first."""
    dtype = compute_dtype(logprobs, old_logprobs, advantages, is_weights)
    valid = valid_positions(mask)
    # Zero masked positions before any arithmetic: a where() afterwards would keep the forward
    # clean but not the backward (0 * NaN = NaN).
    lp = torch.where(valid, logprobs.to(dtype), 0.0)
    old = torch.where(valid, old_logprobs.to(dtype), 0.0)
    adv = torch.where(valid, advantages.to(dtype), 0.0)
    w = None if is_weights is None else torch.where(valid, is_weights.to(dtype), 0.0)
    return dtype, valid, lp, old, adv, w, lp - old


def _weighted(per_token, w):
    return per_token if w is None else per_token * w


def _masked_mean(x, mask):
    return aggregate.raw(x.detach(), mask, "token-mean")


def _dppo(logprobs, old_logprobs, advantages, mask, *, divergence, clip_low, clip_high, clip_ratio_c, agg,
          is_weights):
    dtype, valid, lp, old, adv, w, raw = _token_inputs(logprobs, old_logprobs, advantages, mask, is_weights)
    high = clip_low if clip_high is None else clip_high
    log_ratio = torch.clamp(raw, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    truncated = torch.clamp(ratio, max=clip_ratio_c).detach()
    prob, old_prob = torch.exp(lp), torch.exp(old)
    if divergence == "tv":
        gap = prob - old_prob
        keep_pos, keep_neg = gap <= high, gap >= -clip_low
    else:
        # KL between the two Bernoulli distributions (p_old, 1 - p_old) and (p, 1 - p); the 1e-8
        # is verl's, kept so the trust region is the same at p -> 1.
        binary_kl = old_prob * (old - lp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        keep_pos = (binary_kl <= high) | (prob <= old_prob)
        keep_neg = (binary_kl <= clip_low) | (prob >= old_prob)
    keep = torch.where(adv > 0, keep_pos, keep_neg).to(dtype).detach()
    per_token = _weighted(-adv * truncated * lp * keep, w)
    loss = aggregate.raw(per_token, mask, agg)
    stats = {
        "clipfrac": _masked_mean(1.0 - keep, mask),
        "clipfrac_lower": _masked_mean((ratio > clip_ratio_c).to(dtype) * keep, mask),
        "approx_kl": _masked_mean(-log_ratio, mask),
    }
    return loss, stats


@_validated(_checks.dppo_tv_loss)
def dppo_tv_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, clip_ratio_c=3.0,
                 agg="token-mean", is_weights=None):
    """DPPO-Binary-TV policy loss (verl 0.9.1 ``dppo_tv``; DPPO, arXiv:2602.04879).

    A policy-gradient loss whose trust region is a threshold on the binary total-variation
    distance between new and old token probabilities, instead of a ratio clip:

        ratio    = exp(clamp(lp - old, -20, 20)),  r_c = sg(min(ratio, clip_ratio_c))  (truncated IS)
        gap      = exp(lp) - exp(old)
        keep     = sg(gap <= clip_high)    if A > 0
                   sg(gap >= -clip_low)    otherwise
        L[t]     = -A * r_c * lp * keep    (* is_weights[t])
        loss     = aggregate(L, mask, agg)

    clip_high defaults to clip_low (verl's ``clip_ratio``, ``clip_ratio_low``/``_high``, here a
    probability gap); clip_ratio_c is verl's ``clip_ratio_c`` (ActorConfig default 3.0).
    Gradient: dL/dlp = -A * r_c * keep. Stats: ``clipfrac`` = mean(1 - keep), ``approx_kl`` =
    mean(-clamp(lp - old)), ``clipfrac_lower`` = mean((ratio > clip_ratio_c) * keep) (verl's
    ``pg_clipfrac``, ``ppo_kl``, ``pg_clipfrac_lower``).

    Worked example: lp = log 0.5, old = log 0.4, A = 1, clip 0.2: gap 0.1 <= 0.2 keeps the token,
    ratio 1.25, L = -1.25 * log 0.5 = 0.8664.

    Args:
        logprobs: ``[B, T]`` (differentiable); old_logprobs, advantages, is_weights (optional): ``[B, T]``.
        mask: ``[B, T]``, valid where ``!= 0``.
    Returns:
        ``(loss, stats)``: 0-d float32 loss and detached 0-d float32 stats.
    """
    return _dppo(logprobs, old_logprobs, advantages, mask, divergence="tv", clip_low=clip_low, clip_high=clip_high,
                 clip_ratio_c=clip_ratio_c, agg=agg, is_weights=is_weights)


@_validated(_checks.dppo_kl_loss)
def dppo_kl_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, clip_ratio_c=3.0,
                 agg="token-mean", is_weights=None):
    """DPPO-Binary-KL policy loss (verl 0.9.1 ``dppo_kl``; DPPO, arXiv:2602.04879).

    As :func:`dppo_tv_loss` with the binary KL divergence of the token's probability as the trust
    region (p = exp(lp), q = exp(old)):

        D     = q * (old - lp) + (1 - q) * log((1 - q + 1e-8) / (1 - p + 1e-8))
        keep  = sg(D <= clip_high or p <= q)   if A > 0
                sg(D <= clip_low  or p >= q)   otherwise
        L[t]  = -A * sg(min(ratio, clip_ratio_c)) * lp * keep    (* is_weights[t])

    A token moving against its advantage's direction is never dropped. Same stats as
    :func:`dppo_tv_loss`.

    Worked example: lp = log 0.5, old = log 0.4, A = 1: D = 0.4 log 0.8 + 0.6 log 1.2 = 0.0201
    <= 0.2 keeps the token, L = -1.25 * log 0.5 = 0.8664.
    """
    return _dppo(logprobs, old_logprobs, advantages, mask, divergence="kl", clip_low=clip_low, clip_high=clip_high,
                 clip_ratio_c=clip_ratio_c, agg=agg, is_weights=is_weights)


@_validated(_checks.sapo_loss)
def sapo_loss(logprobs, old_logprobs, advantages, mask, *, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean",
              is_weights=None):
    """Soft Adaptive Policy Optimization (verl 0.9.1 ``sapo``; Gao et al., SAPO, arXiv:2511.20347).

    A smooth sigmoid gate of the ratio replaces the hard clip:

        ratio = exp(clamp(lp - old, -20, 20))
        tau   = tau_pos if A > 0 else tau_neg
        f(r)  = sigmoid(tau * (r - 1)) * 4 / tau         (f(1) = 2 / tau, f'(1) = 1)
        L[t]  = -f(ratio) * A                            (* is_weights[t])

    verl always aggregates SAPO with ``seq-mean-token-mean`` whatever its ``loss_agg_mode`` says;
    here ``agg`` defaults to that mode and is honoured when given (the verl adapter passes
    ``seq-mean-token-mean``). Gradient: dL/dlp = -A * 4 * s * (1 - s) * ratio with
    s = sigmoid(tau * (ratio - 1)) (0 where lp - old is clamped). Stats: ``clipfrac`` and
    ``clipfrac_lower`` are 0 (no clip; verl reports 0 too), ``approx_kl`` = mean(-clamp(lp - old)).

    Worked example: ratio 1, A = 1, tau_pos = 1: L = -2, dL/dlp = -1 (the PPO gradient on-policy).
    """
    dtype, valid, lp, old, adv, w, raw = _token_inputs(logprobs, old_logprobs, advantages, mask, is_weights)
    log_ratio = torch.clamp(raw, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    tau = torch.where(adv > 0, tau_pos, tau_neg).to(dtype)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = aggregate.raw(_weighted(-gate * adv, w), mask, agg)
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    return loss, {"clipfrac": zero, "clipfrac_lower": zero.clone(), "approx_kl": _masked_mean(-log_ratio, mask)}


@_validated(_checks.gpg_loss)
def gpg_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None):
    """Group Policy Gradient (verl 0.9.1 ``gpg``; Chu et al., GPG, arXiv:2504.02546).

    Plain REINFORCE on the given advantages, no ratio and no clip:

        L[t] = -lp * A      (* is_weights[t]),     loss = aggregate(L, mask, agg)

    ``old_logprobs`` enters only the stats. Gradient: dL/dlp = -A. Stats: the three keys of every
    objective, so any objective's stats read the same: ``clipfrac`` and ``clipfrac_lower`` are 0
    (no clip), ``approx_kl`` = mean(-clamp(lp - old, -20, 20)). verl's ``gpg`` reports no metrics;
    its adapter returns ``{}``.

    Worked example: lp = -2, A = 0.5: L = 1.0.
    """
    dtype, valid, lp, old, adv, w, raw = _token_inputs(logprobs, old_logprobs, advantages, mask, is_weights)
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    stats = {"clipfrac": zero, "clipfrac_lower": zero.clone(),
             "approx_kl": _masked_mean(-torch.clamp(raw, -20.0, 20.0), mask)}
    return aggregate.raw(_weighted(-lp * adv, w), mask, agg), stats


@_validated(_checks.cispo_loss)
def cispo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, agg="token-mean",
               is_weights=None):
    """Clipped IS-weight Policy Optimization (verl 0.9.1 ``cispo``; MiniMax-M1, arXiv:2506.13585).

    The importance weight is clipped and detached; every token keeps a gradient through lp:

        ratio = exp(clamp(lp - old, -20, 20))
        r_c   = sg(clamp(ratio, 1 - clip_low, 1 + clip_high))
        L[t]  = -r_c * A * lp          (* is_weights[t])

    clip_high defaults to clip_low. Gradient: dL/dlp = -r_c * A. Stats: ``clipfrac`` = mean of
    ratio != r_c, ``approx_kl`` = mean(-clamp(lp - old)), ``clipfrac_lower`` = 0 (as verl's).

    Worked example: lp = -1, old = -1.5 (ratio 1.6487), A = 2, clip 0.2: r_c = 1.2, L = 2.4.
    """
    dtype, valid, lp, old, adv, w, raw = _token_inputs(logprobs, old_logprobs, advantages, mask, is_weights)
    high = clip_low if clip_high is None else clip_high
    log_ratio = torch.clamp(raw, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + high)
    loss = aggregate.raw(_weighted(-clipped.detach() * adv * lp, w), mask, agg)
    stats = {
        "clipfrac": _masked_mean((ratio != clipped).to(dtype), mask),
        "clipfrac_lower": torch.zeros((), dtype=dtype, device=lp.device),
        "approx_kl": _masked_mean(-log_ratio, mask),
    }
    return loss, stats


@_validated(_checks.dro_loss)
def dro_loss(logprobs, old_logprobs, advantages, mask, *, beta=None, agg="token-mean", is_weights=None):
    """DRO: policy gradient with a quadratic log-ratio penalty (verl 0.9.1 ``dro``; Richemond et
    al., "Offline Regularised RL for LLM Alignment" (DRO), arXiv:2405.19107, in verl's token form).

        L[t] = -(lp * A - beta / 2 * (lp - old)^2)       (* is_weights[t])

    No clamp of the log-ratio. beta (verl's ``policy_loss.dro_beta``) has no default and must be
    > 0. Gradient: dL/dlp = -(A - beta * (lp - old)). Stats: ``approx_kl`` = mean(-(lp - old))
    (unclamped, as verl's ``ppo_kl`` here); ``clipfrac`` and ``clipfrac_lower`` are 0 (no clip;
    verl reports only ``ppo_kl``).

    Worked example: lp = -1, old = -1.5, A = 1, beta = 0.1: L = 1 + 0.05 * 0.25 = 1.0125.
    """
    dtype, valid, lp, old, adv, w, raw = _token_inputs(logprobs, old_logprobs, advantages, mask, is_weights)
    loss = aggregate.raw(_weighted(-(lp * adv - 0.5 * beta * raw.square()), w), mask, agg)
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    return loss, {"clipfrac": zero, "clipfrac_lower": zero.clone(), "approx_kl": _masked_mean(-raw, mask)}
