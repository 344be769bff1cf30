#!/usr/bin/env python
"""TRL's PPO recipe, run through fastppo, offline, on tiny local models.

1. build a tiny causal LM and a tokenizer with a chat template, and fine-tune it briefly on the
   example chats (a stand-in for your SFT model);
2. train a reward model on data/preferences.jsonl (chosen/rejected chats) with TRL's RewardTrainer;
3. ``fastppo train`` with a config written in TRL's PPOConfig key names: LoRA r=32, alpha=8 on all
   linear layers, that reward model, prompts from the ``question`` column of data/prompts.jsonl;
4. load the trained policy with peft's ``AutoPeftModelForCausalLM``, ``merge_and_unload`` it and
   generate answers.

    python examples/trl_recipe/run.py                  # ~40 PPO iterations, a few minutes on a CPU
    python examples/trl_recipe/run.py --quick          # a smoke run (what tests/test_example_recipe.py runs)

Everything is written under --workdir (default ./trl_recipe_run). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>"]
# One message per block, each closed by the EOS token, so a reward model trained on whole chats reads its
# score at the same EOS that ends a PPO response.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|endoftext|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# Tokens a response may take: the polite answers of data/preferences.jsonl take 23-30 tokens of the
# tokenizer built below, their EOS included. Shorter, most of them would be cut off mid-sentence and
# the missing-EOS penalty, not the reward model, would decide the scores.
RESPONSE_LENGTH = 32


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# 1. the SFT model: a tiny Llama and a byte-level BPE tokenizer trained on the example texts

def build_base_model(path: str, seed: int, steps: int, heads: int = 4) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    texts = [row["question"] for row in read_jsonl(os.path.join(DATA, "prompts.jsonl"))]
    for row in read_jsonl(os.path.join(DATA, "preferences.jsonl")):
        texts += [m["content"] for m in row["chosen"] + row["rejected"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    sft(model, tokenizer, steps)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def sft(model, tokenizer, steps: int) -> None:
    """A few hundred tokens of supervised fine-tuning on both answers of every pair, so the policy can
    already say polite and rude things and PPO has something to choose between (plain PyTorch here;
    the recipe uses TRL's SFTTrainer for this step)."""
    import torch

    chats = []
    for row in read_jsonl(os.path.join(DATA, "preferences.jsonl")):
        chats += [row["chosen"], row["rejected"]]
    ids = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
           for c in chats]
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), tokenizer.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    for i, row in enumerate(ids):
        batch[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    attention = (labels != -100).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        rows = torch.randint(0, len(ids), (16,), generator=gen)
        loss = model(input_ids=batch[rows], attention_mask=attention[rows], labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"SFT: {steps} steps, final loss {loss.item():.2f}", flush=True)
    model.eval()


# --------------------------------------------------------------------------------------------
# 2. the reward model, with TRL's RewardTrainer (a sequence classifier on the base model)

def train_reward_model(base: str, path: str, steps: int, seed: int) -> float:
    """Returns the share of preference pairs the trained reward model ranks right."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    datasets.disable_progress_bars()
    pairs = datasets.load_dataset("json", data_files=os.path.join(DATA, "preferences.jsonl"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(base)
    args = RewardConfig(output_dir=os.path.join(os.path.dirname(path), "reward_trainer"), max_steps=steps,
                        per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type="constant",
                        logging_steps=max(1, steps // 4), save_strategy="no", report_to="none", bf16=False,
                        seed=seed, max_length=64, disable_tqdm=True)
    trainer = RewardTrainer(model=base, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(path)  # the model and its tokenizer: fastppo checks that it shares the actor's

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    right = 0
    with torch.no_grad():
        for row in pairs:
            score = []
            for chat in (row["chosen"], row["rejected"]):
                text = tokenizer.apply_chat_template(chat, tokenize=False)
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
                score.append(float(model(**ids).logits[0, 0]))
            right += score[0] > score[1]
    return right / len(pairs)


# --------------------------------------------------------------------------------------------
# 3. fastppo train, configured with TRL's PPOConfig names

def write_config(path: str, base: str, reward: str, output_dir: str, iterations: int, quick: bool,
                 use_vllm: bool = False) -> None:
    per_device, minis = 4, 2  # 8 responses per iteration in 2 mini-batches
    lines = [
        "# TRL PPOConfig / ModelConfig names; fastppo maps each and says so in one line.",
        f"sft_model_path: {base}",
        f"reward_model_path: {reward}",
        f"dataset_name: {os.path.join(DATA, 'prompts.jsonl')}",
        f"output_dir: {output_dir}",
        f"per_device_train_batch_size: {per_device}",
        "gradient_accumulation_steps: 1",
        f"num_mini_batches: {minis}",
        f"total_episodes: {iterations * per_device * minis}",
        "num_ppo_epochs: 2",
        "learning_rate: 3.0e-4",
        f"response_length: {RESPONSE_LENGTH}      # room for the longest polite answer and its EOS",
        "stop_token: eos",
        "temperature: 0.7",
        "kl_coef: 0.05",
        "missing_eos_penalty: 1.0   # subtracted from the score of a response cut off before its EOS",
        "cliprange: 0.2",
        "cliprange_value: 0.2",
        "vf_coef: 0.1",
        "gamma: 1.0",
        "lam: 0.95",
        "seed: 42",
        "report_to: none            # tensorboard: pip install 'fastppo[tensorboard]'",
        "gradient_checkpointing: true",
        "logging_steps: 1",
        "use_peft: true",
        "lora_r: 32",
        "lora_alpha: 8",
        "lora_target_modules: all-linear",
        "# fastppo's own names mix in freely:",
        "prompt_column: question",
        "critic_lora_r: 8           # the critic (from the reward model) trains a LoRA adapter and its value head",
        "num_threads: 1",
    ]
    if use_vllm:
        lines.append("use_vllm: true            # TRL GRPOConfig's switch: vLLM samples the rollouts, colocated")
    if quick:
        lines.append("plot: false")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def run_fastppo(config: str, quick: bool) -> None:
    """``fastppo train --config CONFIG``, through the command's own entry point in this process (a
    second Python would spend longer importing torch and transformers again than training here)."""
    from fastppo.cli import main

    argv = ["train", "--config", config] + (["--no-progress"] if quick else [])
    print("$ fastppo", " ".join(argv), flush=True)
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"fastppo train failed with exit code {rc}")


# --------------------------------------------------------------------------------------------
# 4. load the result as TRL's recipe does, merge the adapter, generate

def generate(policy_dir: str, questions: list[str]) -> list[str]:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(policy_dir).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    answers = []
    for q in questions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=RESPONSE_LENGTH, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="trl_recipe_run", help="where every step writes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few reward steps, 2 PPO iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use-vllm", action="store_true",
                        help="rollouts through vLLM (pip install 'fastppo[vllm]'; the tiny model then has 2 heads of "
                             "32, a head size vLLM's CPU attention takes)")
    args = parser.parse_args()
    import time

    import torch

    torch.set_num_threads(1)  # tiny models: one thread is fastest, and far faster than many on a shared CPU
    start = time.perf_counter()

    def step(*what):
        print(f"[{time.perf_counter() - start:3.0f}s]", *what, flush=True)

    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    base, reward, output = (os.path.join(work, n) for n in ("base", "reward", "ppo"))

    step("1/4 tiny SFT model and tokenizer ->", base)
    build_base_model(base, args.seed, steps=30 if args.quick else 300, heads=2 if args.use_vllm else 4)

    step("2/4 reward model with trl.RewardTrainer ->", reward)
    accuracy = train_reward_model(base, reward, steps=6 if args.quick else 60, seed=args.seed)
    print(f"reward model ranks chosen above rejected on {accuracy:.0%} of the preference pairs", flush=True)

    step("3/4 fastppo train with a TRL-style config ->", output)
    config = os.path.join(work, "ppo_config.yaml")
    write_config(config, base, reward, output, iterations=2 if args.quick else 40, quick=args.quick,
                 use_vllm=args.use_vllm)
    run_fastppo(config, args.quick)

    step("4/4 AutoPeftModelForCausalLM + merge_and_unload, then generate")
    policy = output  # fastppo train writes the final adapter, its config and the tokenizer into output_dir
    questions = [row["question"] for row in read_jsonl(os.path.join(DATA, "prompts.jsonl"))[:3]]
    answers = generate(policy, questions)
    for q, a in zip(questions, answers):
        print(f"Q: {q}\nA: {a}")
    print(f"done in {time.perf_counter() - start:.0f}s; everything is under {work}")
    with open(os.path.join(work, "samples.json"), "w", encoding="utf-8") as f:
        json.dump({"policy": policy, "reward_accuracy": accuracy,
                   "samples": [{"question": q, "answer": a} for q, a in zip(questions, answers)]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
