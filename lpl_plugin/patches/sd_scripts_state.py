"""What the sd-scripts adapter keeps across a resume, and the step a run starts at.

`--save_state` also writes `lpl_plugin_state.json` (optimizer steps taken, LPL settings, the hooks' counters) into
each state folder; `--resume` reads it. A state saved without the plugin resumes too: the step count then comes
from sd-scripts' own `train_state.json` (LoRA), else 0. `--initial_step` / `--initial_epoch` (LoRA, where the
release has them) override both, as they do for the host.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import FileError, UserError
from lpl_plugin.settings.files import read_json_object, write_bytes
from lpl_plugin.settings.messages import show_path, shown
from lpl_plugin.training.registry import HookRegistry

from lpl_plugin.patches.sd_scripts_seams import UnsupportedHost

log = logging.getLogger("lpl_plugin")

STATE_FILE = "lpl_plugin_state.json"
HOST_STATE_FILE = "train_state.json"


def save_state(folder: str | Path, steps: int, config: LPLConfig | None, registry: HookRegistry) -> None:
    """Write the plugin's state file into an accelerate state folder, atomically (main process only)."""
    states = {name: registry.get(name).state_dict() for name in registry
              if callable(getattr(registry.get(name), "state_dict", None))}
    data = {"optimizer_steps": steps, "settings": config.lpl_items() if config else None,
            "hook": states.pop("lpl", None), "hooks": states}
    # whole or not at all (a temporary file, flushed, fsynced, renamed): a crash while saving keeps the last one
    write_bytes(Path(folder, STATE_FILE), (json.dumps(data, indent=2) + "\n").encode("utf-8"), option="--save_state")


def resumed_state(folder: str | Path) -> tuple[int, dict[str, Any]]:
    """Optimizer steps and hook states of a saved state: the plugin's file, else train_state.json's steps, else 0."""
    folder = Path(folder)
    for name, key in ((STATE_FILE, "optimizer_steps"), (HOST_STATE_FILE, "current_step")):
        path = folder / name
        if os.path.lexists(path):
            try:
                data = read_json_object(path, what="a state file")  # bounded, non-blocking (a FIFO cannot hang it)
                steps = int(data[key])
                states = {}
                if name == STATE_FILE:
                    states = {str(k): dict(v) for k, v in dict(data.get("hooks") or {}).items()}
                    if data.get("hook"):
                        states["lpl"] = dict(data["hook"])
            except (UserError, ValueError, KeyError, TypeError, AttributeError) as error:
                reason = error.reason if isinstance(error, FileError) else f"{type(error).__name__}: {shown(error)}"
                raise UnsupportedHost(show_path(folder), [f"{show_path(path)} is unreadable ({reason}); delete it "
                                                          "to resume with the step count sd-scripts saved"])
            log.info("lpl-plugin: resuming after %d optimizer steps (from %s)", steps, show_path(path.name))
            return steps, states
    log.info("lpl-plugin: %s has no %s or %s; counting optimizer steps from 0 for lpl_start", show_path(folder),
             STATE_FILE, HOST_STATE_FILE)
    return 0, {}


def load_hook_states(registry: HookRegistry, states: dict[str, Any]) -> None:
    """Hand each registered hook that keeps state its saved counters."""
    for name, state in states.items():
        hook = registry.get(name) if name in registry else None
        if state and callable(getattr(hook, "load_state_dict", None)):
            hook.load_state_dict(state)


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
