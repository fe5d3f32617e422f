"""LPL in sd-scripts started the usual ways: what runs once the trainer script first imports its checkout's code.

`lpl_plugin_boot` (the `.pth` start-up hook of `lpl-plugin enable`) calls `activate` from the script's own first
import of `library`. In order: the TOML named by `--config_file` is checked (one line per mistake, exit status 2,
before any model loads); the checkout's release is read from its source; then the adapter patches each sd-scripts
module as the script imports it, and does everything the launcher does. A release lpl-plugin does not know is
refused in one line when the run asks for LPL (`use_lpl` in the TOML or on the command line) and left completely
alone when it does not.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from .config import LPLConfig
from .errors import UserError, write_lines

log = logging.getLogger("lpl_plugin")


def config_file(argv: Sequence[str]) -> str | None:
    """The TOML path the host will read: the last `--config_file X` / `--config_file=X`, with `.toml` as it adds it."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--config_file="):
            found = arg.split("=", 1)[1]
    if found is None:
        return None
    return found if found.endswith(".toml") else found + ".toml"


def preflight(path: str) -> LPLConfig:
    """Check the TOML's LPL keys and their context; warnings go to stderr, problems raise ConfigError."""
    from .preflight import check_training_config

    checked = check_training_config(path)
    write_lines(checked.warnings)
    return checked.raise_for_problems()


def command_line_use_lpl(argv: Sequence[str]) -> bool | None:
    """`--use_lpl [true|false]` as given on the command line (the last one wins), or None when absent."""
    from .schema import parse_bool

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--use_lpl", type=str, nargs="?", const="true", default=None)
    known, _ = parser.parse_known_args(list(argv))
    if known.use_lpl is None:
        return None
    try:
        return parse_bool(known.use_lpl)
    except argparse.ArgumentTypeError:
        return True  # a bad value: the host's parser reports it; the run meant LPL


def checks(argv: Sequence[str]) -> bool:
    """Check the TOML before anything loads; whether the run asks for LPL (the command line over the TOML)."""
    path = config_file(argv)
    config = preflight(path) if path is not None else None
    given = command_line_use_lpl(argv)
    return given if given is not None else bool(config is not None and config.use_lpl)


def activate(script: str, argv: Sequence[str]) -> None:
    """Arrange for the adapter to patch the trainer's sd-scripts modules as they load; exit 2 on user errors."""
    from .patches import sd_scripts
    from .patches.sd_scripts_seams import SourceReader, UnsupportedHost, detect, refuse

    if sd_scripts.current() is not None:  # the launcher installed it already
        return
    asks: bool | None = None
    try:
        asks = checks(argv)
        kind = sd_scripts.script_kind(script)
        root = Path(script).resolve().parent
        layout, problems = detect(SourceReader(root), kind)
        if layout is None:
            if asks:
                raise UnsupportedHost(str(root), problems)
            return  # a release lpl-plugin does not know, and the run does not ask for LPL: leave it alone
        sd_scripts.install(kind, layout=layout).patcher.exit_on_error = True
    except UserError as error:
        sd_scripts.uninstall()
        refuse(error)
    except Exception as error:  # a bug of ours: a run without LPL must not pay for it
        sd_scripts.uninstall()
        if asks:
            raise
        print(f"lpl-plugin could not start ({type(error).__name__}: {error}); this run does not ask for LPL and "
              "goes on without it", file=sys.stderr)
