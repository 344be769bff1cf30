"""CPU measurement for issue 10: ``fastppo.linear_logprobs`` against the full-logits path.

    .venv/bin/python benchmarks/linear_cpu.py [--N 2048 --H 256 --V 151936] [--chunk-size C] [--reps 3]

Both variants compute fp32 log-probs and entropy of N tokens from hidden states and a [V, H] head
and backpropagate into hidden and weight:

* ``full``:    ``logits = hidden @ weight.T`` then ``fastppo.logprobs_from_logits`` (auto: the
               PyTorch path on CPU), i.e. the [N, V] logits and their gradient exist;
* ``chunked``: ``fastppo.linear_logprobs`` (auto: the chunked CPU path of fastppo/linear.py).

``--heads`` (issue 20) compares instead, at a frozen head unless named otherwise, interleaved
round by round (``--rounds``; each round runs every variant once, in a fresh subprocess, so a
burst of load on the shared machine hits all of them alike; medians over the rounds):

* ``frozen``:      ``fastppo.linear_logprobs``, head without gradient: the frozen-head path
                   (two vocabulary matmuls, three with entropy; no vocabulary matmul in backward);
* ``recompute``:   the same call with ``fastppo.linear.FROZEN_HEAD_PATH = False``: the
                   recomputing backward that a frozen head took before issue 20 (three matmuls);
* ``trainable``:   ``fastppo.linear_logprobs`` with a head that requires grad (d weight too);
* ``trl``:         TRL's ``trl.kernels.ChunkedLogProbFunction`` (torch ops on CPU), with the
                   chunk its trainer uses (``_CHUNKED_LOGPROB_CHUNK_SIZE``);
* ``torch-lce``:   PyTorch's ``F.linear_cross_entropy(..., reduction="none")`` with
                   ``LinearCrossEntropyOptions(batch_chunk_size=256)`` (its ``"auto"`` chunking
                   ran 30x slower than the unchunked call on this CPU), log-probs only;
* ``ppo-frozen``:  ``fastppo.linear_ppo_loss`` (clipped loss from hidden states, frozen head;
                   with ``--entropy`` an entropy bonus ``ent_coef=0.01`` in the loss).

Without ``--entropy`` every variant computes log-probs only; with it, entropy too (torch-lce has
none and is left out).

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

    if args.variant in HEAD_VARIANTS:
        return _child_heads(args)

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


HEAD_VARIANTS = ("frozen", "recompute", "trainable", "trl", "torch-lce", "ppo-frozen")


def _child_heads(args) -> dict:
    import torch

    import fastppo
    from fastppo import linear

    torch.manual_seed(0)
    N, H, V, v = args.N, args.H, args.V, args.variant
    hidden = torch.randn(N, H).requires_grad_(True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_(v == "trainable")
    labels = torch.randint(0, V, (N,))
    c_lp, c_ent = torch.randn(N), torch.randn(N)
    linear.FROZEN_HEAD_PATH = v != "recompute"
    if v == "trl":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        outputs = ("entropy",) if args.entropy else ()

        def op():
            lp, ent, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                       None, 1.0, outputs)
            return lp, ent
    elif v == "torch-lce":
        opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=256, chunking_method=None)

        def op():
            loss = torch.nn.functional.linear_cross_entropy(hidden, weight, labels, reduction="none", options=opts)
            return -loss, None
    elif v == "ppo-frozen":
        old_lp, adv = torch.randn(1, N) - 12.0, torch.randn(1, N)
        mask = torch.ones(1, N, dtype=torch.bool)

        def op():
            # The clipped loss from hidden states ([B, T, H]: one row of N tokens); with --entropy
            # its entropy bonus is in the loss.
            loss, _ = fastppo.linear_ppo_loss(hidden.view(1, N, H), weight, labels.view(1, N), old_logprobs=old_lp,
                                              advantages=adv, mask=mask,
                                              ent_coef=0.01 if args.entropy else 0.0, chunk_size=args.chunk_size)
            return loss, None
    else:

        def op():
            out = fastppo.linear_logprobs(hidden, weight, labels, return_entropy=args.entropy, chunk_size=args.chunk_size)
            return out if args.entropy else (out, None)

    def step():
        lp, ent = op()
        loss = lp if lp.dim() == 0 else (lp * c_lp).sum()
        if ent is not None:
            loss = loss + (ent * c_ent).sum()
        loss.backward()
        hidden.grad = None
        weight.grad = None

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status("VmRSS")
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = _status("VmHWM")
    times, cpu = [], []
    for _ in range(args.reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"variant": v, "extra_peak_mib": (peak - base) / MiB, "first_s": first, "times_s": times, "cpu_s": cpu,
            "threads": torch.get_num_threads()}


def _load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def main_heads(args) -> int:
    variants = [v for v in (args.variants.split(",") if args.variants else HEAD_VARIANTS)
                if not (args.entropy and v == "torch-lce")]
    runs = {v: [] for v in variants}
    loads = [_load()]
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # no variant always runs first
        for v in order:
            cmd = [sys.executable, __file__, "--variant", v, "--N", str(args.N), "--H", str(args.H), "--V", str(args.V),
                   "--reps", str(args.reps)] + (["--entropy"] if args.entropy else [])
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FASTPPO_BACKEND": "auto"})
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {v}: {runs[v][-1]['times_s']}", file=sys.stderr, flush=True)
        loads.append(_load())
    what = "log-probs and entropy" if args.entropy else "log-probs"
    print(f"N={args.N} H={args.H} V={args.V} fp32, forward + backward of {what}, {runs[variants[0]][0]['threads']} "
          f"torch threads, {args.rounds} interleaved rounds x {args.reps} reps (median), load average {' -> '.join(loads)}")
    # Wall time swings with the other jobs on the machine; the process's CPU time (both threads)
    # much less. Ratios: the median over rounds of this round's time / the baseline's in the same
    # round (neighbours in time, so under about the same load).
    print(f"{'variant':<10} {'extra peak MiB':>15} {'wall s':>8} {'CPU s':>8} {'wall/trainable':>15} "
          f"{'wall/recompute':>15} {'CPU/trainable':>14} {'CPU/recompute':>14}")
    med = {v: statistics.median(t for run in runs[v] for t in run["times_s"]) for v in variants}
    cpu = {v: statistics.median(t for run in runs[v] for t in run["cpu_s"]) for v in variants}
    mem = {v: statistics.median(run["extra_peak_mib"] for run in runs[v]) for v in variants}

    def paired(v, base, key):
        return statistics.median(statistics.median(a[key]) / statistics.median(b[key])
                                 for a, b in zip(runs[v], runs[base]))

    ratios = {v: {f"{key}/{base}": paired(v, base, key) for key in ("times_s", "cpu_s")
                  for base in ("trainable", "recompute")} for v in variants}
    for v in variants:
        r = ratios[v]
        print(f"{v:<10} {mem[v]:>15.1f} {med[v]:>8.2f} {cpu[v]:>8.2f} {r['times_s/trainable']:>15.2f} "
              f"{r['times_s/recompute']:>15.2f} {r['cpu_s/trainable']:>14.2f} {r['cpu_s/recompute']:>14.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": runs, "median_s": med, "median_cpu_s": cpu, "extra_peak_mib": mem,
                       "paired_ratios": ratios, "load": loads}, fh, indent=1)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", type=int, default=2048)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--V", type=int, default=151936)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--heads", action="store_true", help="frozen vs trainable head vs TRL vs torch (issue 20)")
    parser.add_argument("--entropy", action="store_true", help="--heads: entropy too")
    parser.add_argument("--rounds", type=int, default=3, help="--heads: interleaved rounds")
    parser.add_argument("--variants", help="--heads: comma-separated subset (default: all; the ratios need "
                        "trainable and recompute)")
    parser.add_argument("--variant", choices=("full", "chunked") + HEAD_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_child(args)))
        return 0
    if args.heads:
        return main_heads(args)
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
