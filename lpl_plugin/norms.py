"""Feature normalizations: per-pixel channel norms and batch-wide channel statistics."""

from __future__ import annotations

import torch
from torch import Tensor

# Epsilons of the reference's two normalizations, kept in every mode.
OWN_NORM_EPS = 1e-10
SHARED_NORM_EPS = 1e-6


def widen(x: Tensor) -> Tensor:
    """At least float32: half-precision features are compared in float32, float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def channel_norm(x: Tensor) -> Tensor:
    """L2 norm over channels at every pixel."""
    return x.pow(2).sum(dim=1, keepdim=True).sqrt()


def moment_sums(y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel pixel count, sum and sum of squares over batch and space (float64), masked pixels excluded."""
    weight = (mask if mask is not None else torch.ones_like(y, dtype=torch.bool)).double()
    y = y.double()
    dims = (0, 2, 3)
    return weight.sum(dim=dims), (weight * y).sum(dim=dims), (weight * y * y).sum(dim=dims)


def channel_std(sums: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-channel std (1, C, 1, 1) from moment sums, plus the shared-normalization epsilon."""
    count, total, squares = sums
    count = count.clamp_min(2)
    var = ((squares - total * total / count) / (count - 1)).clamp_min(0)
    return var.sqrt().to(dtype).reshape(1, -1, 1, 1) + SHARED_NORM_EPS
