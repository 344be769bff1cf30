"""Every op and implementation of `fastppo bench`, as pytest-benchmark cases."""

from __future__ import annotations

import pytest
import torch

from fastppo import bench

ON_GPU = torch.cuda.is_available()
CASES = bench.build_cases(ON_GPU, quick=not ON_GPU)
PARAMS = [
    pytest.param(case, impl, id=f"{case.op}-{case.mode}-{case.shape.replace(' ', '-')}-{str(case.dtype)[6:]}-{impl}")
    for case in CASES
    # linear_logprobs: also a plain torch.mm of the same shape, the matmul peak of this run
    for impl in (("torch.mm",) if case.op == "linear_logprobs" and case.mode == "fwd" else ()) + case.impls
]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_bench(benchmark, case, impl):
    fn, note = bench._implementation(case, impl, ON_GPU)
    if fn is None:
        pytest.skip(note)
    if case.mode == "fwd+bwd" and impl == "torch-vectorized":
        pytest.skip("forward only")
    device = "cuda" if ON_GPU else "cpu"
    args, kwargs, leaves = case.make(device)
    step = bench._step(fn, args, kwargs, leaves, case.mode)

    def run():
        step()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update(bytes_floor=case.bytes_floor, dtype=str(case.dtype), shape=case.shape)
    if case.op == "linear_logprobs":  # matmul bound: TFLOP/s = flops / time
        benchmark.extra_info.update(flops=bench.linear_flops(case))
    benchmark.pedantic(run, rounds=20 if ON_GPU else 3, warmup_rounds=1)
