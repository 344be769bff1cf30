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
* ``skipped_steps``: optimizer steps of the iteration skipped because the loss or a gradient norm
  was NaN or inf; the ppo_loss statistics and ``grad_norm`` average the steps taken (null if none);
* seconds: ``time_generate``, ``time_score``, ``time_forward`` (old/ref/value passes plus the
  update forwards), ``time_backward`` (backward and optimizer steps), ``time_iteration``;
  ``tokens_per_s`` (response tokens per second of the whole iteration), ``generate_tokens_per_s``;
  ``peak_memory_mb`` (CUDA allocator peak, or the process's peak RSS on a CPU).
"""

from __future__ import annotations

import json
import math
import os
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

# (key, panel title, y-axis label with units); the score and KL panels first.
PANELS = [
    ("score_mean", "Score (reward per response)", "score (reward units)"),
    ("kl", "KL to the reference policy", "KL (nats per sequence)"),
    ("reward_mean", "KL-shaped reward", "reward per sequence"),
    ("entropy", "Policy entropy", "entropy (nats per token)"),
    ("policy_loss", "Policy loss (clipped surrogate)", "loss"),
    ("value_loss", "Value loss", "loss"),
    ("clipfrac", "Clipped fraction (policy ratio)", "fraction of tokens"),
    ("approx_kl", "Approx. KL old -> new policy", "KL (nats per token)"),
    ("explained_variance", "Critic explained variance", "1 - Var[R - V] / Var[R]"),
    ("response_length", "Response length", "tokens"),
    ("tokens_per_s", "Throughput", "response tokens per second"),
    ("peak_memory_mb", "Peak memory", "MiB"),
]
PLOTTED = [key for key, _, _ in PANELS]


def plot_metrics(rows: list[dict[str, Any]], path: str) -> None:
    """Draw ``output_dir/metrics.png``: one titled, labelled panel per ``PANELS`` entry against the iteration."""
    plot_runs([("", rows)], path)


def plot_runs(runs: list[tuple[str, list[dict[str, Any]]]], path: str) -> None:
    """Overlay several runs, ``[(label, rows), ...]``, in one figure (a legend when labels are given).

    The score panel shows the mean with a band of one standard deviation across responses when
    ``score_std`` is there; missing and non-finite values leave gaps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3
    nrows = math.ceil(len(PANELS) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(15, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, ylabel) in zip(axes.flat, PANELS):
        for n, (label, rows) in enumerate(runs):
            pts = [(r["step"], r[key], r.get("score_std")) for r in rows
                   if isinstance(r.get("step"), (int, float)) and _finite(r.get(key))]
            color = colors[n % len(colors)]
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, color=color, linewidth=1.6, marker="o" if len(pts) < 30 else None, markersize=3,
                    label=label or None)
            if key == "score_mean" and pts and all(_finite(p[2]) for p in pts):
                ax.fill_between(xs, [y - p[2] for y, p in zip(ys, pts)], [y + p[2] for y, p in zip(ys, pts)],
                                color=color, alpha=0.15, linewidth=0)
        ax.set_title(title + (" (band: ±1 std)" if key == "score_mean" else ""), fontsize=11)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat[len(PANELS):]:
        ax.set_visible(False)
    labels = [label for label, _ in runs if label]
    if labels:
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", ncol=min(len(labels), 4), frameon=False,
                   bbox_to_anchor=(0.5, 1.0), fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.4 * nrows) * math.ceil(len(labels) / 4)))
    else:
        fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
