"""CPU measurement for issue 10: ``fastppo.linear_logprobs`` against the full-logits path.

    .venv/bin/python benchmarks/linear_cpu.py [--N 2048 --H 256 --V 151936] [--chunk-size C] [--reps 3]

Both variants compute fp32 log-probs and entropy of N tokens from hidden states and a [V, H] head
and backpropagate into hidden and weight:

* ``full``:    ``logits = hidden @ weight.T`` then ``fastppo.logprobs_from_logits`` (auto: the
               PyTorch path on CPU), i.e. the [N, V] logits and their gradient exist;
* ``chunked``: ``fastppo.linear_logprobs`` (auto: the chunked CPU path of fastppo/linear.py).

Each variant runs in a fresh subprocess. PyTorch keeps no allocator statistics on CPU, so peak
memory is the process's peak resident set (VmHWM): the inputs are built and touched, the peak is
reset (``/proc/self/clear_refs`` = 5), one forward + backward runs, and the extra peak is VmHWM
minus the resident set before it. Both variants allocate the same gradients (d hidden, d weight),
which are part of both figures. Time: the median of ``--reps`` further forward + backward runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MiB = 1024**2


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _child(args) -> dict:
    import torch

    import fastppo

    torch.manual_seed(0)
    N, H, V = args.N, args.H, args.V
    hidden = torch.randn(N, H).requires_grad_(True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_(True)
    labels = torch.randint(0, V, (N,))
    c_lp, c_ent = torch.randn(N), torch.randn(N)

    def step():
        if args.variant == "full":
            logits = hidden @ weight.T
            lp, ent = fastppo.logprobs_from_logits(logits, labels, return_entropy=True)
        else:
            lp, ent = fastppo.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=args.chunk_size)
        (lp * c_lp + ent * c_ent).sum().backward()
        hidden.grad = None
        weight.grad = None

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    base = _status("VmRSS")
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = _status("VmHWM")
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "extra_peak_mib": (peak - base) / MiB,
        "first_s": first,
        "median_s": statistics.median(times),
        "times_s": times,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", type=int, default=2048)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--V", type=int, default=151936)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variant", choices=("full", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_child(args)))
        return 0
    results = {}
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--N", str(args.N), "--H", str(args.H),
               "--V", str(args.V), "--reps", str(args.reps)]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FASTPPO_BACKEND": "auto"})
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    print(f"N={args.N} H={args.H} V={args.V} fp32, forward + backward with entropy, "
          f"{full['threads']} torch threads, median of {args.reps}")
    print(f"{'variant':<10} {'extra peak MiB':>15} {'first s':>9} {'median s':>9}")
    for r in (full, chunked):
        print(f"{r['variant']:<10} {r['extra_peak_mib']:>15.1f} {r['first_s']:>9.3f} {r['median_s']:>9.3f}")
    mem = chunked["extra_peak_mib"] / full["extra_peak_mib"]
    tim = chunked["median_s"] / full["median_s"]
    print(f"chunked / full: memory {mem:.3f} (target <= 0.25), time {tim:.2f}x (target <= 1.5x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results, "memory_ratio": mem, "time_ratio": tim}, fh, indent=1)
    return 0 if (mem <= 0.25 and tim <= 1.5) else 1


if __name__ == "__main__":
    sys.exit(main())
