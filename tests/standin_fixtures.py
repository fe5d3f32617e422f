"""Import the sd-scripts stand-ins (tests/standins) like a checkout on sys.path, and undo it afterwards."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any, Iterator

STANDINS = Path(__file__).parent / "standins"
VERSIONS = ("v0_9_1", "v0_10_1", "v0_11")
HOST_MODULES = ("library", "train_network", "sdxl_train_network", "sdxl_train")


def root(version: str) -> Path:
    """The folder of one stand-in."""
    return STANDINS / f"sd_scripts_{version}"


@contextlib.contextmanager
def standin(version: str) -> Iterator[Path]:
    """Put a stand-in on sys.path; afterwards uninstall the adapter and forget the host modules."""
    from lpl_plugin.patches import sd_scripts

    saved_path, saved_argv = list(sys.path), list(sys.argv)
    sys.path.insert(0, str(root(version)))
    try:
        yield root(version)
    finally:
        sd_scripts.uninstall()
        for name in list(sys.modules):
            if name.split(".")[0] in HOST_MODULES:
                del sys.modules[name]
        sys.path[:] = saved_path
        sys.argv[:] = saved_argv


def module(name: str) -> Any:
    """A host module of the stand-in on sys.path."""
    return importlib.import_module(name)


def write_config(folder: Path, lpl: str, host: str = "", name: str = "cfg.toml") -> Path:
    """A trainer TOML with host keys at the top and an lpl block below."""
    path = folder / name
    path.write_text(f"output_dir = \"{(folder / 'out').as_posix()}\"\n{host}\n{lpl}\n", encoding="utf-8")
    return path
