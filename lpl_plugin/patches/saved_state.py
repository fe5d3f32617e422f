"""The plugin's part of a saved training state, for any accelerate-based host: `lpl_plugin_state.json`.

The host's `save_state` writes it into each state folder (optimizer steps taken, LPL settings, the hooks'
counters); its resume reads it back. A state saved without the plugin has no such file: the host adapter then says
how many steps its own files record (`host_steps`), else the count starts at 0.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import FileError, UserError
from lpl_plugin.settings.files import read_json_object, write_bytes
from lpl_plugin.settings.messages import show_path, shown
from lpl_plugin.training.registry import HookRegistry

log = logging.getLogger("lpl_plugin")

STATE_FILE = "lpl_plugin_state.json"
# A host's own record of the steps a saved state had taken: (file name, its steps), or None without one.
HostSteps = Callable[[Path], "tuple[str, int] | None"]


def save_state(folder: str | Path, steps: int, config: LPLConfig | None, registry: HookRegistry) -> None:
    """Write the plugin's state file into a state folder, atomically (main process only)."""
    states = {name: registry.get(name).state_dict() for name in registry
              if callable(getattr(registry.get(name), "state_dict", None))}
    data = {"optimizer_steps": steps, "settings": config.lpl_items() if config else None,
            "hook": states.pop("lpl", None), "hooks": states}
    # whole or not at all (a temporary file, flushed, fsynced, renamed): a crash while saving keeps the last one
    write_bytes(Path(folder, STATE_FILE), (json.dumps(data, indent=2) + "\n").encode("utf-8"), option="--save_state")


def resumed_state(folder: str | Path, host_steps: HostSteps | None = None) -> tuple[int, dict[str, Any]]:
    """Optimizer steps and hook states of a saved state: the plugin's file, else the host's count, else 0."""
    folder = Path(folder)
    states: dict[str, Any] = {}
    if os.path.lexists(folder / STATE_FILE):
        name = STATE_FILE
        steps, states = _read(folder / name, "optimizer_steps", "resume with the step count the trainer saved")
    elif (found := host_steps(folder) if host_steps is not None else None) is not None:
        name, steps = found
    else:
        log.info("lpl-plugin: %s has no %s; counting optimizer steps from 0 for lpl_start", show_path(folder),
                 STATE_FILE)
        return 0, {}
    log.info("lpl-plugin: resuming after %d optimizer steps (from %s)", steps, show_path(name))
    return steps, states


def read_step_count(path: Path, key: str) -> int:
    """The step count under `key` in a host's JSON state file; one-line UserError when it cannot be read."""
    return _read(path, key, "count optimizer steps from 0 for lpl_start")[0]


def _read(path: Path, key: str, otherwise: str) -> tuple[int, dict[str, Any]]:
    """The step count under `key` and (in the plugin's file) the hooks' states; `otherwise`: what deleting the
    file would do, for the error."""
    try:
        data = read_json_object(path, what="a state file")  # bounded, non-blocking (a FIFO cannot hang it)
        steps = int(data[key])
        states: dict[str, Any] = {}
        if path.name == STATE_FILE:
            states = {str(k): dict(v) for k, v in dict(data.get("hooks") or {}).items()}
            if data.get("hook"):
                states["lpl"] = dict(data["hook"])
        return steps, states
    except (UserError, ValueError, KeyError, TypeError, AttributeError) as error:
        reason = error.reason if isinstance(error, FileError) else f"{type(error).__name__}: {shown(error)}"
        raise UserError(f"lpl-plugin: {show_path(path)} is unreadable ({reason}); delete it to {otherwise}") from None


def load_hook_states(registry: HookRegistry, states: dict[str, Any]) -> None:
    """Hand each registered hook that keeps state its saved counters."""
    for name, state in states.items():
        hook = registry.get(name) if name in registry else None
        if state and callable(getattr(hook, "load_state_dict", None)):
            hook.load_state_dict(state)
