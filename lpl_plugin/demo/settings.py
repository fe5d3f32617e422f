"""The demo's settings: defaults, checks with one-line errors, and which of them a resumed run may change."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import LPLConfig
from ..errors import UserError

SETTINGS_FILE = "settings.json"
DEVICES = ("cpu", "cuda")
MIXED_PRECISION = ("no", "bf16", "fp16")
OPTIMIZERS = ("adamw8bit", "adamw")
# A resumed run keeps everything that decides its numbers; these may change between the two halves.
MAY_CHANGE_ON_RESUME = ("steps", "save_every", "device", "progress")


@dataclass(frozen=True)
class DemoSettings:
    """Everything one demo invocation needs besides the LPL settings (command-line names with dashes)."""

    steps: int = 150
    resolution: int = 64
    batch_size: int = 8
    seed: int = 0
    learning_rate: float = 1e-3
    vae_steps: int = 150
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
        for name, low in (("steps", 1), ("batch_size", 1), ("save_every", 0), ("vae_steps", 0), ("seed", 0)):
            value = getattr(self, name)
            if value < low:
                problems.append(f"{flag(name)} must be at least {low}, got {value}")
        if self.resolution < 32 or self.resolution % 32:
            problems.append(f"{flag('resolution')} must be a multiple of 32 (the VAE downsamples 8x and the UNet "
                            f"4x more), got {self.resolution}")
        if not self.learning_rate > 0:
            problems.append(f"{flag('learning_rate')} must be greater than 0, got {self.learning_rate}")
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


def resolve(overrides: Mapping[str, Any], saved: Mapping[str, Any] | None) -> DemoSettings:
    """Settings from the saved ones of a resumed run (or the defaults) plus the options given on the command line.

    On resume, options that would change the run's numbers must match the saved ones.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if saved is None:
        return DemoSettings(**given).check()
    known = {f.name for f in dataclasses.fields(DemoSettings)}
    base = {k: v for k, v in saved.items() if k in known}
    clashes = [f"{flag(k)} {v} differs from the interrupted run's {base[k]}; leave it out to resume, or start a new "
               f"--out" for k, v in given.items() if k not in MAY_CHANGE_ON_RESUME and k in base and base[k] != v]
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
        data = json.loads(path.read_text(encoding="utf-8"))
        lpl = LPLConfig.from_mapping(data["lpl"], source=str(path))
        return dict(data["settings"]), lpl, str(data.get("lpl_source", "built-in"))
    except FileNotFoundError:
        raise UserError(f"{out}: no earlier demo to resume here ({SETTINGS_FILE} not found); pass the --out "
                        "folder of the interrupted run") from None
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: unreadable demo settings ({error}); start a new --out") from None
