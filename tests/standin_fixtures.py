"""Import the sd-scripts stand-ins (tests/standins) like a checkout on sys.path, and undo it afterwards."""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

STANDINS = Path(__file__).parent / "standins"
VERSIONS = ("v0_9_1", "v0_10_1", "v0_11")
HOST_MODULES = ("library", "train_network", "sdxl_train_network", "sdxl_train")


# "unsupported", a future release lpl-plugin does not know, is the v0.10.1 stand-in (without sdxl_train.py) whose
# conditional_loss grew a parameter; it is written on first use. Each edit names the text it replaces; the copy's
# `library` finds standin_host in this folder's standins/ rather than beside itself.
UNSUPPORTED_FROM = "v0_10_1"
UNSUPPORTED_EDITS = {
    "library/__init__.py": [("str(Path(__file__).resolve().parents[2])", repr(str(STANDINS)))],
    "library/train_util.py": [("huber_c: Optional[torch.Tensor] = None\n", "huber_c: Optional[torch.Tensor] = None,\n"
                               "    weighting: Optional[torch.Tensor] = None,\n")],
}
UNSUPPORTED_DOCSTRING = ("Stand-in of {name} of a future sd-scripts release lpl-plugin does not know: the v0.10.1 "
                         "stand-in{more} (tests only).")


def root(version: str) -> Path:
    """The folder of one stand-in ("unsupported" is written on first use)."""
    return unsupported_root() if version == "unsupported" else STANDINS / f"sd_scripts_{version}"


@functools.lru_cache(maxsize=None)
def unsupported_root() -> Path:
    """The "unsupported" stand-in, written once per process into a temporary folder removed at exit."""
    temp = Path(tempfile.mkdtemp(prefix="lpl-standin-"))
    atexit.register(shutil.rmtree, temp, ignore_errors=True)
    folder = temp / "sd_scripts_unsupported"
    shutil.copytree(root(UNSUPPORTED_FROM), folder, ignore=shutil.ignore_patterns("__pycache__", "sdxl_train.py"))
    for path in sorted(folder.rglob("*.py")):
        name = path.relative_to(folder).as_posix()
        docstring, rest = path.read_text(encoding="utf-8").split("\n", 1)
        assert docstring.startswith('"""Stand-in of ') and docstring.endswith('"""'), f"{name}: one-line docstring"
        more = " whose conditional_loss grew a `weighting` parameter" if name == "library/train_util.py" else ""
        for old, new in UNSUPPORTED_EDITS.get(name, []):
            assert rest.count(old) == 1, f"{name}: {old!r} is not there once"
            rest = rest.replace(old, new)
        path.write_text(f'"""{UNSUPPORTED_DOCSTRING.format(name=name, more=more)}"""\n{rest}', encoding="utf-8")
    return folder


def standin(version: str) -> contextlib.AbstractContextManager[Path]:
    """Put a stand-in on sys.path; afterwards uninstall the adapter and forget the host modules."""
    return on_path(root(version))


@contextlib.contextmanager
def on_path(folder: Path) -> Iterator[Path]:
    """Put an sd-scripts folder (stand-in or real checkout) on sys.path; afterwards undo all the adapter did."""
    from lpl_plugin.patches import sd_scripts

    saved_path, saved_argv = list(sys.path), list(sys.argv)
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sd_scripts.uninstall()
        for name in list(sys.modules):
            if name.split(".")[0] in HOST_MODULES:
                del sys.modules[name]
        sys.path[:] = saved_path
        sys.argv[:] = saved_argv


@contextlib.contextmanager
def hooks_off(session: Any, off: bool = True) -> Iterator[None]:
    """The same session with no hook registered (as in a run without LPL), then its hooks back."""
    from lpl_plugin.training.registry import HookRegistry

    registry = session.registry
    if off:
        session.registry = HookRegistry()
    try:
        yield
    finally:
        session.registry = registry


def module(name: str) -> Any:
    """A host module of the stand-in on sys.path."""
    return importlib.import_module(name)


def write_config(folder: Path, lpl: str, host: str = "", name: str = "cfg.toml") -> Path:
    """A trainer TOML with host keys at the top and an lpl block below."""
    path = folder / name
    path.write_text(f"output_dir = \"{(folder / 'out').as_posix()}\"\n{host}\n{lpl}\n", encoding="utf-8")
    return path
