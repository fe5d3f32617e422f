"""The one chunk runner: a pass over a batch in chunks of the learned size, backing off when memory runs out."""

from __future__ import annotations

import logging
from typing import Callable, Iterator, TypeVar

from lpl_plugin.engine.memory import is_out_of_memory, release_cached_memory
from lpl_plugin.engine.state import EngineState

log = logging.getLogger("lpl_plugin")
Done = TypeVar("Done")


class LPLOutOfMemory(RuntimeError):
    """Even one sample at a time, with every recomputation allowed, does not fit in memory."""


class ChunkRunner:
    """Runs work on consecutive slices of a batch, `state.chunk_size` samples each (read afresh for every chunk).

    On an out-of-memory error it halves the chunk, else (one sample per chunk, `lpl_checkpointing = "auto"`)
    switches to recomputing decoder activations, else raises LPLOutOfMemory; then it retries the same chunk. What
    it learns stays in `state`, for the calls after this one.
    """

    def __init__(self, state: EngineState, may_recompute: bool):
        self.state = state
        self.may_recompute = may_recompute

    def __call__(self, batch: int, work: Callable[[slice], Done]) -> Iterator[tuple[slice, Done]]:
        """Each chunk's slice of the batch with `work(slice)`'s result, in order, every sample once."""
        start = 0
        while start < batch:
            part = slice(start, min(batch, start + self.state.chunk_size))
            done = self._attempt(work, part)
            if done is None:
                continue
            start = part.stop
            yield part, done
            del done  # the chunk's results are the caller's now: do not hold them while the next chunk runs

    def _attempt(self, work: Callable[[slice], Done], part: slice) -> Done | None:
        """`work(part)`, or None after backing off from an out-of-memory error."""
        failure = None
        try:
            return work(part)
        except Exception as error:  # the traceback pins the chunk's tensors: handle it after the except block
            if not is_out_of_memory(error):
                raise
            failure = str(error)
        self._back_off(failure)
        return None

    def _back_off(self, error: str) -> None:
        """After an out-of-memory error: halve the chunk, else recompute more (`auto` only), else give up."""
        state = self.state
        release_cached_memory()
        if state.chunk_size > 1:
            state.chunk_size //= 2
            log.warning("LPL ran out of memory; retrying with lpl_chunk_size = %d", state.chunk_size)
        elif self.may_recompute and state.checkpointing == "none":
            state.checkpointing = "resnet"
            log.warning("LPL ran out of memory with one sample per pass; recomputing decoder activations "
                        "(as lpl_checkpointing = \"resnet\") from now on")
        else:
            raise LPLOutOfMemory(error)
        state.oom_retries += 1
