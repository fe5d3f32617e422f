"""What a compare runs: its arms, each arm's TOML for sd-scripts, the settings hash guarding DIR, and the prompts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lpl_plugin.settings.config import ALIASES
from lpl_plugin.settings.errors import UserError
from lpl_plugin.settings.messages import show_path
from lpl_plugin.compare.dataset import Image
from lpl_plugin.compare.toml_write import dumps

PLAN_FILE = "compare.json"
DONE_FILE = "done.json"
VERSION = 1
SAMPLE_NAME = "compare"


@dataclass
class Arm:
    """One training run of the compare: an arm name, its LPL keys and its training seed."""

    name: str
    lpl: dict[str, Any]
    seed: int

    @property
    def label(self) -> str:
        """The arm's folder name (the seed added when the compare trains several)."""
        return f"{self.name}-seed{self.seed}"


@dataclass
class Plan:
    """Everything that decides the compare's results; its hash guards DIR against mixing two compares."""

    script: str
    host: dict[str, Any]
    arms: list[Arm]
    steps: int
    sample_every: int
    prompts: list[dict[str, Any]]
    measure: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    dataset_keys: dict[str, Any] = field(default_factory=dict)  # a holdout's reduced dataset (follows from `extra`)

    def fingerprint(self) -> str:
        """A hash of the settings shared by all arms and the arm list."""
        text = json.dumps({"version": VERSION, "script": self.script, "host": self.host, "steps": self.steps,
                           "arms": [a.__dict__ for a in self.arms], "sample_every": self.sample_every,
                           "prompts": self.prompts, "measure": self.measure, "extra": self.extra},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_arms(arms: str | None, weights: Sequence[float] | None, seeds: int, base_seed: int) -> list[Arm]:
    """off/on arms (LPL on with the TOML's own weight) or a weight sweep (weight 0 is LPL off); K seeds each."""
    if weights:
        named = [(f"w={w:g}", {"use_lpl": w > 0, **({"lpl_weight": float(w)} if w > 0 else {})}) for w in weights]
    else:
        named = [(name, {"use_lpl": name == "on"}) for name in (arms or "off,on").split(",")]
    return [Arm(name, lpl, base_seed + k) for k in range(seeds) for name, lpl in named]


def sample_interval(steps: int, checkpoints: int) -> int:
    """Steps between samplings: the largest interval at most steps / checkpoints that divides steps (so the last
    step is sampled)."""
    wanted = max(1, steps // max(1, checkpoints))
    return next(n for n in range(wanted, 0, -1) if steps % n == 0)


def arm_host(plan: Plan, arm: Arm, folder: Path, prompts_file: Path) -> dict[str, Any]:
    """The arm's flat TOML keys: the user's, with LPL, seed, steps, output, logging and sampling set by compare."""
    host = {k: v for k, v in plan.host.items() if k not in ALIASES}
    host.update(arm.lpl)
    host.update({"seed": arm.seed, "max_train_steps": plan.steps, "output_dir": str(folder / "out"),
                 "output_name": SAMPLE_NAME, "logging_dir": str(folder / "logs"), "log_with": "tensorboard",
                 "sample_prompts": str(prompts_file), "sample_every_n_steps": plan.sample_every,
                 "sample_at_first": True, "sample_sampler": plan.host.get("sample_sampler") or "ddim"})
    for key in ("max_train_epochs", "sample_every_n_epochs", "resume", "wandb_api_key"):
        host.pop(key, None)
    host.update(plan.dataset_keys)
    return host


def write_arm_toml(plan: Plan, arm: Arm, folder: Path, prompts_file: Path, more: dict[str, Any]) -> Path:
    """DIR/<arm>/config.toml for sd-scripts' --config_file (`more`: keys for this attempt only, e.g. on resume)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text("# written by lpl-plugin compare; edit the compare's options instead\n"
                    + dumps({**arm_host(plan, arm, folder, prompts_file), **more}), encoding="utf-8")
    return path


def prompt_lines(prompts: Sequence[dict[str, Any]], size: tuple[int, int], sample_steps: int) -> str:
    """sd-scripts' prompt file: one line per prompt with its size, seed and step count fixed."""
    return "".join(f"{p['text']} --w {size[0]} --h {size[1]} --d {p['seed']} --s {sample_steps}\n" for p in prompts)


def prompts_from(text_file: Path | None, images: Sequence[Image], count: int) -> list[dict[str, Any]]:
    """The user's prompts (one per line), else prompts made from the first distinct captions; fixed seeds."""
    if text_file is not None:
        lines = [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines()]
        texts = [line.split(" --")[0].strip() for line in lines if line and not line.startswith("#")]
        if not texts:
            raise UserError(f"{show_path(text_file)}: --prompts: the file holds no prompt")
    else:
        texts = list(dict.fromkeys(image.caption for image in images if image.caption))[:count] or ["a photo"]
    return [{"id": f"p{i}", "text": text, "seed": 1000 + i} for i, text in enumerate(texts)]


def check_dir(out: Path, fingerprint: str) -> None:
    """Refuse a DIR that holds another compare (other settings) or other files; adopt an empty or matching one."""
    marker = out / PLAN_FILE
    if marker.is_file():
        found = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint")
        if found != fingerprint:
            raise UserError(f"--out {show_path(out)}: holds another compare's arms (settings hash {found}, this one "
                            f"{fingerprint}); choose another --out or remove that folder, results are never mixed")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {show_path(out)}: the folder is not empty and holds no compare; choose an empty or "
                        "new folder")


def arm_done(folder: Path, fingerprint: str) -> bool:
    """Whether an arm finished under these settings (its marker carries the same hash)."""
    marker = folder / DONE_FILE
    return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
