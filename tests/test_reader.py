"""The safe reader (files.py) and safe messages (messages.py): their rules on their own, beside the catalogue."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lpl_plugin import ConfigError, LPLConfig, validate
from lpl_plugin.settings.config import field_names
from lpl_plugin.settings.errors import FileError, UserError
from lpl_plugin.settings.files import (MAX_DEPTH, check_output, data_depth, parse_json, parse_toml, read_bytes,
                                       read_json, write_bytes)
from lpl_plugin.settings.messages import escape, show_path, show_value, shown

PACKAGE = Path(__file__).parent.parent
# Text an attacker would put in a key or value: line breaks, terminal escapes, bidi controls, format fields.
NASTY = ["a\nb", "a\rb", "\x1b[2J\x1b[31mred", "\x1b]0;title\x07", "\u202eevil", "x\u2028y", "\x9b31m", "\x00",
         "{key.__class__}", "{0:>99999999}", "%s%n%(x)s", "x" * 10000, "\ud800", "\ufeffbom"]
UNSAFE = [chr(c) for c in range(0x20) if c != 0x20] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)] + \
    ["\u2028", "\u2029", "\u202e", "\ud800"]


def safe(line: str) -> bool:
    """Whether a message line has no character that could forge a line or drive a terminal."""
    return not any(char in line for char in UNSAFE)


@pytest.mark.parametrize("text", NASTY)
def test_shown_text_is_one_safe_short_line(text):
    out = shown(text)
    assert safe(out) and len(out) < 150
    assert escape(out) == out  # escaping is idempotent: a message escaped twice reads the same
    assert safe(show_value(text)) and safe(show_path(text))


def test_values_are_shown_the_way_toml_writes_them():
    assert show_value(True) == "true" and show_value(1.5) == "1.5" and show_value("l2") == '"l2"'
    assert show_value({"value": 2.5}) == "{value = 2.5}" and show_value([1, 2]) == "[1, 2]"
    assert show_value(10 ** 5000) == "an integer of 5001 digits"  # str() of it would raise ValueError
    assert show_value(-(10 ** 300)) == "a negative integer of 301 digits"
    looped: dict = {}
    looped["a"] = looped
    assert show_value(looped) == "{a = {a = {a = ...}}}"
    assert show_value(list(range(1000))).endswith("... (1000 items)]")
    assert escape("tab\there") == "tab\\there"


@pytest.mark.parametrize("name", field_names())
@pytest.mark.parametrize("text", NASTY)
def test_every_problem_is_one_safe_line(name, text):
    problems = validate({name: text, text: 1, "lpl": {text: {text: text}}})
    lines = [line for messages in problems.values() for line in messages]
    assert lines and all(safe(line) and "\n" not in line and len(line) < 600 for line in lines), lines
    with pytest.raises(ConfigError) as info:
        LPLConfig.from_mapping({name: text})
    assert all(safe(line) for line in info.value.lines())


def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    with pytest.raises(FileError, match="is a FIFO"):
        read_bytes(fifo)  # a blocking open would hang this test forever


def test_size_and_errors_name_the_path(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2000)
    with pytest.raises(FileError, match=r"big.json: is 2.0 KiB, more than the 1.0 KiB"):
        read_bytes(big, limit=1024)
    with pytest.raises(FileError, match="not found"):
        read_json(tmp_path / "nope.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileError, match="is a file, not a folder"):
        read_json(tmp_path / "file" / "x.json")
    with pytest.raises(FileError, match="NUL character"):
        read_json("a\x00b")


def test_nesting_is_bounded_before_and_after_parsing():
    assert parse_toml("[a.b]\nc = [[1]]\n", "x") == {"a": {"b": {"c": [[1]]}}}
    assert parse_toml("a = 1.5\nb = 1979-05-27T07:32:00.999Z\nc = [" + ", ".join(["2.5"] * 200) + "]\n", "x")
    with pytest.raises(FileError, match=f"{MAX_DEPTH + 1} levels deep"):
        parse_toml("a" + ".a" * MAX_DEPTH + " = 1\n", "x")
    with pytest.raises(FileError, match="levels deep"):
        parse_json("[" * 100 + "]" * 100, "x")
    assert parse_json('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', "x") == {"a": "[" * 35}
    cyclic: dict = {}
    cyclic["self"] = cyclic
    assert data_depth(cyclic) > MAX_DEPTH and data_depth({"a": [1, {"b": 2}]}) == 3


def test_outputs_are_checked_first_and_written_whole(tmp_path):
    with pytest.raises(FileError, match=r"--out .*x.bmp: unknown extension .bmp; use one of .png"):
        check_output(tmp_path / "x.bmp", (".png",))
    with pytest.raises(FileError, match="exists and is a directory"):
        (tmp_path / "d.png").mkdir()
        check_output(tmp_path / "d.png", (".png",))
    (tmp_path / "full.png").symlink_to("/dev/full")
    with pytest.raises(FileError, match="exists and is a character device"):
        check_output(tmp_path / "full.png", (".png",))
    out = check_output(tmp_path / "ok.png", (".png",))
    write_bytes(out, b"data")
    assert out.read_bytes() == b"data" and sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "full.png", "ok.png"]
    with pytest.raises(FileError, match="could not be written"):
        write_bytes(tmp_path / "missing" / "x.png", b"data")


def test_no_user_text_becomes_a_format_string():
    """No str.format() call and no '%' formatting in the package; logging gets user text only as arguments."""
    offenders = []
    for path in [*PACKAGE.joinpath("lpl_plugin").rglob("*.py"), *PACKAGE.joinpath("patches").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
                offenders.append(f"{path.name}:{node.lineno} .format()")
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant) \
                    and isinstance(node.left.value, str):
                offenders.append(f"{path.name}:{node.lineno} % formatting")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "debug", "info", "warning", "error") and node.args and len(node.args) > 1 \
                    and not isinstance(node.args[0], ast.Constant):
                offenders.append(f"{path.name}:{node.lineno} logging with a computed format")
    assert offenders == []


@pytest.mark.parametrize("argv", [["-m", "lpl_plugin", "validate", "cfg.toml"],
                                  ["-m", "lpl_plugin.launch", "SCRIPT", "--config_file", "cfg.toml"]])
def test_config_checks_do_not_import_torch(tmp_path, argv):
    from tests.standin_fixtures import root

    (tmp_path / "cfg.toml").write_text("use_lpl = true\nlpl_wieght = 1\n", encoding="utf-8")
    argv = [str(root("v0_10_1") / "sdxl_train_network.py") if a == "SCRIPT" else a for a in argv]
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(PACKAGE)})
    assert done.returncode == 2 and "unknown option `lpl_wieght`" in done.stderr, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "lpl_plugin" in imported and not imported & {"torch", "diffusers", "numpy", "PIL", "safetensors"}


def test_user_errors_print_safe_lines():
    error = UserError("first\x1b[31m\nsecond\x07")
    assert error.lines() == ["first\\x1b[31m", "second\\x07"]


def test_adapter_state_files_go_through_the_reader(tmp_path):
    from lpl_plugin.patches.saved_state import STATE_FILE
    from lpl_plugin.patches.sd_scripts_state import resumed_state

    os.mkfifo(tmp_path / STATE_FILE)
    with pytest.raises(UserError) as info:
        resumed_state(tmp_path)  # a blocking read would hang here
    (line,) = info.value.lines()
    assert "is unreadable (is a FIFO (named pipe)" in line and "lpl_plugin_state.json" in line
    (tmp_path / STATE_FILE).unlink()
    (tmp_path / STATE_FILE).write_text('{"optimizer_steps": ' + "[" * 5000 + "]" * 5000 + "}", encoding="utf-8")
    with pytest.raises(UserError, match="nests tables or arrays 5001 levels deep"):
        resumed_state(tmp_path)
    (tmp_path / STATE_FILE).write_text('{"optimizer_steps": 7, "hook": {}}', encoding="utf-8")
    assert resumed_state(tmp_path) == (7, {})
