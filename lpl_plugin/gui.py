"""For GUI frontends: the command that runs a trainer with LPL, as a list of argv strings (no shell quoting)."""

from __future__ import annotations

import os
import sys
from typing import Sequence


def launch_command(script: str | os.PathLike[str], config_path: str | os.PathLike[str],
                   accelerate_args: Sequence[str] | None = (), *, extra_args: Sequence[str] = (),
                   python: str | None = None) -> list[str]:
    """argv that runs sd-scripts' `script` with `--config_file config_path` through the LPL launcher.

    `accelerate_args` go to `accelerate launch` (e.g. ["--num_processes", "1", "--mixed_precision", "bf16"]);
    None runs the launcher without accelerate. `extra_args` go to the script after the config (command-line
    overrides such as ["--lpl_weight", "1.5"]); `python` defaults to this interpreter, i.e. the host's venv.
    """
    interpreter = python or sys.executable
    head = [interpreter] if accelerate_args is None else \
        [interpreter, "-m", "accelerate.commands.launch", *map(str, accelerate_args)]
    return [*head, "-m", "lpl_plugin.launch", os.fspath(script), "--config_file", os.fspath(config_path),
            *map(str, extra_args)]
