"""The options as data for GUIs and parsers: a field list, JSON Schema, per-key validation and argparse arguments."""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from lpl_plugin.settings.values import FALSE_WORDS, TRUE_WORDS, integer, number, parse_bool
from lpl_plugin.settings.config import ALIASES, LPLConfig, choices, config_from_mapping, fields, kind

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "add_arguments", "json_schema", "namespace_options", "options", "parse_bool",
           "validate"]
_JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}


def options() -> list[dict[str, Any]]:
    """One record per option: name, type, default, minimum/maximum/step, choices, help, group, only_when_enabled."""
    default = LPLConfig()
    records = []
    for f in fields():
        meta, valid = f.metadata, choices(f.name)
        records.append({
            "name": f.name,
            "type": _JSON_TYPES[kind(f.name)],
            "default": getattr(default, f.name),
            "minimum": meta["minimum"],
            "maximum": meta["maximum"],
            "exclusive_minimum": meta["exclusive_minimum"],
            "step": meta["step"],
            "choices": list(valid) if valid else None,
            "help": meta["help"],
            "group": meta["group"],
            "only_when_enabled": f.name != "use_lpl",
        })
    return records


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of the lpl block; trainer keys beside it are allowed."""
    properties: dict[str, Any] = {}
    for record in options():
        prop: dict[str, Any] = {"type": record["type"], "default": record["default"], "description": record["help"]}
        if record["choices"]:
            prop["enum"] = record["choices"]
        if record["minimum"] is not None:
            prop["exclusiveMinimum" if record["exclusive_minimum"] else "minimum"] = record["minimum"]
        if record["maximum"] is not None:
            prop["maximum"] = record["maximum"]
        if record["step"] is not None:
            prop["x-step"] = record["step"]
        prop["x-group"] = record["group"]
        prop["x-only-when-enabled"] = record["only_when_enabled"]
        properties[record["name"]] = prop
    for alias, target in ALIASES.items():
        properties[alias] = {"$ref": f"#/properties/{target}", "description": f"Alias of {target}."}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lpl-plugin options",
        "description": LPLConfig.__doc__,
        "type": "object",
        "properties": properties,
    }


def validate(mapping: Mapping[str, Any], *, source: str = "") -> dict[str, list[str]]:
    """Per-key error messages for a mapping of options (empty when valid); '' collects errors with no key.

    The same checks as LPLConfig's own (and the same one-line, escaped messages), so a form that validates here
    builds an LPLConfig and writes a TOML that load_config reads back unchanged.
    """
    _, problems = config_from_mapping(mapping, source=source)
    errors: dict[str, list[str]] = {}
    for problem in problems:
        errors.setdefault(problem.key, []).append(problem.message)
    return errors


def add_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add `--use_lpl` and `--lpl_*` to a parser; each defaults to None so a TOML value is kept unless given."""
    group = parser.add_argument_group("Latent Perceptual Loss (lpl-plugin)")
    for record in options():
        name, value_type = record["name"], record["type"]
        default_text = str(record["default"]).lower() if value_type == "boolean" else record["default"]
        text = f"{record['help']} (default: {default_text})".replace("%", "%%")  # argparse formats help with %
        existing = {a for action in parser._actions for a in action.option_strings}
        if f"--{name}" in existing:
            continue
        if value_type == "boolean":
            group.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, default=None,
                               metavar="true|false", help=text)
        elif record["choices"]:
            group.add_argument(f"--{name}", choices=record["choices"], default=None, help=text)
        else:
            parse = integer if value_type == "integer" else number
            group.add_argument(f"--{name}", type=parse, default=None, help=text)
    return group


def namespace_options(namespace: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The LPL options present (not None) in a parsed namespace or a flat mapping."""
    items = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    names = {record["name"] for record in options()} | set(ALIASES)
    return {k: v for k, v in items.items() if isinstance(k, str) and (k in names or k.startswith("lpl_"))
            and v is not None}
