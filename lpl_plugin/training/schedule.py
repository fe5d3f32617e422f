"""Noise-schedule tables on the training device, copied there once and reused by every step.

A trainer may keep its scheduler's `alphas_cumprod` on the CPU (sd-scripts v0.10 moves it back there after every
noise call, as a new tensor each time); indexing a device copy made per step would be a blocking host-to-device
copy every step. `device_table` keeps one copy per (device, dtype) and hands it back while the host's values stay
the same: the same tensor object unchanged, or a new CPU tensor with equal values (compared on the CPU, which
waits for no device).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Entry:
    """One device copy and what it was made from."""

    source: "weakref.ref[Tensor]"
    version: int
    host_values: Tensor | None  # a CPU copy of a CPU source, to recognise the same values in a new tensor
    table: Tensor


_tables: dict[tuple[str, torch.dtype], _Entry] = {}
_lock = threading.Lock()


def _same_values(entry: _Entry, source: Tensor) -> bool:
    """Whether a CPU `source` holds exactly the values the entry was made from."""
    known = entry.host_values
    return (known is not None and source.device.type == "cpu" and known.shape == source.shape
            and known.dtype == source.dtype and bool(torch.equal(known, source)))


def device_table(source: Tensor, device: torch.device | str, dtype: torch.dtype = torch.float64) -> Tensor:
    """`source` as `dtype` on `device`, copied at most once per device while its values do not change."""
    device = torch.device(device)
    if source.device == device and source.dtype == dtype:
        return source
    key = (str(device), dtype)
    with _lock:
        entry = _tables.get(key)
        if entry is not None:
            if entry.source() is source and entry.version == source._version:
                return entry.table
            if _same_values(entry, source):
                entry.source, entry.version = weakref.ref(source), source._version
                return entry.table
        host_values = source.detach().clone() if source.device.type == "cpu" else None
        table = source.to(device=device, dtype=dtype).detach()
        _tables[key] = _Entry(weakref.ref(source), source._version, host_values, table)
        return table


def forget_tables() -> None:
    """Drop every device copy (a new run in the same process starts from its own schedule)."""
    with _lock:
        _tables.clear()
