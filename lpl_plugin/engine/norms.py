"""Feature normalizations: per-pixel channel norms and batch-wide channel statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from lpl_plugin.engine.tensors import kept_counts

# Epsilons of the reference's two normalizations, kept in every mode.
OWN_NORM_EPS = 1e-10
SHARED_NORM_EPS = 1e-6


def channel_norm(x: Tensor) -> Tensor:
    """L2 norm over channels at every pixel, computed as the reference does (sqrt of the sum of squares)."""
    return torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True))


def moment_sums(y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel pixel count, sum and sum of squares over batch and space (float64), masked pixels excluded."""
    y = y.double()
    dims = (0, 2, 3)
    if mask is None:
        count = torch.full((y.shape[1],), y.numel() / max(1, y.shape[1]), dtype=torch.float64, device=y.device)
        return count, y.sum(dim=dims), (y * y).sum(dim=dims)
    y = torch.where(mask, y, 0.0)
    return kept_counts(mask).double().sum(dim=0), y.sum(dim=dims), (y * y).sum(dim=dims)


def channel_std(sums: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-channel std (1, C, 1, 1) from moment sums, plus the shared-normalization epsilon."""
    count, total, squares = sums
    count = count.clamp_min(2)
    var = ((squares - total * total / count) / (count - 1)).clamp_min(0)
    return var.sqrt().to(dtype).reshape(1, -1, 1, 1) + SHARED_NORM_EPS
