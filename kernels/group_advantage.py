"""Triton kernels for the critic-free advantages: GRPO, Dr. GRPO, RLOO, Pass@k GRPO, OPO, GPG and
REINFORCE++.

Layout of this file, top to bottom: the ``@triton.jit`` kernels, the Python launchers, then the
public functions with the exact signatures of ``fastppo.reference``. Both ops run on rollout data
and return tensors that never require grad.

``group_advantages`` is three launches, none of which waits for the host:

1. ``_row_member_kernel`` (grid over tiles of rows): the number of valid tokens of row b (int32
   [B]; a member has at least one, and OPO weighs its baseline by it);
2. ``_group_stats_kernel`` (one program per group of K consecutive rows): mean and unbiased std of
   the members' scores (the centred sum of squares, not E[x^2] - E[x]^2, in units of a power of
   two near the mean |score| when that is beyond 2^40, so nothing overflows up to float32's
   max), then each row's scalar advantage (0 for a non-member) into float32 [B]; Pass@k adds
   passes for the group's first maximum and second maximum, OPO one for the length-weighted sum;
   GPG's batch factor alpha is an O(B) device reduction between launches 2 and 3;
3. ``_broadcast_kernel`` (grid over [rows, T] tiles): out[b, t] = a_b where mask != 0, else 0.

Only launch 3 and the mask read of launch 1 touch [B, T] data; launch 2 is O(B).

``reinforce_pp_advantages`` is GAE with values 0 and lam = 1, whitened: it reuses the chunked
reverse scan of ``kernels/advantage.py`` (two launches, with the batch whitening statistics
reduced on the device).

NaN and masks (TRUST_SPEC.md): a position is valid where ``mask != 0`` (a NaN mask entry is
valid); scores of non-member rows and rewards at masked positions are selected away with
``tl.where`` before any arithmetic. A NaN score of a member flows through the group's sums into
every member of that group and no other. No float max/min is used on data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastppo import reference

from ._common import new_output, output_dtype
from .advantage import _as_rows, _empty_outputs, _is_f64, gae_launch

EST_GRPO = 0  # (s - mean) / (std + eps)
EST_CENTER = 1  # s - mean: dr_grpo, and grpo with norm_by_std=False
EST_RLOO = 2  # (s - mean) * n / (n - 1)
EST_PASSK = 3  # best member: (s_max - s_second) / (std + eps), others 0
EST_PASSK_RAW = 4  # best member: s_max - s_second, others 0
EST_OPO = 5  # s - sum(len * s) / sum(len)
_SHRINK = tl.constexpr(2.0**-64)  # exact powers of two: the unit of the group statistics
_GROW = tl.constexpr(2.0**64)
_UNIT_FROM = tl.constexpr(2.0**40)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_member_kernel(mask_ptr, member_ptr, B, T, stride_m, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_T)
    r64 = rows[:, None].to(tl.int64)
    # Count the tile over T; one integer reduction after the loop.
    found = tl.zeros([BLOCK_B, BLOCK_T], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols
        inb = row_ok[:, None] & (t[None, :] < T)
        m = tl.load(mask_ptr + r64 * stride_m + t[None, :], mask=inb, other=0)
        found += ((m != 0) & inb).to(tl.int32)  # NaN != 0: a NaN mask entry is valid
    tl.store(member_ptr + rows, tl.sum(found, axis=1), mask=row_ok)


@triton.jit
def _group_stats_kernel(scores_ptr, member_ptr, adv_ptr, K, eps, EST: tl.constexpr, BLOCK_K: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * K
    ks = tl.arange(0, BLOCK_K)
    # Pass 1: members, their count and the sum of their |score| * 2^-64 (which cannot overflow).
    count = tl.zeros([BLOCK_K], dtype=tl.int32)
    absum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        inb = k < K
        member = tl.load(member_ptr + base + k, mask=inb, other=0) != 0
        s = tl.load(scores_ptr + base + k, mask=inb, other=0.0).to(tl.float32)
        absum += tl.where(member, tl.abs(s) * _SHRINK, 0.0)  # a non-member's score is never read
        count += member.to(tl.int32)
    n = tl.sum(count, axis=0).to(tl.float32)
    several = n >= 2.0
    # The unit of the statistics (see reference._group_unit): 1, or beyond a mean |score| of
    # 2^40 the power of two at or below it (the exponent bits of the float: exact).
    mean_abs = tl.sum(absum, axis=0) / tl.where(n >= 1.0, n, 1.0)
    big = (mean_abs >= _UNIT_FROM * _SHRINK) & (mean_abs <= 3.4028234663852886e38)  # not inf, NaN
    unit = tl.where(big, (mean_abs.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True) * _GROW, 1.0)
    # Pass 2: the sum of the members' scores, in units.
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        inb = k < K
        member = tl.load(member_ptr + base + k, mask=inb, other=0) != 0
        s = tl.load(scores_ptr + base + k, mask=inb, other=0.0).to(tl.float32)
        total += tl.where(member, s / unit, 0.0)  # a non-member's score (NaN, inf) is never read
    mean = tl.sum(total, axis=0) / tl.where(n >= 1.0, n, 1.0)
    # Pass 3: the centred sum of squares (unbiased variance, as torch.std), in units.
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        inb = k < K
        member = tl.load(member_ptr + base + k, mask=inb, other=0) != 0
        s = tl.load(scores_ptr + base + k, mask=inb, other=0.0).to(tl.float32)
        d = tl.where(member, s / unit - mean, 0.0)
        sq += d * d
    n_minus_1 = tl.where(several, n - 1.0, 1.0)
    std = tl.sqrt(tl.sum(sq, axis=0) / n_minus_1)
    # eps in units; it may flush to 0 on the GPU for the largest units. den is then 0 only where
    # every centred score is 0 (std 0), and those must give 0, not 0 / 0.
    den = std + eps / unit
    den = tl.where(den == 0.0, 1.0, den)
    if EST == 3 or EST == 4:
        _passk_rows(scores_ptr, member_ptr, adv_ptr, base, K, unit, den, several, EST == 3, BLOCK_K)
    else:
        if EST == 5:
            # OPO's baseline: sum(len * s) / sum(len), in units (len <= T, s / unit < 2n: no overflow).
            wsum = tl.zeros([BLOCK_K], dtype=tl.float32)
            lsum = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + ks
                inb = k < K
                length = tl.load(member_ptr + base + k, mask=inb, other=0).to(tl.float32)
                s = tl.load(scores_ptr + base + k, mask=inb, other=0.0).to(tl.float32)
                wsum += tl.where(length > 0.0, length * (s / unit), 0.0)
                lsum += length
            mean = tl.sum(wsum, axis=0) / tl.where(n >= 1.0, tl.sum(lsum, axis=0), 1.0)
        # Pass 4: each row's advantage. A lone member has no baseline (verl): mean 0, std 1.
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            inb = k < K
            member = tl.load(member_ptr + base + k, mask=inb, other=0) != 0
            s = tl.load(scores_ptr + base + k, mask=inb, other=0.0).to(tl.float32)
            s = tl.where(member, s, 0.0)
            d = s / unit - mean
            if EST == 0:
                a = tl.where(several, d / den, s / (1.0 + eps))
            elif EST == 1 or EST == 5:
                a = tl.where(several, d * unit, s)
            else:
                a = tl.where(several, d * n / n_minus_1 * unit, s)
            tl.store(adv_ptr + base + k, tl.where(member, a, 0.0), mask=inb)


@triton.jit
def _larger(a, b):
    # A compare and select, not max.f32: the PTX check forbids NaN-dropping float max (no NaN
    # reaches this reduction: NaN members are counted apart).
    return tl.where(a > b, a, b)


@triton.jit
def _passk_rows(scores_ptr, member_ptr, adv_ptr, base, K, unit, den, several, NORM: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Pass@k: the group's first maximal member gets (best - second best), the others 0."""
    ks = tl.arange(0, BLOCK_K)
    # The maximum over members, NaN members counted apart (a float max is undefined on NaN).
    best = tl.full([BLOCK_K], float("-inf"), tl.float32)
    nans = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        inb = k < K
        member = tl.load(member_ptr + base + k, mask=inb, other=0) != 0
        u = tl.load(scores_ptr + base + k, mask=inb, other=0.0).to(tl.float32) / unit
        nans += (member & (u != u)).to(tl.int32)
        best = tl.where(member & (u > best), u, best)
    best_all = tl.reduce(best, 0, _larger)
    any_nan = tl.sum(nans, axis=0) > 0
    # The first member holding it (an integer min), then the largest of the others.
    first = tl.full([BLOCK_K], 2147483647, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        inb = k < K
        member = tl.load(member_ptr + base + k, mask=inb, other=0) != 0
        u = tl.load(scores_ptr + base + k, mask=inb, other=0.0).to(tl.float32) / unit
        first = tl.where(member & (u == best_all) & (k < first), k, first)
    first_all = tl.min(first, axis=0)
    second = tl.full([BLOCK_K], float("-inf"), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        inb = k < K
        member = tl.load(member_ptr + base + k, mask=inb, other=0) != 0
        u = tl.load(scores_ptr + base + k, mask=inb, other=0.0).to(tl.float32) / unit
        second = tl.where(member & (k != first_all) & (u > second), u, second)
    gap = best_all - tl.reduce(second, 0, _larger)
    if NORM:
        gap = gap / den
    else:
        gap = gap * unit
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        inb = k < K
        member = tl.load(member_ptr + base + k, mask=inb, other=0) != 0
        a = tl.where(k == first_all, gap, 0.0)
        a = tl.where(several, a, 0.0)
        a = tl.where(any_nan, float("nan"), a)
        tl.store(adv_ptr + base + k, tl.where(member, a, 0.0), mask=inb)


@triton.jit
def _broadcast_kernel(
adv_ptr, mask_ptr, out_ptr, B, T, stride_m, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < B
    inb = row_ok[:, None] & (t[None, :] < T)
    r64 = rows[:, None].to(tl.int64)
    a = tl.load(adv_ptr + rows, mask=row_ok, other=0.0)
    m = tl.load(mask_ptr + r64 * stride_m + t[None, :], mask=inb, other=0)
    out = tl.where(m != 0, a[:, None], 0.0)
    tl.store(out_ptr + r64 * T + t[None, :], out, mask=inb)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_TILE = 4096  # [rows, T] elements per program of launches 1 and 3


def _tile(B: int, T: int) -> tuple[int, int]:
    block_t = min(max(triton.next_power_of_2(T), 16), 1024)
    block_b = max(1, min(triton.next_power_of_2(B), _TILE // block_t))
    return block_b, block_t


def estimator_id(estimator: str, norm_by_std: bool) -> int:
    if estimator == "rloo":
        return EST_RLOO
    if estimator == "grpo_passk":
        return EST_PASSK if norm_by_std else EST_PASSK_RAW
    if estimator == "opo":
        return EST_OPO
    if estimator == "grpo" and norm_by_std:
        return EST_GRPO
    return EST_CENTER


def group_advantages_launch(scores, group_size, mask, *, estimator="grpo", norm_by_std=True, eps=1e-6,
                            block_k: int | None = None):
    """Three launches (members, group statistics, broadcast); float32 [B, T]."""
    B, T = mask.shape
    device = mask.device
    m = _as_rows(mask)  # unit stride along T; bool viewed as uint8 (the kernels test != 0)
    stride_m = m.stride(0) if B > 1 else max(T, 1)
    scores = scores.contiguous()
    G = B // group_size
    block_b, block_t = _tile(B, T)
    warps = 4 if block_b * block_t <= 1024 else 8
    member = torch.empty(B, dtype=torch.int32, device=device)  # scratch, fully written by launch 1
    _row_member_kernel[(triton.cdiv(B, block_b),)](m, member, B, T, stride_m, BLOCK_B=block_b, BLOCK_T=block_t,
                                                   num_warps=warps)
    if block_k is None:
        block_k = min(triton.next_power_of_2(group_size), 1024)
    row_adv = torch.empty(B, dtype=torch.float32, device=device)  # scratch, fully written by launch 2
    _group_stats_kernel[(G,)](scores, member, row_adv, group_size, float(eps),
                              EST=estimator_id(estimator, norm_by_std), BLOCK_K=block_k,
                              num_warps=4 if block_k <= 512 else 8)
    if estimator == "gpg":
        # alpha = members / nonzero-score members: O(B) on the device, no host sync.
        members = member != 0
        nonzero = (members & (scores.to(torch.float32) != 0)).sum()
        row_adv *= members.sum().to(torch.float32) / nonzero.clamp(min=1).to(torch.float32)
    out = new_output((B, T), torch.float32, device)
    _broadcast_kernel[(triton.cdiv(B, block_b), triton.cdiv(T, block_t))](
        row_adv, m, out, B, T, stride_m, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=warps
    )
    return out


def reinforce_pp_launch(rewards, mask, *, gamma=1.0):
    """REINFORCE++ as the chunked GAE pass with V = 0, lam = 1, whitened; (advantages, returns)."""
    zeros = torch.zeros_like(rewards)
    return gae_launch(rewards, zeros, mask, gamma=gamma, lam=1.0, whiten=True)


# --------------------------------------------------------------------------------------------
# Public ops (the reference signatures; inputs already validated by fastppo.ops)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def group_advantages(scores, group_size, mask, *, estimator="grpo", norm_by_std=True, eps=1e-6):
    """float32 [B, T]; see ``fastppo.reference.group_advantages``. No gradient."""
    if mask.numel() == 0:
        return torch.zeros(mask.shape, dtype=output_dtype(scores), device=mask.device)
    if _is_f64(scores):
        return reference.group_advantages.raw(scores, group_size, mask, estimator=estimator,
                                              norm_by_std=norm_by_std, eps=eps)
    return group_advantages_launch(scores, group_size, mask, estimator=estimator, norm_by_std=norm_by_std, eps=eps)


@torch.no_grad()
def reinforce_pp_advantages(rewards, mask, *, gamma=1.0):
    """(advantages, returns), float32 [B, T]; see ``fastppo.reference.reinforce_pp_advantages``."""
    empty = _empty_outputs(2, rewards, rewards)
    if empty is not None:
        return tuple(empty)
    if _is_f64(rewards):
        return reference.reinforce_pp_advantages.raw(rewards, mask, gamma=gamma)
    return reinforce_pp_launch(rewards, mask, gamma=gamma)
