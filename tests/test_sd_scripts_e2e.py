"""Real sd-scripts training runs, end to end, the ways users start them: long (minutes and ~22 GB each), so opt-in.

    LPL_SD_SCRIPTS_DIR=/path/to/sd-scripts LPL_SD_SCRIPTS_E2E=/path/to/e2e [LPL_SD_SCRIPTS_LOCK=/path/to/lock] \\
        /path/to/venv/bin/python -m pytest tests/test_sd_scripts_e2e.py

`LPL_SD_SCRIPTS_E2E` is a folder made as `../shared/sd_scripts_e2e/README.md` describes (random-weight SDXL
`sdxl_random.safetensors`, `tok/`, `data/`, and `lora.toml` / `lora_v091.toml` / `full.toml`); the venv running
pytest is sd-scripts' own with lpl-plugin installed. Each run starts in a throw-away venv on top of it: one where
`lpl-plugin enable` was run (the script started with `python` or `accelerate launch`), or one without it through
the launcher. With `LPL_SD_SCRIPTS_LOCK` every run waits for that lock (`flock`), one heavy run at a time.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pytest

from lpl_plugin.patches.sd_scripts_seams import SourceReader, detect
from tests.enabled_env import Env, make_env, run

CHECKOUT = os.environ.get("LPL_SD_SCRIPTS_DIR")
WORK = os.environ.get("LPL_SD_SCRIPTS_E2E")
LOCK = os.environ.get("LPL_SD_SCRIPTS_LOCK")
pytestmark = [pytest.mark.skipif(not (CHECKOUT and WORK), reason="set LPL_SD_SCRIPTS_DIR and LPL_SD_SCRIPTS_E2E "
                                 "(real SDXL runs: minutes each)"),
              pytest.mark.timeout(7200)]  # a run may wait for the lock, then take many minutes
LPL = "[lpl]\nuse_lpl = true\nlpl_weight = 1.0\nlpl_t_threshold = 1000\nlpl_num_blocks = 2\n"
ACCELERATE = ["launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
# name: (script, how it is started, host options on the command line)
RUNS = {
    "LoRA, enabled, python, noise offset + ip_noise_gamma":
        ("sdxl_train_network.py", "enabled python", ["--noise_offset", "0.05", "--ip_noise_gamma", "0.1"]),
    "LoRA, launcher, accelerate launch, multires + zero_terminal_snr":
        ("sdxl_train_network.py", "launcher accelerate", ["--multires_noise_iterations", "6",
                                                          "--multires_noise_discount", "0.3", "--zero_terminal_snr"]),
    "full fine-tune (bf16 weights), enabled, accelerate launch":
        ("sdxl_train.py", "enabled accelerate", ["--noise_offset", "0.05"]),
    "full fine-tune (bf16 weights), launcher, python, multires + zero_terminal_snr":
        ("sdxl_train.py", "launcher python", ["--multires_noise_iterations", "6", "--zero_terminal_snr"]),
}


@pytest.fixture(scope="module")
def envs(tmp_path_factory) -> dict[str, Env]:
    """A venv where lpl-plugin is enabled and one where it is not, both on top of the one running pytest."""
    base = tmp_path_factory.mktemp("e2e")
    enabled, plain = make_env(base / "enabled"), make_env(base / "plain")
    assert enabled.lpl_plugin("enable").returncode == 0
    return {"enabled": enabled, "launcher": plain}


def base_toml(script: str) -> str:
    """The e2e folder's TOML for a script and this checkout, without its [lpl] table."""
    if script == "sdxl_train.py":
        name = "full.toml"
    else:
        layout, _ = detect(SourceReader(CHECKOUT), "lora")
        name = "lora_v091.toml" if layout is not None and layout.name == "v0.9" else "lora.toml"
    text = (Path(WORK) / name).read_text(encoding="utf-8")
    return text.split("\n[lpl]", 1)[0] + "\n"


def scalars(folder: Path) -> dict[str, list[float]]:
    """Every scalar series in the TensorBoard event files under a folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[float]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return found


def metadata(folder: Path) -> dict[str, str]:
    """The metadata of the one model saved in a folder."""
    from safetensors import safe_open

    (model,) = folder.glob("*.safetensors")
    with safe_open(str(model), "pt") as f:
        return dict(f.metadata())


@pytest.mark.parametrize("name", list(RUNS))
def test_real_training_run_with_lpl(envs, tmp_path, name):
    script, how, host = RUNS[name]
    mode, starter = how.split()
    env = envs[mode]
    config = tmp_path / "run.toml"
    config.write_text(base_toml(script) + LPL, encoding="utf-8")
    target = ["-m", "lpl_plugin.launch", script] if mode == "launcher" else [script]
    if starter == "python":
        argv = [env.python, *target]
    else:
        argv = [env.root / "bin" / "accelerate", *ACCELERATE, *target]
    argv += ["--config_file", config, "--output_dir", tmp_path / "out", "--logging_dir", tmp_path / "logs", *host]
    if LOCK:
        argv = ["flock", LOCK, *argv]
    done = run(argv, env={"PYTHONPATH": CHECKOUT}, cwd=Path(CHECKOUT), timeout=3600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    series = scalars(tmp_path / "logs")
    steps = len(series["loss/current" if script == "sdxl_train_network.py" else "loss"])
    assert steps >= 1 and len(series["lpl/loss"]) == steps
    assert all(math.isfinite(v) for key in ("lpl/loss", "lpl/weighted") for v in series[key])
    assert series["lpl/applied_fraction"][0] > 0 and series["lpl/weighted"][0] > 0
    saved = metadata(tmp_path / "out")
    assert saved["ss_lpl_enabled"] == "True" and saved["ss_lpl_num_blocks"] == "2"
    print(f"\n{name}: {' '.join(map(str, argv[-len(host) - 6:]))}\n  lpl/loss {series['lpl/loss']} "
          f"lpl/applied_fraction {series['lpl/applied_fraction']} ss_lpl_* "
          f"{ {k: v for k, v in saved.items() if k.startswith('ss_lpl_')} }")
    assert re.search(r"lpl-plugin: LPL on \(sd-scripts", done.stdout + done.stderr)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)  # a full fine-tune saves 7 GB
