"""Counting, with PyTorch's own function and dispatch modes, what stalls a GPU's queue: host reads and host copies.

A *read* is a value of a tensor on the watched device brought to Python (`item`, `tolist`, `bool`, `float`, `int`,
`nonzero`, `numpy`, printing; and, below Python, `_local_scalar_dense`, `nonzero`, `equal`, `is_nonzero`,
`masked_select`, `unique`). A *copy* is a tensor made on the watched device from host data: Python numbers or lists
(`torch.tensor`, `as_tensor`, `new_tensor`, `lift_fresh`) or a tensor living on the host (`to`, `cuda`, `copy_`,
`_to_copy` from the CPU). On a GPU both kinds are synchronous: the CPU waits for the queue.

On the CPU, "device" and "host" are one place and `table.to("cpu")` does nothing, so a transfer cannot be seen by
where the tensors are. There the host's data are named instead: `mark_host(tensor)` flags a tensor the trainer
keeps on its CPU (sd-scripts moves its `alphas_cumprod` back to the CPU after every noise call), and every `to` /
`cuda` / `copy_` / `as_tensor` that takes a marked tensor counts as a copy, exactly the calls that copy on a GPU.
What is computed from marked tensors alone (a `detach`, a `clone`) is host data too: reading it waits for no GPU.
Creations from Python data are seen on either device.
"""

from __future__ import annotations

import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lpl_plugin
from lpl_plugin import patches  # type: ignore[attr-defined]

PACKAGE_ROOTS = tuple(Path(m.__file__).resolve().parent for m in (patches, lpl_plugin))  # patches may sit inside

T = torch.Tensor
READS = {T.item, T.tolist, T.__bool__, T.__float__, T.__int__, T.__index__, T.numpy, T.__repr__, T.__str__,
         T.__format__, T.nonzero, torch.nonzero, torch.equal, T.unique, torch.unique, T.masked_select,
         torch.masked_select}
FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy, T.new_tensor, torch.scalar_tensor}
TRANSFERS = {T.to, T.cuda, T.copy_}
aten = torch.ops.aten
LOW_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.is_nonzero.default,
             aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
             aten.unique_consecutive.default}
LOW_COPIES = {aten._to_copy.default, aten.copy_.default}


@dataclass
class Event:
    """One read or copy: its kind, the operation and where it was called from."""

    kind: str
    op: str
    where: str


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors among a call's arguments (one level into lists and tuples)."""
    found: list[torch.Tensor] = []
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            found.extend(x for x in item if isinstance(x, torch.Tensor))
    return found


def _caller() -> str:
    """`file:line` of the innermost frame of lpl-plugin's own code (package or adapters) in the current call."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        for root in PACKAGE_ROOTS:
            if path.is_relative_to(root):
                return f"{root.name}/{path.relative_to(root).as_posix()}:{frame.lineno}"
    return "(the host's code)"


@dataclass
class SyncCounter:
    """Records reads of `device` tensors and copies onto `device` while active (a context manager)."""

    device: torch.device
    events: list[Event] = field(default_factory=list)
    _host: dict[int, "weakref.ref[torch.Tensor]"] = field(default_factory=dict)
    _inside: int = 0

    def mark_host(self, tensor: torch.Tensor) -> None:
        """Treat `tensor` as living on the host (only needed when the watched device is the CPU)."""
        self._host[id(tensor)] = weakref.ref(tensor)

    def is_marked(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` itself was marked as host data."""
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def at_device(self, tensor: torch.Tensor) -> bool:
        """Whether a tensor's memory is on the watched device."""
        return tensor.device.type == self.device.type and (tensor.device.index or 0) == (self.device.index or 0)

    def on_device(self, tensor: torch.Tensor) -> bool:
        """Whether a tensor is on the watched device and not host data."""
        return self.at_device(tensor) and not self.is_marked(tensor)

    def from_host(self, tensor: torch.Tensor) -> bool:
        """Whether a tensor is host data: marked, or on the CPU while the watched device is not."""
        return self.is_marked(tensor) or (tensor.device.type == "cpu" and self.device.type != "cpu")

    def record(self, kind: str, op: Any) -> None:
        """Note one event of `kind` ("read" or "copy") made by `op`."""
        self.events.append(Event(kind, getattr(op, "__name__", str(op)), _caller()))

    def count(self, kind: str) -> int:
        """How many events of `kind` were recorded."""
        return sum(e.kind == kind for e in self.events)

    def classify_call(self, func: Callable[..., Any], args: tuple, result: Any) -> str | None:
        """What a Python-level call was: "read", "copy" or None."""
        given = _tensors(args)
        if func in READS:
            return "read" if any(self.on_device(t) for t in given) else None
        made = [t for t in _tensors(result) if self.on_device(t)]
        if func in FROM_DATA:
            source = args[0] if args else None
            host_data = not isinstance(source, torch.Tensor) or self.from_host(source)
            return "copy" if made and host_data else None
        if func in TRANSFERS:
            source = args[1] if func is T.copy_ else args[0]
            arrived = any(self.at_device(t) for t in _tensors(result))  # `to` may hand a marked tensor back as is
            return "copy" if arrived and isinstance(source, torch.Tensor) and self.from_host(source) else None
        return None

    def __enter__(self) -> "SyncCounter":
        self._modes = [_Functions(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class _Functions(TorchFunctionMode):
    """The Python-level half: reads and copies as the code wrote them (`tolist` on the CPU dispatches nothing)."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        counter = self.counter
        watched = func in READS or func in FROM_DATA or func in TRANSFERS
        if watched:
            counter._inside += 1
        try:
            result = func(*args, **(kwargs or {}))
        finally:
            if watched:
                counter._inside -= 1
        if watched:
            kind = counter.classify_call(func, args, result)
            if kind:
                counter.record(kind, func)
        given = _tensors(args)
        if func not in TRANSFERS and func not in FROM_DATA and given and all(counter.is_marked(t) for t in given):
            for made in _tensors(result):  # computed from host data alone: still host data (a CPU-side clone)
                counter.mark_host(made)
        return result


class _Dispatch(TorchDispatchMode):
    """The operator-level half: reads and copies made inside other functions, below Python."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        counter = self.counter
        if counter._inside:
            return result
        given = _tensors(args)
        if func in LOW_READS and any(counter.on_device(t) for t in given):
            counter.record("read", func)
        elif func in LOW_COPIES:
            source = given[1] if func is aten.copy_.default else given[0]
            if any(counter.on_device(t) for t in _tensors(result)) and counter.from_host(source):
                counter.record("copy", func)
        elif func is aten.lift_fresh.default and any(counter.on_device(t) for t in _tensors(result)):
            counter.record("copy", func)
        return result
