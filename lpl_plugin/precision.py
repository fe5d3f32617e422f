"""Decoder precision choice and dynamic loss scaling for half-precision backward passes."""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INITIAL_FP16_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 200


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The decoder dtype for an `lpl_dtype` value: 'auto' is bfloat16 on CUDA GPUs that support it, else float32."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class LossScale:
    """Dynamic loss scale kept on the device (no host sync): halves on overflow, doubles after clean runs.

    Only float16 needs it: bfloat16 and float32 share float32's exponent range, so their scale stays 1.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, initial: float | None = None):
        if initial is None:
            initial = INITIAL_FP16_SCALE if dtype == torch.float16 else 1.0
        self.active = dtype == torch.float16
        self.value = torch.tensor(initial, dtype=torch.float32, device=device)
        self._clean = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, overflowed: Tensor) -> None:
        """Record whether the last scaled backward overflowed, adjusting the scale on the device."""
        if not self.active:
            return
        self._clean = torch.where(overflowed, torch.zeros_like(self._clean), self._clean + 1)
        grow = self._clean >= GROWTH_INTERVAL
        self.value = torch.where(overflowed, self.value / 2, torch.where(grow, self.value * 2, self.value))
        self._clean = torch.where(grow, torch.zeros_like(self._clean), self._clean)
