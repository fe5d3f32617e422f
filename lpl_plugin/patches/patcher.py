"""Wrapping a host's functions in place, by parameter name, and undoing it: the mechanics under every host adapter.

A target is (modules, "function" or "Class.method", body). The wrapper binds each call to the original's signature
and hands the body `(original, args, kwargs, bound_arguments)`; re-exports of one function (a shim module importing
it from another) share one wrapper, and a wrapper called again from inside itself runs the original. Modules are
patched now (`patch`, the launcher) or the moment the host imports them (`patch_on_import`, the enabled path).
User errors raised in a body end the process with status 2 and one line each (marked as lpl-plugin's) when
`exit_on_error` is set.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from typing import Any, Callable, Iterator, Sequence

from lpl_plugin.settings.errors import UserError, exit_refused

from lpl_plugin.patches.on_import import OnImport

Body = Callable[[Callable[..., Any], tuple, dict, dict], Any]
Target = tuple[tuple[str, ...], str, Body]


class Patcher:
    """The wrappers one adapter session put in place, and how to take them out again."""

    def __init__(self, targets: Sequence[Target]):
        self.targets = list(targets)
        self.exit_on_error = False
        self._patches: list[tuple[object, str, Any]] = []
        self._wrappers: dict[int, Callable[..., Any]] = {}
        self._busy: set[str] = set()
        self._watch: OnImport | None = None

    def modules(self) -> list[str]:
        """Every module holding a target."""
        return list(dict.fromkeys(m for modules, _, _ in self.targets for m in modules))

    def patch(self) -> None:
        """Import the host modules and wrap their functions now."""
        for module in self.modules():
            importlib.import_module(module)
            self.patch_module(module)

    def patch_on_import(self) -> None:
        """Wrap each host module's functions the moment it is imported."""
        self._watch = OnImport(self.modules(), self.patch_module).install()

    def settle(self) -> None:
        """Wrap the functions of watched modules that were still running when the adapter was installed."""
        if self._watch is not None:
            self._watch.settle()

    def patch_module(self, module: str) -> None:
        """Wrap the targets living in one (imported) module."""
        loaded = importlib.import_module(module)
        for modules, name, body in self.targets:
            if module not in modules:
                continue
            owner: Any = loaded
            *path, attr = name.split(".")
            for part in path:
                owner = getattr(owner, part)
            current = getattr(owner, attr, None)
            if current is None:  # a shim module without this re-export
                continue
            if getattr(current, "__lpl_patcher__", None) is self:  # bound to our wrapper already (a re-export)
                self._patches.append((owner, attr, current.__wrapped__))
                continue
            wrapper = self._wrappers.setdefault(id(current), self._wrap(name, current, body))
            setattr(owner, attr, wrapper)
            self._patches.append((owner, attr, current))

    def replace(self, owner: Any, attr: str, body: Callable[..., Any]) -> None:
        """Put `body(original, *args, **kwargs)` in place of `owner.attr` (an object's method) until unpatch."""
        original = getattr(owner, attr)
        setattr(owner, attr, functools.wraps(original)(functools.partial(body, original)))
        self._patches.append((owner, attr, original))

    def unpatch(self) -> None:
        """Put every wrapped function back and stop watching imports."""
        if self._watch is not None:
            self._watch.remove()
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches.clear()

    @contextlib.contextmanager
    def reporting(self) -> Iterator[None]:
        """With exit_on_error, a user error ends the process with status 2 and one line per problem."""
        try:
            yield
        except UserError as error:
            if self.exit_on_error:
                exit_refused(error.lines())
            raise

    def _wrap(self, name: str, original: Callable[..., Any], body: Body) -> Callable[..., Any]:
        """A wrapper binding the host's call by parameter name; a shim calling a wrapped original runs it once."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name in self._busy:
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self._busy.add(name)
            try:
                with self.reporting():
                    return body(original, args, kwargs, bound.arguments)
            finally:
                self._busy.discard(name)
        wrapper.__lpl_patcher__ = self  # type: ignore[attr-defined]
        return wrapper
