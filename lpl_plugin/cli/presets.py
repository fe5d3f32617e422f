"""`lpl-plugin presets` and `lpl-plugin preset NAME`: the shipped sd-scripts presets for consumer GPUs."""

from __future__ import annotations

import argparse

from lpl_plugin.settings.presets import preset_description, preset_names, preset_text


def _list(args: argparse.Namespace) -> int:
    """Print every preset with its description."""
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_description(name)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    """Print one preset's TOML."""
    print(preset_text(args.name), end="")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `presets` and `preset NAME`."""
    p = subparsers.add_parser("presets", help="list the sd-scripts presets for 8/12/16/24 GB GPUs")
    p.set_defaults(func=_list)
    p = subparsers.add_parser("preset", help="print one preset (a complete sd-scripts TOML with an [lpl] block)")
    p.add_argument("name", help="preset name, as `lpl-plugin presets` lists it")
    p.set_defaults(func=_show)
