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
    return _clipped_surrogate(ratio, A, log_ratio, mask, valid, clip_low, high, dual_clip, is_weights, agg)


def _clipped_surrogate(ratio, A, log_ratio, mask, valid, clip_low, high, dual_clip, is_weights, agg):
    """max(-A r, -A clip(r, 1 - clip_low, 1 + high)), dual-clipped at -A c where A < 0, times the
    IS weights, aggregated; stats from the same terms (approx_kl = masked mean of -log_ratio).
    Shared by ``policy_loss`` and ``gspo_loss``, which differ only in how they form r."""
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
        if estimator == "grpo_passk":
            _passk_rows(row_adv, s, members, std, norm_by_std, eps)
            continue
        if estimator == "opo":
            lengths = [float(valid[b].sum()) for b in members]
            baseline = 0.0 if n == 1 else sum(w * s[b] for w, b in zip(lengths, members)) / sum(lengths)
            for b in members:
                row_adv[b] = s[b] - baseline
            continue
        for i, b in enumerate(members):
            if estimator == "gpg":
                row_adv[b] = s[b] - mean  # alpha is a batch statistic: applied below
            elif estimator == "rloo":
                if n == 1:
                    row_adv[b] = s[b]
                else:  # the leave-one-out baseline: the others' sum over n - 1 (verl's form: an
                    # inf score makes its whole group NaN, inf - inf, like any other estimator)
                    row_adv[b] = s[b] - (picked.sum() - s[b]) / (n - 1)
            elif estimator == "grpo" and norm_by_std:
                row_adv[b] = (s[b] - mean) / (std + eps)
            else:
                row_adv[b] = s[b] - mean
    if estimator == "gpg":
        all_members = [b for b in range(B) if bool(valid[b].any())]
        nonzero = sum(1 for b in all_members if not bool(s[b] == 0))
        row_adv = row_adv * (len(all_members) / max(nonzero, 1))
    return torch.where(valid, row_adv.unsqueeze(1), 0.0)


def _passk_rows(row_adv, s, members, std, norm_by_std, eps):
    """Pass@k: the first best member gets (best - second best) [/ (std + eps)], the rest 0."""
    values = [float(s[b]) for b in members]
    if any(v != v for v in values):
        for b in members:
            row_adv[b] = float("nan")
        return
    if len(members) < 2:
        return
    best_at = max(range(len(values)), key=lambda i: (values[i], -i))  # the first of the maxima
    second = max(v for i, v in enumerate(values) if i != best_at)
    gap = s[members[best_at]] - second
    row_adv[members[best_at]] = gap / (std + eps) if norm_by_std else gap


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
# Token-level policy objectives of verl 0.9.1 (issue 19)
# --------------------------------------------------------------------------------------------


def _token_prep(logprobs, old_logprobs, advantages, mask, is_weights):
    valid = _valid(mask)
    lp = _zero_masked(logprobs, valid)
    old = _zero_masked(old_logprobs, valid)
    A = _zero_masked(advantages, valid)
    w = torch.ones_like(A) if is_weights is None else _zero_masked(is_weights, valid)
    return valid, lp, old, A, w


def _mean_over(x, mask):
    return aggregate(x.detach(), mask, "token-mean")


def _dppo_truth(kind, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, clip_ratio_c, agg, is_weights):
    valid, lp, old, A, w = _token_prep(logprobs, old_logprobs, advantages, mask, is_weights)
    up = clip_low if clip_high is None else clip_high
    d = torch.clamp(lp - old, min=-20.0, max=20.0)
    r = d.exp()
    p, q = lp.detach().exp(), old.exp()
    if kind == "tv":
        inside = torch.where(A > 0, (p - q) <= up, (q - p) <= clip_low)
    else:
        bkl = q * (old - lp.detach()) + (1 - q) * (torch.log(1 - q + 1e-8) - torch.log(1 - p + 1e-8))
        inside = torch.where(A > 0, (bkl <= up) | (p <= q), (bkl <= clip_low) | (p >= q))
    keep = inside.to(F64)
    capped = torch.minimum(r.detach(), torch.full_like(r, clip_ratio_c))
    per_token = -(A * capped * keep) * lp * w
    stats = {
        "clipfrac": _fraction(~inside, valid),
        "clipfrac_lower": _fraction((r.detach() > clip_ratio_c) & inside, valid),
        "approx_kl": _mean_over(-d, mask),
    }
    return aggregate(per_token, mask, agg), stats


def dppo_tv_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, clip_ratio_c=3.0,
                 agg="token-mean", is_weights=None):
    return _dppo_truth("tv", logprobs, old_logprobs, advantages, mask, clip_low, clip_high, clip_ratio_c, agg,
                       is_weights)


def dppo_kl_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, clip_ratio_c=3.0,
                 agg="token-mean", is_weights=None):
    return _dppo_truth("kl", logprobs, old_logprobs, advantages, mask, clip_low, clip_high, clip_ratio_c, agg,
                       is_weights)


def sapo_loss(logprobs, old_logprobs, advantages, mask, *, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean",
              is_weights=None):
    valid, lp, old, A, w = _token_prep(logprobs, old_logprobs, advantages, mask, is_weights)
    d = torch.clamp(lp - old, min=-20.0, max=20.0)
    r = d.exp()
    tau = torch.full_like(A, tau_neg).masked_fill(A > 0, tau_pos)
    gate = (4.0 / tau) / (1.0 + torch.exp(-tau * (r - 1.0)))
    zero = torch.zeros((), dtype=F64, device=A.device)
    stats = {"clipfrac": zero, "clipfrac_lower": zero, "approx_kl": _mean_over(-d, mask)}
    return aggregate(-(gate * A) * w, mask, agg), stats


def gpg_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None):
    valid, lp, old, A, w = _token_prep(logprobs, old_logprobs, advantages, mask, is_weights)
    # No clip: both fractions are 0; the KL estimate is old - lp with the ratio's clamp.
    d = torch.clamp(lp.detach() - old, min=-20.0, max=20.0)
    zero = torch.zeros((), dtype=F64, device=A.device)
    stats = {"clipfrac": zero, "clipfrac_lower": zero, "approx_kl": _mean_over(-d, mask)}
    return aggregate(-(A * lp) * w, mask, agg), stats


def cispo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, agg="token-mean",
               is_weights=None):
    valid, lp, old, A, w = _token_prep(logprobs, old_logprobs, advantages, mask, is_weights)
    up = clip_low if clip_high is None else clip_high
    d = torch.clamp(lp.detach() - old, min=-20.0, max=20.0)
    r = d.exp()
    rc = torch.minimum(torch.maximum(r, torch.full_like(r, 1 - clip_low)), torch.full_like(r, 1 + up))
    stats = {
        "clipfrac": _fraction(r != rc, valid),
        "clipfrac_lower": torch.zeros((), dtype=F64, device=A.device),
        "approx_kl": _mean_over(-d, mask),
    }
    return aggregate(-(rc * A) * lp * w, mask, agg), stats


def dro_loss(logprobs, old_logprobs, advantages, mask, *, beta=None, agg="token-mean", is_weights=None):
    valid, lp, old, A, w = _token_prep(logprobs, old_logprobs, advantages, mask, is_weights)
    d = lp - old
    zero = torch.zeros((), dtype=F64, device=A.device)
    stats = {"clipfrac": zero, "clipfrac_lower": zero, "approx_kl": _mean_over(-d, mask)}
    return aggregate((0.5 * beta * d * d - A * lp) * w, mask, agg), stats


# --------------------------------------------------------------------------------------------
# More advantage estimators (issue 19): fastppo.estimators
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reinforce_pp_baseline_advantages(scores, group_size, mask, *, eps=1e-8):
    centred = group_advantages(scores, group_size, mask, estimator="dr_grpo")
    return masked_whiten(centred, mask, eps=eps)


@torch.no_grad()
def gdpo_advantages(scores, group_size, mask, *, weights=None, norm_by_std=True, eps=1e-6, whiten_eps=1e-8):
    s = scores.to(F64)
    s = s.unsqueeze(1) if s.dim() == 1 else s
    weights = [1.0] * s.shape[1] if weights is None else [float(w) for w in weights]
    total = sum(w * group_advantages(s[:, k], group_size, mask, estimator="grpo", norm_by_std=norm_by_std, eps=eps)
                for k, w in enumerate(weights))
    return masked_whiten(total, mask, eps=whiten_eps)


@torch.no_grad()
def gpg_advantages(scores, group_size, mask, *, f_norm=1.0):
    return group_advantages(scores, group_size, mask, estimator="gpg") / f_norm


@torch.no_grad()
def remax_advantages(rewards, baselines, mask):
    valid = _valid(mask)
    r, ok, base = rewards.to(F64).tolist(), valid.tolist(), baselines.to(F64).tolist()
    adv = [[0.0] * len(row) for row in r]
    ret = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        running = 0.0
        for t in reversed(range(len(r[b]))):
            if ok[b][t]:
                running = running + r[b][t]
                ret[b][t] = running
                adv[b][t] = running - base[b]
    shape = rewards.shape
    return torch.tensor(adv, dtype=F64).reshape(shape), torch.tensor(ret, dtype=F64).reshape(shape)


@torch.no_grad()
def optimal_token_baseline_advantages(rewards, mask, group_size, old_logprobs, sum_pi_squared, *, is_weights=None,
                                      handle_zero_tail=True, eps=1e-8, multi_turn=False):
    valid = _valid(mask)
    B, T = valid.shape
    r, lp, sp = rewards.to(F64), old_logprobs.to(F64), sum_pi_squared.to(F64)
    iw = None if is_weights is None else is_weights.to(F64)
    # Per row: the valid positions, the return-to-go and cumulative path variance at each.
    rows = []
    for b in range(B):
        pos = [t for t in range(T) if bool(valid[b, t])]
        G, W, acc = {}, {}, 0.0
        for t in pos:
            w = 1.0 - 2.0 * torch.exp(lp[b, t]) + sp[b, t]
            if iw is not None:
                w = w * iw[b, t] ** 2
            acc = acc + w
            W[t] = acc
        run = 0.0
        for t in reversed(pos):
            run = run + r[b, t]
            G[t] = run
        rows.append((pos, G, W))
    adv = torch.zeros(B, T, dtype=F64)
    ret = torch.zeros(B, T, dtype=F64)
    for start in range(0, B, group_size):
        members = [b for b in range(start, start + group_size) if rows[b][0]]
        lengths = sorted(len(rows[b][0]) for b in members)
        for b in members:
            pos, G, W = rows[b]
            for j, t in enumerate(pos):
                ret[b, t] = G[t]
                if len(members) < 2:
                    base = 0.0
                else:
                    num = den = 0.0
                    for c in members:  # the members' entries at the same time step / valid index
                        cpos, cG, cW = rows[c]
                        key = (cpos[j] if j < len(cpos) else None) if multi_turn else (t if t in cG else None)
                        if key is not None:
                            num = num + cG[key] * cW[key]
                            den = den + cW[key]
                    base = num / (den + eps)
                    step = j if multi_turn else t
                    alone = lengths[-1] > lengths[-2] and len(pos) == lengths[-1]
                    if handle_zero_tail and alone and step >= lengths[-2]:
                        base = 0.0
                adv[b, t] = G[t] - base
    return adv.to(rewards.device), ret.to(rewards.device)
# Rollout correction
# --------------------------------------------------------------------------------------------


def _rc_thresholds(rs, rs_threshold):
    """verl's rollout_rs / rollout_rs_threshold strings (or lists) -> [(option, lower, upper)]."""
    alias = {"token": "token_k1", "sequence": "seq_sum_k1", "geometric": "seq_mean_k1"}
    names = rs.split(",") if isinstance(rs, str) else list(rs)
    options = []
    for n in names:
        n = alias.get(n.strip(), n.strip())
        if n and n not in options:
            options.append(n)
    specs = rs_threshold.split(",") if isinstance(rs_threshold, str) else (
        list(rs_threshold) if isinstance(rs_threshold, (list, tuple)) else [rs_threshold])
    if len(specs) == 1:
        specs = specs * len(options)
    out = []
    for n, spec in zip(options, specs):
        if isinstance(spec, str) and "_" in spec:
            lo, hi = (float(v) for v in spec.split("_"))
        elif isinstance(spec, (list, tuple)):
            lo, hi = float(spec[0]), float(spec[1])
        else:
            hi = float(spec)
            lo = 1.0 / hi if n.endswith("k1") else None
        out.append((n, lo, hi))
    return out


def rollout_correction(old_logprobs, rollout_logprobs, mask, *, level="token", mode="truncate", upper=2.0,
                       lower=None, batch_normalize=False, rs=None, rs_threshold=None, veto=None):
    """Float64 weights, keep mask and metrics (metric names without the ``rollout_corr/`` prefix).

    Written row by row from the definitions: each row's valid log-ratios are selected first, so
    every per-row figure is a plain sum / mean / max of a short float64 vector.
    """
    import math

    valid = _valid(mask)
    B, T = valid.shape
    lr_all = _zero_masked(old_logprobs, valid) - _zero_masked(rollout_logprobs, valid)
    rows = [lr_all[b][valid[b]] for b in range(B)]
    nonempty = [b for b in range(B) if rows[b].numel() > 0]
    toks = torch.cat(rows) if rows else torch.zeros(0, dtype=F64)
    metrics = {}

    def mean(xs):
        xs = list(xs) if not isinstance(xs, torch.Tensor) else xs
        if isinstance(xs, list):
            xs = torch.stack(xs) if xs else torch.zeros(0, dtype=F64)
        return xs.mean() if xs.numel() else torch.zeros((), dtype=F64)

    def bound(x):
        return x.clamp(-20.0, 20.0)

    weights = None
    if level is not None:
        lower_m = 1.0 / upper if lower is None else lower
        raw = torch.zeros(B, T, dtype=F64)
        row_log = []
        for b in range(B):
            if level == "token":
                raw[b][valid[b]] = torch.exp(bound(rows[b]))
            else:
                s = rows[b].sum()
                if level == "geometric" and rows[b].numel():
                    s = s / rows[b].numel()
                row_log.append(s)
                raw[b][valid[b]] = torch.exp(bound(s))
        if mode == "truncate":
            w = torch.minimum(raw, torch.tensor(upper, dtype=F64))
            w = torch.where(torch.isnan(raw), raw, w)
        else:
            outside = (raw < lower_m) | (raw > upper)
            w = torch.where(outside, torch.zeros((), dtype=F64), raw)
            metrics["rollout_is_oob_ratio"] = outside[valid].to(F64).mean() if valid.any() else torch.zeros((), dtype=F64)
        wv, rv = w[valid], raw[valid]
        metrics["rollout_is_mean"] = mean(wv)
        if level == "token":
            metrics["rollout_is_max"] = wv.max() if wv.numel() else torch.zeros((), dtype=F64)
            metrics["rollout_is_min"] = wv.min() if wv.numel() else torch.zeros((), dtype=F64)
            metrics["rollout_is_ratio_fraction_high"] = mean((rv > upper).to(F64))
            metrics["rollout_is_ratio_fraction_low"] = mean((rv < lower_m).to(F64))
        else:
            rl = torch.stack(row_log) if row_log else torch.zeros(0, dtype=F64)
            metrics["rollout_is_max"] = torch.exp(rl.max().clamp(max=20.0)) if B else torch.ones((), dtype=F64)
            metrics["rollout_is_min"] = torch.exp(rl.min()) if B else torch.ones((), dtype=F64)
            metrics["rollout_is_ratio_fraction_high"] = mean((rl > math.log(upper)).to(F64))
            metrics["rollout_is_ratio_fraction_low"] = mean((rl < math.log(lower_m)).to(F64))
        c = wv.clamp(0.0, upper)
        metrics["rollout_is_std"] = (
            torch.sqrt(torch.clamp((c * c).mean() - c.mean() ** 2, min=0.0)) if c.numel() > 1 else torch.zeros((), dtype=F64)
        )
        metrics["rollout_is_eff_sample_size"] = 1.0 / mean((c / (mean(c) + 1e-8)) ** 2) if c.numel() else torch.tensor(math.inf, dtype=F64)
        seq_w = torch.stack([mean(w[b][valid[b]]) for b in range(B)]) if B else torch.zeros(0, dtype=F64)
        raw_seq = torch.stack([mean(raw[b][valid[b]]) for b in range(B)]) if B else torch.zeros(0, dtype=F64)
        metrics["rollout_is_seq_mean"] = mean(seq_w)
        metrics["rollout_is_seq_std"] = seq_w.std() if B > 1 else torch.zeros((), dtype=F64)
        metrics["rollout_is_seq_max"] = seq_w.max() if B else torch.zeros((), dtype=F64)
        metrics["rollout_is_seq_min"] = seq_w.min() if B else torch.zeros((), dtype=F64)
        metrics["rollout_is_seq_max_deviation"] = (seq_w - 1).abs().max() if B else torch.zeros((), dtype=F64)
        metrics["rollout_is_seq_fraction_high"] = mean((raw_seq > upper).to(F64))
        metrics["rollout_is_seq_fraction_low"] = mean((raw_seq < lower_m).to(F64))
        if batch_normalize:
            if level == "token":
                norm = mean(wv)
            else:
                norm = mean([seq_w[b] for b in nonempty])
            if norm > 1e-8:
                w = w / norm
                metrics["rollout_is_batch_norm_factor"] = norm
            else:
                metrics["rollout_is_batch_norm_factor"] = torch.ones((), dtype=F64)
        weights = w

    keep = valid.clone()
    if rs is not None:
        def stat(kind, x):
            s = bound(x)
            return {"k1": -s, "k2": s * s / 2, "k3": _k3_exact(s)}[kind]

        for opt, lo, hi in _rc_thresholds(rs, rs_threshold):
            kind = opt[-2:]
            lo_t = math.log(lo) if kind == "k1" else None
            hi_t = math.log(hi) if kind == "k1" else hi

            def ok(v):
                return (v <= hi_t) & (v >= lo_t) if lo_t is not None else (v <= hi_t)

            opt_keep = torch.ones(B, T, dtype=torch.bool)
            per_tok, seq_vals = [], []
            for b in range(B):
                v = stat(kind, rows[b])
                if opt.startswith("token"):
                    opt_keep[b][valid[b]] = ok(v)
                    per_tok.append(v)
                    seq_vals.append(mean(v))
                else:
                    if opt.startswith("seq_sum"):
                        r = v.sum()
                    elif opt.startswith("seq_mean"):
                        r = mean(v)
                    else:
                        r = v.max() if v.numel() else torch.zeros((), dtype=F64)
                    opt_keep[b] = bool(ok(r))
                    per_tok.append(r.expand(v.numel()))
                    seq_vals.append(r)
            keep &= opt_keep
            flat = torch.cat(per_tok) if per_tok else torch.zeros(0, dtype=F64)
            sv = torch.stack([seq_vals[b] for b in nonempty]) if nonempty else torch.zeros(0, dtype=F64)
            p = f"rollout_rs_{opt}"
            metrics[f"{p}_mean"] = mean(flat)
            if opt.startswith("token"):
                metrics[f"{p}_max"] = flat.max() if flat.numel() else torch.zeros((), dtype=F64)
                metrics[f"{p}_min"] = flat.min() if flat.numel() else torch.zeros((), dtype=F64)
                metrics[f"{p}_fraction_high"] = mean((flat > hi_t).to(F64))
                metrics[f"{p}_fraction_low"] = mean((flat < lo_t).to(F64)) if lo_t is not None else torch.zeros((), dtype=F64)
            else:
                metrics[f"{p}_max"] = sv.max() if sv.numel() else torch.zeros((), dtype=F64)
                metrics[f"{p}_min"] = sv.min() if sv.numel() else torch.zeros((), dtype=F64)
                metrics[f"{p}_fraction_high"] = mean((sv > hi_t).to(F64))
                metrics[f"{p}_fraction_low"] = mean((sv < lo_t).to(F64)) if lo_t is not None else torch.zeros((), dtype=F64)
            c = flat.clamp(lo_t if lo_t is not None else 0.0, hi_t)
            metrics[f"{p}_std"] = (
                torch.sqrt(torch.clamp((c * c).mean() - c.mean() ** 2, min=0.0)) if c.numel() > 1 else torch.zeros((), dtype=F64)
            )
            metrics[f"{p}_seq_mean"] = mean(sv)
            metrics[f"{p}_seq_std"] = sv.std() if sv.numel() > 1 else torch.zeros((), dtype=F64)
            metrics[f"{p}_seq_max"] = sv.max() if sv.numel() else torch.zeros((), dtype=F64)
            metrics[f"{p}_seq_min"] = sv.min() if sv.numel() else torch.zeros((), dtype=F64)
            metrics[f"{p}_seq_max_deviation"] = sv.abs().max() if sv.numel() else torch.zeros((), dtype=F64)
            metrics[f"{p}_seq_fraction_high"] = mean((sv > hi_t).to(F64))
            if lo_t is not None:
                metrics[f"{p}_seq_fraction_low"] = mean((sv < lo_t).to(F64))
            metrics[f"{p}_masked_fraction"] = mean((~opt_keep[valid]).to(F64))
            metrics[f"{p}_seq_masked_fraction"] = mean([(~opt_keep[b][valid[b]]).any().to(F64) for b in nonempty])
        metrics["rollout_rs_masked_fraction"] = mean((~keep[valid]).to(F64))
        metrics["rollout_rs_seq_masked_fraction"] = mean([(~keep[b][valid[b]]).any().to(F64) for b in range(B)])
    if veto is not None:
        bad = [(rows[b] < math.log(veto)) for b in range(B)]
        metrics["rollout_is_veto_fraction"] = mean([bad[b].any().to(F64) for b in nonempty])
        metrics["rollout_is_catastrophic_token_fraction"] = mean(torch.cat(bad).to(F64)) if bad else torch.zeros((), dtype=F64)
        for b in range(B):
            if bad[b].any():
                keep[b] = False
    keep &= valid

    old_rows = [_zero_masked(old_logprobs, valid)[b][valid[b]] for b in range(B)]
    roll_rows = [_zero_masked(rollout_logprobs, valid)[b][valid[b]] for b in range(B)]
    m_old = torch.stack([mean(r) for r in old_rows]) if B else torch.zeros(0, dtype=F64)
    m_roll = torch.stack([mean(r) for r in roll_rows]) if B else torch.zeros(0, dtype=F64)
    metrics["training_ppl"] = mean(torch.exp(-m_old))
    metrics["training_log_ppl"] = mean(-m_old)
    metrics["kl"] = mean(-toks)
    metrics["k3_kl"] = mean(_k3_exact(toks))
    metrics["rollout_ppl"] = mean(torch.exp(-m_roll))
    metrics["rollout_log_ppl"] = mean(-m_roll)
    d = m_roll - m_old
    metrics["log_ppl_diff"] = mean(d)
    metrics["log_ppl_abs_diff"] = mean(d.abs())
    metrics["log_ppl_diff_max"] = d.max() if B else torch.zeros((), dtype=F64)
    metrics["log_ppl_diff_min"] = d.min() if B else torch.zeros((), dtype=F64)
    metrics["ppl_ratio"] = mean(torch.exp(d))
    metrics["chi2_token"] = mean(torch.exp(bound(toks)) ** 2) - 1.0
    seq_sum = torch.stack([r.sum() for r in rows]) if B else torch.zeros(0, dtype=F64)
    metrics["chi2_seq"] = mean(torch.exp(2.0 * bound(seq_sum))) - 1.0
    return weights, keep, metrics


def bypass_mode_loss(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", is_weights=None,
                     loss_type="ppo_clip", clip_low=0.2, clip_high=None, dual_clip=3.0, level=None,
                     mode="truncate", upper=2.0, lower=None, batch_normalize=False, rs=None, rs_threshold=None,
                     veto=None):
    """Float64: the rollout correction of the detached log-probs, then the loss over kept tokens."""
    w, keep, metrics = rollout_correction(logprobs.detach(), old_logprobs, mask, level=level, mode=mode,
                                          upper=upper, lower=lower, batch_normalize=batch_normalize, rs=rs,
                                          rs_threshold=rs_threshold, veto=veto)
    if loss_type == "ppo_clip":
        loss, stats = policy_loss(logprobs, old_logprobs, advantages, keep, clip_low=clip_low, clip_high=clip_high,
                                  dual_clip=dual_clip, agg=agg, is_weights=is_weights)
    else:
        lp = _zero_masked(logprobs, keep)
        per_token = -_zero_masked(advantages, keep) * lp
        if w is not None:
            per_token = per_token * _zero_masked(w, keep)
        if is_weights is not None:
            per_token = per_token * _zero_masked(is_weights, keep)
        loss = aggregate(per_token, keep, agg)
        n = int(keep.sum())
        kl = (_zero_masked(old_logprobs, keep) - lp.detach()).sum()
        stats = {"approx_kl": kl / n if n else kl * 0}
    stats.update({"rollout_corr/" + k: v for k, v in metrics.items()})
    return loss, stats


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
    return _clipped_surrogate(ratio, A, d, mask, valid, clip_low, high, dual_clip, is_weights, agg)


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
