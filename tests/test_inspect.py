"""``fastppo inspect`` in CI: every kernel configuration the launchers pick compiles for sm_90 with
the installed Triton, nothing spills in a hot loop, and no kernel's PTX holds a NaN-dropping
``max.f32`` / ``min.f32``.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (conftest sets it for the
interpreter tests), over the representative shapes plus the CI sweep (``--all-configs``), one
configuration per distinct constexpr/block/warp combination (``--one-per-constexpr``). Results
are cached under ``FASTPPO_CACHE_DIR`` (default ``~/.cache/fastppo/inspect``) by kernel source
hash, so a rerun without kernel changes takes seconds; a cold run about 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastppo import inspect as fi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {
    "_logprob_fwd_kernel", "_logprob_bwd_kernel", "_kl_kernel", "_kl_bwd_kernel", "_summary_kernel",
    "_finalize_kernel", "_ppo_fwd_kernel", "_ppo_bwd_kernel", "_fold_fwd_kernel", "_dlogits_kernel",
    "_tok_fwd_kernel", "_tok_bwd_kernel",
    "_seq_fwd_kernel", "_seq_bwd_kernel",
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    pytest.importorskip("triton.backends.compiler")
    pytest.importorskip("triton.knobs")
    out = tmp_path_factory.mktemp("inspect") / "rows.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "fastppo.inspect", "--all-configs", "--one-per-constexpr", "--no-sass", "--json", str(out), "-q"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-20000:])
    assert out.exists(), f"inspect wrote no JSON (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
    with open(out) as f:
        return json.load(f)


def _name(r):
    return f"{r['kernel']} {r['config']} {r['shapes']}"


def test_every_configuration_compiles_for_sm90(rows):
    assert {r["kernel"] for r in rows} >= KERNELS
    failed = [f"{_name(r)}: {r.get('error')}" for r in rows if not r["compiled"]]
    assert not failed, "\n".join(failed)
    for r in rows:
        assert r["target"] == "sm_90"
        for key in ("kernel", "config", "target", "triton", "registers", "spill_bytes", "ctas_per_sm",
                    "widest_load_bytes", "instructions_per_element", "compiled", "error"):
            assert key in r, (key, _name(r))
        assert r["registers"] and r["ctas_per_sm"] >= 1, _name(r)


def test_every_group_estimator_compiles(rows):
    """kernels/group_advantage.py: one _group_stats_kernel variant per estimator (EST 0-5: grpo,
    centred (dr_grpo, gpg), rloo, grpo_passk with and without std, opo), issue 19."""
    ests = {part for r in rows if r["kernel"] == "_group_stats_kernel" for part in r["config"].split()
            if part.startswith("EST=")}
    assert ests >= {f"EST={e}" for e in range(6)}, sorted(ests)


def test_no_spill_in_a_hot_loop(rows):
    hot = [f"{_name(r)}: {r['hot_spill_instructions']} local loads/stores in the hot {r['hot_region']}"
           for r in rows if r["compiled"] and r["hot_spill_instructions"]]
    assert not hot, "\n".join(hot)
    # Stack or local memory anywhere else must be a known tail spill, with its reason.
    tail = []
    for r in rows:
        if r["compiled"] and r["spill_bytes"]:
            known = [why for (k, part), why in fi.KNOWN_TAIL_SPILLS.items() if k == r["kernel"] and part in r["config"]]
            if not known:
                tail.append(f"{_name(r)}: {r['spill_bytes']} B of stack/local outside the hot loop")
    assert not tail, "\n".join(tail)


def test_no_nan_dropping_max_min_in_any_ptx(rows):
    bad = [f"{_name(r)}: {r['nan_dropping_minmax']}" for r in rows if r["compiled"] and r["nan_dropping_minmax"]]
    assert not bad, "\n".join(bad)


def test_hot_loads_are_wide_where_rows_are_aligned(rows):
    # The streaming kernels load 16 bytes per instruction when the row length is a multiple of 16.
    # The logprob kernels peel an unaligned head and tail off each row, so they do at any V
    # (50257 included), and the backward's stores too when the gradient rows are laid out alike.
    for r in rows:
        if r["kernel"] in ("_logprob_fwd_kernel", "_logprob_bwd_kernel", "_fold_fwd_kernel", "_kl_kernel") \
                and ("unaligned" not in r["config"] or r["kernel"].startswith("_logprob")) \
                and r["elements_per_pass"] >= 256:
            assert r["widest_load_bytes"] == 16, _name(r)
        if r["kernel"] == "_logprob_bwd_kernel":
            # A new gradient is laid out at the logits' alignment (the [:, :-1] view of odd-V
            # logits included), so the stores are as wide as the loads.
            assert "GRAD_ALIGNED=1" in r["config"], _name(r)
            if r["elements_per_pass"] >= 256:
                assert r["widest_store_bytes"] == 16, _name(r)


def test_the_sliced_view_is_inspected(rows):
    view = [r for r in rows if r["kernel"] == "_logprob_bwd_kernel" and any("[:, :-1]" in sh for sh in r["shapes"])]
    assert any("50257" in sh for r in view for sh in r["shapes"])
    for r in view:
        assert r["widest_store_bytes"] == 16 and r["barriers_per_iteration"] == 0, _name(r)


def test_rows_record_the_fp_fusion_a_user_process_gets(rows):
    expected, _ = fi.fp_fusion_default()
    assert {r["fp_fusion"] for r in rows} == {expected}


# ---- capture only (no compile) -------------------------------------------------------------------

_SWEEP = r"""
import json, sys
from fastppo import inspect as fi
lengths = [1, 17, 32, 100, 255, 257]
out = {op: {k: len(v) for k, v in fi.specializations(fi.length_sweep(lengths, ops=(op,))).items()}
       for op in ("view", "flat")}
keys = set().union(*fi.specializations(fi.length_sweep([5], ops=("flat",))).values())
out["fusion"] = sorted({json.loads(k)[-1]["enable_fp_fusion"] for k in keys})
out["default"] = fi.fp_fusion_default()[0]
print(json.dumps(out))
"""


def _sweep(**env_set):
    pytest.importorskip("triton.knobs")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("TRITON_DEFAULT_FP_FUSION", None)
    env.update(env_set)
    proc = subprocess.run([sys.executable, "-c", _SWEEP], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_response_lengths_compile_one_logprob_variant_and_fp_fusion_is_not_forced():
    """T = 1, 17, 32, 100, 255, 257 (a [:, :-1] view's batch stride (T + 1) * V is 16-divisible at
    T = 255, the flat rows B * T at T = 32): one specialization of each logprob kernel per call
    kind, so a run whose response lengths vary compiles them once. The launches carry Triton's own
    FP fusion default unless TRITON_DEFAULT_FP_FUSION says otherwise."""
    out = _sweep()
    one = {"_logprob_fwd_kernel": 1, "_logprob_bwd_kernel": 1}
    assert out["view"] == one and out["flat"] == one, out
    assert out["fusion"] == [out["default"]]
    off = _sweep(TRITON_DEFAULT_FP_FUSION="0")
    assert off["fusion"] == [False] and off["default"] is False


# ---- pure functions (no compile) ----------------------------------------------------------------

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   FADD R8, R4, R5 ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/                   STL [R1], R8 ;
        /*0050*/              @P1 BRA `(.L_x_1) ;
        /*0060*/                   STG.E.U16 desc[UR4][R2.64], R8 ;
        /*0070*/                   ATOMG.E.ADD.STRONG.GPU PT, R9, desc[UR4][R2.64], R10 ;
        /*0080*/                   LDL R8, [R1] ;
        /*0090*/                   EXIT ;
"""


def test_sass_analysis_finds_the_loop_its_loads_and_its_spills():
    a = fi.analyze("", SASS, num_warps=4, elements=512)
    assert a["isa"] == "sass" and a["hot_region"] == "loop" and a["hot_instructions"] == 5
    assert a["widest_load_bytes"] == 16 and a["widest_store_bytes"] == 0
    assert a["barriers_per_iteration"] == 1
    assert a["hot_spill_instructions"] == 1 and a["tail_spill_instructions"] == 1
    assert a["instructions_per_element"] == pytest.approx(5 * 4 / 512, abs=1e-3)


def test_ptx_fallback_and_nan_dropping_detection():
    ptx = """.entry k(
)
{
$L__BB0_1:
	ld.global.v4.b32 	{%r1, %r2, %r3, %r4}, [%rd1];
	max.NaN.f32 	%f1, %f2, %f3;
	@%p1 bra 	$L__BB0_1;
	st.global.b16 	[%rd2], %rs1;
	max.f32 	%f4, %f5, %f6;
	ret;
}"""
    a = fi.analyze(ptx, None, num_warps=1, elements=128)
    assert a["isa"] == "ptx" and a["hot_region"] == "loop" and a["widest_load_bytes"] == 16
    assert a["nan_dropping_minmax"] == ["max.f32"]


def test_occupancy_h100():
    hw = fi.HARDWARE["sm_90"]
    assert fi.occupancy(hw, 32, 0, 8)[0] == 8  # warps: 64 / 8
    assert fi.occupancy(hw, 128, 0, 8)[0] == 2  # registers: 65536 / (128 * 256)
    assert fi.occupancy(hw, 255, 0, 4)[0] == 2  # 255 -> 256 per thread, 8192 per warp
    assert fi.occupancy(hw, 32, 100 * 1024, 4)[0] == 2  # shared memory


def _tile_row(ctas, programs, warps=4, hot=100, barriers=2, load=40000, store=40000, elements=1024):
    return {"hot_region": "tile", "ctas_per_sm": ctas, "programs": programs, "num_warps": warps,
            "hot_instructions": hot, "barriers_per_iteration": barriers, "load_bytes_per_pass": load,
            "bytes_per_pass": load + store, "instructions_per_element": hot * warps / elements,
            "bytes_per_element": (load + store) / elements}


def test_tile_kernels_at_low_occupancy_add_their_phases():
    """1 CTA/SM, 2 waves: each wave loads (latency + its bytes at 92% of 3.35 TB/s), computes
    (100 instructions x 2 cycles + 2 barriers x 30 cycles at 1.755 GHz; one CTA's 4 warps do not
    fill the issue slots) and stores (its bytes, less the 0.6 us that drain behind the next
    wave's load latency), one after the other. The old model took the lowest of three
    bandwidth bounds as if the phases overlapped: ~6.9 us for these 21 MB."""
    hw = fi.HARDWARE["sm_90"]
    bw = 0.92 * 3.35e12
    wave = 0.6e-6 + 132 * 40000 / bw + (100 * 2 + 2 * 30) / 1.755e9 + (132 * 40000 / bw - 0.6e-6)
    p = fi.predict(hw, _tile_row(1, 264))
    assert p["regime"] == "serial"
    assert p["predicted_us"] == pytest.approx(2 * wave * 1e6, abs=0.01)
    assert p["predicted_hbm_fraction"] == pytest.approx(264 * 80000 / (2 * wave) / 3.35e12, abs=1e-3)
    # 2 CTAs/SM of 16 warps: the SM's 4 schedulers, shared, bound the compute phase.
    p2 = fi.predict(hw, _tile_row(2, 264, warps=16, hot=800, barriers=0, store=0))
    assert p2["predicted_us"] == pytest.approx((0.6e-6 + 264 * 40000 / bw + 2 * 800 * 16 / 4 / 1.755e9) * 1e6, abs=0.01)
    # 4 CTAs/SM over 8 waves: resident CTAs overlap; the lowest of the three bounds.
    p3 = fi.predict(hw, _tile_row(4, 8 * 4 * 132))
    assert p3["regime"] == "overlapped"
    assert p3["predicted_us"] == pytest.approx(8 * 4 * 132 * 80000 / (p3["predicted_hbm_fraction"] * 3.35e12) * 1e6,
                                               rel=2e-3)


def test_cli_registers_inspect():
    from fastppo.cli import build_parser

    args = build_parser().parse_args(["inspect", "--target", "sm_80", "--json", "x.json", "--ops", "loss"])
    assert args.command == "inspect" and args.target == "sm_80" and args.json == "x.json"
