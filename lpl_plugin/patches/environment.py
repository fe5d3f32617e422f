"""Which tool manages this Python environment, and what that means for lpl-plugin (uv: `uv sync` removes it).

uv writes `uv = <version>` into the `pyvenv.cfg` of every virtual environment it creates, and a uv project keeps a
`uv.lock` beside its `.venv`. `uv sync` makes the environment match the lock exactly: a package installed with
`uv pip install` and not in the lock (lpl-plugin, in kohya_ss) is removed, and the activation file `lpl-plugin
enable` wrote then does nothing, silently, so runs that ask for LPL would train without it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lpl_plugin.settings.errors import UserError
from lpl_plugin.settings.files import is_file, read_text
from lpl_plugin.settings.messages import show_path

_UV_LINE = re.compile(r"^\s*uv\s*=\s*(\S+)\s*$", re.MULTILINE)
_LOCKED = re.compile(r'^name\s*=\s*"lpl[-_.]plugin"\s*$', re.MULTILINE | re.IGNORECASE)


def uv_version(prefix: Path) -> str | None:
    """The uv version recorded in a virtual environment's pyvenv.cfg, or None when uv did not create it."""
    config = prefix / "pyvenv.cfg"
    if not is_file(config):
        return None
    try:
        found = _UV_LINE.search(read_text(config, what="a pyvenv.cfg"))
    except UserError:  # unreadable: not something to stop a report for
        return None
    return found.group(1) if found else None


def uv_lock(prefix: Path) -> Path | None:
    """The `uv.lock` of the project whose environment this is (beside the environment's folder), if any."""
    lock = prefix.parent / "uv.lock"
    return lock if is_file(lock) else None


def locks_lpl_plugin(lock: Path) -> bool:
    """Whether a uv.lock names lpl-plugin as one of its packages (then `uv sync` keeps it)."""
    try:
        return bool(_LOCKED.search(read_text(lock, limit=64 * 2**20, what="a uv.lock")))
    except UserError:
        return False


def uv_report(prefix: Path | None = None) -> list[str]:
    """Doctor's lines about a uv-managed environment (none for other environments)."""
    prefix = Path(sys.prefix if prefix is None else prefix)
    version = uv_version(prefix)
    lock = uv_lock(prefix)
    if version is None and lock is None:
        return []
    python = prefix / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    made = f"created by uv {version}" if version else "not created by uv"
    lines = [f"environment: {show_path(prefix)} is {made}" + (f"; its project is locked by {show_path(lock)}"
                                                               if lock else "")]
    if lock is None:  # no project: `uv sync` has nothing to sync this environment to
        return lines
    if locks_lpl_plugin(lock):
        return lines + ["  uv.lock lists lpl-plugin, so `uv sync` keeps it"]
    script = python.with_name("lpl-plugin.exe" if sys.platform == "win32" else "lpl-plugin")
    return lines + [f"  WARNING: `uv sync` removes packages that are not in uv.lock, lpl-plugin among them, and a run "
                    f"that asks for LPL then trains without it; after every `uv sync`, run `uv pip install --python "
                    f"{show_path(python)} lpl-plugin` and `{show_path(script)} enable` again (`uv run` and "
                    "`uv sync --inexact` leave it installed)"]
