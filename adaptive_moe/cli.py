"""``adaptive-moe``: the command line. Each subcommand lives in its own module, which
exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when
chosen, so ``adaptive-moe calc`` never imports the training stack."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("adaptive_moe.runtime.demo", "run one MoE layer forward+backward and print what ran"),
    "train": (
        "adaptive_moe.training.cli",
        "train a small MoE language model with strategy switching",
    ),
    "profile": ("adaptive_moe.profiling.cli", "measure every strategy into a strategy table"),
    "calc": ("adaptive_moe.calc.cli", "parameters, FLOPs and memory of a (MoE) transformer"),
    "plan": ("adaptive_moe.planning.cli", "predict a strategy table for an unmeasured cluster"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(prog="adaptive-moe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, _ = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)
