"""``fastppo train``: flags generated from ``PPOConfig``, defaults < ``--config`` file < flags."""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from typing import Any

from .config import (ADVANTAGE_ESTIMATORS, AGG_MODES, ATTN_IMPLEMENTATIONS, ESTIMATORS, LR_SCHEDULES,
                     REFUSED_ESTIMATORS, REPORT_TO, ConfigError, PPOConfig, check_given, field_docs, field_types, load_trl_or_fastppo,
                     note_trl_defaults)

_CHOICES = {"loss_agg": AGG_MODES, "kl_estimator": ESTIMATORS, "lr_schedule": LR_SCHEDULES,
            "attn_implementation": ATTN_IMPLEMENTATIONS, "report_to": REPORT_TO,
            # The refused ones too, so that the refusal gives its reason rather than "invalid choice".
            "advantage_estimator": ADVANTAGE_ESTIMATORS + tuple(REFUSED_ESTIMATORS), "chat_template": ("auto", "none")}

_NONE = object()  # "--value-clip none": unset an option, distinct from "flag not given"


def _scalar(tp: Any) -> tuple[Any, bool]:
    """``(base type, accepts None)`` of a field annotation such as ``float | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        base = [a for a in args if a is not type(None)]
        return base[0], len(base) < len(args)
    return tp, False


_EXPECT = {int: "a whole number", float: "a number", str: "text"}


def _parser_for(base: Any, nullable: bool):
    def parse(text: str):
        if nullable and text.lower() in ("none", "null"):
            return _NONE
        try:
            return base(text)
        except ValueError:
            also = " or none" if nullable else ""
            raise argparse.ArgumentTypeError(f"expected {_EXPECT.get(base, base.__name__)}{also}, got {text!r}") from None

    parse.__name__ = base.__name__
    return parse


def _show_default(value: Any, base: Any = None) -> str:
    if value is None:
        return "auto" if base is bool else "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser(
        "train", help="run PPO end to end (no arguments: the built-in task, a few minutes on a CPU)",
        description="Run PPO on a causal LM. With no --model it trains the built-in task (a tiny model and "
                    "a rule-based reward shipped with fastppo). Options come from --config FILE (YAML, TOML or "
                    "JSON; TRL PPOConfig key names are mapped) and are overridden by flags; 'none' unsets an optional "
                    "value.")
    t.add_argument("--config", metavar="FILE", help="YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file of options; "
                   "TRL PPOConfig key names are mapped to fastppo's, one line each")
    t.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    from . import builtin

    docs = field_docs()
    plain = PPOConfig()
    task = builtin.default_config()  # what a run without --model starts from
    for name, tp in field_types().items():
        base, nullable = _scalar(tp)
        flag = "--" + name.replace("_", "-")
        a, b = getattr(plain, name), getattr(task, name)
        default = (f"default: {_show_default(a, base)}" if a == b else
                   f"default: {_show_default(b, base)} for the built-in task (no --model), "
                   f"{_show_default(a, base)} with --model")
        choices = _CHOICES.get(name)
        help_text = docs.get(name, "") + (f" One of: {', '.join(choices)}." if choices else "") + f" ({default})"
        if base is bool:
            t.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            t.add_argument(flag, dest=name, type=_parser_for(base, nullable), default=None,
                           metavar=name.upper() if base is str else base.__name__.upper(), help=help_text)
    return t


def resolve_config(args: argparse.Namespace) -> PPOConfig:
    """Defaults (the built-in task's tuned ones when no model is given) < file < flags."""
    from . import builtin

    data: dict[str, Any] = {}
    trl_style = False
    if getattr(args, "config", None):
        data, trl_style = load_trl_or_fastppo(args.config)
    for name in field_types():
        value = getattr(args, name, None)
        if value is not None:
            data[name] = None if value is _NONE else value
    given = set(data)  # what the user set, in the file or as a flag
    defaults = None  # PPOConfig's
    if data.get("model") is None:
        defaults = builtin.default_config().to_dict()
        base = dict(defaults)
        if data.get("reward_model") is not None:
            base["reward"] = None  # the built-in task's reward gives way to a reward model
        base.update(data)
        data = base
    config = PPOConfig.from_dict(data)
    check_given(config, given, defaults)
    if trl_style:
        note_trl_defaults(config, given)
    return config


def _quiet_libraries() -> None:
    # Loading bars of tiny local files drown the one progress bar that matters, the PPO one.
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(args: argparse.Namespace) -> int:
    debug = getattr(args, "debug", False)
    try:
        config = resolve_config(args)
        config.check()  # before transformers is imported or any model loads
    except ConfigError as exc:
        if debug:
            raise
        print(f"fastppo train: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    try:
        return _run(config, getattr(args, "argv", None))
    except ConfigError as exc:
        if debug:
            raise
        print(f"fastppo train: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastppo train: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - not a known bad input: one line, the traceback on --debug
        if debug:
            raise
        from .trainer import TrainingStopped

        if isinstance(exc, TrainingStopped):  # divergence, a full disk: the message says it all
            print(f"fastppo train: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        print(f"fastppo train: failed: {type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def _program() -> str:
    """How this process was started: ``fastppo``, or ``python -m fastppo`` with this interpreter."""
    import shlex
    import shutil

    from .distributed import launcher

    argv0 = sys.argv[0] if sys.argv else ""
    if launcher():  # [dist] started by torchrun/accelerate: resume the same way
        return f"{launcher()} -m fastppo"
    if os.path.basename(argv0) == "fastppo":
        found = shutil.which("fastppo")
        if found and os.path.exists(argv0) and os.path.samefile(found, argv0):
            return "fastppo"
        return shlex.quote(argv0)
    if os.path.basename(argv0) == "__main__.py":
        return f"{shlex.quote(sys.executable)} -m fastppo"
    return "fastppo"


def resume_command(config: PPOConfig, argv: list[str] | None) -> str:
    """The command that continues this run: its own arguments plus ``--resume``."""
    import shlex

    if argv is None:  # not started from the command line: the options that find the run
        argv = ["train", "--output-dir", config.output_dir]
    argv = list(argv)
    if "--resume" not in argv or "--no-resume" in argv[argv.index("--resume"):]:
        argv.append("--resume")
    return f"{_program()} {shlex.join(argv)}"


_EXIT = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal number, as a shell reports a process it killed


def _run(config: PPOConfig, argv: list[str] | None = None) -> int:
    from .trainer import PPOTrainer

    _quiet_libraries()
    trainer = PPOTrainer(config)
    if not trainer.dist.is_main:  # [dist] one summary per run, from rank 0; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
    n_train = sum(p.numel() for p in trainer.actor.parameters() if p.requires_grad)
    what = "built-in task (tiny Llama, sentiment reward)" if config.model is None else config.model
    reward = config.reward_model or config.reward or "sentiment"
    device = str(trainer.device)
    if trainer.device.type == "cpu":  # torch's default is one thread per core: say what this run got
        import torch

        n = torch.get_num_threads()
        device += f" ({n} thread{'s' if n != 1 else ''}{'' if config.num_threads else ', --num-threads sets it'})"
    print(f"fastppo train: {what}; reward: {reward}; device: {device}; "
          f"{n_train:,} trainable actor parameters; output: {config.output_dir}")
    if trainer.resumed_from:
        print(f"resumed from {trainer.resumed_from} at iteration {trainer.step}")
    elif config.resume:
        print(f"--resume: no checkpoint under {config.output_dir}/checkpoints yet; starting from iteration 0")
    summary = trainer.train()
    if summary.get("interrupted") and not trainer.dist.is_main:  # [dist] rank 0 says how to resume
        return _EXIT[summary["interrupted"]]
    if summary.get("interrupted"):
        print(f"fastppo train: stopped by {summary['interrupted']} after iteration {trainer.step} of "
              f"{config.iterations}; metrics: {summary['metrics']}; checkpoint: {summary['checkpoint']}",
              file=sys.stderr)
        print(f"fastppo train: resume with: {resume_command(config, argv)}", file=sys.stderr)
        return _EXIT[summary["interrupted"]]
    hist = summary["history"]
    if hist:
        k = min(5, len(hist))
        first = sum(r["score_mean"] for r in hist[:k]) / k
        last = sum(r["score_mean"] for r in hist[-k:]) / k
        total = sum(r["time_iteration"] for r in hist)
        print(f"mean score: first iteration {summary['first_score']:.3f} -> last iteration {summary['last_score']:.3f} "
              f"(mean of first {k}: {first:.3f}, of last {k}: {last:.3f}); {len(hist)} iterations in {total:.0f}s")
    print(f"metrics: {summary['metrics']}")
    if summary["plot"]:
        print(f"plot: {summary['plot']}")
    if config.report_to == "tensorboard":
        from .report import tensorboard_dir

        print(f"tensorboard: tensorboard --logdir {tensorboard_dir(config.output_dir)}")
    print(f"checkpoint: {summary['checkpoint']}")
    if summary.get("model_dir"):
        from .api import is_peft

        how = ("peft.AutoPeftModelForCausalLM" if is_peft(trainer.actor) else "transformers.AutoModelForCausalLM")
        print(f"model: {summary['model_dir']} (load with {how}.from_pretrained; the critic is in "
              f"{os.path.join(summary['model_dir'], 'critic')})" if trainer.critic is not None else
              f"model: {summary['model_dir']} (load with {how}.from_pretrained)")
    return 0


_IMAGE_TYPES = (".png", ".pdf", ".svg")


def plot_main(args: argparse.Namespace) -> int:
    """``fastppo plot RUN_DIR [RUN_DIR...] [-o FILE]``: bad input is one line on stderr and exit 2."""
    from .metrics import plot_runs, read_metrics

    def fail(message: str) -> int:
        print(f"fastppo plot: error: {message}", file=sys.stderr)
        return 2

    runs = []
    for run in args.runs:
        if not os.path.exists(run):
            return fail(f"run directory {run!r} does not exist")
        if not os.path.isdir(run):
            return fail(f"{run!r} is not a directory (expected the output directory of a fastppo train run)")
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            return fail(f"{run!r} holds no metrics.jsonl (is it the output_dir of a fastppo train run?)")
        try:
            rows = read_metrics(path)
        except OSError as exc:
            return fail(f"cannot read {path!r}: {exc.strerror or exc}")
        rows = [r for r in rows if isinstance(r.get("step"), (int, float))]
        if not rows:
            return fail(f"{path!r} holds no iteration yet")
        runs.append((os.path.normpath(run), rows))
    output = args.output or (os.path.join(args.runs[0], "metrics.png") if len(args.runs) == 1 else "runs.png")
    if os.path.splitext(output)[1].lower() not in _IMAGE_TYPES:
        return fail(f"output {output!r} must end in {', '.join(_IMAGE_TYPES)}")
    if os.path.isdir(output):
        return fail(f"output {output!r} is a directory; expected a file name")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(output) and not os.access(output, os.W_OK)):
        return fail(f"no permission to write {output!r}")
    if len(runs) == 1:
        runs = [("", runs[0][1])] if args.output is None else runs
    try:
        plot_runs(runs, output)
    except OSError as exc:
        return fail(f"cannot write {output!r}: {exc.strerror or exc}")
    print(f"plot: {output} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0
