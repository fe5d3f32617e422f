"""User text inside messages: escaped, shortened and never interpreted, so one problem is always one safe line.

Every key, value, path or line of a user's file that a message echoes goes through `shown` (or `show_value` /
`show_path`, built on it). Messages are assembled by concatenation or f-strings whose *arguments* hold user text;
user text itself is never a template (no `.format()`, no `%`, no logging format string).
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from typing import Any, Iterable

# Characters of user text a message keeps; longer text keeps its start, then "...", then how long it was.
MAX_SHOWN = 80
MAX_PATH = 160
ELLIPSIS = "..."
# Unicode categories that can move the cursor, end a line, reorder text or hide characters on a terminal:
# controls (C0, DEL, C1: ESC starts terminal escape sequences), format characters (bidi overrides, zero-width),
# line and paragraph separators, surrogates (undecodable bytes of a file name) and unassigned code points.
_HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"}
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """`text` with every control, format or separator character written as a visible escape (`\\n`, `\\x1b`)."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char == " " or unicodedata.category(char) not in _HIDDEN:
            out.append(char)
        elif char in _NAMED:
            out.append(_NAMED[char])
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` cut to about `limit` characters, ending in '...' and its full length when it was longer."""
    if len(text) <= limit:
        return text
    return f"{text[:max(1, limit - len(ELLIPSIS))]}{ELLIPSIS} ({len(text)} characters)"


def shown(text: Any, limit: int = MAX_SHOWN) -> str:
    """User text as it may appear in a message: shortened first, then escaped (so escapes cannot be cut in half)."""
    return escape(shorten(text if isinstance(text, str) else str(text), limit))


def show_path(path: Any) -> str:
    """A path named in a message: escaped, and shortened to MAX_PATH characters."""
    try:
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    except (TypeError, ValueError):
        text = repr(path)
    return shown(text, MAX_PATH)


def _big_int(value: int) -> str | None:
    """An integer too long to print (or to turn into text at all) as its digit count, else None."""
    if value.bit_length() <= 256:
        return None
    digits = int(value.bit_length() * math.log10(2)) + 1  # exact, or one too many just below a power of ten
    if abs(value) < 10 ** (digits - 1):
        digits -= 1
    return f"{'a negative' if value < 0 else 'an'} integer of {digits} digits"


def show_value(value: Any, limit: int = MAX_SHOWN) -> str:
    """A value written the way TOML writes it (true, 1.5, "text", [..], {..}), shortened and escaped."""
    return escape(_toml_text(value, limit, depth=0))


def _quoted(text: str, limit: int) -> str:
    """A string in double quotes, cut after `limit` characters with its full length after the closing quote."""
    if len(text) <= limit:
        return json.dumps(text, ensure_ascii=False)
    return f"{json.dumps(text[:limit], ensure_ascii=False)}{ELLIPSIS} ({len(text)} characters)"


def _toml_text(value: Any, limit: int, depth: int) -> str:
    """TOML-like text of a value; containers are cut off once longer than `limit` (never walked in full)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return _big_int(value) or str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _quoted(value, limit)
    if value is None:  # only the Python API passes None
        return "None"
    if hasattr(value, "isoformat") and callable(value.isoformat):  # TOML dates and times
        try:
            return shorten(str(value.isoformat()), limit)
        except Exception:
            pass
    if depth > 2:
        return "..."
    if isinstance(value, dict):
        entries = (f"{shorten(key, limit // 2) if isinstance(key, str) else _toml_text(key, limit // 2, depth + 1)}"
                   f" = {_toml_text(inner, limit // 2, depth + 1)}" for key, inner in value.items())
        return "{" + _joined(entries, len(value), limit, "keys") + "}"
    if isinstance(value, (list, tuple)):
        entries = (_toml_text(inner, limit // 2, depth + 1) for inner in value)
        return "[" + _joined(entries, len(value), limit, "items") + "]"
    try:
        return shorten(repr(value), limit)
    except Exception:  # a hostile object's repr: name its type instead
        return f"<{type(value).__name__}>"


def type_name(value: Any) -> str:
    """A value's type in TOML's words (boolean, integer, float, string, array, table), else Python's name."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", tuple: "array",
             dict: "table", type(None): "NoneType"}
    return names.get(type(value), type(value).__name__)


def one_line(text: str) -> str:
    """A finished message line made safe for a terminal (a last guard; messages are built safe already)."""
    return escape(text)


def _joined(entries: Iterable[str], count: int, limit: int, noun: str) -> str:
    """Entries joined with commas, cut after about `limit` characters with a note of how many there were."""
    parts, size = [], 0
    for part in entries:
        parts.append(part)
        size += len(part) + 2
        if size > limit and len(parts) < count:
            parts.append(f"... ({count} {noun})")
            break
    return ", ".join(parts)
