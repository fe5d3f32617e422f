"""The bad-input catalog: every malformed or conflicting config fails in one line with exit 2; edge cases pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lpl_plugin import ConfigError
from lpl_plugin.cli.main import main
from lpl_plugin.settings.preflight import check_training_config, check_training_mapping

DATA = Path(__file__).parent / "data"
CATALOG = json.loads((DATA / "bad_configs" / "catalog.json").read_text(encoding="utf-8"))["entries"]
GOOD_WARNINGS = {
    "float16_unknown_vae.toml": "the SDXL VAE overflows in float16",
    "keys_without_use_lpl.toml": "`use_lpl` is not",
    "dataset_config.toml": "this is a dataset config",
}


@pytest.fixture(autouse=True)
def in_data_dir(monkeypatch):
    """Configs name model folders relative to tests/data, as sd-scripts resolves them from where it runs."""
    monkeypatch.chdir(DATA)


def validate(path: str, capsys) -> tuple[int, list[str], str]:
    """`lpl-plugin validate PATH` in this process: exit status, stderr lines, stdout."""
    status = main(["validate", path])
    captured = capsys.readouterr()
    return status, captured.err.strip().splitlines(), captured.out


def test_catalog_is_large_and_complete():
    listed = {entry["file"] for entry in CATALOG}
    on_disk = {p.name for p in (DATA / "bad_configs").iterdir() if p.suffix == ".toml"}
    assert len(CATALOG) >= 30 and len(listed) == len(CATALOG)
    assert on_disk == listed - {"missing.toml"} and not (DATA / "bad_configs" / "missing.toml").exists()


@pytest.mark.parametrize("entry", CATALOG, ids=[e["file"] for e in CATALOG])
def test_bad_config_fails_in_one_line(entry, capsys):
    path = f"bad_configs/{entry['file']}"
    status, lines, out = validate(path, capsys)
    assert status == 2 and out == ""
    assert len(lines) == 1, lines
    assert lines[0].startswith(path) and entry["expect"] in lines[0]
    assert not entry["key"] or entry["key"] in lines[0]
    with pytest.raises(ConfigError) as info:  # what the launcher calls before loading any model
        check_training_config(path).raise_for_problems()
    assert [str(p) for p in info.value.problems] == lines


def test_real_processes_exit_2_without_traceback():
    for name in ("vae_fewer_blocks.toml", "not_utf8.toml"):
        result = subprocess.run([sys.executable, "-m", "lpl_plugin", "validate", f"bad_configs/{name}"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (DATA / "good_configs").glob("*.toml")))
def test_valid_configs_and_edge_cases_pass(name, capsys):
    status, lines, out = validate(f"good_configs/{name}", capsys)
    assert status == 0 and out.startswith("# good_configs/")
    expected = GOOD_WARNINGS.get(name)
    assert (len(lines) == 1 and expected in lines[0]) if expected else lines == []


def test_mapping_api_for_launchers_and_host_timesteps():
    flat = {"use_lpl": True, "lpl_t_threshold": 800, "max_train_steps": 50, "lpl_start": 10}
    assert check_training_mapping(flat, "args").raise_for_problems().lpl_t_threshold == 800
    result = check_training_mapping(flat, "args", num_train_timesteps=500)
    assert result.config is None and [p.key for p in result.problems] == ["lpl_t_threshold"]
    assert str(result.problems[0]).startswith("args: `lpl_t_threshold` = 800 is beyond the scheduler's 500")


def test_named_paths_are_not_searched(tmp_path):
    (tmp_path / "vae").mkdir()
    os.mkfifo(tmp_path / "vae" / "config.json")  # a reader that opened it would block: refused, never opened
    flat = {"use_lpl": True, "lpl_num_blocks": 4}
    (problem,) = check_training_mapping({**flat, "vae": str(tmp_path / "vae")}, "s").problems
    assert "is a FIFO (named pipe), not a regular file" in problem.message and problem.key == "vae"
    assert check_training_mapping({**flat, "vae": "models/*"}, "s").problems == []  # no globbing
    deep = {**flat, "vae": "models"}  # a folder of VAE folders: not searched below its own config.json, vae/
    assert check_training_mapping(deep, "s").problems == []
