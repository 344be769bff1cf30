"""Per-iteration metrics: ``metrics.jsonl`` (one JSON object per iteration) and a PNG plot.

Keys of each line (per iteration; "token" means a valid response token):

* ``step``; ``score_mean``/``score_std``: reward model or function output per response;
  ``reward_mean``: per-sequence sum of the KL-shaped token rewards;
* ``kl``: per-sequence sum of the KL estimate against the reference; ``kl_coef``: the coefficient
  used this iteration; ``entropy``: token mean over the rollout;
* from ``fastppo.ppo_loss``, averaged over the optimizer steps: ``policy_loss``, ``value_loss``,
  ``clipfrac``, ``clipfrac_lower``, ``approx_kl``, ``value_clipfrac`` (its ``entropy`` is replaced
  by the rollout entropy above);
* ``explained_variance`` of the critic's values against the returns; ``value_mean``,
  ``advantage_mean``, ``response_length`` (tokens), ``grad_norm`` (actor, before clipping), ``lr``;
* seconds: ``time_generate``, ``time_score``, ``time_forward`` (old/ref/value passes plus the
  update forwards), ``time_backward`` (backward and optimizer steps), ``time_iteration``;
  ``tokens_per_s`` (response tokens per second of the whole iteration), ``generate_tokens_per_s``;
  ``peak_memory_mb`` (CUDA allocator peak, or the process's peak RSS on a CPU).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from typing import Any

import torch

PLOTTED = ["score_mean", "kl", "entropy", "policy_loss", "value_loss", "clipfrac",
           "approx_kl", "explained_variance", "response_length"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.float()
    return float((x.float() * m).sum() / m.sum().clamp(min=1))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over valid tokens (1: perfect critic, <= 0: useless)."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    if r.numel() < 2:
        return float("nan")
    var = r.var()
    return float(1 - (r - v).var() / var) if var > 0 else float("nan")


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory on CUDA; peak resident set size of the process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    except Exception:  # pragma: no cover - resource is POSIX only
        return float("nan")


class MetricsLog:
    """Appends one JSON line per iteration; on resume drops lines past the checkpoint's step."""

    def __init__(self, path: str, keep_up_to: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if keep_up_to is None:
            open(path, "w").close()
        elif os.path.exists(path):
            # A run killed mid-write leaves a cut-off last line: it is dropped with the lines past
            # the checkpoint. Rewritten through a temporary file, so a crash here loses nothing.
            kept = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= keep_up_to]
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null keeps every line parseable by strict readers
    return v


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; lines that are not a JSON object (a write cut off by a crash) are skipped."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# plotting

def plot_metrics(rows: list[dict[str, Any]], path: str) -> str:
    """Draw the ``PLOTTED`` series against ``step`` into a PNG; returns which renderer drew it.

    matplotlib when importable (titled, labelled panels); otherwise a small built-in rasteriser
    writes the same 3x3 grid of line panels (in ``PLOTTED`` order, no text) so that a run always
    ends with a picture.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_builtin(rows, path)
        return "builtin"
    fig, axes = plt.subplots(3, 3, figsize=(13, 9))
    for ax, key in zip(axes.flat, PLOTTED):
        xs = [r["step"] for r in rows if r.get(key) is not None]
        ys = [r[key] for r in rows if r.get(key) is not None]
        ax.plot(xs, ys, color="tab:blue")
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return "matplotlib"


def _plot_builtin(rows: list[dict[str, Any]], path: str, panel: tuple[int, int] = (300, 200)) -> None:
    pw, ph = panel
    width, height = pw * 3, ph * 3
    img = bytearray(b"\xff" * (width * height * 3))

    def put(x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            img[i:i + 3] = bytes(rgb)

    def line(x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            put(round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n), rgb)

    for idx, key in enumerate(PLOTTED):
        ox, oy = (idx % 3) * pw, (idx // 3) * ph
        left, right, top, bottom = ox + 10, ox + pw - 10, oy + 10, oy + ph - 10
        for a, b in (((left, top), (right, top)), ((right, top), (right, bottom)),
                     ((right, bottom), (left, bottom)), ((left, bottom), (left, top))):
            line(*a, *b, (160, 160, 160))
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
        xspan, yspan = (xhi - xlo) or 1, (yhi - ylo) or 1
        scr = [(left + 2 + (x - xlo) / xspan * (right - left - 4),
                bottom - 2 - (y - ylo) / yspan * (bottom - top - 4)) for x, y in pts]
        for (a, b), (c, d) in zip(scr, scr[1:] or scr):
            line(round(a), round(b), round(c), round(d), (31, 119, 180))

    raw = b"".join(b"\x00" + bytes(img[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)
