"""CPU measurement: forward + backward through the compiled custom op against the eager op.

    .venv/bin/python benchmarks/compile_backward_cpu.py [--reps 7] [--no-entropy] [--json out.json]

For each case one forward + backward of ``(lp * c1 + entropy * c2).sum()`` is timed eagerly
(``fastppo.<op>`` outside tracing: the op's own autograd) and through
``torch.compile(fullgraph=True, backend="aot_eager")`` (``fastppo::<op>`` and
``fastppo::<op>_backward``, no code generation, so the difference is the op path itself). The
figure is the ratio of the medians, compiled / eager; eager and compiled runs alternate so that
a noisy neighbour hits both alike. Cases (float32, all rows valid):

* ``logprobs_from_logits`` N = 2048, V = 8192, reference backend (``torch``);
* ``linear_logprobs`` N = 512, H = 256, V = 8192, ``auto`` (the chunked CPU path) and
  ``torch`` (the full-logits reference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastppo


def _cases(with_entropy: bool):
    gen = torch.Generator().manual_seed(0)
    N, V = 2048, 8192
    logits = (torch.randn(N, V, generator=gen) * 3).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    yield ("logprobs_from_logits N=2048 V=8192", "torch",
           lambda: fastppo.logprobs_from_logits(logits, labels, temperature=0.9, return_entropy=with_entropy),
           N)
    N, H = 512, 256
    hidden = torch.randn(N, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    labels2 = torch.randint(0, V, (N,), generator=gen)
    for backend in ("auto", "torch"):
        yield ("linear_logprobs N=512 H=256 V=8192", backend,
               lambda: fastppo.linear_logprobs(hidden, weight, labels2, temperature=0.9, return_entropy=with_entropy),
               N)


def _timed(fn, c1, c2) -> float:
    start = time.perf_counter()
    out = fn()
    lp, ent = out if isinstance(out, tuple) else (out, None)
    loss = (lp * c1).sum() if ent is None else (lp * c1 + ent * c2).sum()
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-entropy", action="store_true", help="log-probs only (return_entropy=False)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with_entropy = not args.no_entropy
    results = []
    for name, backend, call, n in _cases(with_entropy):
        gen = torch.Generator().manual_seed(1)
        c1, c2 = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        torch._dynamo.reset()
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
        eager_t, compiled_t = [], []
        with fastppo.use_backend(backend):
            _timed(call, c1, c2)  # warm-up (and, for compiled, the trace)
            _timed(compiled, c1, c2)
            for _ in range(args.reps):
                eager_t.append(_timed(call, c1, c2))
                compiled_t.append(_timed(compiled, c1, c2))
        row = dict(case=name, backend=backend, entropy=with_entropy, eager_s=statistics.median(eager_t),
                   compiled_s=statistics.median(compiled_t), threads=torch.get_num_threads())
        row["ratio"] = row["compiled_s"] / row["eager_s"]
        results.append(row)
        print(f"{name:40s} {backend:6s} eager {row['eager_s'] * 1e3:8.1f} ms"
              f"  compiled {row['compiled_s'] * 1e3:8.1f} ms  ratio {row['ratio']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
