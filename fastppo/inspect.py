"""``fastppo inspect``: every Triton kernel configuration the launchers pick, compiled offline for
a GPU nobody here has, with the static figures that predict its speed.

How it works, in three steps:

1. **Capture.** The public kernel ops (``fastppo.kernels.*``) are called on small CPU stand-in
   tensors whose shapes drive the launchers' block choices (``CASES``: logprob at the four
   vocabularies, on 2-D rows and on the ``[:, :-1]`` view of ``[B, T + 1, V]`` logits, the
   advantage ops at 512x4096, 2048x1024 and 8x262144, the losses at 64k and 2M tokens, the
   linear_logprobs chunk kernels). Triton's own launch path binds and specializes the arguments
   exactly as on a GPU (pointer dtypes, 16-divisibility of ints and pointers, constexprs,
   ``num_warps``, the FP fusion default a user's process gets), against a stand-in driver that
   reports the target GPU; Triton's ``jit_cache_hook`` then records the specialization and cancels the compile and the launch.
   Nothing executes, so a changed launcher is inspected as it now is, with no list to update.
2. **Compile** each distinct specialization with ``triton.compile`` for ``sm_90`` (or ``sm_80``),
   using the ptxas Triton ships, in worker processes without ``TRITON_INTERPRET``. Results are
   cached under ``~/.cache/fastppo/inspect`` (``FASTPPO_CACHE_DIR``), keyed by the kernel's
   source hash (``JITFunction.cache_key``), the specialization, the target and the Triton
   version.
3. **Read** the cubin: registers, stack and local bytes (``cuobjdump --dump-resource-usage``),
   the SASS (``nvdisasm``, else ``cuobjdump -sass``, else the PTX, as the ``isa`` column says).
   The hot region is the loop holding the most global memory instructions (before any ticket
   atomic) or, for one-tile-per-program kernels, the straight-line code before the ticket
   atomic; per-element figures are per element of that region (``elements``). Occupancy and the
   predicted fraction of HBM bandwidth follow the model in benchmarks/NOTES.md ("Static model
   of `fastppo inspect`").

Works with no GPU and no CUDA driver. ``python -m fastppo.inspect`` is the same command.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import gzip
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Iterator

INSPECT_VERSION = "2"

# --------------------------------------------------------------------------------------------
# Hardware the model predicts for (per SM limits from the CUDA occupancy tables)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    cc: int
    sms: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 233472  # bytes usable by CTAs
    smem_reserved_per_cta: int = 1024
    reg_alloc_unit: int = 256  # registers per warp are allocated in units of 256
    hbm_bytes_per_s: float = 3.35e12
    clock_hz: float = 1.755e9
    issue_per_sm_per_clock: int = 4  # one warp instruction per sub-partition per cycle
    latency_s: float = 0.6e-6  # loaded DRAM latency the in-flight bytes must cover
    reachable: float = 0.92  # fraction of the HBM peak a streaming kernel reaches at best


HARDWARE = {
    "sm_90": Hardware("H100 SXM", 90, 132),
    "sm_80": Hardware("A100 SXM 80GB", 80, 108, smem_per_sm=167936, hbm_bytes_per_s=2.04e12, clock_hz=1.41e9),
}

# Elements one pass of the hot region covers: the block/tile constexprs of each kernel.
# A kernel missing here uses BLOCK if it has one (else 1 element per pass).
ELEMENTS = {
    "_logprob_fwd_kernel": ("BLOCK",),
    "_logprob_bwd_kernel": ("BLOCK",),
    "_fold_fwd_kernel": ("BLOCK",),
    "_dlogits_kernel": ("BLOCK",),
    "_kl_kernel": ("BLOCK",),
    "_kl_bwd_kernel": ("BLOCK",),
    "_summary_kernel": ("BLOCK_B", "CHUNK"),
    "_finalize_kernel": ("BLOCK_B", "CHUNK"),
    "_ppo_fwd_kernel": ("BLOCK_R", "BLOCK_T"),
    "_ppo_bwd_kernel": ("BLOCK_R", "BLOCK_T"),
    "_tok_fwd_kernel": ("BLOCK_R", "BLOCK_T"),
    "_tok_bwd_kernel": ("BLOCK_R", "BLOCK_T"),
    # group advantages: a [BLOCK_B, BLOCK_T] tile of the token mask / outputs, a group of BLOCK_K scores
    "_row_member_kernel": ("BLOCK_B", "BLOCK_T"),
    "_broadcast_kernel": ("BLOCK_B", "BLOCK_T"),
    "_group_stats_kernel": ("BLOCK_K",),
    # sequence-level losses: a BLOCK_T slice of one row per pass (forward: per loop iteration)
    "_seq_fwd_kernel": ("BLOCK_T",),
    "_seq_bwd_kernel": ("BLOCK_T",),
}

# Spills CI accepts, with the reason: (kernel, substring of the config) -> why.
KNOWN_TAIL_SPILLS = {
    ("_ppo_fwd_kernel", "AGG=2"): "8 B of stack in the split seq-mean finisher's row join, outside the token loop "
    "(benchmarks/NOTES.md, issue 9)",
    ("_group_stats_kernel", "EST=3"): "8 B of stack for the group's std + eps, held across Pass@k's three extra "
    "passes over the group's scores; O(K) per group, off the [B, T] path (issue 19)",
}


# --------------------------------------------------------------------------------------------
# Step 1: capture what the launchers launch
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    family: str
    shape: str
    run: Callable[[], None]
    # Programs the real shape launches, when the stand-in tensors are smaller than it (one
    # program per row kernels): kernel name -> programs.
    programs: dict[str, int] = dataclasses.field(default_factory=dict)


FAMILIES = ("logprob", "advantage", "loss", "linear", "objective")
VOCABS = (32000, 50257, 128256, 151936)
ADV_SHAPES = ((512, 4096), (2048, 1024), (8, 262144))
LOSS_SHAPES = ((64, 1024), (1024, 2048))
LOGPROB_ROWS = 16384  # tokens per logprob batch the waves are reported for (stand-in: 16 rows)
_DT = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def _op(module: str, name: str):
    return getattr(importlib.import_module(f"fastppo.kernels.{module}"), name)


def _backward(*outs) -> None:
    import torch

    total = sum(o.float().sum() for o in outs if o is not None and o.requires_grad)
    if isinstance(total, torch.Tensor):
        total.backward()


def _logprob_case(V: int, dtype_name: str) -> Callable[[], None]:
    def run():
        import torch

        dtype = getattr(torch, dtype_name)
        n = 16
        logits = torch.zeros(n, V, dtype=dtype, requires_grad=True)
        labels = torch.zeros(n, dtype=torch.long)
        mask = torch.ones(n, dtype=torch.bool)
        lp_op, ent_op = _op("logprob", "logprobs_from_logits"), _op("logprob", "entropy_from_logits")
        _backward(lp_op(logits, labels))
        _backward(*lp_op(logits, labels, return_entropy=True, mask=mask))
        _backward(ent_op(logits))

    return run


def _logprob_view_case(V: int, dtype_name: str) -> Callable[[], None]:
    """The PPO call: the ``[:, :-1]`` view of ``[B, T + 1, V]`` logits (the last position has no
    next token), with a mask and the entropy, backward included. At odd V its rows are not
    16-byte aligned and the batch stride is (T + 1) * V, so its specialization differs from the
    2-D stand-in's."""

    def run():
        import torch

        dtype = getattr(torch, dtype_name)
        B, T = 2, 8
        full = torch.zeros(B, T + 1, V, dtype=dtype, requires_grad=True)
        labels = torch.zeros(B, T, dtype=torch.long)
        mask = torch.ones(B, T, dtype=torch.bool)
        _backward(*_op("logprob", "logprobs_from_logits")(full[:, :-1], labels, return_entropy=True, mask=mask))

    return run


def _advantage_case(B: int, T: int) -> Callable[[], None]:
    def run():
        import torch

        f = torch.float32
        lp, ref, vals, rew = (torch.zeros(B, T, dtype=f) for _ in range(4))
        mask = torch.ones(B, T, dtype=torch.bool)
        scores = torch.zeros(B, dtype=f)
        _op("advantage", "compute_advantages")(scores, lp, ref, vals, mask, kl_coef=0.05)
        _op("advantage", "compute_advantages")(scores, lp, ref, vals, mask, kl_coef=0.05, whiten=False)
        # k3, the usual estimator, has code of its own in the fused kernels (its series and exp).
        _op("advantage", "compute_advantages")(scores, lp, ref, vals, mask, kl_coef=0.05, estimator="k3")
        _op("advantage", "shape_rewards")(scores, lp, ref, mask, kl_coef=0.05, estimator="k3")
        _op("advantage", "gae")(rew, vals, mask)
        _op("advantage", "masked_whiten")(rew, mask)
        _op("advantage", "shape_rewards")(scores, lp, ref, mask, kl_coef=0.05)
        lpg = lp.clone().requires_grad_(True)
        _backward(_op("advantage", "kl_penalty")(lpg, ref, "k3"))
        # The critic-free estimators (kernels/group_advantage.py): groups of 8 responses.
        if B % 8 == 0:
            for est in ("grpo", "dr_grpo", "rloo", "grpo_passk", "opo", "gpg"):
                _op("group_advantage", "group_advantages")(scores, 8, mask, estimator=est)
            _op("group_advantage", "group_advantages")(scores, 8, mask, estimator="grpo_passk", norm_by_std=False)
        _op("group_advantage", "reinforce_pp_advantages")(rew, mask)

    return run


def _loss_case(B: int, T: int) -> Callable[[], None]:
    def run():
        import torch

        f = torch.float32

        def t(grad=False):
            return torch.zeros(B, T, dtype=f, requires_grad=grad)

        mask = torch.ones(B, T, dtype=torch.bool)
        ppo, pol = _op("ppo_loss", "ppo_loss"), _op("ppo_loss", "policy_loss")
        val, agg = _op("ppo_loss", "value_loss"), _op("ppo_loss", "aggregate")
        for how in ("token-mean", "seq-mean-token-mean"):
            loss, _ = ppo(t(True), t(), t(), t(True), t(), t(), mask, entropy=t(True), ent_coef=0.01, agg=how)
            _backward(loss)
        _backward(pol(t(True), t(), t(), mask)[0])
        _backward(val(t(True), t(), t(), mask)[0])
        _backward(agg(t(True), mask))
        # kernels/seq_policy_loss.py: GSPO and GMPO, with and without importance weights.
        for name in ("gspo_loss", "geo_mean_loss"):
            seq = _op("seq_policy_loss", name)
            _backward(seq(t(True), t(), t(), mask)[0])
            _backward(seq(t(True), t(), t(), mask, is_weights=t(), agg="token-mean")[0])
        # GSPO with OpenRLHF's options: dual clip, gradient through the sequence mean.
        _backward(_op("seq_policy_loss", "gspo_loss")(t(True), t(), t(), mask, dual_clip=3.0, seq_grad=True)[0])

    return run


def _loss_sweep_case(B: int, T: int, aggs: tuple[str, ...]) -> Callable[[], None]:
    """The fullest ppo_loss (importance weights, dual clip, value clip, entropy) per aggregation."""

    def run():
        import torch

        def t(grad=False):
            return torch.zeros(B, T, dtype=torch.float32, requires_grad=grad)

        mask = torch.ones(B, T, dtype=torch.bool)
        for how in aggs:
            loss, _ = _op("ppo_loss", "ppo_loss")(t(True), t(), t(), t(True), t(), t(), mask, entropy=t(True),
                                                  ent_coef=0.01, dual_clip=3.0, is_weights=t(), agg=how)
            _backward(loss)

    return run


# The token-level objectives (kernels/policy_objectives.py) and options valid for each.
OBJECTIVE_OPTIONS = {"dppo_tv_loss": {}, "dppo_kl_loss": {}, "sapo_loss": {}, "gpg_loss": {}, "cispo_loss": {},
                     "dro_loss": {"beta": 0.1}}


def _objective_case(B: int, T: int, ops=tuple(OBJECTIVE_OPTIONS), aggs=("token-mean", "seq-mean-token-mean")
                    ) -> Callable[[], None]:
    """Each objective forward and backward: the first aggregation plain, the others with is_weights."""

    def run():
        import torch

        def t(grad=False):
            return torch.zeros(B, T, dtype=torch.float32, requires_grad=grad)

        mask = torch.ones(B, T, dtype=torch.bool)
        for op in ops:
            for i, how in enumerate(aggs):
                loss, _ = _op("policy_objectives", op)(t(True), t(), t(), mask, agg=how, is_weights=t() if i else None,
                                                       **OBJECTIVE_OPTIONS[op])
                _backward(loss)

    return run


def _advantage_sweep_case(B: int, T: int) -> Callable[[], None]:
    def run():
        import torch

        f = torch.float32
        lp, ref, vals = (torch.zeros(B, T, dtype=f) for _ in range(3))
        mask = torch.ones(B, T, dtype=torch.bool)
        scores = torch.zeros(B, dtype=f)
        _op("advantage", "compute_advantages")(scores, lp, ref, vals, mask, kl_coef=0.05)
        _op("advantage", "gae")(lp, vals, mask)
        _op("advantage", "masked_whiten")(lp, mask)

    return run


def _linear_case(V: int, dtype_name: str = "bfloat16", bias: bool = False) -> Callable[[], None]:
    def run():
        import torch

        dtype = getattr(torch, dtype_name)
        n, h = 16, 32
        hidden = torch.zeros(n, h, dtype=dtype, requires_grad=True)
        weight = torch.zeros(V, h, dtype=dtype, requires_grad=True)
        b = torch.zeros(V, dtype=dtype) if bias else None
        labels = torch.zeros(n, dtype=torch.long)
        mask = torch.ones(n, dtype=torch.bool)
        _backward(*_op("linear_logprob", "linear_logprobs")(hidden, weight, labels, bias=b, return_entropy=True,
                                                           mask=mask))

    return run


# More shapes for CI (``--all-configs``): every tile, chunk and block ladder step the launchers
# have, beyond the issue's representative shapes.
SWEEP_VOCABS = ((1000, "bfloat16"), (151936, "float16"))
SWEEP_ADV_SHAPES = ((1, 1 << 20), (8, 32768), (8192, 128))
SWEEP_LOSS_SHAPES = ((128, 4096), (8192, 1), (256, 512), (512, 1024))
SWEEP_AGGS = ("token-mean", "seq-mean-token-mean")
OTHER_AGGS = ("token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def build_cases(families: Iterable[str] = FAMILIES, all_configs: bool = False) -> list[Case]:
    """The representative shapes of issue 12, plus (``all_configs``) the CI sweep."""
    families = set(families)
    cases: list[Case] = []
    if "logprob" in families:
        for V in VOCABS:
            for dt in ("bfloat16", "float32"):
                per_row = {"_logprob_fwd_kernel": LOGPROB_ROWS, "_logprob_bwd_kernel": LOGPROB_ROWS}
                cases.append(Case("logprob", f"{LOGPROB_ROWS}x{V} {_DT[dt]}",
                                  _logprob_case(V, dt), per_row))
                cases.append(Case("logprob", f"{LOGPROB_ROWS}x{V} {_DT[dt]} [:, :-1]",
                                  _logprob_view_case(V, dt), per_row))
    if "advantage" in families:
        for B, T in ADV_SHAPES:
            cases.append(Case("advantage", f"{B}x{T}", _advantage_case(B, T)))
    if "loss" in families:
        for B, T in LOSS_SHAPES:
            cases.append(Case("loss", f"{B}x{T}", _loss_case(B, T)))
    if "linear" in families:
        for V in VOCABS:
            # Programs: one per row of a 16384-row tile (the CUDA workspace at 4096 columns).
            per_row = {"_fold_fwd_kernel": 16384, "_dlogits_kernel": 16384}
            cases.append(Case("linear", f"16384xH->{V} bf16", _linear_case(V), per_row))
    if "objective" in families:
        for B, T in LOSS_SHAPES:
            cases.append(Case("objective", f"{B}x{T}", _objective_case(B, T)))
    if not all_configs:
        return cases
    if "logprob" in families:
        for V, dt in SWEEP_VOCABS:
            per_row = {"_logprob_fwd_kernel": LOGPROB_ROWS, "_logprob_bwd_kernel": LOGPROB_ROWS}
            cases.append(Case("logprob", f"{LOGPROB_ROWS}x{V} {_DT.get(dt, dt)}", _logprob_case(V, dt), per_row))
    if "advantage" in families:
        for B, T in SWEEP_ADV_SHAPES:
            cases.append(Case("advantage", f"{B}x{T}", _advantage_sweep_case(B, T)))
    if "loss" in families:
        for B, T in SWEEP_LOSS_SHAPES:
            cases.append(Case("loss", f"{B}x{T} full", _loss_sweep_case(B, T, SWEEP_AGGS)))
        cases.append(Case("loss", "64x1024 full", _loss_sweep_case(64, 1024, OTHER_AGGS)))
    if "linear" in families:
        cases.append(Case("linear", "16xH->151936 fp32 bias", _linear_case(151936, "float32", True)))
        cases.append(Case("linear", "16xH->50257 fp16 bias", _linear_case(50257, "float16", True)))
    if "objective" in families:
        # Whole rows in one program (no split), and the other aggregations (one objective: the
        # aggregation code does not depend on it).
        cases.append(Case("objective", "8192x1", _objective_case(8192, 1)))
        cases.append(Case("objective", "64x1024 other aggs", _objective_case(64, 1024, ("gpg_loss",), OTHER_AGGS)))
    return cases


class _StandInDriver:
    """What Triton's launch path asks the driver for, answered for a GPU that is not here."""

    def __init__(self, target):
        self._target = target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_interface(self):
        import torch

        return torch.cuda

    @staticmethod
    def is_active():
        return True


@dataclasses.dataclass
class Launch:
    kernel: str
    module: str
    family: str
    shapes: list[str]
    signature: dict[str, str]
    constants: list[tuple[tuple, Any]]  # (path, value) as Triton's ASTSource takes them
    attrs: dict
    options: dict[str, Any]
    programs: int
    config: str
    key: str = ""


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _config_string(fn, signature: dict, constants: dict, attrs: dict, options: dict) -> str:
    names = fn.arg_names
    parts = [f"{names[path[0]]}={int(v) if isinstance(v, bool) else v}" for path, v in sorted(constants.items())
             if len(path) == 1 and signature.get(names[path[0]]) == "constexpr"]
    parts.append(f"warps={options['num_warps']}")
    if not options.get("enable_fp_fusion", True):
        parts.append("fp_fusion=0")
    if options.get("num_stages") not in (None, 3):
        parts.append(f"stages={options['num_stages']}")
    ptrs = [t for t in signature.values() if t.startswith("*")]
    if ptrs:
        parts.append(f"in={ptrs[0][1:]}")
    # Arguments Triton could not mark 16-divisible (or, for pointers, 16-aligned): unaligned rows.
    odd = [names[path[0]] for path, a in attrs.items()
           if len(path) == 1 and not a and signature.get(names[path[0]], "constexpr") not in ("constexpr", "fp32")
           and names[path[0]] in _ALIGN_ARGS]
    if odd:
        parts.append("unaligned:" + "/".join(odd))
    return " ".join(parts)


# Integer arguments whose 16-divisibility decides load widths (row strides, row lengths).
_ALIGN_ARGS = {"stride_t", "stride_b", "grad_stride_t", "grad_stride_b", "V", "stride_z", "stride_g", "T",
               "stride_a", "stride_v", "stride_m", "n_cols"}


def fp_fusion_default() -> tuple[bool, str]:
    """(FP fusion on?, where that comes from) for a kernel launched without ``enable_fp_fusion``:
    what a user's process compiles. Triton's own default (on up to 3.9, off from 3.10), unless
    ``TRITON_DEFAULT_FP_FUSION`` is set; the inspection never forces it either way."""
    import triton

    env = os.environ.get("TRITON_DEFAULT_FP_FUSION")
    try:
        from triton import knobs

        on = bool(knobs.language.default_fp_fusion) and not bool(getattr(knobs.language, "force_disable_fp_fusion",
                                                                          False))
    except (ImportError, AttributeError):  # pragma: no cover - Triton < 3.4
        on = env is None or env.strip().lower() in ("1", "true", "on", "yes")
    source = f"TRITON_DEFAULT_FP_FUSION={env}" if env is not None else f"Triton {triton.__version__} default"
    return on, source


@contextlib.contextmanager
def _intercepted(target: str, on_compile: Callable[[Any, Any, dict], None]) -> Iterator[None]:
    """Inside this block every ``@triton.jit`` launch binds and specializes its arguments as on a
    ``target`` GPU, then calls ``on_compile(jit_function, grid, compile)`` (``compile``: what
    Triton's ``jit_cache_hook`` gets: signature, constants, attrs, options) and is cancelled:
    nothing compiles or executes. Needs ``TRITON_INTERPRET`` unset."""
    if _interpreter_on():
        raise RuntimeError("capture needs TRITON_INTERPRET unset (run fastppo inspect, which re-executes itself)")
    import torch  # noqa: F401
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    try:
        from triton import knobs
    except ImportError as exc:  # pragma: no cover - Triton < 3.4
        raise RuntimeError(f"fastppo inspect needs Triton >= 3.4 (triton.knobs), found {triton.__version__}") from exc

    hw = HARDWARE[target]
    current: dict[str, Any] = {}
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        current["grid"] = grid
        return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def hook(*, fn, compile, **_):
        on_compile(fn.jit_function, current.get("grid"), compile)
        return True  # cancel the compile (and with it the launch)

    saved_hook = knobs.runtime.jit_cache_hook
    saved_driver = driver._active if hasattr(driver, "_active") else None
    driver.set_active(_StandInDriver(GPUTarget("cuda", hw.cc, 32)))
    knobs.runtime.jit_cache_hook = hook
    JITFunction.run = run
    try:
        from fastppo import _dispatch

        with warnings.catch_warnings():
            # Triton 3.9 warns once that its FP fusion default changes in 3.10: the rows record
            # the setting (fp_fusion_default), so the warning says nothing new here.
            warnings.filterwarnings("ignore", message=".*fp.fusion.*", category=Warning)
            warnings.filterwarnings("ignore", message=".*FP_FUSION.*", category=Warning)
            with _dispatch.use_backend("triton"):
                yield
    finally:
        JITFunction.run = orig_run
        knobs.runtime.jit_cache_hook = saved_hook
        if hasattr(driver, "_active"):
            driver._active = saved_driver


def _repr(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def _ident(jf, compile: dict) -> str:
    """The specialization Triton compiles one variant for: signature, constexprs and ints (or
    pointers) it specialized (16-divisible, == 1), and the compile options."""
    options = {"num_warps": compile["num_warps"], "num_stages": compile["num_stages"],
               "num_ctas": compile["num_ctas"], "enable_fp_fusion": compile["enable_fp_fusion"]}
    return json.dumps([jf.__module__, jf.__name__, dict(compile["signature"]),
                       sorted((list(k), _repr(v)) for k, v in dict(compile["constants"]).items()),
                       sorted((list(k), _repr(v)) for k, v in compile["configs"][0].items()), options], sort_keys=True)


def capture(target: str = "sm_90", families: Iterable[str] = FAMILIES, progress: Callable[[str], None] | None = None,
            all_configs: bool = False) -> list[Launch]:
    """Run every case's ops with Triton's launch path intercepted; returns the distinct launches.

    Must run in a process where ``TRITON_INTERPRET`` is unset (the kernels must be JITFunctions).
    """
    import triton

    found: dict[str, Launch] = {}
    current: dict[str, Any] = {}

    def on_compile(jf, grid, compile):
        case: Case = current["case"]
        programs = case.programs.get(jf.__name__)
        if programs is None:
            g = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
            programs = int(math.prod(int(x) for x in g)) if all(isinstance(x, int) for x in g) else 0
        constants = dict(compile["constants"])
        attrs = compile["configs"][0]
        options = {"num_warps": compile["num_warps"], "num_stages": compile["num_stages"],
                   "num_ctas": compile["num_ctas"], "enable_fp_fusion": compile["enable_fp_fusion"]}
        signature = dict(compile["signature"])
        ident = _ident(jf, compile)
        launch = found.get(ident)
        if launch is None:
            launch = found[ident] = Launch(
                kernel=jf.__name__, module=jf.__module__, family=case.family, shapes=[], signature=signature,
                constants=sorted(constants.items()), attrs=attrs, options=options, programs=programs,
                config=_config_string(jf, signature, constants, attrs, options),
                key=hashlib.sha256(f"{INSPECT_VERSION}|{triton.__version__}|{target}|{jf.cache_key}|{ident}".encode()
                                   ).hexdigest()[:24],
            )
        if case.shape not in launch.shapes:
            launch.shapes.append(case.shape)
            launch.programs = max(launch.programs, programs)

    with _intercepted(target, on_compile):
        for case in build_cases(families, all_configs):
            if progress:
                progress(f"capture {case.family} {case.shape}")
            current["case"] = case
            case.run()
    return list(found.values())


def specializations(run: Callable[[], None], target: str = "sm_90") -> dict[str, set[str]]:
    """Kernel name -> the distinct specializations ``run()`` launches, i.e. the variants a GPU
    process compiles (one compile each, seconds apiece with ptxas); nothing compiles here."""
    seen: dict[str, set[str]] = {}

    def on_compile(jf, grid, compile):
        seen.setdefault(jf.__name__, set()).add(_ident(jf, compile))

    with _intercepted(target, on_compile):
        run()
    return seen


SWEEP_OPS = ("view", "flat", "advantage", "loss")


def length_sweep(lengths: Iterable[int], V: int = 50257, B: int = 2, ops: Iterable[str] = SWEEP_OPS
                 ) -> Callable[[], None]:
    """One training step's kernel ops per response length T: log-probs and entropy of a
    ``[B, T + 1, V][:, :-1]`` view (backward included) and of the flat ``[B * T, V]`` rows,
    compute_advantages with whitening, ppo_loss (backward included). For ``specializations``:
    how many variants a run whose lengths vary compiles."""
    lengths, ops = list(lengths), set(ops)

    def run():
        import torch

        f = torch.float32
        for T in lengths:
            labels = torch.zeros(B, T, dtype=torch.long)
            mask = torch.ones(B, T, dtype=torch.bool)
            lp_op = _op("logprob", "logprobs_from_logits")
            if "view" in ops:
                full = torch.zeros(B, T + 1, V, dtype=torch.bfloat16, requires_grad=True)
                _backward(*lp_op(full[:, :-1], labels, return_entropy=True, mask=mask))
            if "flat" in ops:
                flat = torch.zeros(B * T, V, dtype=torch.bfloat16, requires_grad=True)
                _backward(lp_op(flat, labels.reshape(-1)))
            if "advantage" in ops:
                lp, ref, vals = (torch.zeros(B, T, dtype=f) for _ in range(3))
                _op("advantage", "compute_advantages")(torch.zeros(B, dtype=f), lp, ref, vals, mask, kl_coef=0.05)
            if "loss" in ops:
                def t(grad=False):
                    return torch.zeros(B, T, dtype=f, requires_grad=grad)

                loss, _ = _op("ppo_loss", "ppo_loss")(t(True), t(), t(), t(True), t(), t(), mask, entropy=t(True),
                                                      ent_coef=0.01)
                _backward(loss)

    return run


# --------------------------------------------------------------------------------------------
# Step 2: compile (in worker processes), step 3: read the binary
# --------------------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    return shutil.which(name)


@dataclasses.dataclass
class Instr:
    op: str  # opcode with modifiers, e.g. LDG.E.128 or ld.global.v4.b32
    text: str
    target: str | None = None  # branch target label


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_PTX_LABEL = re.compile(r"^\s*(\$L__\w+):")
_PTX_LINE = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9_.]*)\b(.*);\s*$")


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    instrs, labels = [], {}
    for line in text.splitlines():
        m = _SASS_LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _SASS_LINE.match(line)
        if not m or m.group(1) == "NOP":
            continue
        tgt = re.search(r"`\((\.L_\w+)\)", m.group(2)) if m.group(1).startswith(("BRA", "BRX", "JMP")) else None
        instrs.append(Instr(m.group(1), line.strip(), tgt.group(1) if tgt else None))
    return instrs, labels


def parse_ptx(text: str) -> tuple[list[Instr], dict[str, int]]:
    instrs, labels = [], {}
    body = text[text.find(".entry"):]
    for line in body.splitlines():
        m = _PTX_LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _PTX_LINE.match(line)
        if not m or m.group(1).startswith((".", "//")):
            continue
        tgt = re.search(r"(\$L__\w+)", m.group(2)) if m.group(1).startswith("bra") else None
        instrs.append(Instr(m.group(1), line.strip(), tgt.group(1) if tgt else None))
    return instrs, labels


def _sass_class(op: str) -> tuple[str, int]:
    """(kind, bytes per thread) of a SASS opcode: kind in load/store/atomic/local/barrier/other."""
    head = op.split(".")[0]
    mods = op.split(".")[1:]
    width = 4
    for m in mods:
        if m in ("128",):
            width = 16
        elif m in ("64",):
            width = 8
        elif m in ("U16", "S16"):
            width = 2
        elif m in ("U8", "S8"):
            width = 1
    if head in ("LDG", "LDGSTS") or (head == "LD" and "E" in mods):
        return "load", width
    if head in ("STG",) or (head == "ST" and "E" in mods):
        return "store", width
    if head in ("ATOMG", "ATOM", "RED", "REDG"):
        return "atomic", width
    if head in ("LDL", "STL"):
        return "local", width
    if head == "BAR":
        return "barrier", 0
    return "other", 0


_PTX_SIZES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4,
              "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


def _ptx_class(op: str) -> tuple[str, int]:
    parts = op.split(".")
    size = next((_PTX_SIZES[p] for p in reversed(parts) if p in _PTX_SIZES), 4)
    vec = next((int(p[1:]) for p in parts if p in ("v2", "v4", "v8")), 1)
    if parts[0] == "ld" and "global" in parts:
        return "load", size * vec
    if parts[0] == "st" and "global" in parts:
        return "store", size * vec
    if parts[0] in ("atom", "red"):
        return "atomic", size
    if parts[0] in ("ld", "st") and "local" in parts:
        return "local", size * vec
    if parts[0] in ("bar", "barrier"):
        return "barrier", 0
    return "other", 0


def hot_region(instrs: list[Instr], labels: dict[str, int], classify) -> tuple[str, list[int], list[tuple[int, int]]]:
    """("loop" or "tile", instruction indices of the hot region, every loop as (start, end))."""
    loops = []
    for i, ins in enumerate(instrs):
        if ins.target is not None and ins.target in labels and labels[ins.target] <= i:
            loops.append((labels[ins.target], i))
    kinds = [classify(ins.op)[0] for ins in instrs]
    first_atomic = next((i for i, k in enumerate(kinds) if k == "atomic"), len(instrs))

    def mem(lo, hi):
        return sum(1 for k in kinds[lo:hi + 1] if k in ("load", "store"))

    candidates = [(lo, hi) for lo, hi in loops if lo < first_atomic and any(k == "load" for k in kinds[lo:hi + 1])]
    if candidates:
        lo, hi = max(candidates, key=lambda r: (mem(*r), -(r[1] - r[0])))
        return "loop", list(range(lo, hi + 1)), loops
    in_loop = set()
    for lo, hi in loops:
        in_loop.update(range(lo, hi + 1))
    end = min(first_atomic + 1, len(instrs))
    return "tile", [i for i in range(end) if i not in in_loop], loops


def analyze(ptx: str, sass: str | None, num_warps: int, elements: int) -> dict[str, Any]:
    """Static figures of one compiled kernel from its SASS (or PTX when there is no disassembler)."""
    if sass:
        instrs, labels = parse_sass(sass)
        classify, isa = _sass_class, "sass"
    else:
        instrs, labels = parse_ptx(ptx)
        classify, isa = _ptx_class, "ptx"
    region, hot, loops = hot_region(instrs, labels, classify)
    hot_set = set(hot)
    loads = [classify(instrs[i].op)[1] for i in hot if classify(instrs[i].op)[0] == "load"]
    stores = [classify(instrs[i].op)[1] for i in hot if classify(instrs[i].op)[0] == "store"]
    barriers = sum(1 for i in hot if classify(instrs[i].op)[0] == "barrier")
    local_all = [i for i, ins in enumerate(instrs) if classify(ins.op)[0] == "local"]
    lanes = 32 * num_warps
    elements = max(1, elements)
    nan_dropping = sorted(set(m.group(0) for m in re.finditer(
        r"\b(?:max|min)(?:\.ftz)?(?:\.xorsign\.abs)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b", ptx)))
    return {
        "isa": isa,
        "hot_region": region,
        "loops": len(loops),
        "hot_instructions": len(hot),
        "elements_per_pass": elements,
        "instructions_per_element": round(len(hot) * num_warps / elements, 3),
        "global_mem_instructions_per_element": round((len(loads) + len(stores)) * num_warps / elements, 3),
        "widest_load_bytes": max(loads, default=0),
        "widest_store_bytes": max(stores, default=0),
        "narrowest_load_bytes": min(loads, default=0),
        "load_bytes_per_pass": sum(loads) * lanes,
        "bytes_per_pass": (sum(loads) + sum(stores)) * lanes,
        "bytes_per_element": round((sum(loads) + sum(stores)) * lanes / elements, 3),
        "barriers_per_iteration": barriers,
        "hot_spill_instructions": sum(1 for i in local_all if i in hot_set),
        "tail_spill_instructions": sum(1 for i in local_all if i not in hot_set),
        "nan_dropping_minmax": nan_dropping,
    }


def occupancy(hw: Hardware, regs: int, smem: int, num_warps: int) -> tuple[int, float, str]:
    """(CTAs per SM, occupancy as a fraction of max warps, the limiting resource)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / hw.reg_alloc_unit) * hw.reg_alloc_unit
    by = {
        "regs": hw.regs_per_sm // (regs_per_warp * num_warps),
        "warps": hw.max_warps_per_sm // num_warps,
        "ctas": hw.max_ctas_per_sm,
        "smem": hw.smem_per_sm // (smem + hw.smem_reserved_per_cta),
    }
    limit = min(by, key=by.get)
    ctas = by[limit]
    return ctas, round(ctas * num_warps / hw.max_warps_per_sm, 3), limit


def predict(hw: Hardware, row: dict) -> dict[str, Any]:
    """Predicted fraction of HBM bandwidth (benchmarks/NOTES.md, "Static model of fastppo inspect").

    One pass of the hot region (a loop iteration, or a whole one-tile program) takes
    t = latency + (hot instructions x CPI + barriers x barrier cycles) / clock for one CTA, its
    loads not overlapping its own compute (no software pipelining survives ptxas).

    Overlapped regime (loop kernels; tile kernels at >= 3 CTAs/SM and >= 4 waves, where resident
    CTAs drift out of phase and one's loads hide another's compute): three bounds, the lowest
    wins: the latency bound (min(programs, CTAs/SM x SMs) CTAs overlap: CTAs x bytes per pass / t),
    the issue bound (4 warp instructions per SM per cycle) and the reachable peak; then the last
    partial wave scales it by waves / ceil(waves).

    Serial regime (one-tile-per-program kernels at 1-2 CTAs/SM or under 4 waves): the CTAs of a
    wave start together and stay in step, so a wave's phases add up instead of overlapping:
    load (latency + the wave's load bytes at the reachable peak), compute (one warp's chain, or
    the SM's issue slots shared by its resident CTAs, whichever is longer), store (the wave's
    store bytes, less what drains behind the next wave's load latency); summed over the waves,
    the last one with its own CTA count. ``predicted_us`` is that launch time for the captured
    program count; the serial finisher and the gaps between launches are not in it.
    """
    ctas = row["ctas_per_sm"]
    programs = row.get("programs") or ctas * hw.sms
    resident_sm = min(ctas, programs / hw.sms)
    t_chain = (row["hot_instructions"] * CPI + row["barriers_per_iteration"] * BARRIER_CYCLES) / hw.clock_hz
    t_pass = hw.latency_s + t_chain
    peak = hw.hbm_bytes_per_s
    concurrent = min(programs, ctas * hw.sms)
    latency_bound = concurrent * row["bytes_per_pass"] / t_pass / peak
    ipe = row["instructions_per_element"]
    issue = (hw.sms * hw.issue_per_sm_per_clock * hw.clock_hz / ipe * row["bytes_per_element"] / peak) if ipe else 1.0
    waves = programs / (ctas * hw.sms) if ctas else 0.0
    tail = waves / math.ceil(waves) if waves > 1 else 1.0
    bounds = {"latency": latency_bound, "issue": issue, "hbm": hw.reachable}
    limiter = min(bounds, key=bounds.get)
    if tail < 0.9:
        limiter += "+tail"
    fraction = bounds[min(bounds, key=bounds.get)] * tail
    out = {
        "bytes_in_flight_per_sm": int(row["load_bytes_per_pass"] * resident_sm),
        "waves": round(waves, 2),
        "pass_us": round(t_pass * 1e6, 3),
        "regime": "overlapped",
        "predicted_us": None,
    }
    if row.get("hot_region") == "tile" and ctas and programs:
        total = programs * row["bytes_per_pass"]
        if ctas <= 2 or waves < 4:
            t = serial_waves_time(hw, row, programs)
            fraction = total / t / peak
            limiter, out["regime"] = "serial phases", "serial"
        else:
            t = total / (fraction * peak)
        out["predicted_us"] = round(t * 1e6, 2)
    out.update({"predicted_hbm_fraction": round(fraction, 3), "limiter": limiter})
    return out


def serial_waves_time(hw: Hardware, row: dict, programs: int) -> float:
    """Seconds for ``programs`` one-tile CTAs whose waves run load, compute and store in step
    (the serial regime of :func:`predict`)."""
    ctas, warps = row["ctas_per_sm"], row["num_warps"]
    per_wave = ctas * hw.sms
    bw = hw.reachable * hw.hbm_bytes_per_s
    load_b = row["load_bytes_per_pass"]
    store_b = row["bytes_per_pass"] - load_b
    chain = row["hot_instructions"] * CPI + row["barriers_per_iteration"] * BARRIER_CYCLES
    total, left = 0.0, programs
    while left > 0:
        n = min(left, per_wave)
        on_sm = math.ceil(n / hw.sms)  # resident CTAs of the busiest SM in this wave
        issue = on_sm * row["hot_instructions"] * warps / hw.issue_per_sm_per_clock
        t_load = hw.latency_s + n * load_b / bw
        t_compute = max(chain, issue) / hw.clock_hz
        t_store = max(0.0, n * store_b / bw - hw.latency_s)
        total += t_load + t_compute + t_store
        left -= n
    return total


# Model constants (benchmarks/NOTES.md): average cycles between dependent-ish warp instructions
# of one warp, and the cost of one CTA barrier (8 warps arriving, shared-memory round trip).
CPI = 2.0
BARRIER_CYCLES = 30


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    vals = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        vals[key] = int(m.group(1)) if m else 0
    return vals


def _disassemble(cubin: bytes) -> str | None:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        for name, cmd in (("nvdisasm", ["-c"]), ("cuobjdump", ["-sass"])):
            tool = _tool(name)
            if tool is None:
                continue
            out = subprocess.run([tool, *cmd, f.name], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout
    return None


def compile_one(item: dict) -> dict:
    """Worker: compile one captured launch; returns the PTX, the SASS and the cubin's resource usage.

    Cached as JSON (``item["cache_file"]``): the analysis runs on the cached text, so changing the
    figures never needs a recompile.
    """
    cache = item.get("cache_file")
    want_sass = item.get("sass", True)
    if cache and os.path.exists(cache):
        try:
            with gzip.open(cache, "rt") as f:
                out = json.load(f)
            out["cached"] = True
            if out.get("sass") is None and _needs_sass(out, want_sass) and out.get("cubin"):
                out["sass"] = _disassemble(base64.b64decode(out["cubin"]))
                _write_cache(cache, out)
            return out
        except (OSError, ValueError, EOFError):
            pass
    t0 = time.time()
    out: dict[str, Any] = {"compiled": False, "error": None, "cached": False}
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.backends.compiler import GPUTarget

        fn = getattr(importlib.import_module(item["module"]), item["kernel"])
        constants = {tuple(p): v for p, v in item["constants"]}
        attrs = {tuple(p): v for p, v in item["attrs"]}
        src = triton.compiler.ASTSource(fn, item["signature"], constants, attrs)
        options = {k: v for k, v in item["options"].items() if v is not None}
        k = triton.compile(src, target=GPUTarget("cuda", HARDWARE[item["target"]].cc, 32), options=options)
        cubin = k.asm["cubin"]
        out.update({
            "compiled": True,
            "ptx": k.asm["ptx"],
            "cubin": base64.b64encode(cubin).decode(),
            "resources": _resource_usage(cubin),
            "metadata_shared": int(getattr(k.metadata, "shared", 0) or 0),
        })
        out["sass"] = _disassemble(cubin) if _needs_sass(out, want_sass) else None
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        out["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
    out["compile_seconds"] = round(time.time() - t0, 2)
    if cache and out["compiled"]:
        _write_cache(cache, out)
    return out


def _needs_sass(out: dict, want_sass: bool) -> bool:
    # Without the SASS figures (CI's --no-sass) the SASS is still read when the cubin has stack
    # or local memory: only the SASS tells a hot-loop spill from a tail one.
    use = out.get("resources") or {}
    return want_sass or bool(use.get("STACK") or use.get("LOCAL"))


def _write_cache(path: str, out: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    with gzip.open(tmp, "wt") as f:
        json.dump({k: v for k, v in out.items() if k != "cached"}, f)
    os.replace(tmp, path)


def read_compiled(out: dict, num_warps: int, elements: int) -> dict:
    """The row's figures from a compile_one result."""
    row: dict[str, Any] = {"compiled": out.get("compiled", False), "error": out.get("error"),
                           "cached": out.get("cached", False), "compile_seconds": out.get("compile_seconds")}
    if not row["compiled"]:
        return row
    use = out.get("resources") or {}
    row.update(analyze(out["ptx"], out.get("sass"), num_warps, elements))
    row.update({
        "registers": use.get("REG"),
        "spill_bytes": use.get("STACK", 0) + use.get("LOCAL", 0),
        "stack_bytes": use.get("STACK", 0),
        "local_bytes": use.get("LOCAL", 0),
        "shared_bytes": max(out.get("metadata_shared", 0), use.get("SHARED", 0)),
    })
    return row


def default_cache_dir() -> str:
    base = os.environ.get("FASTPPO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastppo")
    return os.path.join(base, "inspect")


def _elements(kernel: str, constants: list[tuple[tuple, Any]], arg_names: list[str]) -> int:
    named = {arg_names[p[0]]: v for p, v in constants if len(p) == 1}
    keys = ELEMENTS.get(kernel) or (("BLOCK",) if "BLOCK" in named else ())
    return int(math.prod(int(named.get(k, 1)) for k in keys)) if keys else 1


def inspect_kernels(targets: Iterable[str] = ("sm_90",), families: Iterable[str] = FAMILIES, jobs: int | None = None,
                    cache_dir: str | None = None, progress: Callable[[str], None] | None = None,
                    all_configs: bool = False, one_per_constexpr: bool = False, sass: bool = True) -> list[dict]:
    """Capture, compile and read every configuration; one row (a dict) per (configuration, target).

    Runs in this process, which must not have ``TRITON_INTERPRET`` set (``run`` re-executes).
    """
    import triton

    rows: list[dict] = []
    items: list[tuple[dict, dict]] = []
    for target in targets:
        launches = capture(target, families, progress, all_configs)
        if one_per_constexpr:
            # One launch per (kernel, constexprs, warps): dtype and alignment variants share one.
            merged: dict[tuple, Launch] = {}
            for la in launches:
                k = (la.kernel, repr(la.constants), la.options["num_warps"], la.options["num_stages"])
                if k in merged:
                    merged[k].shapes += [sh for sh in la.shapes if sh not in merged[k].shapes]
                else:
                    merged[k] = la
            launches = list(merged.values())
        for la in launches:
            fn = getattr(importlib.import_module(la.module), la.kernel)
            item = {
                "module": la.module, "kernel": la.kernel, "signature": la.signature,
                "constants": [[list(p), v] for p, v in la.constants],
                "attrs": [[list(p), v] for p, v in la.attrs.items()], "options": la.options,
                "target": target, "elements": _elements(la.kernel, la.constants, fn.arg_names),
                "cache_file": os.path.join(cache_dir, f"{la.key}.json.gz") if cache_dir else None, "sass": sass,
            }
            row = {"kernel": la.kernel, "family": la.family, "config": la.config, "shapes": la.shapes,
                   "target": target, "triton": triton.__version__, "num_warps": la.options["num_warps"],
                   "fp_fusion": bool(la.options["enable_fp_fusion"]), "programs": la.programs, "key": la.key}
            items.append((item, row))
    n = len(items)
    jobs = max(1, min(jobs or (os.cpu_count() or 1), n or 1))
    done = 0

    def finish(item, row, out):
        nonlocal done
        done += 1
        row.update(read_compiled(out, row["num_warps"], item["elements"]))
        hw = HARDWARE[row["target"]]
        if row.get("compiled"):
            ctas, occ, limit = occupancy(hw, row["registers"] or 0, row["shared_bytes"], row["num_warps"])
            row.update({"ctas_per_sm": ctas, "occupancy": occ, "occupancy_limit": limit})
            row.update(predict(hw, row))
        else:
            for k in ("registers", "spill_bytes", "ctas_per_sm", "widest_load_bytes", "instructions_per_element"):
                row.setdefault(k, None)
        if progress:
            state = "cached" if row.get("cached") else ("ok" if row.get("compiled") else "FAILED")
            progress(f"[{done}/{n}] {row['target']} {row['kernel']} {row['config']}: {state} "
                     f"({row.get('compile_seconds', 0):.1f} s)")
        rows.append(row)

    pending = []
    for item, row in items:
        cf = item["cache_file"]
        if cf and os.path.exists(cf):
            finish(item, row, compile_one(item))
        else:
            pending.append((item, row))
    if pending and jobs > 1 and len(pending) > 1:
        import concurrent.futures as cf_mod
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with cf_mod.ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=ctx) as pool:
            futures = {pool.submit(compile_one, item): (item, row) for item, row in pending}
            for fut in cf_mod.as_completed(futures):
                item, row = futures[fut]
                try:
                    out = fut.result()
                except Exception as exc:  # noqa: BLE001 - a crashed worker is a failed row
                    out = {"compiled": False, "error": f"worker: {type(exc).__name__}: {exc}"}
                finish(item, row, out)
    else:
        for item, row in pending:
            finish(item, row, compile_one(item))
    order = {(it["kernel"], r["key"]): i for i, (it, r) in enumerate(items)}
    rows.sort(key=lambda r: (r["target"], r["family"], r["kernel"], order.get((r["kernel"], r["key"]), 0)))
    return rows


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


COLUMNS = (
    ("kernel", "kernel", 20, "s"),
    ("regs", "registers", 4, "d"),
    ("spill", "spill_bytes", 5, "d"),
    ("smem", "shared_bytes", 6, "d"),
    ("CTA/SM", "ctas_per_sm", 6, "d"),
    ("occ", "occupancy", 5, ".2f"),
    ("ldB", "widest_load_bytes", 3, "d"),
    ("stB", "widest_store_bytes", 3, "d"),
    ("gmem/el", "global_mem_instructions_per_element", 7, ".3f"),
    ("ins/el", "instructions_per_element", 7, ".2f"),
    ("bar", "barriers_per_iteration", 3, "d"),
    ("KB/SM", "bytes_in_flight_per_sm", 6, "kb"),
    ("waves", "waves", 6, ".1f"),
    ("HBM%", "predicted_hbm_fraction", 5, "pct"),
)


def _cell(row: dict, key: str, width: int, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        s = "-"
    elif fmt == "kb":
        s = f"{v / 1024:.1f}"
    elif fmt == "pct":
        s = f"{100 * v:.0f}"
    elif fmt == "s":
        s = str(v)[:width]
    else:
        s = format(v, fmt)
    return f"{s:<{width}}" if fmt == "s" else f"{s:>{width}}"


def format_table(rows: list[dict]) -> str:
    head = " ".join(f"{t:<{w}}" if f == "s" else f"{t:>{w}}" for t, _, w, f in COLUMNS) + "  isa  config [shapes]"
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r.get("compiled"):
            lines.append(f"{r['kernel'][:20]:<20} COMPILE FAILED  {r['config']}  [{', '.join(r['shapes'])}]")
            lines.append("    " + (r.get("error") or "").strip().splitlines()[-1][:200] if r.get("error") else "")
            continue
        cells = " ".join(_cell(r, k, w, f) for _, k, w, f in COLUMNS)
        note = ""
        if r.get("hot_spill_instructions"):
            note = " SPILL-IN-LOOP"
        elif r.get("spill_bytes"):
            note = " (tail spill)"
        lines.append(f"{cells}  {r.get('isa', '?'):<4} {r['config']} [{', '.join(r['shapes'])}]{note}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("compiled")]
    failed = len(rows) - len(ok)
    spills = [r for r in ok if r.get("spill_bytes")]
    hot = [r for r in ok if r.get("hot_spill_instructions")]
    nan = [r for r in ok if r.get("nan_dropping_minmax")]
    parts = [f"{len(rows)} configurations, {len(ok)} compiled, {failed} failed",
             f"{len(spills)} with spills ({len(hot)} in a hot loop)", f"{len(nan)} with NaN-dropping max/min"]
    if ok:
        worst = min(ok, key=lambda r: r.get("predicted_hbm_fraction") or 0)
        parts.append(f"lowest predicted HBM fraction: {worst['kernel']} {worst['config']} "
                     f"{100 * (worst.get('predicted_hbm_fraction') or 0):.0f}% ({worst.get('limiter')})")
    return "; ".join(parts)


def _positive_jobs(text: str) -> int:
    from ._args import positive_int

    return positive_int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="sm_90", metavar="SM[,SM]",
                   help="GPU architectures to compile for: sm_90 (H100, default), sm_80 (A100), or both")
    p.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list to FILE")
    p.add_argument("--ops", metavar="FAMILY[,...]", help=f"only these kernel families ({', '.join(FAMILIES)})")
    p.add_argument("--jobs", "-j", type=_positive_jobs, default=None, help="parallel compile processes, >= 1 (default: CPU count)")
    p.add_argument("--cache-dir", default=None, help="result cache (default: $FASTPPO_CACHE_DIR or ~/.cache/fastppo/inspect)")
    p.add_argument("--no-cache", action="store_true", help="recompile everything, read and write no cache")
    p.add_argument("--all-configs", action="store_true",
                   help="also the CI sweep: every tile/chunk/block step and flag set the launchers have")
    p.add_argument("--one-per-constexpr", action="store_true",
                   help="compile one configuration per distinct constexpr/warp combination (what CI does)")
    p.add_argument("--no-sass", action="store_true",
                   help="skip disassembly unless a cubin has stack/local memory (faster; figures from PTX)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")


def _argv(args) -> list[str]:
    out = ["--target", args.target]
    if args.json:
        out += ["--json", os.path.abspath(args.json)]
    if args.ops:
        out += ["--ops", args.ops]
    if args.jobs:
        out += ["--jobs", str(args.jobs)]
    if args.cache_dir:
        out += ["--cache-dir", args.cache_dir]
    if args.no_cache:
        out.append("--no-cache")
    if args.quiet:
        out.append("--quiet")
    if args.all_configs:
        out.append("--all-configs")
    if args.one_per_constexpr:
        out.append("--one-per-constexpr")
    if args.no_sass:
        out.append("--no-sass")
    return out


def main(args) -> int:
    if _interpreter_on() or _interpreted():
        # The kernels must be JITFunctions: run the command again in a clean process.
        return subprocess.call([sys.executable, "-m", "fastppo.inspect", *_argv(args)], env=_clean_env())
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    bad = [t for t in targets if t not in HARDWARE]
    if bad:
        print(f"error: unknown target {', '.join(bad)}; choose from {', '.join(HARDWARE)}", file=sys.stderr)
        return 2
    families = FAMILIES
    if args.ops:
        families = tuple(f.strip() for f in args.ops.split(",") if f.strip())
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            print(f"error: unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
            return 2
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())

    def progress(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    import triton

    t0 = time.time()
    rows = inspect_kernels(targets, families, args.jobs, cache_dir, progress, args.all_configs, args.one_per_constexpr,
                           not args.no_sass)
    fusion, source = fp_fusion_default()
    print(f"fastppo inspect: Triton {triton.__version__}, offline compile for {', '.join(targets)} "
          f"({', '.join(HARDWARE[t].name for t in targets)}); no GPU needed. {time.time() - t0:.0f} s")
    print(f"FP fusion (a * b + c as one FMA) {'on' if fusion else 'off'}: {source}, as a process of yours compiles")
    print(format_table(rows))
    print(summary(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 1 if any(not r.get("compiled") for r in rows) else 0


def _interpreted() -> bool:
    mod = sys.modules.get("fastppo.kernels.logprob")
    return mod is not None and type(mod._logprob_fwd_kernel).__name__ == "InterpretedFunction"


def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastppo inspect", description=__doc__.splitlines()[0])
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
