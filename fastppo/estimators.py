"""Advantage estimators by name: verl 0.9.1's fourteen, as fastppo ops and one registry.

The ops (each takes the rollout layout of :func:`fastppo.group_advantages`: rows
``g*K .. g*K+K-1`` are the K = ``group_size`` responses to prompt g; a row with no valid token is
not a member of its group and its outputs are 0):

* :func:`fastppo.group_advantages` with ``estimator`` = ``grpo``, ``dr_grpo``, ``rloo``,
  ``grpo_passk``, ``opo``, ``gpg``: one group statistic per prompt (Triton kernel);
* :func:`reinforce_pp_baseline_advantages`, :func:`gdpo_advantages`, :func:`gpg_advantages`:
  group statistics then batch whitening / scaling, composed of the kernel ops;
* :func:`remax_advantages`: returns-to-go minus a greedy-rollout baseline (the kernel scan of
  ``fastppo.gae``);
* :func:`optimal_token_baseline_advantages`: a per-token baseline across each group (PyTorch, see
  its docstring).

``ADVANTAGE_ESTIMATORS`` maps verl's ``algorithm.adv_estimator`` names to functions of one
signature::

    fn(token_rewards, mask, *, group_size=1, **inputs_and_options) -> (advantages, returns)

``token_rewards`` ``[B, T]``: the outcome estimators score row b with the sum of its rewards at
valid positions (verl's ``token_level_rewards.sum(-1)``); ``mask`` ``[B, T]``; the outputs are
float32 ``[B, T]``, 0 at masked positions (for the outcome estimators ``returns`` is
``advantages``, as in verl). ``ESTIMATOR_INPUTS[name]`` names the extra tensors an estimator needs
(``values`` for gae, ``baselines`` for remax, ``old_logprobs`` and ``sum_pi_squared`` for the
optimal token baselines). Rollout data: nothing carries a gradient.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import _checks
from .ops import gae, group_advantages, masked_whiten, reinforce_pp_advantages
from .reference import compute_dtype, valid_positions

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ESTIMATOR_INPUTS",
    "gdpo_advantages",
    "get_advantage_estimator",
    "gpg_advantages",
    "optimal_token_baseline_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
]


def _check_group(scores, group_size, mask):
    # The group layout checks of group_advantages, with its messages.
    _checks.run(_checks.group_advantages, scores, group_size, mask)


# --------------------------------------------------------------------------------------------
# Ops composed of the kernel ops
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reinforce_pp_baseline_advantages(scores, group_size, mask, *, eps=1e-8):
    """REINFORCE++-baseline (arXiv 2501.03262): the group-mean baseline, then batch whitening.

        a_i      = s_i - mean_{group(i)} s          (a lone member: s_i, verl's rule)
        out      = masked_whiten(a broadcast over the valid tokens, mask)

    The whitening statistics are over valid tokens (a long response weighs more), unbiased
    variance, as verl 0.9.1's ``reinforce_plus_plus_baseline``. Worked example, K = 2, scores
    (1, 0) and (3, 3), one token each: centred 0.5, -0.5, 0, 0; mean 0, unbiased std
    sqrt(1/6) = 0.408; advantages 1.225, -1.225, 0, 0.

    Args:
        scores: ``[B]`` float; group_size: K dividing B; mask: ``[B, T]``.
        eps: added to the variance (verl: 1e-8).
    Returns:
        float32 ``[B, T]``, 0 at masked positions.
    """
    _check_group(scores, group_size, mask)
    _checks.run(_checks._number, "eps", eps, low=0.0, low_open=True)
    centred = group_advantages(scores, group_size, mask, estimator="dr_grpo")
    return masked_whiten(centred, mask, eps=eps)


@torch.no_grad()
def gdpo_advantages(scores, group_size, mask, *, weights=None, norm_by_std=True, eps=1e-6, whiten_eps=1e-8):
    """GDPO (Group reward-Decoupled normalization, arXiv 2601.05242): GRPO per reward component,
    weighted sum, then batch whitening.

        A_k = grpo advantage of component k within each group        (norm_by_std, eps as grpo)
        out = masked_whiten(sum_k w_k A_k, mask)

    With one component this is GRPO whitened over the batch's valid tokens. Worked example, K = 2,
    components (1, 0) and (0, 1) for rows 0 and 1 of one group (one token each), w = (1, 1):
    A_1 = (+0.707, -0.707), A_2 = (-0.707, +0.707), sum 0 -> 0, 0.

    Args:
        scores: ``[B]`` or ``[B, D]`` float, D reward components per response.
        group_size: K dividing B; mask: ``[B, T]``.
        weights: D floats (a sequence or a 1-D tensor), default all 1.
    Returns:
        float32 ``[B, T]``, 0 at masked positions.
    """
    if isinstance(scores, torch.Tensor) and scores.dim() == 1:
        scores = scores.unsqueeze(1)
    _checks.run(_checks._float_tensor, "scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B] or [B, D] (D reward components), got shape {tuple(scores.shape)}")
    D = scores.shape[1]
    if weights is None:
        weights = [1.0] * D
    weights = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(weights) != D or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {D} finite numbers (one per reward component), got {weights!r}")
    total = None
    for k in range(D):
        a = group_advantages(scores[:, k].contiguous(), group_size, mask, estimator="grpo", norm_by_std=norm_by_std,
                             eps=eps)
        total = weights[k] * a if total is None else total + weights[k] * a
    return masked_whiten(total, mask, eps=whiten_eps)


@torch.no_grad()
def gpg_advantages(scores, group_size, mask, *, f_norm=1.0):
    """GPG (Group Policy Gradient, arXiv 2504.02546): the group-centred score scaled by the batch's
    share of informative responses.

        a_i = alpha * (s_i - mean_{group(i)} s) / f_norm,   alpha = members / max(1, members with s != 0)

    ``f_norm`` is verl's argument (1 by default; the paper divides by the group std, which is
    ``group_advantages(estimator="grpo")`` instead). Worked example, one group, scores 1, 0, 0, 1:
    alpha = 4 / 2 = 2, advantages +1, -1, -1, +1.
    """
    _checks.run(_checks._number, "f_norm", f_norm, low=0.0, low_open=True)
    adv = group_advantages(scores, group_size, mask, estimator="gpg")
    return adv / f_norm if f_norm != 1.0 else adv


@torch.no_grad()
def remax_advantages(rewards, baselines, mask):
    """ReMax (arXiv 2310.10505): returns-to-go minus the reward of the greedy response.

        G[t] = sum_{t' >= t valid} rewards[t']        (undiscounted, masked positions skipped)
        A[t] = G[t] - baselines[b]                     at valid t, 0 elsewhere

    ``baselines[b]`` is the score of the greedy (argmax) decoding of row b's prompt. Worked
    example: rewards [0, 1] with baseline 0.25: returns [1, 1], advantages [0.75, 0.75].

    Args:
        rewards: ``[B, T]`` float token rewards; baselines: ``[B]`` float; mask: ``[B, T]``.
    Returns:
        ``(advantages, returns)``, float32 ``[B, T]``, 0 at masked positions.
    """
    _checks.run(_checks._float_tensor, "baselines", baselines)
    _checks.run(_checks.reinforce_pp_advantages, rewards, mask)
    if baselines.shape != rewards.shape[:1]:
        raise ValueError(f"baselines must be [B] = [{rewards.shape[0]}], got shape {tuple(baselines.shape)}")
    # The kernel scan: GAE with values 0, gamma = lam = 1 is the return-to-go.
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    valid = valid_positions(mask)
    adv = torch.where(valid, returns - baselines.to(returns.dtype).unsqueeze(1), 0.0)
    return adv, returns


# --------------------------------------------------------------------------------------------
# Optimal token baseline (PyTorch)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def optimal_token_baseline_advantages(rewards, mask, group_size, old_logprobs, sum_pi_squared, *, is_weights=None,
                                      handle_zero_tail=True, eps=1e-8, multi_turn=False):
    """The optimal token baseline (OTB): a baseline per time step, shared by a prompt's group.

        G[t] = sum_{t' >= t} rewards[t'] over valid t'            (return-to-go)
        w[t] = (1 - 2 exp(old_logprobs[t]) + sum_pi_squared[t]) * is_weights[t]^2
        W[t] = sum_{t' <= t} w[t'] over valid t'                  (cumulative path variance)
        B[t] = sum_i G_i[t] W_i[t] / (sum_i W_i[t] + eps)         (i over the group's members)
        A[t] = G[t] - B[t]                                         at valid t, 0 elsewhere

    ||s_t||^2 = 1 - 2 pi_t + sum_v pi_v^2 is the squared norm of the score function of the
    sampled token (Optimal baselines for policy gradient, Weaver & Tao 2001; verl's
    ``optimal_token_baseline``). The sums over i align members by position t
    (``multi_turn=False``) or by the index of the valid token (``multi_turn=True``: verl's
    ``tir_optimal_token_baseline``, whose valid tokens are the assistant turns with tool output
    masked between them). ``handle_zero_tail``: where one member is strictly the longest, its
    baseline past the second-longest length is 0 (there it has no company). A lone member has no
    baseline (A = G).

    PyTorch, not a kernel: the baseline is a cross-row reduction at every time step (or valid
    index) followed by a sort of the members' lengths, and it needs ``sum_pi_squared`` from the
    rollout's full softmax, so it runs once per rollout on data that is already O(B T).

    Worked example: one group of two rows, one valid token each, rewards 1 and 0, pi = 0.5 and
    sum_pi_squared = 0.5 (w = 0.5): B = (1 * 0.5 + 0) / 1 = 0.5, advantages +0.5, -0.5.

    Args:
        rewards, old_logprobs, sum_pi_squared, is_weights (or None): ``[B, T]`` float;
        mask: ``[B, T]``; group_size: K dividing B.
    Returns:
        ``(advantages, returns)``, float32 ``[B, T]`` (float64 for float64 inputs), 0 at masked
        positions.
    """
    _checks.run(_checks.reinforce_pp_advantages, rewards, mask)
    for name, t in (("old_logprobs", old_logprobs), ("sum_pi_squared", sum_pi_squared), ("is_weights", is_weights)):
        if t is None and name == "is_weights":
            continue
        _checks.run(_checks._float_tensor, name, t)
        if t.shape != rewards.shape or t.device != rewards.device:
            raise ValueError(f"{name} must be [B, T] = {tuple(rewards.shape)} on {rewards.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    _check_group(rewards.new_zeros(rewards.shape[0]), group_size, mask)
    _checks.run(_checks._number, "eps", eps, low=0.0)
    dtype = compute_dtype(rewards, old_logprobs, sum_pi_squared, is_weights)
    valid = valid_positions(mask)
    B, T = valid.shape
    r = torch.where(valid, rewards.to(dtype), 0.0)
    G = returns = r.flip(-1).cumsum(-1).flip(-1)
    w = 1.0 - 2.0 * old_logprobs.to(dtype).exp() + sum_pi_squared.to(dtype)
    if is_weights is not None:
        w = w * is_weights.to(dtype).square()
    W = torch.where(valid, w, 0.0).cumsum(-1)
    lengths = valid.sum(-1)
    if multi_turn:
        # Compact each row's valid tokens to the front: position j is the row's j-th valid token.
        order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
        G, W, v = G.gather(1, order), W.gather(1, order), valid.gather(1, order)
    else:
        v = valid
    Gg, Wg, vg = (x.view(B // group_size, group_size, T) for x in (G, W, v))
    member = vg.any(-1)  # [n_groups, K]
    n = member.sum(-1, keepdim=True)  # [n_groups, 1]
    num = torch.where(vg, Gg * Wg, 0.0).sum(1, keepdim=True)
    den = torch.where(vg, Wg, 0.0).sum(1, keepdim=True) + eps
    base = (num / den).expand_as(Gg)
    base = torch.where((n >= 2).unsqueeze(-1), base, 0.0)
    if handle_zero_tail:
        L = lengths.view(-1, group_size)
        top2 = L.topk(min(2, group_size), dim=-1).values
        longest, second = top2[:, :1], top2[:, -1:]
        unique = ((L == longest).sum(-1, keepdim=True) == 1) & (longest > second) & (n >= 2)
        tail = (L == longest) & unique  # [n_groups, K]
        past = torch.arange(T, device=valid.device) >= second.unsqueeze(-1)  # [n_groups, 1, T]
        base = torch.where(tail.unsqueeze(-1) & past, 0.0, base)
    adv = torch.where(vg, Gg - base, 0.0).view(B, T)
    if multi_turn:
        adv = torch.zeros_like(adv).scatter(1, order, adv)
    return adv, torch.where(valid, returns, 0.0)


# --------------------------------------------------------------------------------------------
# The registry: verl's names, one signature
# --------------------------------------------------------------------------------------------

EstimatorFn = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def _scores(token_rewards, mask):
    """verl's outcome score: the row sum of the token rewards (at valid positions)."""
    _checks.run(_checks.reinforce_pp_advantages, token_rewards, mask)
    dtype = compute_dtype(token_rewards)
    return torch.where(valid_positions(mask), token_rewards.to(dtype), 0.0).sum(-1)


def _outcome(estimator, **fixed):
    def fn(token_rewards, mask, *, group_size=1, norm_by_std=True, eps=1e-6):
        kw = dict(norm_by_std=norm_by_std, eps=eps)
        kw.update(fixed)
        adv = group_advantages(_scores(token_rewards, mask), group_size, mask, estimator=estimator, **kw)
        return adv, adv

    fn.__doc__ = f"``group_advantages(estimator={estimator!r})`` of the row-summed token rewards; (adv, adv)."
    return fn


def _gae(token_rewards, mask, *, values, group_size=1, gamma=1.0, lam=1.0, whiten=True):
    """GAE (Schulman et al. 2016, arXiv 1506.02438) by ``fastppo.gae``; advantages whitened as verl."""
    return gae(token_rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)


def _reinforce_pp(token_rewards, mask, *, group_size=1, gamma=1.0):
    """REINFORCE++ (arXiv 2501.03262) by ``fastppo.reinforce_pp_advantages``."""
    return reinforce_pp_advantages(token_rewards, mask, gamma=gamma)


def _rpp_baseline(token_rewards, mask, *, group_size=1, eps=1e-8):
    """``reinforce_pp_baseline_advantages`` of the row-summed token rewards; (adv, adv)."""
    adv = reinforce_pp_baseline_advantages(_scores(token_rewards, mask), group_size, mask, eps=eps)
    return adv, adv


def _gdpo(token_rewards, mask, *, group_size=1, scores=None, weights=None, norm_by_std=True, eps=1e-6):
    """``gdpo_advantages`` of ``scores`` ``[B, D]`` (default: the row-summed token rewards); (adv, adv)."""
    adv = gdpo_advantages(_scores(token_rewards, mask) if scores is None else scores, group_size, mask,
                          weights=weights, norm_by_std=norm_by_std, eps=eps)
    return adv, adv


def _gpg(token_rewards, mask, *, group_size=1, f_norm=1.0):
    """``gpg_advantages`` of the row-summed token rewards; (adv, adv)."""
    adv = gpg_advantages(_scores(token_rewards, mask), group_size, mask, f_norm=f_norm)
    return adv, adv


def _remax(token_rewards, mask, *, baselines, group_size=1):
    """``remax_advantages``: (advantages, returns)."""
    return remax_advantages(token_rewards, baselines, mask)


def _otb(multi_turn):
    def fn(token_rewards, mask, *, old_logprobs, sum_pi_squared, group_size=1, is_weights=None,
           handle_zero_tail=True, eps=1e-8):
        return optimal_token_baseline_advantages(token_rewards, mask, group_size, old_logprobs, sum_pi_squared,
                                                 is_weights=is_weights, handle_zero_tail=handle_zero_tail, eps=eps,
                                                 multi_turn=multi_turn)

    fn.__doc__ = f"``optimal_token_baseline_advantages(multi_turn={multi_turn})``: (advantages, returns)."
    return fn


_grpo = _outcome("grpo")
_rloo = _outcome("rloo")
ADVANTAGE_ESTIMATORS: dict[str, EstimatorFn] = {
    "gae": _gae,
    "grpo": _grpo,
    "grpo_vectorized": _grpo,
    "gdpo": _gdpo,
    "grpo_passk": _outcome("grpo_passk"),
    "reinforce_plus_plus_baseline": _rpp_baseline,
    "rloo": _rloo,
    "rloo_vectorized": _rloo,
    "opo": _outcome("opo"),
    "reinforce_plus_plus": _reinforce_pp,
    "remax": _remax,
    "gpg": _gpg,
    "optimal_token_baseline": _otb(False),
    "tir_optimal_token_baseline": _otb(True),
}

# The tensors each estimator needs beyond (token_rewards, mask); a trainer without them refuses it.
ESTIMATOR_INPUTS: dict[str, tuple[str, ...]] = {name: () for name in ADVANTAGE_ESTIMATORS}
ESTIMATOR_INPUTS.update({
    "gae": ("values",),
    "remax": ("baselines",),
    "optimal_token_baseline": ("old_logprobs", "sum_pi_squared"),
    "tir_optimal_token_baseline": ("old_logprobs", "sum_pi_squared"),
})


def get_advantage_estimator(name: str) -> EstimatorFn:
    """The estimator registered as ``name`` (verl's ``adv_estimator`` names); ``ValueError``
    naming the known ones otherwise."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of: "
                         f"{', '.join(ADVANTAGE_ESTIMATORS)}") from None
