"""The ``fastppo`` command: ``verify``, ``bench`` and ``train``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastppo", description="Fast, verified PPO math for language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    v = sub.add_parser("verify", help="check every kernel against its PyTorch reference on random inputs")
    v.add_argument("--json", metavar="FILE", help="also write the table as JSON to FILE")
    v.add_argument("--ops", metavar="OP[,OP...]", help="only these ops (default: all)")
    v.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed)")
    v.add_argument("--small", action="store_true", help="small shapes even on a GPU")
    v.add_argument("--cpu", action="store_true", help="run on the CPU (Triton interpreter) even if a GPU is present")

    b = sub.add_parser("bench", help="time every op against the references, the peers and the hardware limit")
    b.add_argument("--json", nargs="?", const="auto", metavar="FILE",
                   help="write results as JSON (default file: benchmarks/results/<device>-<date>.json)")
    b.add_argument("--ops", metavar="OP[,OP...]", help="only these ops (default: all)")
    b.add_argument("--quick", action="store_true", help="the smallest shape of each op only")
    b.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")

    from .inspect import add_arguments as add_inspect_arguments

    add_inspect_arguments(sub.add_parser("inspect", help="compile every kernel configuration offline, print static figures"))
    from .train.cli import add_parser as add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "verify":
        from . import verify

        return verify.main(args)
    if args.command == "bench":
        from . import bench

        return bench.main(args)
    if args.command == "inspect":
        from . import inspect

        return inspect.main(args)
    if args.command == "train":
        from .train import cli as train_cli

        return train_cli.main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
