"""Padding-free forwards against padded rows: one `fastppo train` iteration's forward and backward time
and peak memory on the CPU, with response lengths spread from a few tokens to the maximum.

The built-in task with a larger randomly initialised Llama (hidden 256, 4 layers, MLP 768 by default),
``max_new_tokens`` 256 and a stop rule: each response ends with EOS, the batch's lengths spread evenly
over 2..256 tokens (assigned to rows by a hash of the prompt), so about half of a padded batch is
padding, as in RL rollouts whose lengths vary. Sampling is replaced by that rule (generation is not what is measured), the reward is
the built-in sentiment rule, GAE with a critic, one mini-batch per iteration. Each measurement runs in
a fresh process (so its max RSS is its own), packed and padded alternating, ``--rounds`` times; each
process runs one warm-up iteration and ``--iterations`` timed ones. Reported per iteration:

* update: the update phase (actor + critic forward, backward, optimizer step);
* rollout forwards: the no-grad old/reference log-prob and value forwards;
* peak RSS, and the rise of the max RSS over the process after its models were loaded;
* the tokens the forwards computed: padded rows, packed rows, and the real tokens.

Usage: ``python benchmarks/packing_cpu.py [--rounds 3] [--iterations 2] [--batch 16] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512)


def stop_rule_generate(trainer, longest: int):
    """Responses that end with EOS, their lengths spread evenly over 2..``longest`` within each batch
    (so about half of the padded response block is padding) and assigned to rows by a hash of the
    prompt's tokens; the tokens are fixed by the prompt too."""
    import torch

    tok = trainer.tokenizer
    vocab = len(tok)

    def generate(prompt_ids, prompt_mask):
        hashes = []
        for ids, m in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            real = [i for i, k in zip(ids, m) if k]
            hashes.append(sum(i * (j + 3) for j, i in enumerate(real)) * 2654435761 % 2**32)
        b = len(hashes)
        spread = [2 + round(i * (longest - 2) / max(b - 1, 1)) for i in range(b)]
        order = sorted(range(b), key=lambda i: (hashes[i], i))
        rows = [None] * b
        for rank, i in enumerate(order):
            h, length = hashes[i], spread[rank]
            rows[i] = [4 + (h * (t + 1) + t) % (vocab - 4) for t in range(length - 1)] + [tok.eos_token_id]
        width = max(len(r) for r in rows)
        out = torch.full((b, width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = True
        return out.to(prompt_ids.device), mask.to(prompt_ids.device)

    return generate


def child(args) -> None:
    import torch

    from fastppo.train import PPOTrainer, builtin, packing

    cfg = builtin.default_config(model=args.model_dir, dataset=args.prompts, output_dir=args.out, iterations=100,
                                 batch_size=args.batch, mini_batch_size=args.batch, micro_batch_size=args.micro,
                                 max_new_tokens=args.new_tokens, ppo_epochs=1, progress=False, plot=False,
                                 padding_free=args.mode == "packed", num_threads=args.threads, overwrite=True,
                                 max_prompt_length=16)
    trainer = PPOTrainer(cfg)
    trainer.generate = stop_rule_generate(trainer, args.new_tokens)
    tokens = {"padded": 0, "packed": 0, "real": 0}
    build = packing.build_layout

    def counting(seq, attn, pos, width, pad_id):
        lay = build(seq, attn, pos, width, pad_id)
        tokens["packed"] += lay.tokens if lay is not None else seq.numel()
        return lay

    make_batch = trainer.packing.batch

    def counted_batch(seq, attn, pos, width):  # each micro-batch of every phase, once
        tokens["padded"] += seq.numel()
        tokens["real"] += int((attn != 0).sum())
        return make_batch(seq, attn, pos, width)

    packing.build_layout = counting
    trainer.packing.batch = counted_batch
    loss_time = [0.0]
    loss = trainer._loss

    def timed_loss(*a, **k):
        t = time.perf_counter()
        out = loss(*a, **k)
        loss_time[0] += time.perf_counter() - t
        return out

    trainer._loss = timed_loss
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.iteration()  # warm-up
    rows = []
    for _ in range(args.iterations):
        loss_time[0] = 0.0
        for k in tokens:
            tokens[k] = 0
        row = trainer.iteration()
        rows.append({"update": loss_time[0] + row["time_backward"],
                     "rollout_forwards": row["time_forward"] - loss_time[0],
                     "iteration": row["time_iteration"], "score_mean": row["score_mean"],
                     "policy_loss": row["policy_loss"], "value_loss": row["value_loss"], "kl": row["kl"],
                     "response_length": row["response_length"], **tokens})
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps({"mode": args.mode, "rows": rows, "peak_rss_mb": after / 1024,
                                  "rise_mb": (after - before) / 1024, "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", choices=("packed", "padded"))
    ap.add_argument("--model-dir")
    ap.add_argument("--prompts")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return
    from fastppo.train import builtin

    root = tempfile.mkdtemp(prefix="fastppo-pack-")
    model_dir, prompts = builtin.materialize(root, **MODEL)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results: dict[str, list] = {"packed": [], "padded": []}
    for r in range(args.rounds):
        for mode in (("packed", "padded") if r % 2 == 0 else ("padded", "packed")):
            cmd = [sys.executable, __file__, "--child", mode, "--model-dir", model_dir, "--prompts", prompts,
                   "--out", os.path.join(root, f"run-{mode}-{r}"), "--batch", str(args.batch), "--micro",
                   str(args.micro), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
                   "--iterations", str(args.iterations)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            res = json.loads(line[len("RESULT "):])
            results[mode].append(res)
            upd = statistics.median(x["update"] for x in res["rows"])
            print(f"round {r} {mode}: update {upd:.2f} s/it, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    print()
    print("| mode | update s/it (median) | rollout forwards s/it | peak RSS MB | RSS rise MB | tokens computed / "
          "iteration | policy_loss | value_loss | kl |")
    print("|---|---|---|---|---|---|---|---|---|")
    med = {}
    for mode in ("padded", "packed"):
        rows = [x for res in results[mode] for x in res["rows"]]
        med[mode] = statistics.median(x["update"] for x in rows)
        fwd = statistics.median(x["rollout_forwards"] for x in rows)
        peak = statistics.median(res["peak_rss_mb"] for res in results[mode])
        rise = statistics.median(res["rise_mb"] for res in results[mode])
        computed = statistics.median(x["packed" if mode == "packed" else "padded"] for x in rows)
        last = rows[-1]
        print(f"| {mode} | {med[mode]:.2f} | {fwd:.2f} | {peak:.0f} | {rise:.0f} | {computed:.0f} | "
              f"{last['policy_loss']:.6g} | {last['value_loss']:.6g} | {last['kl']:.6g} |")
    rows = [x for res in results["packed"] for x in res["rows"]]
    padded = sum(x["padded"] for x in rows)
    print()
    print(f"pad share of the padded rows: {1 - sum(x['real'] for x in rows) / padded:.1%}; "
          f"removed by packing: {1 - sum(x['packed'] for x in rows) / padded:.1%} of the padded tokens; "
          f"update speed-up {med['padded'] / med['packed']:.2f}x "
          f"(threads {args.threads}, rounds {args.rounds}, iterations {args.iterations} per process)")


if __name__ == "__main__":
    main()
