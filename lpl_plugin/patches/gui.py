"""For GUI frontends: the command that runs a trainer with LPL, as a list of argv strings (no shell quoting)."""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from lpl_plugin.settings.errors import ArgumentTypeError
from lpl_plugin.settings.messages import show_value, type_name


def _path(name: str, value: Any) -> str:
    """A path argument as text; ArgumentTypeError naming the argument for anything else."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str) and text:
            return text
    raise ArgumentTypeError(f"launch_command: `{name}` must be a path (str or os.PathLike), got "
                            f"{show_value(value)} ({type_name(value)})")


def _words(name: str, value: Any) -> list[str]:
    """A list of argv words; a string (which would be split into characters) or a non-sequence is refused."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ArgumentTypeError(f"launch_command: `{name}` must be a list of arguments such as [\"--num_processes\", "
                                f"\"1\"], got {show_value(value)} ({type_name(value)})")
    words = []
    for word in value:
        if not isinstance(word, (str, int, float, os.PathLike)) or isinstance(word, bool):
            raise ArgumentTypeError(f"launch_command: every item of `{name}` must be text, a number or a path, got "
                                    f"{show_value(word)} ({type_name(word)})")
        words.append(os.fspath(word) if isinstance(word, os.PathLike) else str(word))
    return words


def launch_command(script: str | os.PathLike[str], config_path: str | os.PathLike[str],
                   accelerate_args: Sequence[str] | None = (), *, extra_args: Sequence[str] = (),
                   python: str | None = None) -> list[str]:
    """argv that runs sd-scripts' `script` with `--config_file config_path` through the LPL launcher.

    `accelerate_args` go to `accelerate launch` (e.g. ["--num_processes", "1", "--mixed_precision", "bf16"]);
    None runs the launcher without accelerate. `extra_args` go to the script after the config (command-line
    overrides such as ["--lpl_weight", "1.5"]); `python` defaults to this interpreter, i.e. the host's venv.
    A string where a list belongs raises ArgumentTypeError (it would otherwise be split into characters).
    """
    interpreter = sys.executable if python is None else _path("python", python)
    script_path, config = _path("script", script), _path("config_path", config_path)
    head = [interpreter] if accelerate_args is None else \
        [interpreter, "-m", "accelerate.commands.launch", *_words("accelerate_args", accelerate_args)]
    return [*head, "-m", "lpl_plugin.launch", script_path, "--config_file", config, *_words("extra_args", extra_args)]
