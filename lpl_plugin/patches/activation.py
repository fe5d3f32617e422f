"""LPL in sd-scripts started any usual way: what runs once a process first imports an sd-scripts checkout's `library`.

`lpl_plugin_boot` (the `.pth` start-up hook of `lpl-plugin enable`) calls `start` with the script it found. First, and
before anything is checked, whether the run asks for LPL (`lpl_plugin.patches.asked`: the TOML as sd-scripts reads it,
the command line over it). Then:

- sdxl_train_network.py / sdxl_train.py: a run that asks gets the plugin's strict check of its TOML (one line per
  mistake, exit status 2, before any model loads) and a release check; then the adapter patches each sd-scripts
  module as the script imports it. A run that does not ask gets the adapter too, inert: its `--lpl_*` options are
  accepted and ignored, nothing is checked. Started by a wrapper (arguments unknown here), the same decision is made
  on the namespace sd-scripts' `read_config_from_file` returns.
- Any other script of the checkout (train_network.py, flux_train_network.py, sd3_train.py, train_db.py, ...) that
  asks is stopped in one line; one that does not ask is left completely alone.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from lpl_plugin.patches.asked import asks_from_argv, asks_in, config_path
from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import UserError, exit_refused, from_plugin, write_lines

log = logging.getLogger("lpl_plugin")

SCRIPT_KINDS = {"sdxl_train_network.py": "lora", "sdxl_train.py": "full"}
# The modules defining read_config_from_file (v0.11 moved it to library/args.py and re-exports it).
CONFIG_MODULES = ("library.train_util", "library.args")


def config_file(argv: Sequence[str]) -> str | None:
    """The TOML path the host will read (see asked.config_path)."""
    return config_path(argv)


def stop(lines: Sequence[str]) -> NoReturn:
    """End this host process with status 2 after one line per problem, each marked as lpl-plugin's."""
    exit_refused(lines)


def preflight(path: str) -> LPLConfig:
    """Check the TOML's LPL keys and their context; warnings go to stderr, problems raise ConfigError."""
    from lpl_plugin.settings.preflight import check_training_config

    checked = check_training_config(path)
    write_lines(from_plugin(checked.warnings))
    return checked.raise_for_problems()


def other_script_line(script: str) -> str:
    """The refusal of a run of another sd-scripts script that asks for LPL."""
    name = os.path.basename(script)
    return (f"{name} asks for LPL (use_lpl), but LPL supports sdxl_train_network.py and sdxl_train.py only; this "
            "script would train without it, so the run is stopped: remove use_lpl or start one of those two")


def unknown_script_line(caller: str) -> str:
    """The refusal of a run that asks for LPL in a process whose sd-scripts script could not be told."""
    return (f"{os.path.basename(caller)} asks for LPL (use_lpl), but lpl-plugin cannot tell which sd-scripts script "
            "this process runs; LPL supports sdxl_train_network.py and sdxl_train.py only: start one of those, or set "
            "LPL_PLUGIN=on if this process runs one of them")


def forced_kind(script: str | None) -> str:
    """The trainer kind under LPL_PLUGIN=on for a script the automatic check does not know: full fine-tune for a
    name like sdxl_train*.py without "network", else LoRA."""
    name = os.path.basename(script or "")
    return "full" if "sdxl_train" in name and "network" not in name else "lora"


def start(root: str, script: str | None, argv: Sequence[str] | None, *, forced: bool = False) -> None:
    """Hand one sd-scripts process to the adapter, the other-script guard or a watch for a trainer module."""
    kind = SCRIPT_KINDS.get(os.path.basename(script or ""))
    if kind is None and forced:
        kind = forced_kind(script)
    if kind is not None:
        activate(root, kind, argv)
    elif script is not None:
        if argv is not None and asks_from_argv(argv):
            stop([other_script_line(script)])
        if argv is None:  # a wrapper importing train_network.py first may import sdxl_train_network next
            watch_trainer_modules(root)
        guard(root, lambda: [other_script_line(script)])
    else:  # a wrapper that imported `library` first: it may import a trainer module next
        watch_trainer_modules(root)
        guard(root, lambda: [unknown_script_line(_caller_file())])


def activate(root: str, kind: str, argv: Sequence[str] | None) -> None:
    """Arrange for the adapter to patch the trainer's sd-scripts modules as they load; exit 2 on user errors.

    `argv` is the trainer's own command line (None when a wrapper imported the trainer module: then only the
    namespace sd-scripts builds says whether the run asks).
    """
    from lpl_plugin.patches import sd_scripts
    from lpl_plugin.patches.sd_scripts_seams import SourceReader, UnsupportedHost, detect

    if sd_scripts.current() is not None:  # the launcher installed it already
        return
    asks = asks_from_argv(argv) if argv is not None else None
    try:
        path = config_path(argv) if asks else None
        if path is not None:
            preflight(path)
        layout, problems = detect(SourceReader(root), kind)
        if layout is None:
            if asks:
                raise UnsupportedHost(root, problems)
            if asks is None:  # a wrapper: refused at the host's config seam if it turns out to ask
                guard(root, lambda: UnsupportedHost(root, problems).lines())
            return  # a release lpl-plugin does not know, and the run does not ask for LPL: leave it alone
        sd_scripts.install(kind, layout=layout).patcher.exit_on_error = True
    except UserError as error:
        sd_scripts.uninstall()
        stop(error.lines())
    except Exception as error:  # a bug of ours: a run without LPL must not pay for it
        sd_scripts.uninstall()
        if asks:
            raise
        write_lines([f"lpl-plugin: could not start ({type(error).__name__}: {error}); this run does not ask for "
                     "LPL and goes on without it"])


def guard(root: str, refusal: Callable[[], list[str]]) -> None:
    """Stop the run in one line if the namespace sd-scripts' read_config_from_file returns asks for LPL while no
    adapter is installed (another script, a release lpl-plugin does not know)."""
    from lpl_plugin.patches.on_import import OnImport

    modules = [m for m in CONFIG_MODULES if os.path.isfile(Path(root, *m.split(".")).with_suffix(".py"))]
    OnImport(modules, lambda name: _guard_module(sys.modules[name], refusal)).install()


def _guard_module(module: Any, refusal: Callable[[], list[str]]) -> None:
    """Wrap one module's read_config_from_file with the check of `guard`."""
    original = getattr(module, "read_config_from_file", None)
    if original is None or getattr(original, "__lpl_guard__", False):
        return

    def read_config_from_file(args: Any, parser: Any) -> Any:
        result = original(args, parser)
        if asks_in(vars(result)):
            from lpl_plugin.patches import sd_scripts

            if sd_scripts.current() is None:
                stop(refusal())
        return result

    read_config_from_file.__lpl_guard__ = True  # type: ignore[attr-defined]
    read_config_from_file.__wrapped__ = original  # type: ignore[attr-defined]
    module.read_config_from_file = read_config_from_file


def _caller_file() -> str:
    """The file of the code that called read_config_from_file (a wrapper, or the script itself)."""
    frame = sys._getframe(3)
    return frame.f_code.co_filename if frame is not None else "this script"


def watch_trainer_modules(root: str) -> None:
    """Activate when a wrapper that imported `library` first imports sdxl_train_network / sdxl_train of `root`."""
    names = {Path(script).stem: kind for script, kind in SCRIPT_KINDS.items()}

    class TrainerWatch:
        """A meta-path finder reacting to the import of the checkout's SDXL trainer modules only."""

        lpl_plugin_watch = True

        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name not in names or path is not None:
                return None
            if not os.path.isfile(os.path.join(root, name + ".py")):
                return None
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            activate(root, names[name], None)
            return None

    sys.meta_path.insert(0, TrainerWatch())
