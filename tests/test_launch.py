"""The launcher (`lpl-launch` / `python -m lpl_plugin.launch`) running the sd-scripts stand-ins in this process."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from lpl_plugin import launch
from tests.standin_fixtures import standin, write_config

LPL_ON = "[lpl]\nuse_lpl = true\nlpl_t_threshold = 1000\nlpl_num_blocks = 2\n"


def logs(folder: Path) -> list[dict]:
    """The scalars the stand-in's tracker received."""
    return [json.loads(line) for line in (folder / "logs" / "logs.jsonl").read_text().splitlines()]


def saved(folder: Path) -> tuple[dict, dict]:
    """Tensors and metadata of the saved weights."""
    with safe_open(str(folder / "out" / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def host_keys(folder: Path, steps: int = 2) -> str:
    """Host settings of a short stand-in run logging to folder/logs."""
    return f"logging_dir = \"{(folder / 'logs').as_posix()}\"\nmax_train_steps = {steps}\nsave_state = true"


def test_usage_without_a_script(capsys):
    assert launch.main([]) == 2 and "usage: lpl-launch SCRIPT" in capsys.readouterr().err
    assert launch.main(["--help"]) == 0 and "sdxl_train_network.py (LoRA)" in capsys.readouterr().out


def test_other_scripts_are_refused(tmp_path, capsys):
    script = tmp_path / "train_network.py"
    script.write_text("raise SystemExit('must not run')\n")
    assert launch.main([str(script)]) == 2
    assert "LPL supports the sd-scripts SDXL trainers sdxl_train_network.py (LoRA), sdxl_train.py (full fine-tune)" \
        in capsys.readouterr().err


def test_config_problems_stop_the_run_before_anything_is_imported(tmp_path, capsys):
    config = write_config(tmp_path, "[lpl]\nuse_lpl = true\nlpl_wieght = 1.0\nlpl_num_blocks = 7\n")
    with standin("v0_10_1") as folder:
        assert launch.main([str(folder / "sdxl_train_network.py"), "--config_file", str(config)]) == 2
        assert "library" not in sys.modules
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"lpl-plugin: {config}: [lpl] unknown option `lpl_wieght` (did you mean `lpl_weight`?)",
                     f"lpl-plugin: {config}: [lpl] `lpl_num_blocks` must be between 0 and 4, got 7"]
    assert not (tmp_path / "out").exists()


def test_unsupported_release_is_refused_in_one_line(tmp_path, capsys):
    with standin("unsupported") as folder:
        assert launch.main([str(folder / "sdxl_train_network.py"), "--config_file",
                            str(write_config(tmp_path, LPL_ON))]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "`library.train_util.conditional_loss` has signature" in line and not (tmp_path / "out").exists()


def test_lora_run_logs_lpl_and_records_its_settings(tmp_path):
    config = write_config(tmp_path, LPL_ON, host_keys(tmp_path))
    with standin("v0_9_1") as folder:
        assert launch.main([str(folder / "sdxl_train_network.py"), "--config_file", str(config),
                            "--lpl_weight", "2"]) == 0
    first = logs(tmp_path)[0]
    assert first["lpl/applied_fraction"] == 1.0 and first["lpl/weighted"] > 0 and "lpl/layer/mid" in first
    _, metadata = saved(tmp_path)
    assert metadata["ss_lpl_weight"] == "2.0" and metadata["ss_lpl_enabled"] == "True"
    state = json.loads((tmp_path / "out" / "state" / "lpl_plugin_state.json").read_text())
    assert state["optimizer_steps"] == 2 and state["settings"]["lpl_weight"] == 2.0


def test_full_fine_tune_logs_lpl_through_accelerator_log(tmp_path):
    config = write_config(tmp_path, LPL_ON, host_keys(tmp_path, steps=1))
    with standin("v0_10_1") as folder:
        assert launch.main([str(folder / "sdxl_train.py"), "--config_file", str(config)]) == 0
    (entry,) = logs(tmp_path)
    assert entry["loss"] > 0 and entry["lpl/loss"] > 0
    assert saved(tmp_path)[1]["ss_lpl_num_blocks"] == "2"


@pytest.mark.parametrize("lpl", ["", "[lpl]\nuse_lpl = false\nlpl_weight = 2.0\n"],
                         ids=["no lpl keys", "use_lpl false"])
def test_lpl_off_is_bit_identical_to_the_plain_script(tmp_path, lpl):
    runs = {}
    for name in ("plain", "launcher"):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(folder, lpl, host_keys(folder))
        with standin("v0_10_1") as host:
            script = str(host / "sdxl_train_network.py")
            if name == "plain":
                sys.argv = [script, "--config_file", str(config)]
                runpy.run_path(script, run_name="__main__")
            else:
                assert launch.main([script, "--config_file", str(config)]) == 0
        runs[name] = (logs(folder), saved(folder), json.loads((folder / "out" / "summary.json").read_text()))
    (plain_logs, (plain_weights, plain_meta), plain), (lpl_logs, (weights, meta), summary) = runs.values()
    assert plain_logs == lpl_logs and plain["losses"] == summary["losses"]
    assert plain_weights.keys() == weights.keys() and all(plain_weights[k].equal(weights[k]) for k in weights)
    assert plain_meta == meta


def test_resume_continues_lpl_start_from_the_saved_optimizer_step(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
    with standin("v0_10_1") as host:
        assert launch.main([str(host / "sdxl_train_network.py"), "--config_file",
                            str(write_config(first, LPL_ON, host_keys(first)))]) == 0
    with standin("v0_10_1") as host:
        assert launch.main([str(host / "sdxl_train_network.py"), "--config_file",
                            str(write_config(second, LPL_ON, host_keys(second, steps=4))),
                            "--resume", str(first / "out" / "state"), "--lpl_start", "3"]) == 0
    # the host restarts its own step count at 0 after a resume; LPL counts optimizer steps 2, 3 (from the state)
    assert ["lpl/loss" in entry for entry in logs(second)] == [False, True]


def test_host_help_lists_the_lpl_options(capsys):
    with standin("v0_11") as folder, pytest.raises(SystemExit) as stopped:
        launch.main([str(folder / "sdxl_train_network.py"), "--help"])
    assert stopped.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps help text at the terminal's width
    assert "--lpl_weight LPL_WEIGHT" in out and "--use_lpl [true|false]" in out and "(default: 1.0)" in out

