"""The `lpl-plugin` settings commands, run as a user runs them (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

from lpl_plugin import LPLConfig, load_config

from .conftest import write


def run(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m lpl_plugin ARGS` and capture its output."""
    return subprocess.run([sys.executable, "-m", "lpl_plugin", *args], capture_output=True, text=True, timeout=120)


def test_validate_three_mistakes_three_lines(tmp_path):
    path = write(tmp_path, 'use_lpl = true\nlpl_wieght = 1.0\n[lpl]\nlpl_num_blocks = 7\nlpl_loss_type = "l2"\n')
    result = run("validate", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert all(line.startswith(str(path)) for line in lines)
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_validate_valid_prints_effective_settings(tmp_path):
    path = write(tmp_path, "[lpl]\nuse_lpl = true\nlpl_weight = 1.5\n")
    result = run("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "LPL is on" in result.stdout and "lpl_weight = 1.5" in result.stdout and "lpl_t_threshold = 200" in result.stdout


def test_validate_warns_when_keys_set_without_use_lpl(tmp_path):
    result = run("validate", str(write(tmp_path, "lpl_weight = 2.0\n")))
    assert result.returncode == 0 and "use_lpl" in result.stderr and "LPL is off" in result.stdout


def test_validate_missing_and_broken_files(tmp_path):
    result = run("validate", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr
    result = run("validate", str(write(tmp_path, "use_lpl = [\n")))
    assert result.returncode == 2 and "malformed TOML" in result.stderr and "Traceback" not in result.stderr


def test_schema_is_json_with_bounds_choices_and_help():
    result = run("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    props = schema["properties"]
    assert props["lpl_num_blocks"]["minimum"] == 0 and props["lpl_num_blocks"]["maximum"] == 4
    assert props["lpl_norm_type"]["enum"] == ["default", "shared", "batch"]
    assert props["lpl_weight"]["type"] == "number" and props["lpl_weight"]["description"]
    assert props["use_lpl"]["default"] is False


def test_defaults_round_trip(tmp_path):
    result = run("defaults")
    assert result.returncode == 0
    assert load_config(write(tmp_path, result.stdout)) == LPLConfig(use_lpl=True)


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    command = 'python -m pip install ".[test]" && python -m pytest'
    assert f"```bash\n{command}\n```" in readme
    assert command in (root / ".ci" / "run").read_text()


def test_readme_documents_every_option():
    from pathlib import Path

    from lpl_plugin import options

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert all(f"`{o['name']}`" in readme for o in options())


def test_version_is_the_installed_distribution_version():
    from importlib.metadata import version

    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"lpl-plugin {version('lpl-plugin')}"
