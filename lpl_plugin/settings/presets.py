"""The shipped sd-scripts presets for consumer GPUs (`lpl_plugin.configs`): names, texts, descriptions."""

from __future__ import annotations

from importlib import resources

from lpl_plugin.settings.errors import UserError
from lpl_plugin.settings.messages import show_value

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
