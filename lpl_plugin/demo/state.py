"""Saving and resuming demo runs: accelerate's `save_state`, written atomically, plus the run's own JSON state."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lpl_plugin.settings.errors import FileError, UserError
from lpl_plugin.settings.files import is_dir, is_file, read_json_object
from lpl_plugin.settings.messages import show_path, show_value

CHECKPOINTS = "checkpoints"
STATE_FILE = "demo_state.json"
KEEP = 2
_NAME = re.compile(r"^step-(\d{1,12})$")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (those holding the state file), oldest first."""
    folder = run_dir / CHECKPOINTS
    if not is_dir(folder):
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and is_file(p / STATE_FILE)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, if any."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Any, run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write model, optimizer and RNG states (accelerate) and `state` as JSON to `checkpoints/step-N`.

    Everything goes to a `.partial` folder that is renamed once complete, so a run killed while saving leaves its
    previous checkpoint as the latest. Every process must call this; older checkpoints beyond the last KEEP go.
    """
    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in checkpoints(run_dir)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint; UserError when it is missing or unreadable."""
    path = checkpoint / STATE_FILE
    try:
        return read_json_object(path, what="a checkpoint state")
    except FileError as error:
        if error.errno == errno.ENOENT:
            raise UserError(f"{show_path(checkpoint)}: not a complete demo checkpoint ({STATE_FILE} is missing)") \
                from None
        raise UserError(f"{error.path}: unreadable checkpoint state ({error.reason})") from None


def load_checkpoint(accelerator: Any, checkpoint: Path, num_processes: int) -> dict[str, Any]:
    """Restore model, optimizer and RNG states into the prepared objects; returns the run's JSON state."""
    state = read_state(checkpoint)
    saved = state.get("num_processes", 1)
    if isinstance(saved, bool) or not isinstance(saved, int) or saved < 1:
        raise UserError(f"{show_path(checkpoint)}: unreadable checkpoint state (num_processes is "
                        f"{show_value(saved)}, not a positive integer)")
    if saved != num_processes:
        raise UserError(f"{show_path(checkpoint)}: written by {saved} process(es), resumed with {num_processes}; "
                        f"resume with the same number of processes (accelerate launch --num_processes {saved})")
    accelerator.load_state(str(checkpoint))
    return state


def resume_point(path: Path) -> tuple[Path, Path | None]:
    """The demo folder and, when `path` is one checkpoint folder, that checkpoint (else None: each run's latest)."""
    if path.parent.name == CHECKPOINTS and _NAME.match(path.name):
        read_state(path)
        parents = path.absolute().parents
        if len(parents) < 4:  # out/runs/<run>/checkpoints/step-N
            raise UserError(f"{show_path(path)}: a checkpoint folder must sit in OUT/runs/RUN/checkpoints/; pass the "
                            "demo's --out folder instead")
        return parents[3], path
    return path, None
