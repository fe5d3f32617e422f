"""`lpl-launch SCRIPT ARGS...`: run sd-scripts' SDXL trainer as `__main__` with LPL hooked in, no file changed.

Also `accelerate launch [accelerate options] -m lpl_plugin.launch SCRIPT ARGS...`; the explicit way in where `lpl-plugin
enable` is not wanted (it works enabled or not). Order: check the TOML named by `--config_file` (exit 2, one line per
problem, before any model is loaded: whoever starts this launcher asks for the plugin), put the script's folder on
sys.path, install the sd-scripts adapter (which also adds `--use_lpl`/`--lpl_*` to the script's own parser), run the
script.

DataLoader workers: under the fork start method they inherit the adapter, which only touches main-process code
(arguments, loss, logs, metadata, state). Under spawn/forkserver (Windows, macOS, Python 3.14 on Linux) a worker
re-imports the running script as `__mp_main__`: the script's own `if __name__ == "__main__":` guard keeps it from
training again, and this module's entry point is guarded the same way, so workers only load data.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Sequence

import lpl_plugin_boot

from lpl_plugin.patches.activation import config_file, preflight
from lpl_plugin.settings.errors import UserError, from_plugin, write_lines

USAGE = ("usage: lpl-launch SCRIPT [SCRIPT ARGS...]\n"
         "       accelerate launch [ACCELERATE ARGS...] -m lpl_plugin.launch SCRIPT [SCRIPT ARGS...]\n"
         "SCRIPT is sd-scripts' sdxl_train_network.py (LoRA) or sdxl_train.py (full fine-tune); the LPL settings\n"
         "come from its --config_file TOML (use_lpl, lpl_*) and --use_lpl/--lpl_* options (see SCRIPT --help).")


def run(script: str, argv: Sequence[str]) -> None:
    """Check, install the adapter and run the script as `__main__` with `argv` as its arguments."""
    from lpl_plugin.patches.sd_scripts_seams import script_kind

    lpl_plugin_boot.disarm()  # enabled in this environment too: this launcher installs the adapter, once
    kind = script_kind(script)
    config = config_file(argv)
    if config is not None:
        preflight(config)  # before torch or the adapter is imported: a bad config fails within a fraction of a second
    from lpl_plugin.patches import sd_scripts
    folder = str(Path(script).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sd_scripts.install(kind)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lpl-launch` and `python -m lpl_plugin.launch`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        run(argv[0], argv[1:])
    except UserError as error:
        write_lines(from_plugin(error.lines()))
        return 2
    return 0
