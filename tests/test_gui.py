"""The GUI-facing API: a form built from the options schema, validation, TOML round trip, and the launch command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from lpl_plugin import LPLConfig, launch_command, options, render_toml, validate
from lpl_plugin.settings.toml_io import tomllib
from tests.standin_fixtures import root


def build_form() -> dict[str, dict[str, Any]]:
    """What a GUI makes of the schema: one widget per option, grouped, greyed out unless LPL is on."""
    form = {}
    for record in options():
        if record["type"] == "boolean":
            widget = {"kind": "checkbox"}
        elif record["choices"]:
            widget = {"kind": "dropdown", "items": record["choices"]}
        else:
            widget = {"kind": "spinbox", "min": record["minimum"], "max": record["maximum"], "step": record["step"]}
        form[record["name"]] = {**widget, "value": record["default"], "tooltip": record["help"],
                                "group": record["group"], "needs_use_lpl": record["only_when_enabled"]}
    return form


def values(form: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The values a GUI would save: every option when LPL is on, only use_lpl when it is off."""
    enabled = form["use_lpl"]["value"]
    return {name: w["value"] for name, w in form.items() if enabled or not w["needs_use_lpl"]}


def test_form_from_schema_covers_every_option():
    form = build_form()
    assert set(form) == set(LPLConfig().lpl_items())
    assert form["lpl_loss_type"]["items"] == ["mse", "l1"] and form["lpl_num_blocks"]["max"] == 4
    assert not form["use_lpl"]["needs_use_lpl"] and form["lpl_weight"]["needs_use_lpl"]
    assert {w["group"] for w in form.values()} == {"general", "loss", "engine"}


def test_validate_names_each_bad_field():
    form = build_form()
    form["use_lpl"]["value"] = True
    form["lpl_weight"]["value"] = -1.0
    form["lpl_num_blocks"]["value"] = 7
    errors = validate(values(form))
    assert set(errors) == {"lpl_weight", "lpl_num_blocks"}
    assert errors["lpl_num_blocks"] == ["`lpl_num_blocks` must be between 0 and 4, got 7"]


def test_render_reread_validate_round_trip():
    config = LPLConfig(use_lpl=True, lpl_weight=1.75, lpl_t_threshold=150, lpl_loss_type="l1",
                       lpl_norm_type="batch", lpl_pow_law=False, lpl_num_blocks=3, lpl_scale=False,
                       lpl_start=10, lpl_dtype="bfloat16", lpl_checkpointing="resnet")
    for table in ("lpl", None):
        data = tomllib.loads(render_toml(config, table=table))
        assert validate(data) == {}
        assert LPLConfig.from_mapping(data) == config


def test_launch_command_shapes():
    plain = launch_command("sd/sdxl_train.py", "cfg.toml", None, python="py")
    assert plain == ["py", "-m", "lpl_plugin.launch", "sd/sdxl_train.py", "--config_file", "cfg.toml"]
    accelerated = launch_command("sd/sdxl_train_network.py", "cfg.toml", ["--num_processes", "2"],
                                 extra_args=["--lpl_weight", "1.5"], python="py")
    assert accelerated == ["py", "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "lpl_plugin.launch",
                           "sd/sdxl_train_network.py", "--config_file", "cfg.toml", "--lpl_weight", "1.5"]
    assert launch_command("s.py", "c.toml")[:3] == [sys.executable, "-m", "accelerate.commands.launch"]


def test_gui_fills_the_form_and_launches_a_host_with_spawned_loader_workers(tmp_path):
    form = build_form()
    form["use_lpl"]["value"] = True
    form["lpl_t_threshold"]["value"] = 1000
    form["lpl_num_blocks"]["value"] = 2
    form["lpl_weight"]["value"] = 1.5
    assert validate(values(form)) == {}
    host = (f"output_dir = \"{(tmp_path / 'out').as_posix()}\"\nlogging_dir = \"{(tmp_path / 'logs').as_posix()}\"\n"
            "max_train_steps = 2\nmax_data_loader_n_workers = 1\n\n")
    config = tmp_path / "run.toml"
    config.write_text(host + render_toml(LPLConfig(**values(form))), encoding="utf-8")
    script = root("v0_10_1") / "sdxl_train_network.py"  # stand-in host: the demo takes minutes, too long here
    command = launch_command(script, config, ["--num_processes", "1", "--num_machines", "1", "--mixed_precision",
                                              "no", "--dynamo_backend", "no"])
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    entries = [json.loads(line) for line in (tmp_path / "logs" / "logs.jsonl").read_text().splitlines()]
    assert len(entries) == 2 and all(e["lpl/applied_fraction"] == 1.0 for e in entries)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # the loader worker was spawned (it re-imported the script as __mp_main__) but trained nothing
    assert summary["loader_pids"] and summary["main_pid"] not in summary["loader_pids"]
    assert (tmp_path / "out" / "runs.txt").read_text().split() == [str(summary["main_pid"])]
