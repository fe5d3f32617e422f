"""Graceful stop: SIGTERM or a first Ctrl-C asks the run to save and stop after the current step; a second Ctrl-C aborts."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator


class StopRequest:
    """The signal that asked the run to stop (None while training should go on)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal number, the shell's convention for a run ended by a signal (130 Ctrl-C, 143 SIGTERM)."""
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        """The signal's name, e.g. SIGTERM."""
        return signal.Signals(self.signum).name if self.signum else "none"


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGINT set the returned request instead of killing the process.

    A second SIGINT raises KeyboardInterrupt at once. Outside the main thread nothing is installed.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and request.signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signum = signum

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
