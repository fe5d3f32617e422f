"""Whether an sd-scripts run asks for LPL, decided from what sd-scripts itself will see, before anything is checked.

sd-scripts reads `--config_file` with the `toml` package, flattens one level of tables into its namespace and parses
the command line over it. The same is done here: the TOML is read with `toml` when it is importable (sd-scripts'
environments have it), else with the standard library's reader; a TOML that cannot be read is sd-scripts' own
problem and counts as not asking. The run asks when the resulting `use_lpl` (or its alias `lpl_enabled`) is set and
does not read as false. Only a run that asks gets the plugin's strict reading and checks; the rest stays untouched.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Sequence

from lpl_plugin.settings.values import FALSE_WORDS

# Largest TOML read to decide whether a run asks (sd-scripts reads any size; far beyond any real training config).
MAX_HOST_TOML = 64 << 20

def reads_as_on(value: Any) -> bool:
    """Whether a use_lpl value asks for LPL: set, and neither False nor a false word (false/0/no/off, any case)."""
    if value is None or value is False:
        return False
    if isinstance(value, str):
        return value.strip().lower() not in FALSE_WORDS
    return not (isinstance(value, (int, float)) and value == 0)


def asks_in(values: Mapping[str, Any]) -> bool:
    """Whether flat settings (sd-scripts' namespace, or a flattened TOML) ask for LPL: `use_lpl` when it is set
    (the command line's `--use_lpl` lands there), else its alias `lpl_enabled`."""
    value = values.get("use_lpl")
    return reads_as_on(values.get("lpl_enabled") if value is None else value)


def unasked_warning(values: Mapping[str, Any]) -> list[str]:
    """The one warning a run that does not ask may get: lpl_* settings given while use_lpl is not set at all."""
    if values.get("use_lpl") is not None or values.get("lpl_enabled") is not None:
        return []
    if not any(isinstance(k, str) and k.startswith("lpl_") and v is not None for k, v in values.items()):
        return []
    return ["lpl-plugin: warning: lpl_* settings are given but use_lpl is not, so LPL is off; add use_lpl = true (or "
            "--use_lpl) to turn it on"]


def config_path(argv: Sequence[str]) -> str | None:
    """The TOML path the host will read: the last `--config_file X` / `--config_file=X`, with `.toml` as it adds it."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--config_file="):
            found = arg.split("=", 1)[1]
    if not found:
        return None
    return found if found.endswith(".toml") else found + ".toml"


def host_settings(path: str) -> dict[str, Any] | None:
    """The TOML as sd-scripts puts it into its namespace (one level of tables flattened), or None if unreadable."""
    try:
        import toml as reader  # sd-scripts' own TOML library
        decode_errors: tuple[type[BaseException], ...] = (reader.TomlDecodeError,)
    except ImportError:
        import tomllib as reader  # type: ignore[no-redef]
        decode_errors = (reader.TOMLDecodeError,)
    try:  # a regular file sd-scripts could read at all; a special or gigantic one is left to sd-scripts
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_HOST_TOML:
            return None
    except (OSError, ValueError):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            data = reader.loads(file.read())
    except (OSError, UnicodeDecodeError, ValueError, TypeError, IndexError, RecursionError, *decode_errors):
        return None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def command_line_use_lpl(argv: Sequence[str]) -> str | None:
    """`--use_lpl [VALUE]` as given on the command line (the last one wins; bare means "true"), or None."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--use_lpl", type=str, nargs="?", const="true", default=None)
    known, _ = parser.parse_known_args(list(argv))
    return known.use_lpl


def asks_from_argv(argv: Sequence[str]) -> bool:
    """Whether a trainer's command line (its TOML as sd-scripts reads it, then `--use_lpl`) asks for LPL."""
    path = config_path(argv)
    settings = (host_settings(path) if path is not None else None) or {}
    given = command_line_use_lpl(argv)
    if given is not None:
        settings = {**settings, "use_lpl": given}
    return asks_in(settings)
