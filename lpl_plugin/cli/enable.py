"""`lpl-plugin enable` / `disable`: LPL in every sd-scripts SDXL run of this Python environment, or via the launcher.

`enable` writes `lpl_plugin_activate.pth` into the site-packages this interpreter installs into
(`sysconfig.get_paths()["purelib"]`), or into the user site-packages when lpl-plugin itself is a `pip install --user`
there. Its one line defines a tiny import watcher at interpreter start (no import; see lpl_plugin_boot for what it
costs) that wakes only when a process imports an sd-scripts checkout's `library`. `disable` removes it.
"""

from __future__ import annotations

import argparse
import os
import site
import sys
import sysconfig
from pathlib import Path

import lpl_plugin_boot

from lpl_plugin.settings.errors import UserError


def site_dir() -> Path:
    """Where the `.pth` belongs: beside lpl-plugin in a user site-packages, else this interpreter's site-packages."""
    home = Path(lpl_plugin_boot.__file__).resolve().parent
    try:
        user = Path(site.getusersitepackages()).resolve()
    except Exception:  # some embedded interpreters have no user site
        user = None
    if site.ENABLE_USER_SITE and user is not None and home == user:
        return user
    return Path(sysconfig.get_paths()["purelib"])


def pth_path() -> Path:
    """The activation file of this environment."""
    return site_dir() / lpl_plugin_boot.PTH_NAME


def state() -> tuple[str, Path]:
    """("enabled" | "stale" | "disabled", the file's path) for this environment."""
    path = pth_path()
    if not path.is_file():
        return "disabled", path
    try:
        current = path.read_text(encoding="utf-8") == lpl_plugin_boot.pth_line(path)
    except (OSError, UnicodeDecodeError):
        current = False
    return ("enabled" if current else "stale"), path


def report() -> str:
    """One line for `lpl-plugin doctor`."""
    status, path = state()
    if status == "enabled":
        return (f"activation: enabled for {sys.executable} ({path}): sdxl_train_network.py / sdxl_train.py run "
                "with LPL however they are started")
    if status == "stale":
        return f"activation: {path} is from another lpl-plugin version; run `lpl-plugin enable` again"
    return (f"activation: disabled for {sys.executable}: LPL runs only through the launcher (`lpl-plugin enable` "
            "turns it on for this environment)")


def _enable(args: argparse.Namespace) -> int:
    """Write the activation file."""
    path = pth_path()
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot enable LPL for {sys.executable}: {path.parent} is not writable; run this as the "
                        "user who owns that environment, or install lpl-plugin into sd-scripts' virtual environment")
    before, _ = state()
    path.write_text(lpl_plugin_boot.pth_line(path), encoding="utf-8")
    again = " (it was already; the file was rewritten)" if before == "enabled" else ""
    print(f"LPL enabled for {sys.executable}{again}: {path}\nsdxl_train_network.py and sdxl_train.py of sd-scripts "
          "now read use_lpl / lpl_* from their TOML and command line however they are started; "
          "`lpl-plugin disable` turns this off")
    return 0


def _disable(args: argparse.Namespace) -> int:
    """Remove the activation file."""
    path = pth_path()
    if not path.exists():
        print(f"LPL was not enabled for {sys.executable} (no {path})")
        return 0
    try:
        path.unlink()
    except OSError as error:
        raise UserError(f"cannot disable LPL for {sys.executable}: {path} could not be removed "
                        f"({error.strerror or error}); remove it by hand") from None
    print(f"LPL disabled for {sys.executable}: removed {path}; sd-scripts runs without LPL unless started "
          "through the launcher")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `enable` and `disable`."""
    p = subparsers.add_parser("enable", help="run LPL in every sd-scripts SDXL training of this Python environment")
    p.set_defaults(func=_enable)
    p = subparsers.add_parser("disable", help="undo `enable`: LPL only through the launcher")
    p.set_defaults(func=_disable)
