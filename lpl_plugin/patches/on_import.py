"""Run a callback right after named modules execute: a host's functions get wrapped before anything can call them.

Used when LPL is enabled in an environment: the trainer script imports sd-scripts' modules itself, in its own order,
and each one is patched the moment its code has run, before the script (or a module importing it) binds its names.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, Callable, Iterable


class _PatchingLoader:
    """A loader that runs the real one, then the callback; everything else is the real loader's."""

    def __init__(self, loader: Any, done: Callable[[str], None]):
        self._loader, self._done = loader, done

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        """The real loader's module creation."""
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        """Execute the module, then report it."""
        self._loader.exec_module(module)
        self._done(module.__name__)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class OnImport:
    """A meta-path finder that finds modules through the other finders and wraps the loaders of the watched ones."""

    def __init__(self, names: Iterable[str], callback: Callable[[str], None]):
        self.pending = set(names)
        self.callback = callback
        self.deferred: set[str] = set()  # imported, but still running their code (a wrapper imported them first)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        """The spec the other finders give, with a patching loader for watched names; None for the rest."""
        if self.deferred:
            self.settle()
        if fullname not in self.pending:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, self._loaded)
        return spec

    def _loaded(self, name: str) -> None:
        """A watched module has run: stop watching it, and leave sys.meta_path when none is left."""
        self.pending.discard(name)
        if not self.pending and not self.deferred:
            self.remove()
        self.callback(name)

    def install(self) -> "OnImport":
        """Report the watched modules already imported, and watch for the others (and for those still running)."""
        for name in sorted(self.pending & set(sys.modules)):
            if _initializing(sys.modules[name]):
                self.pending.discard(name)
                self.deferred.add(name)
            else:
                self._loaded(name)
        if self.pending or self.deferred:
            sys.meta_path.insert(0, self)
        return self

    def settle(self) -> None:
        """Report the deferred modules that have finished running their code."""
        for name in sorted(self.deferred):
            module = sys.modules.get(name)
            if module is None or not _initializing(module):
                self.deferred.discard(name)
                if not self.pending and not self.deferred:
                    self.remove()
                if module is not None:
                    self.callback(name)

    def remove(self) -> None:
        """Stop watching."""
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]


def _initializing(module: Any) -> bool:
    """Whether a module in sys.modules is still running its code (imported by a module being imported)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))
