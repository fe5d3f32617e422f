"""What the engine learns while running (chunk size, recomputation, float16 loss scale, counters), saved and restored
whole, apart from the user's settings."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lpl_plugin.engine.precision import LossScale
from lpl_plugin.settings.config import LPLConfig

STATE_VERSION = 2


class EngineState:
    """What the engine learned while running, kept apart from the user's settings; saved and restored whole.

    `chunk_size` and `checkpointing` are what the engine uses now (the settings' values until memory ran short),
    the loss scale is float16's, and the counters run over the engine's life. `zeroed` counts, on the device,
    the gradients the non-finite filter zeroed during backward passes; each call reports those not reported yet.
    """

    def __init__(self, config: LPLConfig, dtype: torch.dtype, device: torch.device):
        self.settings = {"lpl_chunk_size": config.lpl_chunk_size, "lpl_checkpointing": config.lpl_checkpointing,
                         "lpl_dtype": str(dtype).replace("torch.", "")}
        self.chunk_size = config.lpl_chunk_size
        self.checkpointing = "none" if config.lpl_checkpointing == "auto" else config.lpl_checkpointing
        self.loss_scale = LossScale(dtype, device)
        self.calls = self.oom_retries = self.oom_skips = 0
        self.nonfinite_samples = torch.zeros((), dtype=torch.int64, device=device)
        self.zeroed = torch.zeros((), dtype=torch.int64, device=device)
        self.zeroed_reported = torch.zeros((), dtype=torch.int64, device=device)

    def state_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-safe values (reads the device: call at save time only)."""
        return {"version": STATE_VERSION, "settings": dict(self.settings),
                "learned": {"chunk_size": self.chunk_size, "checkpointing": self.checkpointing,
                            "loss_scale": self.loss_scale.state_dict()},
                "counters": {"calls": self.calls, "oom_retries": self.oom_retries, "oom_skips": self.oom_skips,
                             "nonfinite_samples": int(self.nonfinite_samples + self.zeroed
                                                      - self.zeroed_reported)}}

    def load_state_dict(self, saved: dict[str, Any]) -> list[str]:
        """Restore a saved state; what was learned under other settings is dropped. Returns what differed.

        The counters always carry over. The chunk size and the switch to recomputation carry over only when the
        setting they were learned under is unchanged; the loss scale only when the decoder precision is.
        """
        counters = saved.get("counters", {})
        self.calls = int(counters.get("calls", self.calls))
        self.oom_retries = int(counters.get("oom_retries", self.oom_retries))
        self.oom_skips = int(counters.get("oom_skips", self.oom_skips))
        device = self.nonfinite_samples.device
        self.nonfinite_samples = torch.tensor(int(counters.get("nonfinite_samples", 0)), device=device)
        before, learned = saved.get("settings", {}), saved.get("learned", {})
        changed = [f"{key} = {before[key]!r} then, {value!r} now" for key, value in self.settings.items()
                   if key in before and before[key] != value]
        if before.get("lpl_chunk_size") == self.settings["lpl_chunk_size"] and "chunk_size" in learned:
            self.chunk_size = max(1, min(int(learned["chunk_size"]), self.chunk_size))
        if (before.get("lpl_checkpointing") == self.settings["lpl_checkpointing"] == "auto"
                and learned.get("checkpointing") == "resnet"):
            self.checkpointing = "resnet"
        if before.get("lpl_dtype") == self.settings["lpl_dtype"] and "loss_scale" in learned:
            self.loss_scale.load_state_dict(learned["loss_scale"])
        return changed

    def take_zeroed(self) -> Tensor:
        """The gradients zeroed in backward passes and not reported yet (a device tensor; no sync)."""
        fresh = self.zeroed - self.zeroed_reported
        self.zeroed_reported = self.zeroed.clone()
        return fresh
