"""AdamW step time on the CPU: torch's per-tensor loop vs foreach vs fused (issue 22, item 6).

The parameters are those of a small LM at Qwen2's vocabulary: a 151936 x 256 embedding (the
tied head) and ``--layers`` decoder layers of hidden 256 (q, k, v, o 256x256, MLP 256x1024 x3,
two norms), all float32 with random gradients. Each repetition times one step of every
implementation in turn (interleaved, so a change in the machine's load hits all three), at 1 and
at 2 threads. The floor is the memory traffic of one AdamW step (read p, g, m, v; write p, m, v:
28 bytes per parameter) at the copy bandwidth this script measures first. Usage:

    python benchmarks/train_adamw_cpu.py [--layers 4] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_params(layers: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(151936, 256)]
    for _ in range(layers):
        shapes += [(256, 256)] * 4 + [(1024, 256), (1024, 256), (256, 1024), (256,), (256,)]
    shapes.append((256,))
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def copy_bandwidth_gbs() -> float:
    a = torch.empty(64 * 2**20 // 4).normal_()
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9  # read + write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    impls = {"per-tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    print(f"torch {torch.__version__}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        params = {name: make_params(args.layers) for name in impls}
        n = sum(p.numel() for p in params["fused"])
        opts = {name: torch.optim.AdamW(params[name], lr=1e-4, weight_decay=0.01, **kw) for name, kw in impls.items()}
        for opt in opts.values():  # the first step allocates the state
            opt.step()
        bw = copy_bandwidth_gbs()
        floor_ms = 28 * n / (bw * 1e9) * 1e3
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.reps):
            for name, opt in opts.items():
                t = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t)
        print(f"\nthreads {threads}: {len(params['fused'])} tensors, {n / 1e6:.1f} M parameters; copy bandwidth "
              f"{bw:.1f} GB/s, floor {floor_ms:.0f} ms")
        print("| implementation | median ms | min ms | max ms | x per-tensor |")
        print("|---|---|---|---|---|")
        base = statistics.median(times["per-tensor"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {med * 1e3:.0f} | {min(ts) * 1e3:.0f} | {max(ts) * 1e3:.0f} | {base / med:.2f} |")
        # Same numbers: the three copies started from the same weights and took the same steps.
        ref = params["per-tensor"]
        for name in ("foreach", "fused"):
            err = max((a - b).abs().max().item() for a, b in zip(params[name], ref))
            print(f"max |{name} - per-tensor| weight after {args.reps + 1} steps: {err:.2e}")


if __name__ == "__main__":
    main()
