"""``fastppo bench``: every op against the references, the peers and the hardware limit.

For each op, shape and implementation the table gives the median time, the achieved bandwidth
(the op's byte floor over the time), the percent of the roofline (that bandwidth over the copy
bandwidth measured on the same device in the same run), the peak memory above the inputs and the
speed-up over the plain PyTorch reference.

The byte floor of an op is what it must move at the least: every input read once, every output
written once (forward), plus the re-read of the inputs and the write of the gradients for the
backward pass. It is stated per case in ``BenchCase.bytes_floor``; benchmarks/NOTES.md derives them.

linear_logprobs is matmul bound and has a table of its own: median time, TFLOP/s over the two
matmul FLOPs (2NHV forward, 6NHV with the backward), the percent of a plain ``torch.mm`` of the
same [N, H] x [H, V] timed in the same run, the peak memory (CUDA allocator above the inputs; on
a CPU the rise of the peak RSS in a fresh process per implementation) and the time and memory
ratios against the logits path (``hidden @ weight.T`` then ``logprobs_from_logits``).

Kernel timings need a GPU: on a CPU-only machine the command times the references (and CPU
peers) on small shapes and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from . import _dispatch, reference
from .testing import select_ops, triton_version

GiB = 1024**3


@dataclasses.dataclass
class BenchCase:
    op: str  # public op name
    mode: str  # "fwd" or "fwd+bwd"
    shape: str
    dtype: torch.dtype
    make: Callable[[str], tuple[tuple, dict, list]]  # device -> (args, kwargs, leaves needing grad)
    bytes_floor: float
    impls: tuple[str, ...] = ("torch", "torch.compile", "triton")


@dataclasses.dataclass
class Result:
    op: str
    mode: str
    shape: str
    dtype: str
    impl: str
    median_ms: float | None
    gbps: float | None
    pct_roofline: float | None
    peak_mem_mb: float | None
    speedup_vs_torch: float | None
    note: str = ""
    # linear_logprobs only (left out of the other ops' JSON rows): matmul-bound columns.
    tflops: float | None = None  # the two matmuls' FLOPs (2NHV fwd, 6NHV fwd+bwd) over the time
    pct_matmul_peak: float | None = None  # tflops over matmul_tflops
    matmul_tflops: float | None = None  # a plain torch.mm of the same [N,H]x[H,V] shape, same run
    time_vs_logits: float | None = None  # median time over the logits path's
    mem_vs_logits: float | None = None  # peak memory over the logits path's
    mem_method: str | None = None  # "cuda-allocator" or "peak-rss-subprocess"


LINEAR_FIELDS = ("tflops", "pct_matmul_peak", "matmul_tflops", "time_vs_logits", "mem_vs_logits", "mem_method")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _logprob_case(N: int, V: int, dtype: torch.dtype, mode: str) -> BenchCase:
    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn(N, V, device=device, generator=gen, dtype=torch.float32) * 2).to(dtype)
        labels = torch.randint(0, V, (N,), device=device, generator=gen)
        leaves = [logits.requires_grad_()] if mode == "fwd+bwd" else []
        return (logits, labels), {"return_entropy": True}, leaves

    logits_bytes = N * V * _esize(dtype)
    # fwd: one read of the logits (+ labels, 2 float32 outputs); fwd+bwd adds a read and a write of the logits.
    floor = logits_bytes + N * (8 + 8) + (2 * logits_bytes if mode == "fwd+bwd" else 0)
    return BenchCase("logprobs_from_logits", mode, f"N={N} V={V}", dtype, make, floor,
                     impls=("torch", "torch.compile", "triton", "row-loop", "trl", "trl-eager", "liger"))


def _advantage_case(op: str, B: int, T: int) -> BenchCase:
    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        x = lambda: torch.randn(B, T, device=device, generator=gen)  # noqa: E731
        lengths = torch.randint(1, T + 1, (B, 1), device=device, generator=gen)
        mask = torch.arange(T, device=device)[None, :] < lengths
        if op == "gae":
            return (x(), x(), mask), {"gamma": 1.0, "lam": 0.95}, []
        scores = torch.randn(B, device=device, generator=gen)
        return (scores, x(), x(), x(), mask), {"kl_coef": 0.05, "gamma": 1.0, "lam": 0.95, "whiten": True}, []

    tokens = B * T
    # gae: read rewards, values (fp32) and mask (bool), write advantages and returns.
    # compute_advantages: read logprobs, ref_logprobs, values and mask, write advantages, returns, rewards, kl.
    floor = tokens * (4 * 2 + 1 + 4 * 2) if op == "gae" else tokens * (4 * 3 + 1 + 4 * 4) + B * 4
    return BenchCase(op, "fwd", f"B={B} T={T}", torch.float32, make, floor,
                     impls=("torch", "torch.compile", "triton", "torch-vectorized"))


def _loss_case(tokens: int, dtype: torch.dtype) -> BenchCase:
    B = max(1, tokens // 1024)
    T = tokens // B

    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        x = lambda: torch.randn(B, T, device=device, generator=gen).to(dtype)  # noqa: E731
        old = x()
        lp = (old.float() + 0.2 * torch.randn(B, T, device=device, generator=gen)).to(dtype).requires_grad_()
        old_v = x()
        v = (old_v.float() + 0.2 * torch.randn(B, T, device=device, generator=gen)).to(dtype).requires_grad_()
        ent = torch.rand(B, T, device=device, generator=gen).to(dtype).requires_grad_()
        mask = torch.rand(B, T, device=device, generator=gen) < 0.9
        args = (lp, old, x(), v, old_v, x(), mask)
        return args, {"entropy": ent, "dual_clip": 3.0, "ent_coef": 0.01}, [lp, v, ent]

    e = _esize(dtype)
    # forward reads 7 token tensors (mask 1 byte); backward re-reads them and writes 3 gradients.
    fwd = tokens * (7 * e + 1)
    floor = fwd + fwd + tokens * 3 * e
    return BenchCase("ppo_loss", "fwd+bwd", f"B*T={tokens}", dtype, make, floor)


# The token-level objectives of verl 0.9.1 (fastppo.policy_objectives): op -> its options here.
OBJECTIVES = {
    "dppo_tv_loss": {"clip_ratio_c": 3.0},
    "dppo_kl_loss": {"clip_ratio_c": 3.0},
    "sapo_loss": {},
    "gpg_loss": {},
    "cispo_loss": {"clip_high": 0.28},
    "dro_loss": {"beta": 0.1},
}


def _objective_case(op: str, tokens: int, dtype: torch.dtype) -> BenchCase:
    B = max(1, tokens // 1024)
    T = tokens // B

    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        old = -torch.rand(B, T, device=device, generator=gen) * 3.0
        lp = (old + 0.3 * torch.randn(B, T, device=device, generator=gen)).clamp(max=-1e-3).to(dtype)
        lp.requires_grad_()
        adv = torch.randn(B, T, device=device, generator=gen).to(dtype)
        mask = torch.rand(B, T, device=device, generator=gen) < 0.9
        return (lp, old.to(dtype), adv, mask), dict(OBJECTIVES[op]), [lp]

    e = _esize(dtype)
    # forward reads 3 token tensors and the mask (1 byte); backward re-reads them and writes d logprobs.
    fwd = tokens * (3 * e + 1)
    return BenchCase(op, "fwd+bwd", f"B*T={tokens}", dtype, make, fwd + fwd + tokens * e,
                     impls=("torch", "torch.compile", "triton", "verl"))


def _verl_objective(op: str) -> tuple[Callable | None, str]:
    """verl 0.9.1's own ``compute_policy_loss_<name>`` with the case's options, or None and why."""
    try:
        from verl.trainer.ppo import core_algos
        from verl.workers.config.actor import ActorConfig, PolicyLossConfig
    except Exception:
        return None, "verl not installed"
    name = op[: -len("_loss")]
    opts = OBJECTIVES[op]
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                         clip_ratio_high=opts.get("clip_high"), clip_ratio_c=opts.get("clip_ratio_c", 3.0),
                         policy_loss=PolicyLossConfig(loss_mode=name, dro_beta=opts.get("beta")))
    verl_fn = getattr(core_algos, f"compute_policy_loss_{name}")

    def run(lp, old, adv, mask, **_):
        return verl_fn(old, lp, adv, mask, "token-mean", config)

    return run, "computes in the input dtype; .item()s its metrics"


def _seq_loss_case(op: str, tokens: int, dtype: torch.dtype) -> BenchCase:
    """gspo_loss / geo_mean_loss, forward and backward, rows of 1024 tokens, seq-mean-token-mean."""
    B = max(1, tokens // 1024)
    T = tokens // B

    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        old = torch.randn(B, T, device=device, generator=gen).to(dtype)
        lp = (old.float() + 0.2 * torch.randn(B, T, device=device, generator=gen)).to(dtype).requires_grad_()
        adv = torch.randn(B, 1, device=device, generator=gen).expand(B, T).contiguous().to(dtype)
        mask = torch.rand(B, T, device=device, generator=gen) < 0.9
        return (lp, old, adv, mask), {"agg": "seq-mean-token-mean"}, [lp]

    e = _esize(dtype)
    # GSPO: forward pass 1 reads lp, old, mask, pass 2 lp, adv, mask; backward reads lp, adv, mask
    # and writes d lp. GMPO: forward reads lp, old, adv, mask; backward reads them, writes d lp.
    if op == "gspo_loss":
        floor = tokens * (2 * (2 * e + 1) + (2 * e + 1) + e)
    else:
        floor = tokens * ((3 * e + 1) + (3 * e + 1) + e)
    return BenchCase(op, "fwd+bwd", f"B*T={tokens}", dtype, make, floor, impls=("torch", "torch.compile", "triton", "verl"))


def _verl_seq_peer(op: str) -> tuple[Callable | None, str]:
    """verl 0.9.1's own compute_policy_loss_gspo / _geo_mean (bf16 math in bf16, metrics .item()-ed)."""
    try:
        from verl.trainer.ppo import core_algos
        from verl.workers.config.actor import ActorConfig, PolicyLossConfig
    except Exception:
        return None, "verl not installed"
    name = {"gspo_loss": "gspo", "geo_mean_loss": "geo_mean"}[op]
    cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                      policy_loss=PolicyLossConfig(loss_mode=name))
    fn = getattr(core_algos, f"compute_policy_loss_{name}")

    def verl_loss(lp, old, adv, mask, *, agg="seq-mean-token-mean", **_):
        return fn(old, lp, adv, mask.to(lp.dtype), agg, cfg)

    return verl_loss, "verl's function (syncs for its metrics)"


def _linear_case(N: int, H: int, V: int, dtype: torch.dtype, mode: str) -> BenchCase:
    """linear_logprobs is matmul bound: its columns are TFLOP/s over the two matmul FLOPs and the
    percent of a plain torch.mm of the same shape timed in the same run (``linear_flops``). The
    byte floor kept in the JSON counts only its inputs and outputs (the logits it never writes
    are the point)."""
    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(N, H, device=device, generator=gen, dtype=torch.float32).to(dtype)
        weight = (torch.randn(V, H, device=device, generator=gen, dtype=torch.float32) / H**0.5).to(dtype)
        labels = torch.randint(0, V, (N,), device=device, generator=gen)
        leaves = [hidden.requires_grad_(), weight.requires_grad_()] if mode == "fwd+bwd" else []
        return (hidden, weight, labels), {"return_entropy": True}, leaves

    e = _esize(dtype)
    inputs = (N * H + V * H) * e + N * 8
    floor = inputs + N * 8 + ((inputs + (N * H + V * H) * e) if mode == "fwd+bwd" else 0)
    return BenchCase("linear_logprobs", mode, f"N={N} H={H} V={V}", dtype, make, floor, impls=LINEAR_IMPLS)


# fastppo: the public op (auto: Triton folds + cuBLAS on CUDA, the chunked PyTorch path on CPU);
# chunked: the PyTorch chunked path forced (on CUDA too); logits: hidden @ weight.T then
# fastppo.logprobs_from_logits (the baseline of the ratios); torch: the full-logits reference;
# then the peers, and PyTorch's own chunked F.linear_cross_entropy (torch >= 2.13).
LINEAR_IMPLS = ("fastppo", "chunked", "logits", "torch", "trl", "liger", "liger-flce", "verl", "torch-lce")

# torch-lce: rows per chunk of F.linear_cross_entropy's chunked path, set explicitly. Its "auto"
# chunking (LinearCrossEntropyOptions()) ran 30x slower than the unchunked call on our CPU
# (benchmarks/NOTES.md); 256 rows is a [256, V] float32 logits chunk (156 MB at V = 151936).
TORCH_LCE_ROWS = {"cpu": 256, "cuda": 4096}


def linear_dims(case: BenchCase) -> tuple[int, int, int]:
    dims = dict(part.split("=") for part in case.shape.split())
    return int(dims["N"]), int(dims["H"]), int(dims["V"])


def linear_flops(case: BenchCase) -> float:
    """The two matmul FLOPs: 2*N*H*V forward; 3x that with the backward (d hidden and d weight).
    A backward that recomputes the logits does 8*N*H*V; the floor stays 6*N*H*V."""
    N, H, V = linear_dims(case)
    return 2.0 * N * H * V * (3 if case.mode == "fwd+bwd" else 1)


# linear_logprobs on a CPU: the CPU paths at a smaller N (each implementation in a fresh process).
CPU_LINEAR_GRID = ((1024, 256, 32000), (256, 256, 151936))
CPU_LINEAR_QUICK = (128, 128, 8192)


def _group_case(B: int, T: int, K: int, estimator: str) -> BenchCase:
    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        lengths = torch.randint(1, T + 1, (B, 1), device=device, generator=gen)
        mask = torch.arange(T, device=device)[None, :] < lengths
        scores = torch.randint(0, 2, (B,), device=device, generator=gen).float()  # pass/fail rewards: ties
        return (scores, K, mask), {"estimator": estimator}, []

    # Read the bool mask, write the float32 advantages; the scores are O(B).
    floor = B * T * (1 + 4) + B * 4
    return BenchCase("group_advantages", "fwd", f"B={B} T={T} K={K} {estimator}", torch.float32, make, floor,
                     impls=("torch", "torch.compile", "triton"))


def build_cases(on_gpu: bool, quick: bool) -> list[BenchCase]:
    if on_gpu:
        Ns, Vs, dtypes = (4096, 16384), (32000, 128256, 151936), (torch.bfloat16, torch.float32)
        adv_shapes = ((8, 32768), (512, 4096), (2048, 2048), (8192, 1024))
        loss_tokens = (65536, 2097152)
    else:
        Ns, Vs, dtypes = (256,), (32000,), (torch.float32,)
        adv_shapes = ((64, 512),)
        loss_tokens = (65536,)
    if quick:
        Ns, Vs, dtypes, adv_shapes, loss_tokens = Ns[:1], Vs[:1], dtypes[:1], adv_shapes[:1], loss_tokens[:1]
    cases = []
    for dtype in dtypes:
        for N in Ns:
            for V in Vs:
                for mode in ("fwd", "fwd+bwd"):
                    cases.append(_logprob_case(N, V, dtype, mode))
    for B, T in adv_shapes:
        cases.append(_advantage_case("compute_advantages", B, T))
        cases.append(_advantage_case("gae", B, T))
    # The critic-free estimators of kernels/group_advantage.py, groups of 8 (issue 19).
    for B, T in adv_shapes[-1:]:
        for est in ("grpo", "rloo", "grpo_passk", "opo", "gpg"):
            cases.append(_group_case(B, T, 8, est))
    for tokens in loss_tokens:
        for dtype in (torch.float32, torch.bfloat16) if on_gpu else (torch.float32,):
            cases.append(_loss_case(tokens, dtype))
            for op in OBJECTIVES:
                cases.append(_objective_case(op, tokens, dtype))
            for op in ("gspo_loss", "geo_mean_loss"):
                cases.append(_seq_loss_case(op, tokens, dtype))
    if on_gpu:
        linear_grid = [(N, H, V) for N in (4096, 16384) for H in (896, 4096) for V in (32000, 151936)]
    else:
        linear_grid = list(CPU_LINEAR_GRID)
    if quick:
        linear_grid = [CPU_LINEAR_QUICK] if not on_gpu else linear_grid[:1]
    for N, H, V in linear_grid:
        for mode in ("fwd", "fwd+bwd"):
            cases.append(_linear_case(N, H, V, torch.bfloat16 if on_gpu else torch.float32, mode))
    return cases


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def _vectorized_gae(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=False):
    """GAE as a masked matrix product: what people write to avoid the Python loop over T.

    Valid only for right-padded masks (no gaps), like most vectorised versions in the wild;
    the benchmark masks are right-padded. O(T^2) memory per row block.
    """
    m = mask.float()
    v = values * m
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    delta = (rewards + gamma * next_v - v) * m
    T = rewards.shape[1]
    idx = torch.arange(T, device=rewards.device)
    power = (idx[None, :] - idx[:, None]).clamp(min=0).float()
    discount = torch.where(idx[None, :] >= idx[:, None], (gamma * lam) ** power, 0.0)
    adv = (delta @ discount.T) * m
    returns = adv + v
    if whiten:
        adv = reference.masked_whiten.raw(adv, mask) * m
    return adv, returns


def _vectorized_advantages(scores, logprobs, ref_logprobs, values, mask, **kw):
    rewards, kl = reference.shape_rewards.raw(scores, logprobs, ref_logprobs, mask, kl_coef=kw["kl_coef"])
    adv, ret = _vectorized_gae(rewards, values, mask, gamma=kw["gamma"], lam=kw["lam"], whiten=kw["whiten"])
    return adv, ret, rewards, kl


def _row_loop_logprobs(logits, labels, *, return_entropy=False, **_):
    """One row at a time: the memory-frugal loop people write when the full log_softmax OOMs."""
    lps, ents = [], []
    for row, label in zip(logits, labels):
        logp = torch.log_softmax(row.float(), dim=-1)
        lps.append(logp[label])
        ents.append(-(logp.exp() * logp).sum())
    return torch.stack(lps), torch.stack(ents)


def _peer(case: BenchCase, impl: str) -> tuple[Callable | None, str]:
    """(function with the op's signature, or None) and a note saying why not."""
    if impl == "row-loop":
        return _row_loop_logprobs, ""
    if impl == "verl":
        return _verl_objective(case.op)
    if impl == "chunked":
        from . import linear

        return linear.linear_logprobs, "chunked PyTorch path (auto on CPU)"
    if impl == "torch-vectorized":
        if case.op == "gae":
            return _vectorized_gae, ""
        return _vectorized_advantages, ""
    if impl == "trl":
        # TRL >= 1.16 ships a Triton log-prob + entropy kernel; older releases only the eager utils.
        try:
            from trl.kernels import selective_log_softmax_and_entropy
        except Exception:
            return None, "trl >= 1.16 not installed (pip install fastppo[bench])"

        def trl_fn(logits, labels, *, temperature=1.0, **_):
            return selective_log_softmax_and_entropy(logits, labels, temperature=temperature)

        return trl_fn, ""
    if impl == "trl-eager":
        try:
            from trl.trainer.utils import entropy_from_logits as trl_entropy
            from trl.trainer.utils import selective_log_softmax
        except Exception:
            return None, "trl not installed (pip install fastppo[bench])"

        def trl_eager_fn(logits, labels, **_):
            return selective_log_softmax(logits, labels), trl_entropy(logits)

        return trl_eager_fn, ""
    if impl == "liger":
        try:
            from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
            from liger_kernel.transformers.functional import liger_cross_entropy
        except Exception:
            return None, "liger-kernel not installed (pip install fastppo[bench])"
        if case.mode == "fwd":

            def liger_fwd(logits, labels, *, temperature=1.0, **_):
                # Liger's kernel takes [B, L + 1, V] logits and scores the first L rows: one row
                # fewer than ours. It has no entropy and no backward.
                return fused_selective_log_softmax(logits[None], labels[None], temperature=temperature)

            return liger_fwd, "log-prob only, no entropy; N-1 rows"

        def liger_ce(logits, labels, **_):
            # With a backward, Liger's fused cross entropy is the closest op: per-token -log p.
            return -liger_cross_entropy(logits, labels, reduction="none")

        return liger_ce, "fused cross entropy: log-prob only, no entropy"
    if impl == "verl" and case.op in ("gspo_loss", "geo_mean_loss"):
        return _verl_seq_peer(case.op)
    raise KeyError(impl)


def _installed(module: str) -> bool:
    """Whether the top-level package of ``module`` is installed, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _linear_impl(impl: str, on_gpu: bool) -> tuple[Callable | None, str]:
    """linear_logprobs implementations, each with the signature (hidden, weight, labels, **kw)
    and returning (logprobs, entropy) or logprobs alone (the peers without entropy)."""
    import fastppo

    if impl == "torch.mm":  # the matmul peak: one [N, H] x [H, V] product, nothing else
        out = {}

        def mm(hidden, weight, labels, **_):
            # Into a buffer kept across calls: on a CPU a fresh [N, V] output is mostly page faults.
            key = (hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device)
            if key not in out:
                out.clear()
                out[key] = torch.empty(key[0], key[1], dtype=key[2], device=key[3])
            return torch.mm(hidden, weight.t(), out=out[key])

        return mm, "plain torch.mm of the same shape into a reused output: the peak"
    if impl == "fastppo":

        def fused(hidden, weight, labels, **kw):
            with fastppo.use_backend("auto"):
                return fastppo.linear_logprobs(hidden, weight, labels, **kw)

        return fused, ("Triton folds + cuBLAS per vocabulary chunk" if on_gpu
                       else "chunked PyTorch path (auto on CPU)")
    if impl == "chunked":
        if not on_gpu:
            return None, "same as fastppo on CPU"
        from . import linear

        return linear.linear_logprobs, "chunked PyTorch path forced on CUDA"
    if impl == "logits":

        def logits_path(hidden, weight, labels, **kw):
            with fastppo.use_backend("auto"):
                return fastppo.logprobs_from_logits(hidden @ weight.t(), labels, **kw)

        return logits_path, ("hidden @ weight.T, then the Triton logprobs_from_logits" if on_gpu
                             else "hidden @ weight.T, then logprobs_from_logits")
    if impl == "torch":
        return reference.linear_logprobs.raw, "full-logits reference (float32 logits)"
    if impl == "trl":
        # TRL >= 1.16: trl.kernels.ChunkedLogProbFunction (cuBLAS tiles + a Triton fold on CUDA,
        # the same loops with torch folds elsewhere), at the chunk width its trainer uses.
        try:
            from trl.kernels import ChunkedLogProbFunction
        except Exception:
            return None, "trl >= 1.16 not installed (pip install fastppo[bench])"
        # The width TRL's fused LM head uses (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in 1.16;
        # not imported: it pulls in the whole trainer stack).
        chunk = 32768

        def trl_fn(hidden, weight, labels, *, temperature=1.0, return_entropy=True, **_):
            outputs = ("entropy",) if return_entropy else ()
            lp, ent, *_rest = ChunkedLogProbFunction.apply(hidden, weight, None, labels, float(temperature), chunk,
                                                           None, 1.0, outputs)
            return (lp, ent) if return_entropy else lp

        return trl_fn, f"trl.kernels.ChunkedLogProbFunction, chunk {chunk}" + ("" if on_gpu else ", torch folds on CPU")
    if impl == "liger":
        # Liger's fused linear PPO losses get their log-probs from this (chunked torch, no entropy).
        try:
            from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase
        except Exception:
            return None, "liger-kernel not installed (pip install fastppo[bench])"

        def liger_fn(hidden, weight, labels, *, temperature=1.0, **_):
            return LigerFusedLinearPPOBase.chunk_forward(hidden[None], weight, labels[None],
                                                         temperature=temperature)[0]

        return liger_fn, "LigerFusedLinearPPOBase.chunk_forward: chunked torch, log-prob only, no entropy"
    if impl == "liger-flce":
        if not _installed("liger_kernel"):
            return None, "liger-kernel not installed (pip install fastppo[bench])"
        if not on_gpu:
            return None, "Liger fused linear cross entropy is Triton: GPU only"
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger_flce(hidden, weight, labels, **_):
            return -liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="none")

        return liger_flce, "fused linear cross entropy (reduction=none): log-prob only, no entropy"
    if impl == "verl":
        if not _installed("verl"):
            return None, "verl not installed"
        if not on_gpu:
            return None, "verl linear_cross_entropy is Triton/CUDA only (asserts hidden.is_cuda)"
        try:
            from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
        except Exception as exc:
            return None, f"verl linear_cross_entropy not importable: {type(exc).__name__}"

        def verl_fn(hidden, weight, labels, *, temperature=1.0, **_):
            return linear_cross_entropy(hidden, weight, labels, float(temperature), "none")

        return verl_fn, "verl.utils.kernel.linear_cross_entropy (log-probs and token entropy)"
    if impl == "torch-lce":
        F = torch.nn.functional
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return None, f"F.linear_cross_entropy needs torch >= 2.13 (this is {torch.__version__})"
        rows = TORCH_LCE_ROWS["cuda" if on_gpu else "cpu"]
        opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows, chunking_method=None)

        def torch_lce(hidden, weight, labels, *, temperature=1.0, **_):
            # No temperature argument: logits / T = (hidden / T) @ weight.T (no bias here).
            h = hidden if temperature == 1.0 else hidden / temperature
            return -F.linear_cross_entropy(h, weight, labels, reduction="none", options=opts)

        return torch_lce, f"F.linear_cross_entropy, reduction=none, batch_chunk_size={rows}: log-prob only, no entropy"
    raise KeyError(impl)


def _implementation(case: BenchCase, impl: str, on_gpu: bool) -> tuple[Callable | None, str]:
    import fastppo

    if case.op == "linear_logprobs":
        return _linear_impl(impl, on_gpu)
    if impl == "torch":
        return getattr(reference, case.op).raw, ""
    if impl == "torch.compile":
        if not on_gpu:
            return None, "GPU only"
        return torch.compile(getattr(reference, case.op).raw, dynamic=False), ""
    if impl == "triton":
        if not on_gpu:
            return None, "kernel timings need a GPU"
        if not _dispatch.has_kernel(case.op):
            return None, "no kernel yet"
        op = getattr(fastppo, case.op)

        def kernel(*args, **kwargs):
            with fastppo.use_backend("triton"):
                return op(*args, **kwargs)

        return kernel, ""
    fn, note = _peer(case, impl)
    if fn is not None and impl in ("trl", "liger") and not on_gpu:  # Triton peers
        return None, "GPU only"
    return fn, note


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _step(fn, args, kwargs, leaves, mode):
    def run():
        out = fn(*args, **kwargs)
        if mode == "fwd+bwd":
            outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor) and o.requires_grad]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            for leaf in leaves:
                leaf.grad = None
        return out

    return run


def _time(run, on_gpu: bool, reps: int) -> float:
    """Median milliseconds of ``reps`` calls of ``run`` (device time between CUDA events on a GPU).

    On a GPU the L2 cache is flushed before each call, as triton.testing.do_bench does, so a
    small case is not timed out of cache; ``reps`` counts calls (do_bench's ``rep`` would be a
    time budget in milliseconds)."""
    if on_gpu:
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        for _ in range(10):  # warm up: compile, autotune, allocator pools
            run()
        times = []
        for _ in range(max(reps, 3)):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    run()  # warm up
    times = []
    for _ in range(max(reps, 3)):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_bandwidth(on_gpu: bool) -> float:
    """Achieved copy bandwidth in bytes/s on this device (read + write counted)."""
    device = "cuda" if on_gpu else "cpu"
    n = (1 * GiB if on_gpu else 128 * 1024**2) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), on_gpu, reps=20)
    return 2 * n * 4 / (ms * 1e-3)


def run_case(case: BenchCase, impl: str, on_gpu: bool, bandwidth: float, reps: int) -> Result:
    device = "cuda" if on_gpu else "cpu"
    dtype_name = str(case.dtype).replace("torch.", "")
    fn, note = _implementation(case, impl, on_gpu)
    if fn is None:
        return Result(case.op, case.mode, case.shape, dtype_name, impl, None, None, None, None, None, note)
    if case.mode == "fwd+bwd" and impl == "torch-vectorized":
        return Result(case.op, case.mode, case.shape, dtype_name, impl, None, None, None, None, None, "forward only")
    try:
        args, kwargs, leaves = case.make(device)
        if on_gpu:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        run = _step(fn, args, kwargs, leaves, case.mode)
        run()
        peak = (torch.cuda.max_memory_allocated() - base) / 1024**2 if on_gpu else None
        ms = _time(run, on_gpu, reps)
    except torch.cuda.OutOfMemoryError if on_gpu else MemoryError:
        return Result(case.op, case.mode, case.shape, dtype_name, impl, None, None, None, None, None, "out of memory")
    except Exception as exc:  # a peer that breaks is reported, not fatal
        return Result(case.op, case.mode, case.shape, dtype_name, impl, None, None, None, None, None, f"{type(exc).__name__}: {str(exc)[:80]}")
    finally:
        if on_gpu:
            torch.cuda.empty_cache()
    gbps = case.bytes_floor / (ms * 1e-3) / 1e9
    return Result(case.op, case.mode, case.shape, dtype_name, impl, ms, gbps, 100 * gbps * 1e9 / bandwidth, peak, None, note)


# --------------------------------------------------------------------------------------------
# linear_logprobs: matmul-bound columns, and peak memory per implementation
# --------------------------------------------------------------------------------------------

MiB = 1024**2
CPU_MEM_METHOD = "peak-rss-subprocess"
CPU_MEM_NOTE = ("peak MB on CPU: the rise of the peak resident set (VmHWM, reset through /proc/self/clear_refs) "
                "over one call, in a fresh process per implementation, inputs excluded, gradients included")


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _measure_linear_cpu(N: int, H: int, V: int, dtype: str, mode: str, impl: str, reps: int) -> dict:
    """In a fresh process: a call at a small shape first (pages in the library code, starts the
    thread pool), then the first call at full size for the peak memory, then ``reps`` timed."""
    fn, note = _linear_impl(impl, on_gpu=False)
    if fn is None:
        return {"skip": note}
    small = _linear_case(min(N, 64), H, min(V, 2048), getattr(torch, dtype), mode)
    args, kwargs, leaves = small.make("cpu")
    _step(fn, args, kwargs, leaves, mode)()
    del args, kwargs, leaves
    case = _linear_case(N, H, V, getattr(torch, dtype), mode)
    args, kwargs, leaves = case.make("cpu")
    run = _step(fn, args, kwargs, leaves, mode)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := the current resident set
        base = _proc_status("VmRSS")
    except OSError:
        base = None
    run()
    extra = (_proc_status("VmHWM") - base) / MiB if base is not None else None
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "extra_peak_mb": extra, "note": note,
            "threads": torch.get_num_threads()}


_MARK = "@@fastppo-bench "


def _fork_server() -> None:
    """``python -c 'from fastppo.bench import _fork_server; _fork_server()'``: import torch,
    fastppo and the peers once, then for each JSON spec read from stdin fork a fresh process that
    measures it (its own peak RSS), and answer one marked JSON line. The server itself never runs
    a torch op, so forking it is safe (no thread pool yet)."""
    import importlib

    # trl.trainer.utils: TRL's backward imports it on its first call.
    for mod in ("trl.kernels", "trl.trainer.utils", "liger_kernel.chunked_loss.fused_linear_ppo"):
        if _installed(mod):
            try:
                importlib.import_module(mod)
            except Exception:
                pass  # the child says why
    for line in sys.stdin:
        spec = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the measuring process
            os.close(r)
            try:
                out = _measure_linear_cpu(**spec)
            except BaseException as exc:  # reported in the table, never fatal
                out = {"error": f"{type(exc).__name__}: {str(exc)[:80]}"}
            with os.fdopen(w, "w") as fh:
                fh.write(json.dumps(out))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as fh:
            text = fh.read()
        _, status = os.waitpid(pid, 0)
        if not text:
            code = os.waitstatus_to_exitcode(status)
            text = json.dumps({"error": f"process died ({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)};"
                                        " out of memory?)"})
        sys.stdout.write(_MARK + text + "\n")
        sys.stdout.flush()


_SERVER = None


def _run_linear_cpu(case: BenchCase, impl: str, reps: int) -> dict:
    """Measure one implementation in a fresh process forked from the fork server."""
    global _SERVER
    import tempfile

    N, H, V = linear_dims(case)
    spec = dict(N=N, H=H, V=V, dtype=str(case.dtype).replace("torch.", ""), mode=case.mode, impl=impl, reps=reps)
    if _SERVER is None or _SERVER.poll() is not None:
        log = tempfile.TemporaryFile(mode="w+")
        _SERVER = subprocess.Popen([sys.executable, "-c", "from fastppo.bench import _fork_server; _fork_server()"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        _SERVER.log = log
    _SERVER.stdin.write(json.dumps(spec) + "\n")
    _SERVER.stdin.flush()
    for line in _SERVER.stdout:
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    _SERVER.log.seek(0)
    tail = _SERVER.log.read().strip().splitlines()[-1:] or ["no output"]
    _SERVER = None
    return {"error": f"fork server died: {tail[0][:100]}"}


def _stop_fork_server() -> None:
    global _SERVER
    if _SERVER is not None:
        _SERVER.stdin.close()
        _SERVER.wait()
        _SERVER.log.close()
        _SERVER = None


_MATMUL_PEAK: dict = {}


def matmul_peak(case: BenchCase, on_gpu: bool, reps: int) -> tuple[float | None, float | None]:
    """(ms, TFLOP/s) of a plain ``torch.mm`` [N, H] x [H, V] in the case's dtype, timed in this
    run; measured once per shape."""
    N, H, V = linear_dims(case)
    key = (N, H, V, case.dtype)
    if key not in _MATMUL_PEAK:
        fwd = _linear_case(N, H, V, case.dtype, "fwd")
        if on_gpu:
            r = run_case(fwd, "torch.mm", True, 1.0, reps)
            ms = r.median_ms
        else:
            ms = _run_linear_cpu(fwd, "torch.mm", reps).get("median_ms")
        _MATMUL_PEAK[key] = (ms, 2.0 * N * H * V / (ms * 1e-3) / 1e12 if ms else None)
    return _MATMUL_PEAK[key]


def run_linear_case(case: BenchCase, on_gpu: bool, bandwidth: float, reps: int, progress=None) -> list[Result]:
    """Every implementation of one linear_logprobs case, with the matmul-peak columns and the
    time and memory ratios against the logits path."""
    dtype_name = str(case.dtype).replace("torch.", "")
    _, peak_tflops = matmul_peak(case, on_gpu, reps)
    flops = linear_flops(case)
    rows = []
    for impl in case.impls:
        if on_gpu:
            r = run_case(case, impl, True, bandwidth, reps)
            r.mem_method = "cuda-allocator" if r.median_ms else None
        else:
            out = _run_linear_cpu(case, impl, reps)
            ms = out.get("median_ms")
            note = out.get("skip") or out.get("error") or out.get("note", "")
            gbps = case.bytes_floor / (ms * 1e-3) / 1e9 if ms else None
            r = Result(case.op, case.mode, case.shape, dtype_name, impl, ms, gbps,
                       100 * gbps * 1e9 / bandwidth if gbps else None, out.get("extra_peak_mb"), None, note,
                       mem_method=CPU_MEM_METHOD if ms else None)
        if r.median_ms:
            r.tflops = flops / (r.median_ms * 1e-3) / 1e12
            r.matmul_tflops = peak_tflops
            if peak_tflops:
                r.pct_matmul_peak = 100 * r.tflops / peak_tflops
        rows.append(r)
        if progress:
            progress.update()
    base = next((r for r in rows if r.impl == "logits" and r.median_ms), None)
    ref = next((r.median_ms for r in rows if r.impl == "torch" and r.median_ms), None)
    for r in rows:
        if ref and r.median_ms:
            r.speedup_vs_torch = ref / r.median_ms
        if base and r.median_ms:
            r.time_vs_logits = r.median_ms / base.median_ms
            if base.peak_mem_mb and r.peak_mem_mb is not None:
                r.mem_vs_logits = r.peak_mem_mb / base.peak_mem_mb
    return rows


LINEAR_HEADER = (f"{'op':<22} {'mode':<7} {'shape':<22} {'dtype':<8} {'impl':<11} {'median ms':>10} {'TFLOP/s':>8} "
                 f"{'% mm':>6} {'peak MB':>9} {'t/logits':>8} {'mem/logits':>10}  note")


def _linear_line(r: Result) -> str:
    ratio = lambda x: (_fmt(x, "7.2f") + "x") if x is not None else _fmt(None, "8")  # noqa: E731
    return (f"{r.op:<22} {r.mode:<7} {r.shape:<22} {r.dtype:<8} {r.impl:<11} {_fmt(r.median_ms, '10.3f')} "
            f"{_fmt(r.tflops, '8.3f')} {_fmt(r.pct_matmul_peak, '6.1f')} {_fmt(r.peak_mem_mb, '9.1f')} "
            f"{ratio(r.time_vs_logits)} {ratio(r.mem_vs_logits).rjust(10)}  {r.note}")


def _fmt(x, spec):
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return format(x, spec) if x is not None else "-".rjust(width)


def main(args) -> int:
    on_gpu = torch.cuda.is_available()
    _MATMUL_PEAK.clear()  # peaks of this run only
    cases = build_cases(on_gpu, args.quick)
    try:
        cases = select_ops(cases, args.ops)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reps = args.reps or (100 if on_gpu else 5)
    linear_reps = args.reps or (100 if on_gpu else 2)  # on a CPU a call takes seconds; total ~2 min
    device_name = torch.cuda.get_device_name() if on_gpu else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"fastppo bench on {device_name}")
    if not on_gpu:
        print("no GPU: timing the PyTorch references on small shapes; kernel timings need a GPU")
    bandwidth = measure_bandwidth(on_gpu)
    print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s (the roofline below)")
    header = (f"{'op':<22} {'mode':<7} {'shape':<18} {'dtype':<8} {'impl':<16} {'median ms':>10} {'GB/s':>8} "
              f"{'% roof':>7} {'peak MB':>9} {'speedup':>8}  note")
    results: list[Result] = []
    try:
        from tqdm import tqdm

        progress = tqdm(total=sum(len(c.impls) for c in cases), desc="bench", leave=False, file=sys.stderr,
                        disable=not sys.stderr.isatty())
    except ImportError:  # pragma: no cover - tqdm is a dependency
        progress = None
    table = None
    for case in cases:
        linear = case.op == "linear_logprobs"
        if table != linear:  # the header of the table this case belongs to
            if progress:
                progress.clear()
            if linear:
                if table is not None:
                    print()
                print("linear_logprobs: TFLOP/s over the two matmuls (2NHV fwd, 6NHV fwd+bwd); % mm: of a plain "
                      "torch.mm of the same [N,H]x[H,V] timed in this run; ratios against the logits path")
                print(CPU_MEM_NOTE if not on_gpu else "peak MB: CUDA allocator peak above the inputs")
            print(LINEAR_HEADER if linear else header)
            print("-" * len(LINEAR_HEADER if linear else header))
            table = linear
        if linear:
            rows = run_linear_case(case, on_gpu, bandwidth, linear_reps, progress)
            if progress:
                progress.clear()
            for r in rows:
                print(_linear_line(r), flush=True)
            results += rows
            continue
        rows = []
        for impl in case.impls:
            rows.append(run_case(case, impl, on_gpu, bandwidth, reps))
            if progress:
                progress.update()
        base = next((r.median_ms for r in rows if r.impl == "torch"), None)
        for r in rows:
            if base and r.median_ms:
                r.speedup_vs_torch = base / r.median_ms
            if progress:
                progress.clear()
            print(f"{r.op:<22} {r.mode:<7} {r.shape:<18} {r.dtype:<8} {r.impl:<16} {_fmt(r.median_ms, '10.3f')} "
                  f"{_fmt(r.gbps, '8.2f')} {_fmt(r.pct_roofline, '7.1f')} {_fmt(r.peak_mem_mb, '9.1f')} "
                  f"{(_fmt(r.speedup_vs_torch, '7.2f') + 'x') if r.speedup_vs_torch else _fmt(None, '8')}  {r.note}", flush=True)
        results += rows
    if progress:
        progress.close()
    _stop_fork_server()
    if args.json:
        path = Path(args.json) if args.json != "auto" else _default_json_path(device_name)
        payload = {
            "command": "fastppo bench" + (" --quick" if args.quick else ""),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": device_name,
            "commit": _git_commit(),
            "torch": torch.__version__,
            "triton": triton_version(),
            "copy_bandwidth_gbps": bandwidth / 1e9,
            "results": [_row(r) for r in results],
        }
        if _MATMUL_PEAK:
            payload["matmul_peaks"] = [
                {"shape": f"N={N} H={H} V={V}", "dtype": str(dt).replace("torch.", ""), "median_ms": ms, "tflops": tf}
                for (N, H, V, dt), (ms, tf) in _MATMUL_PEAK.items()
            ]
            payload["linear_mem_method"] = "cuda-allocator" if on_gpu else CPU_MEM_METHOD
        try:  # the path was checked before the run; a disk that filled or vanished since still gets one line
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=1))
        except OSError as exc:
            print(f"fastppo bench: error: cannot write --json {str(path)!r}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    return 0


def _row(r: Result) -> dict:
    row = dataclasses.asdict(r)
    if r.op != "linear_logprobs":  # the other ops' rows keep their fields
        for key in LINEAR_FIELDS:
            row.pop(key)
    return row


def _default_json_path(device_name: str) -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return Path("benchmarks") / "results" / f"bench-{slug[:40]}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"

