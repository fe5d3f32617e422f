"""Start-up hook of `lpl-plugin enable`: arms LPL in sd-scripts' SDXL trainers, stays out of every other process.

`lpl-plugin enable` writes a one-line `.pth` file (`pth_line()`) into the site-packages lpl-plugin is installed in.
Python runs that line at every interpreter start; it compares `sys.argv[0]` with the two script names and does
nothing else for any other process (no import). For `sdxl_train_network.py` / `sdxl_train.py` it imports this module
(standard library only) and calls `boot()`, which checks that the script sits in an sd-scripts checkout and puts a
trigger on `sys.meta_path`. The trigger fires when the script first imports the checkout's own code (`library`,
`train_network`): only then is `lpl_plugin.activation` imported (torch with it), which checks the TOML and the release
and makes the adapter patch each sd-scripts module as it loads. Uninstalled meanwhile: the import fails silently.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

SCRIPTS = ("sdxl_train_network.py", "sdxl_train.py")
PTH_NAME = "lpl_plugin_activate.pth"
# The checkout's first-party top-level modules: the first import of one of them activates the adapter.
TRIGGERS = ("library", "train_network")


def pth_line() -> str:
    """The line `lpl-plugin enable` writes: a string test on argv[0], then a guarded import only for the trainers."""
    guarded = "try:\\n from lpl_plugin_boot import boot\\nexcept Exception:\\n pass\\nelse:\\n boot()"
    return (f'import sys; exec("{guarded}") if str((getattr(sys, "argv", None) or [""])[0]).endswith({SCRIPTS!r}) '
            "else None\n")


def trainer_script(argv: Sequence[str]) -> str | None:
    """The script of this process when it is a supported trainer inside an sd-scripts checkout, else None."""
    script = str(argv[0]) if argv else ""
    if os.path.basename(script) not in SCRIPTS:
        return None
    folder = os.path.dirname(os.path.abspath(script))
    return script if os.path.isfile(os.path.join(folder, "library", "train_util.py")) else None


class Trigger:
    """A meta-path finder that never finds anything: it activates the adapter at the first import of the checkout."""

    def __init__(self, script: str, argv: Sequence[str]):
        self.script, self.argv = script, list(argv)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        """On the first import of `library` or `train_network`, step aside and activate; otherwise nothing."""
        if fullname not in TRIGGERS:
            return None
        disarm()
        try:
            from lpl_plugin.activation import activate
        except Exception as error:  # a broken install: say so once and leave the run as it is
            print(f"lpl-plugin is enabled but cannot be imported ({type(error).__name__}: {error}); this run goes "
                  "on without it (reinstall lpl-plugin, or `lpl-plugin disable`)", file=sys.stderr)
            return None
        activate(self.script, self.argv[1:])
        return None


def armed() -> Trigger | None:
    """The trigger on sys.meta_path, if any."""
    return next((f for f in sys.meta_path if isinstance(f, Trigger)), None)


def disarm() -> None:
    """Take the trigger off sys.meta_path (the launcher does this: it installs the adapter itself)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, Trigger)]


def boot(argv: Sequence[str] | None = None) -> None:
    """Arm the trigger when this process runs a supported trainer; idempotent, never raises, prints nothing."""
    try:
        argv = list(sys.argv if argv is None else argv)
        script = trainer_script(argv)
        if script is not None and armed() is None:
            sys.meta_path.insert(0, Trigger(script, argv))
    except Exception:
        pass
