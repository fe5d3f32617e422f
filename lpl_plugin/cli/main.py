"""The `lpl-plugin` command: one subcommand per job, user mistakes reported in one line each with exit status 2."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable, Sequence

from lpl_plugin import __version__
from lpl_plugin.settings.values import Parser
from lpl_plugin.settings.errors import UserError, write_lines

# Modules that add subcommands: each defines `add_commands(subparsers)` and sets `func` on its parsers.
COMMAND_MODULES = ("lpl_plugin.cli.config", "lpl_plugin.demo.cli", "lpl_plugin.cli.inspect",
                   "lpl_plugin.bench.command", "lpl_plugin.cli.doctor", "lpl_plugin.cli.presets",
                   "lpl_plugin.cli.estimate", "lpl_plugin.cli.enable", "lpl_plugin.compare.cli")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = Parser(prog="lpl-plugin", description="Latent Perceptual Loss for SDXL trainers.")
    parser.add_argument("--version", action="version", version=f"lpl-plugin {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a bad argument already reported in one line
        return done.code if isinstance(done.code, int) else 2
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except UserError as error:
        write_lines(error.lines())
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0


def print_json(data: object) -> None:
    """Write data as indented JSON to standard output."""
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    sys.exit(main())
