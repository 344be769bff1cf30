"""``--report-to``: every metrics.jsonl field as a scalar per iteration, in TensorBoard or Weights & Biases.

The tag of each scalar is its metrics.jsonl key (``score_mean``, ``kl``, ...) and its step the
iteration (``step``). Nothing here is needed for a run that reports to ``none``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
from typing import Any

_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def missing_package(report_to: str) -> str | None:
    """The package ``report_to`` needs when it is not installed, else None (imports nothing)."""
    name = _PACKAGE.get(report_to)
    if name is None:
        return None
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else name


def tensorboard_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "tensorboard")


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    # Non-finite values are written as they are (TensorBoard shows NaN); metrics.jsonl's nulls are skipped.
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Reporter:
    """No-op base: ``log(row)`` once per iteration, ``close()`` at the end."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    def __init__(self, output_dir: str, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides events an earlier run (or the part of a run a resume
        # replays) wrote at steps >= first_step, as metrics.jsonl drops those lines.
        self.writer = SummaryWriter(log_dir=tensorboard_dir(output_dir), purge_step=first_step)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_reachable(timeout: float = 2.0) -> bool:
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    name, _, port = host.partition(":")
    try:
        with socket.create_connection((name, int(port or 443)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class WandbReporter(Reporter):
    def __init__(self, output_dir: str, config: dict[str, Any], resume: bool):
        import wandb

        if not os.environ.get("WANDB_MODE") and not _wandb_reachable():
            os.environ["WANDB_MODE"] = "offline"
            print(f"fastppo train: wandb: no network, logging offline under {output_dir}/wandb "
                  "(upload later with `wandb sync`)", file=sys.stderr)
        os.makedirs(output_dir, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastppo"), dir=output_dir, config=config,
                              resume="allow" if resume else None)

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in _scalars(row).items() if math.isfinite(v)}, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def open_reporter(config, first_step: int) -> Reporter:
    """The reporter ``config.report_to`` names; ``first_step``: the step of the next iteration."""
    if config.report_to == "tensorboard":
        return TensorBoardReporter(config.output_dir, first_step)
    if config.report_to == "wandb":
        return WandbReporter(config.output_dir, config.to_dict(), resume=first_step > 1)
    return Reporter()
