"""The shipped sd-scripts presets for consumer GPUs (`lpl_plugin.configs`) and the `presets` / `preset` commands."""

from __future__ import annotations

import argparse
from importlib import resources

from .errors import UserError
from .messages import show_value

PACKAGE = "lpl_plugin.configs"
SUFFIX = ".toml"


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted by card size (8, 12, 16, 24 GB), LoRA before full fine-tune."""
    names = [f.name[:-len(SUFFIX)] for f in resources.files(PACKAGE).iterdir() if f.name.endswith(SUFFIX)]
    return sorted(names, key=lambda n: (not n.startswith("sdxl_lora"), _gigabytes(n), n))


def _gigabytes(name: str) -> int:
    """The card size in a preset's name (`..._12gb` -> 12), or 0."""
    tail = name.rsplit("_", 1)[-1]
    return int(tail[:-2]) if tail.endswith("gb") and tail[:-2].isdigit() else 0


def preset_text(name: str) -> str:
    """The TOML text of one preset; an unknown name raises UserError listing the valid ones."""
    names = preset_names()
    if name.endswith(SUFFIX):
        name = name[:-len(SUFFIX)]
    if name not in names:
        raise UserError(f"unknown preset {show_value(name)}; valid presets: {', '.join(names)}")
    return resources.files(PACKAGE).joinpath(name + SUFFIX).read_text(encoding="utf-8")


def preset_description(name: str) -> str:
    """The one-line description of a preset: its first comment line."""
    first = preset_text(name).splitlines()[0]
    return first.lstrip("#").strip()


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
