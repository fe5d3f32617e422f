"""Reading the `lpl_*` keys of a trainer TOML (through the safe reader), and writing the lpl block back."""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable

from lpl_plugin.settings.config import ALIASES, LPLConfig, config_from_mapping, fields, is_lpl_key
from lpl_plugin.settings.errors import ArgumentError, ArgumentTypeError, FileError
from lpl_plugin.settings.files import parse_toml, read_text, tomllib
from lpl_plugin.settings.messages import show_path, show_value, shown, type_name
from lpl_plugin.settings.problems import ConfigError, Problem

__all__ = ["check_file", "config_from_toml", "load_config", "read_toml", "render_toml", "toml_value", "tomllib"]

# Kept under its historical name: the mapping rules are config.py's, TOML adds nothing to them.
config_from_toml = config_from_mapping
_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")
_LINE_KEY = re.compile(r"""^\s*\[*\s*([^\]=#]+?)\s*(?:\]|=|$)""")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# What to do about a TOML syntax error, by the start of the parser's reason; each gets the key on that line.
_SYNTAX_ADVICE: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("Cannot overwrite a value",
     lambda key: f"`{key}` is set twice in the same table (or as a value and a table); keep one"),
    ("Cannot declare", lambda key: f"table `[{key}]` is declared twice; merge the two into one"),
    ("Invalid value",
     lambda key: f"`{key}` has no valid value; write booleans as lower-case true/false and strings in quotes"),
    ("Illegal character '\\n'", lambda key: f"close the quotes of `{key}`'s string on the same line"),
)


def read_toml(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Parse a TOML file as data only; problems name the file (and line and column for syntax errors)."""
    source = show_path(path)
    try:
        text = read_text(path, what="a TOML file")
        return parse_toml(text, source), []
    except FileError as error:
        return None, [Problem(error.path, "", error.reason)]
    except tomllib.TOMLDecodeError as error:
        return None, [_syntax_problem(source, str(error), text)]


def _syntax_problem(source: str, message: str, text: str) -> Problem:
    """A TOML decoder message as `file:line:col: malformed TOML: reason; advice` (the key on that line named)."""
    found = _POSITION.search(message)
    lines = text.splitlines() or [""]
    if found:
        line_no, column = int(found.group(1)), int(found.group(2))
    else:  # "(at end of document)": point just past the last character
        line_no, column = len(lines), len(lines[-1]) + 1
    reason = shown(re.sub(r"\(at [^)]*\)", "", message).strip().rstrip("."))
    where, head = f"{source}:{line_no}:{column}", f"malformed TOML: {reason}"
    line = lines[line_no - 1] if 0 < line_no <= len(lines) else ""
    if line.startswith("\ufeff"):
        return Problem(where, "", f"{head}; the file starts with a byte-order mark (BOM), which TOML does not "
                       "allow: save it as UTF-8 without BOM")
    key_match = _LINE_KEY.match(line)
    key = key_match.group(1).strip() if key_match else ""
    advice = next((make for start, make in _SYNTAX_ADVICE if reason.startswith(start)), None)
    if advice is None or not key:
        return Problem(where, key, f"{head}; fix the TOML syntax of this line: {show_value(line.strip())}")
    return Problem(where, key, f"{head}; {advice(shown(key))}")


def check_file(path: str | os.PathLike[str]) -> tuple[LPLConfig | None, list[Problem]]:
    """Read and validate one TOML file, collecting every problem rather than stopping at the first."""
    data, problems = read_toml(path)
    if data is None:
        return None, problems
    return config_from_mapping(data, source=show_path(path))


def load_config(path: str | os.PathLike[str]) -> LPLConfig:
    """Read the LPL settings of a trainer TOML; raises ConfigError listing every problem."""
    config, problems = check_file(path)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def toml_value(value: Any) -> str:
    """One option value written as TOML (what tomllib reads back as the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArgumentError(f"cannot write the non-finite number {show_value(value)} to TOML")
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and _BARE_KEY.fullmatch(value):
        return f'"{value}"'
    raise ArgumentTypeError(f"cannot write {show_value(value)} ({type_name(value)}) as an option value")


def render_toml(config: LPLConfig | None = None, *, table: str | None = "lpl", comments: bool = True,
                only_changed: bool = False) -> str:
    """The lpl block of a trainer TOML (an `[lpl]` table by default), with each option's help as a comment.

    `table` must be a bare TOML key (letters, digits, `_`, `-`) that is not itself an option name, or None for
    keys at the top level; anything else could inject keys, so it is refused.
    """
    if config is not None and not isinstance(config, LPLConfig):
        raise ArgumentTypeError(f"render_toml: `config` must be an LPLConfig, got {type_name(config)}; build one "
                                "with LPLConfig(...) or LPLConfig.from_mapping(...)")
    if table is not None and (not isinstance(table, str) or not _BARE_KEY.fullmatch(table) or is_lpl_key(table)
                              or table in ALIASES):
        raise ArgumentError(f"render_toml: `table` must be a bare TOML key (letters, digits, _ and -) other than an "
                            f"option name, or None, got {show_value(table)}")
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
