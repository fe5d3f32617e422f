"""Memory: out-of-memory detection and cache release (accelerate's), and resident-memory readings (psutil's)."""

from __future__ import annotations

from pathlib import Path

import psutil
from accelerate.utils.memory import release_memory, should_reduce_batch_size


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an allocator failure (CUDA, XPU, MPS or the CPU allocator), as accelerate sees it."""
    return isinstance(error, Exception) and should_reduce_batch_size(error)


def release_cached_memory() -> None:
    """After an out-of-memory error: collect garbage and return the device allocator's cached blocks."""
    release_memory()


def current_rss() -> int:
    """Resident memory of this process in bytes."""
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter where Linux allows it, so that model construction does not hide a later peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (since the last reset where Linux allows one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    info = psutil.Process().memory_info()
    return int(getattr(info, "peak_wset", 0) or info.rss)  # Windows keeps a peak; elsewhere the current size
