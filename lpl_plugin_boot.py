"""Start-up hook of `lpl-plugin enable`: arms LPL in every start of sd-scripts' trainers, stays out of other processes.

`lpl-plugin enable` writes a one-line `.pth` file (`pth_line`) into the site-packages lpl-plugin is installed in. Python
runs that line at every interpreter start: it defines a tiny meta-path finder (`WATCH_SOURCE`, no import) and, unless
`LPL_PLUGIN=off`, puts it first on `sys.meta_path`. The finder compares each imported name with `library`, the top-level
package every sd-scripts script imports before anything else, and does nothing else. On the first import of a `library`,
it leaves `sys.meta_path` and calls `on_library` here (standard library only), which checks that this `library` sits in
an sd-scripts checkout (`library/train_util.py`) and finds which script of the checkout runs: `sys.argv[0]` resolved (a
symlink, a relative path, `python -m`, whose argv[0] runpy sets to the module's file before running it), else
`__main__`, else a top-level module of the checkout being imported (a wrapper or notebook that imports
`sdxl_train_network`). Arming on the import of sd-scripts' own package rather than on argv[0] at start-up is what makes
all of these starts look alike. Then `lpl_plugin.patches.activation` (torch with it) takes over. When lpl-plugin itself
is gone (pip uninstall, uv sync) while the `.pth` file stays, the finder says so in one line in sd-scripts processes
only.
"""

from __future__ import annotations

import os
import sys
from typing import Any

SCRIPTS = ("sdxl_train_network.py", "sdxl_train.py")
PTH_NAME = "lpl_plugin_activate.pth"
ENV = "LPL_PLUGIN"
OFF_WORDS = ("off", "false", "0", "no")
ON_WORDS = ("on", "true", "1", "yes")
AUTO_WORDS = ("", "auto")

# What the watch finder runs on the first import of a `library` (compiled only then, in a namespace holding PTH, the
# .pth file's path): hand over to `on_library`, or, when lpl-plugin cannot be imported any more, one line in a process
# importing an sd-scripts checkout's `library`.
ON_LIBRARY_SOURCE = '''\
import importlib.machinery, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "lpl_plugin_watch", False)]
try:
    from lpl_plugin_boot import on_library
except Exception:
    origin = getattr(importlib.machinery.PathFinder.find_spec("library"), "origin", None) or ""
    if os.path.isfile(os.path.join(os.path.dirname(origin), "train_util.py")):
        sys.stderr.write("lpl-plugin: lpl-plugin is no longer installed in this Python environment but its activation "
                         "file " + PTH + " remains; LPL will not run in this training (delete " + PTH + " to remove "
                         "this line)\\n")
else:
    on_library(PTH)
'''


def pth_line(pth: str | os.PathLike[str]) -> str:
    """The line `lpl-plugin enable` writes into `pth`, run by `site` at every interpreter start.

    Unless LPL_PLUGIN says off, it puts a finder first on sys.meta_path whose find_spec is one lambda: a string
    comparison with "library" per import, nothing else. No import and no second code string is compiled at start-up
    (compiling source is what costs: a class with a method compiled from a string took about 0.9 ms here).
    """
    on_hit = f"exec({ON_LIBRARY_SOURCE!r}, {{'PTH': {str(pth)!r}}})"
    finder = ('type("LPLWatch", (), {"lpl_plugin_watch": True, "find_spec": lambda self, name, path=None, target=None: '
              f'None if name != "library" or path is not None else {on_hit}}})()')
    return (f'import os, sys; os.environ.get("{ENV}", "").strip().lower() in {OFF_WORDS!r} or '
            f"sys.meta_path.insert(0, {finder})\n")


def boot(pth: str | os.PathLike[str] = PTH_NAME) -> None:
    """Arm this process as the `.pth` line does (in-process tests, embedded interpreters); idempotent."""
    if armed() is None:
        exec(pth_line(pth), {})


def armed() -> Any:
    """The watch finder on sys.meta_path, if any."""
    return next((f for f in sys.meta_path if getattr(f, "lpl_plugin_watch", False)), None)


def disarm() -> None:
    """Take the watch finders off sys.meta_path (the launcher does this: it installs the adapter itself)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "lpl_plugin_watch", False)]


def mode() -> str:
    """LPL_PLUGIN as "auto", "on" or "off"; any other value is returned as given (the caller refuses it)."""
    raw = os.environ.get(ENV, "")
    word = raw.strip().lower()
    if word in AUTO_WORDS:
        return "auto"
    if word in ON_WORDS:
        return "on"
    if word in OFF_WORDS:
        return "off"
    return raw


def data_worker() -> bool:
    """Whether this is a spawned multiprocessing child (a DataLoader worker) re-importing the main script: it only
    loads data. (torch's import makes `__mp_main__` an alias of `__main__` in every process; only in a child is it
    a module of that name, the script being re-run.)"""
    mp_main = sys.modules.get("__mp_main__")
    return "--multiprocessing-fork" in sys.argv or getattr(mp_main, "__name__", None) == "__mp_main__"


def library_root() -> str | None:
    """The sd-scripts checkout whose `library` this process is importing, or None for any other `library`."""
    for finder in list(sys.meta_path):
        find = getattr(finder, "find_spec", None)
        if find is None or getattr(finder, "lpl_plugin_watch", False):
            continue
        spec = find("library", None)
        if spec is not None:
            break
    else:
        return None
    locations = list(spec.submodule_search_locations or [])
    folder = locations[0] if locations else os.path.dirname(spec.origin or "")
    root = os.path.dirname(os.path.abspath(folder)) if folder else ""
    return root if root and os.path.isfile(os.path.join(root, "library", "train_util.py")) else None


def running_script(root: str) -> tuple[str | None, list[str] | None]:
    """The checkout's top-level script this process runs, and its arguments when it was started as the program.

    argv[0] resolved first (symlinks, relative paths, `python -m`), then `__main__`'s file, then a top-level module
    of the checkout a wrapper is importing right now (arguments unknown: None).
    """
    real_root = os.path.realpath(root)

    def in_checkout(path: Any) -> str | None:
        if not isinstance(path, str) or not path:
            return None
        real = os.path.realpath(path)
        return real if real.endswith(".py") and os.path.dirname(real) == real_root else None

    argv = list(getattr(sys, "argv", None) or [""])
    found = in_checkout(argv[0]) if argv[0] not in ("", "-c", "-m") else None
    if found:
        return found, argv[1:]
    main = in_checkout(getattr(sys.modules.get("__main__"), "__file__", None))
    if main:
        return main, None
    for name, module in list(sys.modules.items()):
        found = in_checkout(getattr(module, "__file__", None)) if "." not in name and name != "library" else None
        if found:
            return found, None
    return None, None


def on_library(pth: str) -> None:
    """The first import of a `library` package: hand an sd-scripts process to `patches.activation`, else nothing.

    Raises SystemExit(2) for a refused run; a failure of ours before the hand-over leaves the run alone.
    """
    try:
        root = library_root()
        chosen = mode()
        if root is None or chosen == "off" or data_worker():
            return
        from lpl_plugin.patches import activation
        script, argv = running_script(root)
    except Exception as error:  # a broken install: say so once and leave the run as it is
        sys.stderr.write(f"lpl-plugin: lpl-plugin is enabled but could not start ({type(error).__name__}: {error}); "
                         "this run goes on without it (reinstall lpl-plugin, or `lpl-plugin disable`)\n")
        return
    if chosen not in ("auto", "on"):
        activation.stop([f"{ENV}={chosen!r} is not one of off, on, auto; unset it for the automatic check, or set "
                         "it to off to run this training without LPL"])
    activation.start(root, script, argv, forced=chosen == "on")
