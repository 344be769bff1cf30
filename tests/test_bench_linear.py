"""`fastppo bench --ops linear_logprobs --quick` on the CPU: the numbers it reports are sane.

No timing assertions (timing belongs in benchmarks/): only that every implementation that can run
on a CPU reports a positive time, TFLOP/s against a matmul peak measured in the same run, a peak
memory and its ratios against the logits path, and that the others are skipped with a note.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastppo import bench
from fastppo.cli import main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU table (a GPU runs the full grid)")

RUN_ON_CPU = ("fastppo", "logits", "torch", "trl", "liger", "torch-lce")  # trl, liger, torch-lce: when there
GPU_ONLY = ("chunked", "liger-flce", "verl")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "linear.json"
    assert main(["bench", "--quick", "--ops", "linear_logprobs", "--reps", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _installed(impl: str) -> bool:
    return {"trl": bench._installed("trl"), "liger": bench._installed("liger_kernel"),
            "torch-lce": hasattr(torch.nn.functional, "linear_cross_entropy")}.get(impl, True)


def test_every_case_and_implementation_is_reported(report):
    rows = report["results"]
    cases = [c for c in bench.build_cases(on_gpu=False, quick=True) if c.op == "linear_logprobs"]
    assert {c.mode for c in cases} == {"fwd", "fwd+bwd"}
    assert len(rows) == sum(len(c.impls) for c in cases)
    assert {r["impl"] for r in rows} == set(bench.LINEAR_IMPLS)
    assert report["linear_mem_method"] == "peak-rss-subprocess"
    (peak,) = report["matmul_peaks"]
    assert peak["median_ms"] > 0 and peak["tflops"] > 0


def test_numbers_are_sane(report):
    N, H, V = bench.CPU_LINEAR_QUICK
    for r in report["results"]:
        if r["impl"] not in RUN_ON_CPU or not _installed(r["impl"]):
            continue
        what = f"{r['mode']} {r['impl']}: {r['note']}"
        assert r["median_ms"] is not None and r["median_ms"] > 0, what
        flops = 2 * N * H * V * (3 if r["mode"] == "fwd+bwd" else 1)
        assert math.isclose(r["tflops"], flops / (r["median_ms"] * 1e-3) / 1e12, rel_tol=1e-9), what
        assert r["matmul_tflops"] > 0 and r["pct_matmul_peak"] > 0, what
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0, what
        assert r["mem_method"] == "peak-rss-subprocess", what
        assert r["time_vs_logits"] > 0 and r["mem_vs_logits"] is not None, what
        assert r["note"], what
    for mode in ("fwd", "fwd+bwd"):
        logits = next(r for r in report["results"] if r["mode"] == mode and r["impl"] == "logits")
        assert logits["time_vs_logits"] == 1.0 and logits["mem_vs_logits"] == 1.0
        # The [N, V] float32 logits alone are N * V * 4 bytes; the logits path holds at least them.
        assert logits["peak_mem_mb"] >= N * V * 4 / 2**20


def test_unavailable_peers_are_skipped_with_a_note(report):
    for r in report["results"]:
        if r["impl"] in GPU_ONLY or not _installed(r["impl"]):
            assert r["median_ms"] is None and r["tflops"] is None and r["time_vs_logits"] is None, r
            assert r["note"], r


def test_other_ops_rows_keep_their_fields(tmp_path):
    out = tmp_path / "gae.json"
    assert main(["bench", "--quick", "--ops", "gae", "--reps", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"] and not any(set(bench.LINEAR_FIELDS) & set(r) for r in data["results"])
    assert "matmul_peaks" not in data


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_torch_lce_baseline_computes_the_logprobs(rng, temperature):
    """The torch-lce row times the right math: log-probs (and d hidden, d weight) equal to the
    float64 ground truth of the same inputs, over several of its row chunks."""
    from fastppo import groundtruth
    from helpers import TOL, assert_close

    fn, note = bench._linear_impl("torch-lce", on_gpu=False)
    if fn is None:
        pytest.skip(note)
    assert "batch_chunk_size=256" in note
    N, H, V = 600, 8, 37  # 600 rows: three chunks of 256, the last one short
    hidden = torch.randn(N, H, generator=rng).requires_grad_()
    weight = torch.randn(V, H, generator=rng).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=rng)
    g = torch.randn(N, generator=rng)
    lp = fn(hidden, weight, labels, temperature=temperature, return_entropy=True)
    (lp * g).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = groundtruth.linear_logprobs(h64, w64, labels, temperature=temperature)
    (want * g.double()).sum().backward()
    assert lp.shape == (N,) and lp.dtype == torch.float32
    assert_close(lp, want, TOL[torch.float32], "log-probs")
    assert_close(hidden.grad, h64.grad, TOL[torch.float32], "d hidden")
    assert_close(weight.grad, w64.grad, TOL[torch.float32], "d weight")
