"""CPU measurement: rollout tokens per second of fastppo's own loop (``hf``) against vLLM (``vllm``).

    .venv/bin/python benchmarks/rollout_cpu.py [--reps 3] [--prompts 64] [--new-tokens 128] [--json out.json]

Both engines are driven exactly as ``fastppo train`` drives them (``rollout.HFEngine`` and
``rollout.VLLMEngine`` of one ``PPOTrainer``), on a randomly initialised Llama of about 40 M
parameters (hidden 512, 8 layers, 8 heads of 64, MLP 1408, vocabulary 32000, tied head, float32),
64 prompts of 16-48 tokens, up to 128 sampled tokens each at temperature 1. Responses stop at
different lengths: the EOS row of the head is set so that EOS follows any of 1/64 of the vocabulary
with high probability (the random model's last hidden state is mostly the current token's
embedding), so lengths are roughly geometric around 64. The two engines alternate, ``--reps`` times
each, so a noisy neighbour hits both alike; the engine's start-up and the weight sync (the actor
pushed into vLLM in place, as after every iteration) are timed too. Tokens per second count response
tokens (up to and including EOS). The machine's load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


SCALE = 0.3  # of the EOS row: a mean response length near 64 of 128


def build(directory: str, seed: int = 0):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = 32000
    words = {f"w{i}": i for i in range(vocab)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=words, unk_token="w3")),
                                  pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3",
                                  padding_side="left")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # tied: also the head; EOS is never an input
        enders = torch.randperm(vocab)[: vocab // 64]
        direction = emb[enders] / emb[enders].norm(dim=1, keepdim=True)
        emb[2] = direction.sum(0) * SCALE
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from fastppo.train import PPOConfig, PPOTrainer, rollout

    if args.threads:
        torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="fastppo-rollout-bench-")
    model_dir = os.path.join(work, "model")
    n_params = build(model_dir)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": [1] + torch.randint(4, 32000, (int(n) - 1,), generator=gen).tolist()}
            for n in torch.randint(16, 49, (args.prompts,), generator=gen)]
    cfg = PPOConfig(model=model_dir, output_dir=os.path.join(work, "run"), rollout_engine="vllm",
                    batch_size=args.prompts, mini_batch_size=args.prompts, micro_batch_size=8,
                    max_prompt_length=48, max_new_tokens=args.new_tokens, temperature=1.0, progress=False,
                    plot=False, advantage_estimator="grpo", num_generations=2, num_threads=args.threads)
    t0 = time.perf_counter()
    trainer = PPOTrainer(cfg, train_dataset=data, reward_fn=lambda p, c: [0.0] * len(c))
    built = time.perf_counter() - t0  # models + vLLM engine
    engines = {"hf": rollout.HFEngine(trainer), "vllm": trainer.rollout}
    from fastppo.train.data import left_pad

    ids, attn = left_pad(trainer.prompt_ids, trainer.tokenizer.pad_token_id, trainer.device)
    rows: dict[str, list[dict]] = {"hf": [], "vllm": []}
    syncs = []
    for rep in range(args.reps):
        for name, engine in engines.items():
            torch.manual_seed(100 + rep)
            t = time.perf_counter()
            out = engine.generate(ids, attn)
            dt = time.perf_counter() - t
            n = int(out.mask.sum())
            rows[name].append({"seconds": dt, "tokens": n, "tokens_per_s": n / dt,
                               "mean_length": n / out.mask.shape[0], "max_length": int(out.mask.sum(1).max())})
            print(f"rep {rep} {name:5s} {dt:7.2f} s  {n:6d} tokens  {n / dt:7.1f} tok/s  mean length "
                  f"{n / out.mask.shape[0]:.1f}", flush=True)
        syncs.append(engines["vllm"].sync_weights())
    summary = {
        "params": n_params, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(), "trainer_and_engine_start_s": built,
        "loadavg": os.getloadavg(),
        "weight_sync_s_median": statistics.median(syncs),
        **{f"{name}_tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs) for name, rs in rows.items()},
        **{f"{name}_tokens_per_s_first": rs[0]["tokens_per_s"] for name, rs in rows.items()},
        "runs": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    engines["vllm"].close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
