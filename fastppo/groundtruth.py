"""An independent float64 ground truth of every op, for ``fastppo verify`` and the tests.

``fastppo.reference`` is what ``auto`` runs on CPU tensors, so it is itself under test: a
float32 reference that loses the answer at logits of 1e4 must be caught, which a comparison of
the reference with itself in float64 cannot do. This module is a second spelling of
``DESIGN.md``'s formulas that shares no code with the reference and always computes in float64,
from the caller's (already rounded) inputs. It favours the most literal form of each formula
over speed (loops over rows, boolean indexing, host synchronisation are all fine here):

* entropy as ``-sum p log p`` (the reference uses ``lse - sum p z``);
* whitening from the selected valid values with ``torch.var`` (the reference uses where-sums);
* the aggregation modes row by row;
* GAE row by row over the compacted valid positions.

Every function takes the op's own arguments and returns float64 tensors of the op's shapes.
Masked positions are replaced by 0 in every input before any arithmetic (the contract: nothing at
a masked position reaches an output or a gradient); a NaN or inf at a valid position flows
through float64 arithmetic exactly as the formula says. The ops the contract calls
differentiable are differentiable here too, so gradients have a ground truth as well.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(F64)


def _valid(mask: torch.Tensor) -> torch.Tensor:
    return mask != 0


def _zero_masked(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, t.to(F64), 0.0)


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------


def _softmax_stats(x: torch.Tensor, labels: torch.Tensor, temperature: float):
    """x: [N, V] float64 logits; ([N] log p[label], [N] -sum p log p) of softmax(x / temperature)."""
    z = x / temperature
    top = z.detach().max(dim=-1, keepdim=True).values
    # Shift only by a finite max: an all -inf row then gives NaN, a +inf logit gives NaN, as
    # log_softmax does; a NaN logit makes the max NaN and the whole row NaN.
    top = torch.where(torch.isinf(top), 0.0, top)
    shifted = z - top
    log_norm = torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))
    log_p = shifted - log_norm
    p = torch.exp(log_p)
    logprob = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # 0 * log 0 = 0: select before multiplying, so that neither value nor gradient sees -inf.
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(dim=-1)
    return logprob, entropy


def logprobs_from_logits(logits, labels, *, temperature=1.0, return_entropy=False, mask=None, inplace_backward=False):
    V = logits.shape[-1]
    x = logits.reshape(-1, V).to(F64)
    lab = labels.reshape(-1).long()
    valid = torch.ones_like(lab, dtype=torch.bool) if mask is None else _valid(mask.reshape(-1))
    x = torch.where(valid.unsqueeze(-1), x, 0.0)
    lab = torch.where(valid, lab, 0).clamp(0, V - 1)
    lp, ent = _softmax_stats(x, lab, temperature)
    lp = torch.where(valid, lp, 0.0).reshape(labels.shape)
    ent = torch.where(valid, ent, 0.0).reshape(labels.shape)
    return (lp, ent) if return_entropy else lp


def entropy_from_logits(logits, *, temperature=1.0, inplace_backward=False):
    V = logits.shape[-1]
    x = logits.reshape(-1, V).to(F64)
    _, ent = _softmax_stats(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), temperature)
    return ent.reshape(logits.shape[:-1])


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, return_entropy=False, mask=None, chunk_size=None):
    """The full float64 logits ``hidden @ weight.T + bias``, then the log-prob ground truth."""
    H = hidden.shape[-1]
    logits = hidden.reshape(-1, H).to(F64) @ weight.to(F64).T
    if bias is not None:
        logits = logits + bias.to(F64)
    lab = labels.reshape(-1)
    flat_mask = None if mask is None else mask.reshape(-1)
    out = logprobs_from_logits(logits, lab, temperature=temperature, return_entropy=True, mask=flat_mask)
    lp, ent = (o.reshape(labels.shape) for o in out)
    return (lp, ent) if return_entropy else lp


# --------------------------------------------------------------------------------------------
# KL, shaping, GAE, whitening
# --------------------------------------------------------------------------------------------


def _k3_exact(r):
    """exp(r) - r - 1 in float64 to ~1e-16 relative at every r (and so its autograd gradient).

    Even float64's expm1(r) - r keeps only ~1e-16 / |r| relative as r -> 0 (a float32 k3 at
    r = 1e-8 could not be checked against it), so |r| < 1/2 sums the terms r^k / k!, k = 2 .. 24,
    one by one (the first term left out is below 1e-30 of the sum).
    """
    near = r.abs() < 0.5
    x = torch.where(near, r, 0.0)  # keeps r^k finite in the unused branch, and its gradient 0
    term = x * x / 2
    total = term
    for k in range(3, 25):
        term = term * x / k
        total = total + term
    return torch.where(near, total, torch.expm1(r) - r)


def kl_penalty(logprobs, ref_logprobs, estimator="k1", *, clamp=None):
    d = logprobs.to(F64) - ref_logprobs.to(F64)
    if estimator == "k1":
        kl = d
    elif estimator == "abs":
        kl = torch.abs(d)
    elif estimator == "k2":
        kl = d * d / 2
    else:  # k3 = exp(r) - r - 1 with r = ref - lp
        r = -d
        if clamp is not None:
            # Past r = 700 float64's exp overflows, and the clamp's zero gradient would meet
            # 0 * inf = NaN; the estimate there (> 1e300) is clamped whatever the exact value.
            # (Finite r only: a NaN or inf input keeps autograd's NaN gradient.)
            r = torch.where(torch.isfinite(r) & (r > 700.0), 700.0, r)
        kl = _k3_exact(r)
    if clamp is not None:
        kl = torch.clamp(kl, -clamp, clamp)
    return kl


@torch.no_grad()
def shape_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1"):
    valid = _valid(mask)
    kl = torch.where(valid, kl_penalty(_zero_masked(logprobs, valid), _zero_masked(ref_logprobs, valid), estimator), 0.0)
    rewards = -kl_coef * kl
    for b in range(valid.shape[0]):
        positions = valid[b].nonzero().flatten().tolist()
        if positions:
            rewards[b, positions[-1]] += scores[b].to(F64)
    return rewards, kl


@torch.no_grad()
def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    valid = _valid(mask)
    xf = x.to(F64)
    picked = xf[valid]
    out = torch.zeros_like(xf)
    if picked.numel() == 0:
        return out
    mean = picked.mean()
    if picked.numel() >= 2:
        whitened = (xf - mean) / torch.sqrt(picked.var(unbiased=True) + eps)
    else:
        whitened = xf - mean
    if not shift_mean:
        whitened = whitened + mean
    out[valid] = whitened[valid]
    return out


@torch.no_grad()
def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=False):
    valid = _valid(mask)
    # Plain Python floats (exact float64 arithmetic) row by row: the literal recursion.
    r, v, ok = rewards.to(F64).tolist(), values.to(F64).tolist(), valid.tolist()
    advantages = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        next_value, running = 0.0, 0.0
        for t in reversed(range(len(r[b]))):
            if not ok[b][t]:  # masked positions are skipped, never read
                continue
            delta = r[b][t] + gamma * next_value - v[b][t]
            running = delta + gamma * lam * running
            advantages[b][t] = running
            next_value = v[b][t]
    adv = torch.tensor(advantages, dtype=F64).reshape(rewards.shape).to(rewards.device)
    returns = torch.where(valid, adv + values.to(F64), 0.0)
    if whiten:
        adv = masked_whiten(adv, mask)
    return adv, returns


@torch.no_grad()
def compute_advantages(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, estimator="k1", gamma=1.0, lam=0.95, whiten=True):
    rewards, kl = shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    return advantages, returns, rewards, kl


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def aggregate(loss_mat, mask, agg="token-mean"):
    valid = _valid(mask)
    L = _zero_masked(loss_mat, valid)
    B, T = L.shape
    zero = L.sum() * 0  # keeps the graph, so an empty mask still has a (zero) gradient
    if agg in ("token-mean", "token-sum"):
        total = L.sum()
        if agg == "token-sum":
            return total
        count = int(valid.sum())
        return total / count if count else zero
    rows = []
    for b in range(B):
        n = int(valid[b].sum())
        if n:
            rows.append(L[b].sum() / n if agg == "seq-mean-token-mean" else L[b].sum())
    if not rows:
        return zero
    seq_mean = torch.stack(rows).mean()
    return seq_mean / T if agg == "seq-mean-token-sum-norm" else seq_mean


def _fraction(flags: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = int(valid.sum())
    return (flags & valid).sum().to(F64) / max(count, 1)


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean", is_weights=None):
    valid = _valid(mask)
    high = clip_low if clip_high is None else clip_high
    log_ratio = torch.clamp(_zero_masked(logprobs, valid) - _zero_masked(old_logprobs, valid), -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    A = _zero_masked(advantages, valid)
    unclipped = -A * ratio
    clipped = -A * torch.clamp(ratio, 1 - clip_low, 1 + high)
    per_token = torch.maximum(unclipped, clipped)
    lower = torch.zeros((), dtype=F64, device=A.device)
    if dual_clip is not None:
        bound = -A * dual_clip
        lower = _fraction((per_token > bound) & (A < 0), valid)
        per_token = torch.where(A < 0, torch.minimum(per_token, bound), per_token)
    if is_weights is not None:
        per_token = per_token * _zero_masked(is_weights, valid)
    stats = {
        "clipfrac": _fraction(clipped > unclipped, valid),
        "clipfrac_lower": lower,
        "approx_kl": aggregate(-log_ratio.detach(), mask, "token-mean"),
    }
    return aggregate(per_token, mask, agg), stats


def value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean"):
    valid = _valid(mask)
    v, R = _zero_masked(values, valid), _zero_masked(returns, valid)
    unclipped = (v - R) ** 2
    if clip is None:
        return 0.5 * aggregate(unclipped, mask, agg), {"clipfrac": torch.zeros((), dtype=F64, device=v.device)}
    old = _zero_masked(old_values, valid)
    clipped = (torch.clamp(v, old - clip, old + clip) - R) ** 2
    per_token = torch.maximum(unclipped, clipped)
    return 0.5 * aggregate(per_token, mask, agg), {"clipfrac": _fraction(clipped > unclipped, valid)}


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, *, entropy=None, clip_low=0.2, clip_high=None, dual_clip=None, value_clip=0.2, vf_coef=0.5, ent_coef=0.0, agg="token-mean", is_weights=None):
    pg, pg_stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, is_weights=is_weights)
    vf, vf_stats = value_loss(values, old_values, returns, mask, clip=value_clip, agg=agg)
    ent = aggregate(entropy, mask, agg) if entropy is not None else torch.zeros((), dtype=F64, device=pg.device)
    loss = pg + vf_coef * vf - ent_coef * ent
    stats = {
        "policy_loss": pg.detach(),
        "value_loss": vf.detach(),
        "entropy": ent.detach(),
        "clipfrac": pg_stats["clipfrac"],
        "clipfrac_lower": pg_stats["clipfrac_lower"],
        "approx_kl": pg_stats["approx_kl"],
        "value_clipfrac": vf_stats["clipfrac"],
    }
    return loss, stats


def linear_ppo_loss(hidden, weight, labels, *, old_logprobs, advantages, mask, bias=None, temperature=1.0,
                    clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean", is_weights=None, ent_coef=0.0,
                    ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", chunk_size=None):
    lp, ent = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True, mask=mask)
    pg, pg_stats = policy_loss(lp, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                               dual_clip=dual_clip, agg=agg, is_weights=is_weights)
    zero = torch.zeros((), dtype=F64, device=pg.device)
    ent_agg = aggregate(ent, mask, agg)
    kl_agg = zero
    if ref_logprobs is not None:
        valid = _valid(mask)
        kl_agg = aggregate(kl_penalty(_zero_masked(lp, valid), _zero_masked(ref_logprobs, valid), kl_estimator),
                           mask, agg)
    loss = pg - ent_coef * ent_agg + kl_coef * kl_agg
    stats = {"policy_loss": pg.detach(), "entropy": ent_agg.detach(), "kl": kl_agg.detach(), **pg_stats}
    return loss, stats


# --------------------------------------------------------------------------------------------
# Critic-free advantages (issue 11)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def group_advantages(scores, group_size, mask, *, estimator="grpo", norm_by_std=True, eps=1e-6):
    valid = _valid(mask)
    B = valid.shape[0]
    s = scores.to(F64)
    row_adv = torch.zeros(B, dtype=F64, device=s.device)
    for start in range(0, B, group_size):
        # Group members: the rows of this prompt that have at least one valid token.
        members = [b for b in range(start, start + group_size) if bool(valid[b].any())]
        if not members:
            continue
        picked = s[members]
        if len(members) == 1:
            mean, std = torch.zeros((), dtype=F64), torch.ones((), dtype=F64)
        else:
            mean, std = picked.mean(), picked.std(unbiased=True)
        n = len(members)
        for i, b in enumerate(members):
            if estimator == "rloo":
                if n == 1:
                    row_adv[b] = s[b]
                else:  # the leave-one-out baseline: the others' sum over n - 1 (verl's form: an
                    # inf score makes its whole group NaN, inf - inf, like any other estimator)
                    row_adv[b] = s[b] - (picked.sum() - s[b]) / (n - 1)
            elif estimator == "grpo" and norm_by_std:
                row_adv[b] = (s[b] - mean) / (std + eps)
            else:
                row_adv[b] = s[b] - mean
    return torch.where(valid, row_adv.unsqueeze(1), 0.0)


@torch.no_grad()
def reinforce_pp_advantages(rewards, mask, *, gamma=1.0):
    valid = _valid(mask)
    r, ok = rewards.to(F64).tolist(), valid.tolist()
    returns = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        running = 0.0
        for t in reversed(range(len(r[b]))):
            if ok[b][t]:  # masked positions are skipped, never read
                running = r[b][t] + gamma * running
                returns[b][t] = running
    ret = torch.tensor(returns, dtype=F64).reshape(rewards.shape).to(rewards.device)
    return masked_whiten(ret, mask), ret


# --------------------------------------------------------------------------------------------
# Sequence-level and covariance-selection policy losses (issue 19)
# --------------------------------------------------------------------------------------------


def gspo_loss(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None,
              clip_low=0.2, clip_high=None, dual_clip=None, seq_grad=False):
    """GSPO row by row: s_b = mean of the valid log-ratios, token ratio exp(min(lp - sg(lp) + sg(s_b), 10))."""
    valid = _valid(mask)
    high = clip_low if clip_high is None else clip_high
    lp = _zero_masked(logprobs, valid)
    d = lp - _zero_masked(old_logprobs, valid)
    A = _zero_masked(advantages, valid)
    rows = []
    for b in range(lp.shape[0]):
        n = int(valid[b].sum())
        if seq_grad:  # the gradient through the sequence mean
            s = d[b].sum() / n if n else d[b].sum() * 0
            rows.append(torch.exp(torch.clamp(s, max=10.0)).expand(lp.shape[1]))
        else:
            s = d[b].detach().sum() / n if n else d[b].detach().sum() * 0
            rows.append(torch.exp(torch.clamp((lp[b] - lp[b].detach()) + s, max=10.0)))
    ratio = torch.stack(rows) if rows else lp.clone()
    first, second = -A * ratio, -A * torch.clamp(ratio, 1 - clip_low, 1 + high)
    per_token = torch.maximum(first, second)
    lower = torch.zeros((), dtype=F64, device=lp.device)
    if dual_clip is not None:
        bound = -A * dual_clip
        lower = _fraction((per_token > bound) & (A < 0), valid)
        per_token = torch.where(A < 0, torch.minimum(per_token, bound), per_token)
    if is_weights is not None:
        per_token = per_token * _zero_masked(is_weights, valid)
    stats = {
        "clipfrac": _fraction(second > first, valid),
        "clipfrac_lower": lower,
        "approx_kl": aggregate(-d.detach(), mask, "token-mean"),
    }
    return aggregate(per_token, mask, agg), stats


def geo_mean_loss(logprobs, old_logprobs, advantages, mask, *, agg="seq-mean-token-mean", is_weights=None,
                  clip_low=0.2, clip_high=None):
    """GMPO row by row on the compacted valid tokens; the row loss repeated on its tokens for ``agg``."""
    valid = _valid(mask)
    high = clip_low if clip_high is None else clip_high
    lp = _zero_masked(logprobs, valid)
    d = lp - _zero_masked(old_logprobs, valid)
    A = _zero_masked(advantages, valid)
    B, T = d.shape
    token_rows = []
    for b in range(B):
        v = valid[b]
        n = int(v.sum())
        if n == 0:
            token_rows.append(lp[b] * 0)
            continue
        db, Ab = d[b][v], A[b][v]
        # Pessimistic (in the advantage's direction) of the raw and the clamped log-ratio.
        sg = torch.sign(Ab)
        clamped = torch.clamp(db, -clip_low, high)
        c = sg * torch.minimum(sg * db, sg * clamped)
        loss_b = -(Ab.sum() / n) * torch.exp(c.sum() / n)
        if is_weights is not None:
            loss_b = loss_b * torch.exp(torch.log(_zero_masked(is_weights, valid)[b][v] + 1e-10).sum() / n)
        token_rows.append(torch.where(v, loss_b, 0.0))
    per_token = torch.stack(token_rows) if token_rows else lp * 0
    # seq-mean-token-mean: each non-empty row's token mean of its repeated loss is the row loss.
    loss = aggregate(per_token, mask, agg)
    clipped = d != torch.clamp(d, -clip_low, high)
    stats = {
        "clipfrac": _fraction(clipped & (A > 0), valid),
        "clipfrac_lower": _fraction(clipped & (A < 0), valid),
        "approx_kl": aggregate(-d.detach(), mask, "token-mean"),
    }
    return loss, stats


def _verl_mean(x, valid, mask):
    m = valid.to(mask.dtype) if mask.dtype.is_floating_point else valid
    return (torch.where(valid, x, 0.0) * m).sum() / (m.sum() + 1e-8)


def clip_cov_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None,
                  clip_low=0.2, clip_high=None, clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0,
                  generator=None):
    """Clip-Cov: the candidates in the inputs' dtype (the spec: verl's), one randperm, the loss in float64."""
    valid = _valid(mask)
    high = clip_low if clip_high is None else clip_high
    # Selection, in the inputs' own dtype.
    lp_in = torch.where(valid, logprobs.detach(), 0.0)
    A_in = torch.where(valid, advantages.detach(), 0.0)
    r_in = torch.exp(lp_in - torch.where(valid, old_logprobs.detach(), 0.0))
    origin_clipped = (-A_in * torch.clamp(r_in, 1 - clip_low, 1 + high)) > (-A_in * r_in)
    cov = (A_in - _verl_mean(A_in, valid, mask)) * (lp_in - _verl_mean(lp_in, valid, mask))
    cand = []
    for b in range(cov.shape[0]):
        for t in range(cov.shape[1]):
            if valid[b, t] and not origin_clipped[b, t] and clip_cov_lb < cov[b, t] < clip_cov_ub:
                cand.append((b, t))
    dropped = torch.zeros_like(valid)
    if cand:
        k = min(max(int(clip_cov_ratio * int(valid.sum())), 1), len(cand))
        for i in torch.randperm(len(cand), generator=generator)[:k].tolist():
            dropped[cand[i]] = True
    # The loss, in float64.
    lp = _zero_masked(logprobs, valid)
    d = lp - _zero_masked(old_logprobs, valid)
    A = _zero_masked(advantages, valid)
    ratio = torch.exp(d)
    per_token = torch.maximum(-A * ratio, -A * torch.clamp(ratio, 1 - clip_low, 1 + high))
    per_token = torch.where(dropped, 0.0, per_token)
    if is_weights is not None:
        per_token = per_token * _zero_masked(is_weights, valid)
    stats = {
        "clipfrac": _fraction(dropped, valid),
        "clipfrac_lower": torch.zeros((), dtype=F64, device=lp.device),
        "approx_kl": aggregate(-d.detach(), mask, "token-mean"),
    }
    return aggregate(per_token, mask, agg), stats


def kl_cov_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None,
                kl_cov_ratio=0.0002, ppo_kl_coef=0.1):
    """KL-Cov: the top-covariance tokens (in the inputs' dtype, torch.topk on the CPU) take + coef * |d|."""
    valid = _valid(mask)
    n_valid = int(valid.sum())
    chosen = torch.zeros_like(valid)
    if n_valid:
        where = valid.nonzero().tolist()
        A_in = torch.stack([advantages[b, t].detach() for b, t in where]).cpu()
        lp_in = torch.stack([logprobs[b, t].detach() for b, t in where]).cpu()
        cov = (A_in - A_in.mean()) * (lp_in - lp_in.mean())
        for i in torch.topk(cov, max(1, int(n_valid * kl_cov_ratio))).indices.tolist():
            chosen[tuple(where[i])] = True
    lp = _zero_masked(logprobs, valid)
    d = lp - _zero_masked(old_logprobs, valid)
    A = _zero_masked(advantages, valid)
    per_token = -A * torch.exp(d) + torch.where(chosen, ppo_kl_coef * torch.abs(d), 0.0)
    if is_weights is not None:
        per_token = per_token * _zero_masked(is_weights, valid)
    zero = torch.zeros((), dtype=F64, device=lp.device)
    stats = {"clipfrac": zero, "clipfrac_lower": zero, "approx_kl": aggregate(torch.abs(d.detach()), mask, "token-mean")}
    return aggregate(per_token, mask, agg), stats
