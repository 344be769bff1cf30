"""The built-in task: everything ``fastppo train`` needs with no download.

A word-level tokenizer over a fixed vocabulary of movie-review words, a tiny Llama built from a
config (about 90k parameters, random weights), a prompt set of review openings, and a rule-based
"sentiment" reward: (positive words - negative words) / max_new_tokens. A random policy scores
about 0; the reward climbs towards 1 within a few dozen iterations on a CPU, which makes the task
a quick end-to-end check that generation, scoring, advantages and the losses are all wired right.

The files are written once into a directory (tokenizer, model, prompts.jsonl) and then loaded back
through ``from_pretrained`` and ``datasets.load_dataset``, so the built-in run exercises exactly the
code paths that a run on real local models does.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from typing import Callable, Sequence

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
POSITIVE = ["good", "great", "happy", "love", "nice", "fun", "wonderful", "best"]
NEGATIVE = ["bad", "sad", "awful", "hate", "boring", "ugly", "worst", "dull"]
NEUTRAL = ["the", "a", "movie", "film", "was", "is", "it", "this", "and", "very", "story", "plot",
           "acting", "i", "think", "really", "but", "so", "music", "ending"]
VOCAB = SPECIAL + NEUTRAL + POSITIVE + NEGATIVE

_SUBJECTS = ["the movie", "this film", "the story", "the plot", "the acting", "the music", "the ending", "it"]
_OPENINGS = ["", "i think ", "really ", "and ", "but ", "so "]
_VERBS = ["was", "is", "was very", "is really", "is so"]


def prompts() -> list[str]:
    """The 240 built-in prompts (openings of a movie review, sentiment left open)."""
    return [f"{o}{s} {v}" for o, s, v in itertools.product(_OPENINGS, _SUBJECTS, _VERBS)]


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``VOCAB``; adds <bos> in front of each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with a space
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left")


def build_model_config(**overrides):
    """The tiny causal LM: 2 layers, hidden size 64, tied embeddings."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=VOCAB.index("<pad>"), bos_token_id=VOCAB.index("<bos>"),
        eos_token_id=VOCAB.index("<eos>"))
    kw.update(overrides)
    return LlamaConfig(**kw)


# vLLM's CPU attention takes head sizes from 32 up; the built-in model's 4 heads of 16 become 2 of 32
# (same hidden size) when vLLM samples.
VLLM_HEADS = 2


def model_overrides(config) -> dict:
    """``build_model_config`` overrides for a run of ``config``: 2 heads of 32 under ``--rollout-engine vllm``."""
    return {"num_attention_heads": VLLM_HEADS, "num_key_value_heads": VLLM_HEADS} \
        if getattr(config, "rollout_engine", "hf") == "vllm" else {}


def materialize(directory: str, seed: int = 0, **overrides) -> tuple[str, str]:
    """Write the built-in model + tokenizer and prompts under ``directory`` (once).

    Returns ``(model_dir, prompts_file)``. The weights depend only on ``seed`` (and the
    ``build_model_config`` ``overrides``), so reruns and resumed runs see the same starting model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tag = "".join(f"-{k.split('_')[-1]}{v}" for k, v in sorted(overrides.items()) if k == "num_attention_heads")
    model_dir = os.path.join(directory, f"model-seed{seed}{tag}")
    prompts_file = os.path.join(directory, "prompts.jsonl")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        tmp = model_dir + f".tmp{os.getpid()}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(build_model_config(**overrides))
        model.save_pretrained(tmp)
        build_tokenizer().save_pretrained(tmp)
        if os.path.exists(model_dir):  # another process won the race; its files are identical
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, model_dir)
    if not os.path.isfile(prompts_file):
        tmp = prompts_file + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for p in prompts():
                f.write(json.dumps({"prompt": p}) + "\n")
        os.replace(tmp, prompts_file)
    return model_dir, prompts_file


# --------------------------------------------------------------------------------------------
# Rewards: name -> factory(config) -> fn(prompts, completions) -> list of float scores.

def _sentiment(config) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    pos, neg = set(POSITIVE), set(NEGATIVE)
    # Normalised by the budget, not the completion length, so stopping early is no way to score.
    scale = float(config.max_new_tokens)

    def reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        out = []
        for c in completions:
            words = c.split()
            out.append((sum(w in pos for w in words) - sum(w in neg for w in words)) / scale)
        return out

    return reward


def _length(config) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    scale = float(config.max_new_tokens)

    def reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [len(c.split()) / scale for c in completions]

    return reward


REWARDS: dict[str, Callable] = {"sentiment": _sentiment, "length": _length}
"""Built-in rule-based rewards by name: ``sentiment`` (the default task) and ``length`` (words)."""


def make_reward(name: str, config) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    if name not in REWARDS:
        from .config import ConfigError

        raise ConfigError(f"unknown built-in reward {name!r}; choose one of {sorted(REWARDS)}")
    return REWARDS[name](config)


def default_config(**overrides):
    """The built-in task's tuned settings (what ``fastppo train`` with no argument runs)."""
    from .config import PPOConfig

    kw = dict(
        iterations=50, batch_size=64, max_new_tokens=12, mini_batch_size=32, micro_batch_size=16,
        ppo_epochs=2, learning_rate=1e-3, critic_learning_rate=1e-3, kl_coef=0.05, reward="sentiment",
        max_prompt_length=16, num_threads=1)
    kw.update(overrides)
    return PPOConfig(**kw)
