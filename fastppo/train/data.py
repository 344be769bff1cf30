"""Prompts: a local file through ``datasets.load_dataset``, tokenised once, sampled per iteration."""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import ConfigError

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def dataset_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise ConfigError(f"dataset {path!r}: expected a .jsonl, .json, .csv or .parquet file, got {ext or 'no extension'!r}")
    return _FORMATS[ext]


def load_prompts(path: str, column: str) -> list[Any]:
    """The ``column`` of a local file: strings, or chat message lists ``[{"role", "content"}]``."""
    import datasets

    if not os.path.isfile(path):
        raise ConfigError(f"dataset file {path!r} does not exist")
    fmt = dataset_format(path)
    if os.path.getsize(path) == 0:
        raise ConfigError(f"dataset {path!r} is empty; expected one prompt per row in a {column!r} column")
    if fmt != "parquet":
        _need_utf8(path)
    if fmt == "csv":
        with open(path, encoding="utf-8") as f:
            if sum(1 for _, line in zip(range(2), (ln for ln in f if ln.strip()))) < 2:
                raise ConfigError(f"dataset {path!r} has no rows (only a header?); expected one prompt per row")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs a parse error before raising it
    try:
        ds = datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many kinds for a file they cannot parse
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:  # the parser's own words
            cause = cause.__cause__ or cause.__context__
        why = " ".join(str(cause).split())[:200] or type(cause).__name__
        raise ConfigError(f"dataset {path!r} cannot be read as {path.rsplit('.', 1)[-1].upper()} ({why})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if column not in ds.column_names:
        raise ConfigError(f"dataset {path!r} has no column {column!r}; its columns are {ds.column_names} "
                          "(choose one with --prompt-column)")
    try:
        rows = list(ds[column])
    except Exception as exc:  # noqa: BLE001 - pyarrow reports bad cells only when they are read
        raise ConfigError(f"dataset {path!r}: column {column!r} cannot be read ({' '.join(str(exc).split())[:200]})") from None
    if not rows:
        raise ConfigError(f"dataset {path!r} has no rows (only a header?); expected one prompt per row")
    for i, p in enumerate(rows):
        ok = isinstance(p, str) or (isinstance(p, list) and p and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in p))
        if not ok:
            raise ConfigError(f"dataset {path!r}, row {i + 1}: column {column!r} holds {p!r:.60}; expected text or "
                              "a list of chat messages {'role': ..., 'content': ...}")
    return rows


def _need_utf8(path: str) -> None:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
                done += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"dataset {path!r} is not valid UTF-8 text (near byte {done + exc.start}); save it as "
                          "UTF-8") from None


def prompt_text(prompt: Any) -> str:
    """What a reward function sees as the prompt: the string, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


def encode_prompts(tokenizer, prompts: list[Any], max_length: int) -> list[list[int]]:
    """Token ids of each prompt, chat template applied when the tokenizer has one.

    Long prompts keep their last ``max_length`` tokens: the end is what the response continues.
    """
    templated = getattr(tokenizer, "chat_template", None) is not None
    out: list[list[int]] = []
    for p in prompts:
        if templated:
            messages = p if isinstance(p, list) else [{"role": "user", "content": str(p)}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template already holds the special tokens it wants.
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if not isinstance(p, str):
                raise ConfigError("chat-message prompts need a tokenizer with a chat template; "
                                  f"this tokenizer has none (prompt: {p!r:.80})")
            ids = tokenizer(p)["input_ids"]
        if not ids:
            ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if not ids:
            raise ConfigError(f"prompt {p!r:.80} encodes to no token and the tokenizer has no BOS token")
        out.append(list(ids[-max_length:]))
    return out


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``, both int64 ``[B, max len]``, padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        attn[i, width - len(r):] = 1
    return ids.to(device), attn.to(device)


class PromptSampler:
    """Epochs over the prompts in a seeded random order; its state goes into checkpoints."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.gen).tolist()
        self.pos = 0

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos == self.n:
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
                self.pos = 0
            take = min(k - len(out), self.n - self.pos)
            out += self.order[self.pos:self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": list(self.order), "pos": self.pos, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ConfigError(f"checkpoint was written for {state['n']} prompts, the dataset now has {self.n}")
        self.gen.set_state(state["gen"])
        self.order = list(state["order"])
        self.pos = int(state["pos"])
