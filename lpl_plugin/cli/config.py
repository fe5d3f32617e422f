"""Subcommands about settings: `validate`, `schema` and `defaults`."""

from __future__ import annotations

import argparse

from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import write_lines
from lpl_plugin.settings.messages import show_path
from lpl_plugin.settings.preflight import check_training_config
from lpl_plugin.settings.schema import json_schema
from lpl_plugin.settings.toml_io import render_toml


def _validate(args: argparse.Namespace) -> int:
    """Check a trainer TOML; print the effective settings."""
    checked = check_training_config(args.config)
    write_lines(checked.warnings)
    config = checked.raise_for_problems()
    state = "on" if config.use_lpl else "off"
    print(f"# {show_path(args.config)}: valid; LPL is {state}. Effective settings:")
    print(render_toml(config, comments=False), end="")
    return 0


def _schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of the options."""
    from lpl_plugin.cli.main import print_json

    print_json(json_schema())
    return 0


def _defaults(args: argparse.Namespace) -> int:
    """Print the recommended lpl block as TOML."""
    print(render_toml(LPLConfig(use_lpl=True), table=None if args.top_level else "lpl",
                      comments=not args.no_comments), end="")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register validate, schema and defaults."""
    p = subparsers.add_parser("validate", help="check the lpl_* keys of a trainer TOML")
    p.add_argument("config", help="the trainer's TOML file")
    p.set_defaults(func=_validate)
    p = subparsers.add_parser("schema", help="print the JSON Schema of the options")
    p.set_defaults(func=_schema)
    p = subparsers.add_parser("defaults", help="print the recommended lpl block as TOML")
    p.add_argument("--top-level", action="store_true", help="write the keys without an [lpl] table header")
    p.add_argument("--no-comments", action="store_true", help="leave out the help comments")
    p.set_defaults(func=_defaults)
