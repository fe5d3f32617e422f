"""What sd-scripts itself records about where a run starts: the steps of a state saved without the plugin, and the
step `--initial_step` / `--initial_epoch` name.

The plugin's own state file (lpl_plugin.patches.saved_state) comes first on resume; a state saved without the
plugin resumes from sd-scripts' `train_state.json` (LoRA), else from 0. `--initial_step` / `--initial_epoch` (LoRA,
where the release has them) override both, as they do for the host.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lpl_plugin.patches.saved_state import read_step_count
from lpl_plugin.patches.saved_state import resumed_state as plugin_resumed_state

HOST_STATE_FILE = "train_state.json"


def train_state_steps(folder: Path) -> tuple[str, int] | None:
    """The optimizer steps sd-scripts' `train_state.json` records in a state folder, or None without one."""
    path = folder / HOST_STATE_FILE
    return (HOST_STATE_FILE, read_step_count(path, "current_step")) if os.path.lexists(path) else None


def resumed_state(folder: str | Path) -> tuple[int, dict[str, Any]]:
    """Optimizer steps and hook states of an sd-scripts state folder: the plugin's file, else train_state.json's
    steps, else 0."""
    return plugin_resumed_state(folder, train_state_steps)


def host_start_step(args: Any, accelerator: Any, loader_length: int | None) -> int | None:
    """The optimizer step the host says this run starts at (`--initial_step`, else `--initial_epoch`), or None.

    sd-scripts' own formula: (initial_epoch - 1) x ceil(len(train loader) / processes / gradient accumulation).
    """
    initial_step = getattr(args, "initial_step", None)
    if initial_step is not None:
        return int(initial_step)
    initial_epoch = getattr(args, "initial_epoch", None)
    if initial_epoch is None or loader_length is None:
        return None
    processes = int(getattr(accelerator, "num_processes", 1) or 1)
    accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    return (int(initial_epoch) - 1) * math.ceil(loader_length / processes / accumulation)
