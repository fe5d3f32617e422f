"""Tensor helpers shared by the layer math and the decoder trunk: precision widening and channel slicing."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Full-resolution maps are processed in channel slices of about this many elements, so that float32 scratch (loss
# math, GroupNorm backward) stays a small fraction of one map: 16 MiB of float32 per slice.
SLICE_ELEMENTS = 2 ** 22
# Boolean maps are counted in parts of about this many elements (a boolean sum converts its whole input first).
COUNT_ELEMENTS = 2 ** 18


def widen(x: Tensor) -> Tensor:
    """At least float32: half-precision features are compared in float32, float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def channel_slices(shape: torch.Size | tuple[int, ...], multiple: int = 1,
                   elements: int | None = None) -> list[slice]:
    """Slices over dim 1 of a (B, C, H, W) map holding about `elements` (SLICE_ELEMENTS) each, whole multiples."""
    channels = shape[1]
    per_channel = max(1, math.prod(shape) // max(1, channels))
    step = max(1, (elements or SLICE_ELEMENTS) // per_channel // multiple) * multiple
    return [slice(start, min(channels, start + step)) for start in range(0, channels, step)]


def kept_counts(mask: Tensor) -> Tensor:
    """True values per sample and channel (B, C) of a boolean (B, C, H, W) map, as float32, a few channels at a
    time."""
    parts = channel_slices(mask.shape, elements=COUNT_ELEMENTS)
    return torch.cat([mask[:, part].sum(dim=(2, 3), dtype=torch.float32) for part in parts], dim=1)
