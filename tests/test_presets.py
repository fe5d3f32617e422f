"""The shipped sd-scripts presets: listed and printed by the CLI, valid, flattening-safe, sd-scripts' own options."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lpl_plugin import LPLConfig
from lpl_plugin.cli.main import main
from lpl_plugin.settings.config import is_lpl_key
from lpl_plugin.settings.presets import preset_names, preset_text
from lpl_plugin.settings.toml_io import config_from_toml, tomllib

NAMES = ["sdxl_lora_8gb", "sdxl_lora_12gb", "sdxl_lora_16gb", "sdxl_lora_24gb", "sdxl_full_24gb"]


def flatten(data: dict) -> dict:
    """sd-scripts' config-file reading: top-level keys, plus each table's keys one level deep, in one namespace."""
    flat: dict = {}
    for key, value in data.items():
        for inner, item in (value.items() if isinstance(value, dict) else [(key, value)]):
            assert inner not in flat, f"`{inner}` is set twice; sd-scripts would keep only the last"
            assert not isinstance(item, dict), f"[{key}.{inner}] is two tables deep; sd-scripts reads one level"
            flat[inner] = item
    return flat


def load(name: str) -> dict:
    """A preset as parsed TOML."""
    return tomllib.loads(preset_text(name))


def test_presets_command_lists_every_preset_with_a_description(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == NAMES == preset_names()
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)


def test_preset_command_prints_the_toml_and_rejects_unknown_names(capsys):
    assert main(["preset", "sdxl_lora_12gb"]) == 0
    assert capsys.readouterr().out == preset_text("sdxl_lora_12gb")
    assert main(["preset", "sdxl_lora_6gb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sdxl_lora_6gb" in err[0] and all(name in err[0] for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_preset_validates_and_survives_sd_scripts_flattening(name):
    data = load(name)
    config, problems = config_from_toml(data, source=name)
    assert not problems and config is not None and config.use_lpl
    flat = flatten(data)
    assert LPLConfig.from_mapping(flat) == config  # the same settings once sd-scripts has flattened the tables
    assert flat["optimizer_type"] == "AdamW8bit" and flat["xformers"] is True
    assert "sdpa = true" in preset_text(name)  # the documented fallback where xformers cannot run
    assert flat["gradient_checkpointing"] and flat["cache_latents"] and flat["no_half_vae"]
    assert flat["mixed_precision"] in ("bf16", "fp16") and flat["resolution"] == "1024,1024"
    assert config.lpl_dtype in ("bfloat16", "float32") and config.lpl_chunk_size >= 1
    assert ("network_module" in flat) == name.startswith("sdxl_lora")
    assert all(v != "" for v in flat.values())


def test_smaller_cards_compare_fewer_or_recompute_more_blocks():
    configs = [LPLConfig.from_mapping(load(n)) for n in NAMES[:4]]
    blocks = [c.lpl_num_blocks for c in configs]
    assert blocks == sorted(blocks) and blocks[0] < blocks[-1]
    assert configs[0].lpl_checkpointing == "resnet" and configs[-1].lpl_checkpointing in ("auto", "none")


def sd_scripts_options(root: Path, scripts: list[str]) -> set[str]:
    """Option names a trainer's parser declares: `add_argument("--x")` in its script and the shared modules."""
    files = [root / s for s in scripts] + [root / "library" / f for f in (
        "train_util.py", "sdxl_train_util.py", "custom_train_functions.py", "config_util.py", "deepspeed_utils.py")]
    names: set[str] = set()
    for file in files:
        if file.is_file():
            text = file.read_text(encoding="utf-8")
            names |= set(re.findall(r"add_argument\(\s*[\"']--([A-Za-z0-9_\-]+)[\"']", text))
    return {n.replace("-", "_") for n in names}


@pytest.mark.skipif(not os.environ.get("LPL_SD_SCRIPTS_DIR"), reason="set LPL_SD_SCRIPTS_DIR to an sd-scripts checkout")
@pytest.mark.parametrize("name", NAMES)
def test_preset_uses_only_options_sd_scripts_knows(name):
    root = Path(os.environ["LPL_SD_SCRIPTS_DIR"])
    scripts = ["train_network.py", "sdxl_train_network.py"] if name.startswith("sdxl_lora") else ["sdxl_train.py"]
    known = sd_scripts_options(root, scripts)
    assert len(known) > 100, f"{root} does not look like an sd-scripts checkout"
    unknown = sorted(k for k in flatten(load(name)) if not is_lpl_key(k) and k not in known)
    assert not unknown, f"{name}: options sd-scripts does not declare: {unknown}"
