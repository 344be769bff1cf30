"""The ``fastppo`` command: ``verify``, ``bench``, ``inspect``, ``train`` and ``plot``."""

from __future__ import annotations

import argparse
import re
import sys

from ._args import op_list, output_file, positive_int, seed


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what was wrong and where to look, no usage block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "--learning-rate -1e-5" is a (bad) value, not an unknown flag: read 1e-5 and -inf as numbers too.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastppo", description="Fast, verified PPO math for language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    v = sub.add_parser("verify", help="check every kernel against its PyTorch reference on random inputs")
    v.add_argument("--json", metavar="FILE", type=output_file(parents=False),
                   help="also write the table as JSON to FILE")
    v.add_argument("--ops", metavar="OP[,OP...]", type=op_list, help="only these ops (default: all)")
    v.add_argument("--seed", type=seed, help="random seed in [0, 2**63) (default: a fresh one, printed)")
    v.add_argument("--small", action="store_true", help="small shapes even on a GPU")
    v.add_argument("--cpu", action="store_true", help="run on the CPU (Triton interpreter) even if a GPU is present")

    b = sub.add_parser("bench", help="time every op against the references, the peers and the hardware limit")
    b.add_argument("--json", nargs="?", const="auto", metavar="FILE", type=output_file(parents=True),
                   help="write results as JSON (default file: benchmarks/results/<device>-<date>.json)")
    b.add_argument("--ops", metavar="OP[,OP...]", type=op_list, help="only these ops (default: all)")
    b.add_argument("--quick", action="store_true", help="the smallest shape of each op only")
    b.add_argument("--reps", type=positive_int, default=None,
                   help="timed repetitions per measurement, >= 1 (default: 100 on a GPU, 5 on a CPU)")

    from .inspect import add_arguments as add_inspect_arguments

    add_inspect_arguments(sub.add_parser("inspect", help="compile every kernel configuration offline, print static figures"))
    from .train.cli import add_parser as add_train_parser

    add_train_parser(sub)
    p = sub.add_parser("plot", help="draw the metrics of one or more `fastppo train` runs, overlaid, into one image",
                       description="Overlay the metrics.jsonl of each RUN_DIR in one figure (score and KL first), "
                                   "one colour per run, the legend naming the run directories.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output directory of a fastppo train run")
    p.add_argument("-o", "--output", metavar="FILE", type=output_file(parents=False),
                   help="image to write, .png, .pdf or .svg (default: RUN_DIR/metrics.png for one run, "
                        "runs.png in the current directory for several)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `fastppo train` prints how to resume
    if args.command == "verify":
        from . import verify

        return verify.main(args)
    if args.command == "bench":
        from . import bench

        return bench.main(args)
    if args.command == "inspect":
        from . import inspect

        return inspect.main(args)
    if args.command == "plot":
        from .train import cli as train_cli

        return train_cli.plot_main(args)
    if args.command == "train":
        from .train import cli as train_cli

        return train_cli.main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
