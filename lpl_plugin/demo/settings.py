"""The demo's settings: defaults, checks with one-line errors, and which of them a resumed run may change."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import FileError, UserError
from lpl_plugin.settings.files import is_dir, read_json_object
from lpl_plugin.settings.messages import show_path, show_value, shown

SETTINGS_FILE = "settings.json"
DEVICES = ("cpu", "cuda")
MIXED_PRECISION = ("no", "bf16", "fp16")
OPTIMIZERS = ("adamw8bit", "adamw")
# A resumed run keeps everything that decides its numbers; these may change between the two halves.
MAY_CHANGE_ON_RESUME = ("steps", "save_every", "device", "progress")
# Integer settings: (lowest, highest). The demo trains a tiny model on the CPU; the upper bounds keep a typo from
# asking for hours of work or more memory than a machine has (resolution 1024 is already 256 times the default).
INT_RANGES = {"steps": (1, 10 ** 6), "resolution": (32, 1024), "batch_size": (1, 1024), "seed": (0, 2 ** 32 - 1),
              "vae_steps": (0, 10 ** 6), "save_every": (0, 10 ** 6)}
CHOICES = {"device": DEVICES, "mixed_precision": MIXED_PRECISION, "optimizer": OPTIMIZERS}
MAX_LEARNING_RATE = 10.0
# The demo's LPL block when no --config is given. The recommended block (lpl_t_threshold 200) leaves LPL at about
# 0.2 % of this tiny model's loss: its clean-latent estimates below t = 200 are nearly exact. Weight 2 (the top of
# the recommended 0.5-2 range) with LPL down to t = 600 made it 5.3 % of the loss on the steps it applied to over the
# default 300-step run (README, "The demo").
DEMO_LPL: dict[str, Any] = {"lpl_weight": 2.0, "lpl_t_threshold": 600}


def demo_lpl_text() -> str:
    """The demo's LPL block in words, e.g. `lpl_weight = 2, lpl_t_threshold = 600`."""
    return ", ".join(f"{k} = {v:g}" for k, v in DEMO_LPL.items())
# Named sets of defaults (`--preset`); options given on the command line override them.
PRESETS: dict[str, dict[str, Any]] = {"quick": {}, "long": {"steps": 1500, "vae_steps": 1500}}


@dataclass(frozen=True)
class DemoSettings:
    """Everything one demo invocation needs besides the LPL settings (command-line names with dashes)."""

    steps: int = 300
    resolution: int = 64
    batch_size: int = 8
    seed: int = 0
    learning_rate: float = 2e-3
    vae_steps: int = 300
    save_every: int = 0
    device: str = "cpu"
    mixed_precision: str = "no"
    optimizer: str = "adamw8bit"
    progress: bool = True

    @property
    def latent_size(self) -> int:
        """Side of the latents: the SDXL-layout VAE downsamples 8 times."""
        return self.resolution // 8

    def check(self) -> "DemoSettings":
        """Raise UserError naming every bad option and the constraint it breaks."""
        problems = []
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{flag(name)} must be an integer, got {show_value(value)}")
            elif not low <= value <= high:
                problems.append(f"{flag(name)} must be between {low} and {high}, got {show_value(value)}")
        if isinstance(self.resolution, int) and self.resolution % 32:
            problems.append(f"{flag('resolution')} must be a multiple of 32 (the VAE downsamples 8x and the UNet "
                            f"4x more), got {show_value(self.resolution)}")
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= MAX_LEARNING_RATE \
                or not math.isfinite(rate):
            problems.append(f"{flag('learning_rate')} must be greater than 0 and at most {MAX_LEARNING_RATE:g}, got "
                            f"{show_value(rate)}")
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid or not isinstance(getattr(self, name), str):
                problems.append(f"{flag(name)} must be one of {', '.join(valid)}, got "
                                f"{show_value(getattr(self, name))}")
        if not isinstance(self.progress, bool):
            problems.append(f"progress must be true or false, got {show_value(self.progress)}")
        if self.mixed_precision == "fp16" and self.device != "cuda":
            problems.append(f"{flag('mixed_precision')} fp16 needs --device cuda; use bf16 on the CPU")
        if problems:
            raise UserError("\n".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON data."""
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    """The command-line spelling of a settings field."""
    return "--" + name.replace("_", "-")


def resolve(overrides: Mapping[str, Any], saved: Mapping[str, Any] | None, preset: str | None = None) -> DemoSettings:
    """Settings from the saved ones of a resumed run (or the defaults) plus the preset's values and the options
    given on the command line (these last win).

    On resume, options that would change the run's numbers must match the saved ones.
    """
    given = {**PRESETS.get(preset or "quick", {}), **{k: v for k, v in overrides.items() if v is not None}}
    if saved is None:
        return DemoSettings(**given).check()
    known = {f.name for f in dataclasses.fields(DemoSettings)}
    base = {k: v for k, v in saved.items() if k in known}
    clashes = [f"{flag(k)} {show_value(v)} differs from the interrupted run's {show_value(base[k])}; leave it out to "
               "resume, or start a new --out" for k, v in given.items()
               if k not in MAY_CHANGE_ON_RESUME and k in base and base[k] != v]
    if clashes:
        raise UserError("\n".join(clashes))
    return DemoSettings(**{**base, **given}).check()


def write_settings(out: Path, settings: DemoSettings, lpl: LPLConfig, config_source: str) -> None:
    """Record the settings a run used, so `--resume` can continue with exactly them."""
    data = {"settings": settings.to_dict(), "lpl": lpl.lpl_items(), "lpl_source": config_source}
    (out / SETTINGS_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_settings(out: Path) -> tuple[dict[str, Any], LPLConfig, str]:
    """The saved settings, LPL settings and their source of an earlier demo in `out`; UserError if there is none."""
    path = out / SETTINGS_FILE
    try:
        data = read_json_object(path, what="demo settings")
        settings, lpl = data["settings"], LPLConfig.from_mapping(data["lpl"], source=show_path(path))
        if not isinstance(settings, dict):
            raise TypeError(f"settings is {show_value(settings)}, not a table")
        return dict(settings), lpl, shown(str(data.get("lpl_source", "built-in")), 200)
    except FileError as error:
        if error.errno == errno.ENOENT or not is_dir(out):
            raise UserError(f"{show_path(out)}: no earlier demo to resume here ({SETTINGS_FILE} not found); pass "
                            "the --out folder of the interrupted run") from None
        raise
    except UserError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{show_path(path)}: unreadable demo settings ({type(error).__name__}: "
                        f"{show_value(str(error))}); start a new --out") from None
