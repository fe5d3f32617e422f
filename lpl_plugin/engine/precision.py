"""Decoder precision choice and dynamic loss scaling for half-precision backward passes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INITIAL_FP16_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 200
# The scale never drops below 1: below it, scaling would shrink gradients that already overflow float16, which
# means the activations themselves are out of range (samples are then zeroed and counted by the non-finite guard).
SCALE_FLOOR = 1.0


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The decoder dtype for an `lpl_dtype` value: 'auto' is bfloat16 on CUDA GPUs that support it, else float32."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class LossScale:
    """Dynamic loss scale on the device (no host sync): halves on overflow down to a floor, doubles after clean runs.

    Only float16 needs it: bfloat16 and float32 share float32's exponent range, so their scale stays 1.
    `floor_hits` counts overflows that happened with the scale already at its floor.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, initial: float | None = None):
        if initial is None:
            initial = INITIAL_FP16_SCALE if dtype == torch.float16 else 1.0
        self.active = dtype == torch.float16
        self.value = torch.tensor(max(float(initial), SCALE_FLOOR), dtype=torch.float32, device=device)
        self.clean = torch.zeros((), dtype=torch.int64, device=device)
        self.floor_hits = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, overflowed: Tensor) -> None:
        """Record whether the last scaled backward overflowed, adjusting the scale on the device."""
        if not self.active:
            return
        at_floor = self.value <= SCALE_FLOOR
        self.floor_hits = self.floor_hits + (overflowed & at_floor).to(self.floor_hits.dtype)
        self.clean = torch.where(overflowed, torch.zeros_like(self.clean), self.clean + 1)
        grow = self.clean >= GROWTH_INTERVAL
        halved = (self.value / 2).clamp_min(SCALE_FLOOR)
        self.value = torch.where(overflowed, halved, torch.where(grow, self.value * 2, self.value))
        self.clean = torch.where(grow, torch.zeros_like(self.clean), self.clean)

    def state_dict(self) -> dict[str, Any]:
        """The scale as plain numbers (read from the device: call at save time only)."""
        return {"value": float(self.value), "clean_steps": int(self.clean), "floor_hits": int(self.floor_hits)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict wrote (values below the floor are raised to it)."""
        device = self.value.device
        self.value = torch.tensor(max(float(state["value"]), SCALE_FLOOR), dtype=torch.float32, device=device)
        self.clean = torch.tensor(int(state.get("clean_steps", 0)), dtype=torch.int64, device=device)
        self.floor_hits = torch.tensor(int(state.get("floor_hits", 0)), dtype=torch.int64, device=device)
