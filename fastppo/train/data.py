"""Prompts: a local file through ``datasets.load_dataset``, or a ``datasets.Dataset`` / list of dicts
given in Python; text, chat messages or token ids; tokenised once, sampled per iteration."""

from __future__ import annotations

import os
import sys
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
    return prompts_from_dataset(ds, column, f"dataset {path!r}")


# --------------------------------------------------------------------------------------------
# prompts from a dataset: text, chat messages or token ids, from a named column or found

CHAT_COLUMN, IDS_COLUMN = "messages", "input_ids"


def _columns(ds) -> list[str]:
    if isinstance(ds, list):
        names: dict[str, None] = {}
        for row in ds:
            names.update(dict.fromkeys(row))
        return list(names)
    return list(ds.column_names)


def _text_columns(ds) -> list[str]:
    """Columns that hold text in every row."""
    if isinstance(ds, list):
        return [c for c in _columns(ds) if all(isinstance(r.get(c), str) for r in ds)]
    features = getattr(ds, "features", None) or {}
    return [c for c in ds.column_names if getattr(features.get(c), "dtype", None) in ("string", "large_string")]


def pick_column(ds, column: str, where: str) -> str:
    """The column holding the prompts: ``column`` when present; when the default ``prompt`` is absent,
    ``messages`` (whole conversations), then ``input_ids`` (tokenised), then the only text column."""
    names = _columns(ds)
    if column in names:
        return column
    if column == "prompt":
        found = None
        if CHAT_COLUMN in names:
            found = CHAT_COLUMN
        elif IDS_COLUMN in names:
            found = IDS_COLUMN
        elif len(texts := _text_columns(ds)) == 1:
            found = texts[0]
        if found is not None:
            print(f"fastppo train: {where} has no 'prompt' column; prompts come from its {found!r} column "
                  "(--prompt-column chooses another)", file=sys.stderr)
            return found
        more = "; it has more than one text column" if len(_text_columns(ds)) > 1 else ""
        raise ConfigError(f"{where} has no column 'prompt'; its columns are {names}{more} (choose one with "
                          "--prompt-column, or name it prompt, messages or input_ids)")
    raise ConfigError(f"{where} has no column {column!r}; its columns are {names} (choose one with --prompt-column)")


def _conversation_prompt(messages: list) -> list:
    """A whole conversation's prompt: its messages up to the last one that is not the assistant's."""
    keep = len(messages)
    while keep and isinstance(messages[keep - 1], dict) and messages[keep - 1].get("role") == "assistant":
        keep -= 1
    return list(messages[:keep])


def _is_ids(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in p)


def _is_chat(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                    for m in p)


def prompts_from_dataset(ds, column: str, where: str = "the train_dataset") -> list[Any]:
    """Prompts of a ``datasets.Dataset`` or a list of dicts: each a string, a list of chat messages
    ``[{"role", "content"}]`` or a list of token ids (an already tokenised dataset)."""
    if isinstance(ds, list):
        if not all(isinstance(r, dict) for r in ds):
            bad = next(r for r in ds if not isinstance(r, dict))
            raise ConfigError(f"{where}: expected a datasets.Dataset or a list of dicts (one per row), got a list "
                              f"holding {bad!r:.60}")
    elif isinstance(ds, dict):  # a DatasetDict: load_dataset(...) without split=
        raise ConfigError(f"{where}: expected one split, got a {type(ds).__name__} of splits {list(ds)}; pass "
                          "dataset['train'] (or load_dataset(..., split='train'))")
    elif not hasattr(ds, "column_names") or not hasattr(ds, "__len__"):
        raise ConfigError(f"{where}: expected a datasets.Dataset or a list of dicts, got {type(ds).__name__} "
                          "(a streaming IterableDataset has no length to sample epochs from)")
    if len(ds) == 0:
        raise ConfigError(f"{where} has no rows (only a header?); expected one prompt per row")
    column = pick_column(ds, column, where)
    try:
        rows = [r.get(column) for r in ds] if isinstance(ds, list) else list(ds[column])
    except Exception as exc:  # noqa: BLE001 - pyarrow reports bad cells only when they are read
        raise ConfigError(f"{where}: column {column!r} cannot be read ({' '.join(str(exc).split())[:200]})") from None
    if not rows:
        raise ConfigError(f"{where} has no rows (only a header?); expected one prompt per row")
    if column == CHAT_COLUMN:
        rows = [_conversation_prompt(p) if isinstance(p, list) else p for p in rows]
    for i, p in enumerate(rows):
        if not (isinstance(p, str) or _is_chat(p) or _is_ids(p)):
            raise ConfigError(f"{where}, row {i + 1}: column {column!r} holds {p!r:.60}; expected text, a list of "
                              "chat messages {'role': ..., 'content': ...} or a list of token ids")
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


def prompt_text(prompt: Any, tokenizer=None) -> str:
    """What a reward function sees as the prompt: the string, the last message, or the decoded ids."""
    if isinstance(prompt, str):
        return prompt
    if _is_ids(prompt) and tokenizer is not None:
        return tokenizer.decode(prompt, skip_special_tokens=True)
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


CHAT_TEMPLATE_MODES = ("auto", "none")
_PROBE = "\x00fastppo-prompt\x00"


def template_markers(tokenizer) -> tuple[str, str]:
    """``(before, after)``: the text the chat template puts around one user message and the generation
    prompt (whitespace stripped), kept only when it holds one of the tokenizer's special tokens, so that
    plain words are never mistaken for a template. ``("", "")`` without a template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "", ""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that needs more than one user message
        return "", ""
    if _PROBE not in text:
        return "", ""
    before, after = (part.strip() for part in text.split(_PROBE, 1))
    special = [t for t in set(getattr(tokenizer, "all_special_tokens", [])) | set(
        getattr(tokenizer, "get_added_vocab", dict)()) if t]

    def marked(part: str) -> str:
        return part if any(t in part for t in special) else ""

    # The text before the message often holds a default system prompt that a user's own templating may
    # have replaced: its first special token is what every templated prompt starts with.
    head = marked(before)
    starts = [t for t in special if head.startswith(t)]
    if starts:
        head = max(starts, key=len)
    return head, marked(after)


def has_chat_template(tokenizer, text: str, markers: tuple[str, str] | None = None) -> bool:
    """True when ``text`` already went through ``tokenizer``'s chat template (starts with what the
    template puts before a message, or ends with its generation prompt)."""
    before, after = markers if markers is not None else template_markers(tokenizer)
    return bool(before and text.lstrip().startswith(before)) or bool(after and text.rstrip().endswith(after))


def encode_prompts(tokenizer, prompts: list[Any], max_length: int, chat_template: str = "auto") -> list[list[int]]:
    """Token ids of each prompt.

    Token-id prompts are used as they are. Chat messages go through the tokenizer's chat template.
    Text goes through it too (as one user message) when ``chat_template`` is ``auto`` and the
    tokenizer has one, unless the text already carries the template: then it is tokenised without
    adding special tokens, so no second template and no second BOS. With ``none``, text is tokenised
    as it is. Long prompts keep their last ``max_length`` tokens: the end is what the response continues.
    """
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"chat_template (--chat-template) must be one of {', '.join(CHAT_TEMPLATE_MODES)}; "
                          f"got {chat_template!r}")
    templated = chat_template == "auto" and getattr(tokenizer, "chat_template", None) is not None
    markers = template_markers(tokenizer) if templated else ("", "")
    n_tokens = len(tokenizer)
    out: list[list[int]] = []
    for p in prompts:
        if _is_ids(p):
            ids = list(p)
            if max(ids) >= n_tokens:
                raise ConfigError(f"a tokenised prompt holds token id {max(ids)}, but the tokenizer has {n_tokens} "
                                  "tokens; was the dataset tokenised with another tokenizer?")
        elif isinstance(p, str) and templated and has_chat_template(tokenizer, p, markers):
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        elif templated:
            messages = p if isinstance(p, list) else [{"role": "user", "content": str(p)}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template already holds the special tokens it wants.
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if not isinstance(p, str):
                why = ("--chat-template none was given" if chat_template == "none"
                       else "this tokenizer has none")
                raise ConfigError(f"chat-message prompts need the tokenizer's chat template, and {why} "
                                  f"(prompt: {p!r:.80})")
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
