"""Peak memory of one `fastppo train` iteration with a 152k vocabulary, fused head vs logits (CPU).

Each variant runs in a fresh process: the built-in task, its tokenizer, and a tiny Llama whose
vocabulary is widened to 151936 (Qwen2's), so the logits dominate memory as they do in real
models. The figure is the rise of the process's peak resident set size (max RSS) during a
training run of two iterations over what the process held once the models were loaded. Usage:

    python benchmarks/train_memory_cpu.py [--vocab 151936] [--batch 16] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def child(model_dir: str, prompts: str, out: str, fused: bool, batch: int, new_tokens: int) -> None:
    import torch

    from fastppo.train import PPOTrainer, builtin

    cfg = builtin.default_config(model=model_dir, dataset=prompts, output_dir=out, iterations=2, batch_size=batch,
                                 mini_batch_size=batch, micro_batch_size=batch, max_new_tokens=new_tokens,
                                 ppo_epochs=1, progress=False, plot=False,
                                 fused_head=fused)
    trainer = PPOTrainer(cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # models loaded, nothing run
    trainer.iteration()
    row = trainer.iteration()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"fused": fused, "rise_mb": (after - before) / 1024, "peak_rss_mb": after / 1024,
                      "score_mean": row["score_mean"], "kl": row["kl"], "time_iteration": row["time_iteration"],
                      "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    from fastppo.train import builtin

    root = tempfile.mkdtemp(prefix="fastppo-mem-")
    base_dir, prompts = builtin.materialize(root)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(builtin.build_model_config(vocab_size=args.vocab))
    wide = os.path.join(root, "wide")
    model.save_pretrained(wide)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(wide)
    for fused in (True, False):
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import train_memory_cpu as m; "
                f"m.child({wide!r}, {prompts!r}, {os.path.join(root, str(fused))!r}, {fused}, {args.batch}, {args.new_tokens})")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
