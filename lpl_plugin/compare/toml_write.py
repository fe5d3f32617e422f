"""Writing plain TOML (the arm configs compare hands to sd-scripts): scalars, arrays, tables and arrays of tables."""

from __future__ import annotations

import json
import math
from typing import Any


def value(item: Any) -> str:
    """One TOML value (strings in JSON's escaping, which TOML basic strings read the same)."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int):
        return str(item)
    if isinstance(item, float):
        if not math.isfinite(item):
            raise ValueError(f"cannot write {item} to TOML")
        return repr(item)
    if isinstance(item, str):
        return json.dumps(item, ensure_ascii=False)
    if isinstance(item, (list, tuple)):
        return "[" + ", ".join(value(x) for x in item) + "]"
    if isinstance(item, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {value(v)}" for k, v in item.items()) + "}"
    raise ValueError(f"cannot write {type(item).__name__} to TOML")


def is_table_array(item: Any) -> bool:
    """Whether a value is a non-empty list of tables."""
    return isinstance(item, list) and bool(item) and all(isinstance(x, dict) for x in item)


def dumps(data: dict[str, Any], prefix: str = "") -> str:
    """A TOML document: plain keys first, then tables, then arrays of tables (recursively)."""
    lines = [f"{json.dumps(str(k))} = {value(v)}" for k, v in data.items()
             if not isinstance(v, dict) and not is_table_array(v)]
    for key, item in data.items():
        name = f"{prefix}{json.dumps(str(key))}"
        if isinstance(item, dict):
            lines += ["", f"[{name}]", dumps(item, name + ".").strip()]
        elif is_table_array(item):
            for table in item:
                lines += ["", f"[[{name}]]", dumps(table, name + ".").strip()]
    return "\n".join(lines).strip() + "\n"
