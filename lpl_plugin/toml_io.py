"""Reading the `lpl_*` keys from a trainer TOML the way sd-scripts flattens it, and writing the lpl block back."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from .config import (ALIASES, LPLConfig, ConfigError, Problem, build_config, field_names, fields, is_lpl_key,
                     suggest)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


def read_toml(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Parse a TOML file as data only; problems name the file, and line and column for syntax errors."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None, [Problem(source, "", "config file not found")]
    except IsADirectoryError:
        return None, [Problem(source, "", "is a directory, expected a TOML file")]
    except PermissionError:
        return None, [Problem(source, "", "config file is not readable (permission denied)")]
    except UnicodeDecodeError as error:
        return None, [Problem(source, "", f"config file is not UTF-8 text (byte {error.start})")]
    try:
        return tomllib.loads(text), []
    except tomllib.TOMLDecodeError as error:
        return None, [Problem(*_syntax_problem(source, str(error), text))]


def _syntax_problem(source: str, message: str, text: str) -> tuple[str, str, str]:
    """Turn a TOML decoder message into `file:line:col` plus a one-line reason."""
    found = _POSITION.search(message)
    if found:
        line, column = found.group(1), found.group(2)
    else:  # "(at end of document)": point just past the last character
        lines = text.splitlines() or [""]
        line, column = str(len(lines)), str(len(lines[-1]) + 1)
    reason = re.sub(r"\(at [^)]*\)", "", message).strip().rstrip(".")
    return f"{source}:{line}:{column}", "", f"malformed TOML: {reason}"


def _misspelt_prefix(key: str) -> str | None:
    """The canonical spelling of a key that looks meant for LPL but is not written as one, if any."""
    normal = key.lower().replace("-", "_")
    if is_lpl_key(key) or not (is_lpl_key(normal) or "lpl" in normal or normal.startswith("lp_")):
        return None
    return normal if is_lpl_key(normal) else key


def collect_lpl_keys(mapping: Mapping[str, Any], *,
                     source: str) -> tuple[dict[str, Any], dict[str, str], list[Problem]]:
    """Gather `use_lpl`/`lpl_*` values from the top level and one table deep, as sd-scripts flattens them.

    Returns the values by canonical name, the table each came from ('' at top level) and the problems found.
    """
    values: dict[str, Any] = {}
    tables: dict[str, str] = {}
    where: dict[str, str] = {}
    problems: list[Problem] = []
    known = field_names() + list(ALIASES)

    def take(key: str, value: Any, location: str) -> None:
        canonical = ALIASES.get(key, key)
        here = f"{location} `{key}`" if location else f"`{key}`"
        if canonical in values:
            problems.append(Problem(source, canonical, f"{here} repeats `{canonical}` already set at {where[canonical]}; "
                                    "sd-scripts keeps only one of them, so set it once"))
            return
        values[canonical] = value
        tables[canonical] = location
        where[canonical] = here

    def look(key: str, value: Any, location: str) -> None:
        if is_lpl_key(key) or key in ALIASES:
            take(key, value, location)
            return
        respelt = _misspelt_prefix(key)
        if respelt is not None:
            hint = f" (did you mean `{respelt}`?)" if respelt in known else suggest(respelt, known)
            problems.append(Problem(source, key, f"{location + ' ' if location else ''}`{key}` is not an LPL "
                                    f"option{hint}; LPL keys are lower case and start with `lpl_`"))

    for key, value in mapping.items():
        if not isinstance(value, dict):
            look(key, value, "")
            continue
        table = f"[{key}]"
        for inner, inner_value in value.items():
            if isinstance(inner_value, dict) and any(is_lpl_key(k) for k in inner_value):
                problems.append(Problem(source, inner, f"[{key}.{inner}] holds LPL keys two tables deep; sd-scripts "
                                        "reads only one table level, so move them to the top level or an [lpl] table"))
            elif key == "lpl" and not (is_lpl_key(inner) or inner in ALIASES):
                problems.append(Problem(source, inner, f"[lpl] `{inner}` lacks the `lpl_` prefix; sd-scripts flattens "
                                        f"tables, so it would set its own `{inner}`{suggest('lpl_' + inner, known)}"))
            else:
                look(inner, inner_value, table)
    return values, tables, problems


def config_from_toml(data: Mapping[str, Any], *, source: str) -> tuple[LPLConfig | None, list[Problem]]:
    """Validate parsed TOML data; returns the config or every problem found."""
    values, tables, problems = collect_lpl_keys(data, source=source)
    config, more = build_config(values, source=source, tables=tables)
    problems.extend(more)
    return (None if problems else config), problems


def check_file(path: str | os.PathLike[str]) -> tuple[LPLConfig | None, list[Problem]]:
    """Read and validate one TOML file, collecting every problem rather than stopping at the first."""
    data, problems = read_toml(path)
    if data is None:
        return None, problems
    return config_from_toml(data, source=str(path))


def load_config(path: str | os.PathLike[str]) -> LPLConfig:
    """Read the LPL settings of a trainer TOML; raises ConfigError listing every problem."""
    config, problems = check_file(path)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return config


def toml_value(value: Any) -> str:
    """One value written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write the non-finite number {value!r} to TOML")
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def render_toml(config: LPLConfig | None = None, *, table: str | None = "lpl", comments: bool = True,
                only_changed: bool = False) -> str:
    """The lpl block of a trainer TOML (an `[lpl]` table by default), with each option's help as a comment."""
    config = config if config is not None else LPLConfig(use_lpl=True)
    default = LPLConfig()
    lines = [f"[{table}]"] if table else []
    for f in fields():
        value = getattr(config, f.name)
        if only_changed and value == getattr(default, f.name):
            continue
        if comments:
            lines.append(f"# {f.metadata['help']}")
        lines.append(f"{f.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"
