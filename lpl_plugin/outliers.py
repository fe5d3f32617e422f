"""Outlier masks for target decoder features (Berrada et al., 2025, Sec. 3): quantile band plus morphology."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .norms import widen

QUANTILE = 0.02
OPENING = 5
CLOSING = 3


def _kernel_sizes(down_factor: int) -> tuple[int, int]:
    """Morphology kernel sizes for a map `down_factor` times below the decoder output (the paper's 5 and 3)."""
    opening = math.ceil(OPENING / down_factor)
    closing = math.ceil(CLOSING / down_factor)
    return (3 if opening == 2 else opening), (1 if closing == 2 else closing)


def _max_filter(x: Tensor, size: int) -> Tensor:
    """Same-size sliding maximum with an odd window."""
    if size <= 1:
        return x
    return F.max_pool2d(x, kernel_size=size, stride=1, padding=(size - 1) // 2)


@torch.no_grad()
def outlier_mask(target: Tensor, down_factor: int, *, exact_reference: bool = False) -> Tensor:
    """Boolean mask (B, C, H, W) keeping target values inside the per-channel 2 % quantiles widened by 2 std.

    The band is dilated with a max filter and then eroded (the paper's morphological cleanup). With
    `exact_reference` the reference's arithmetic is kept, including its failure on maps with fewer than 50
    pixels; otherwise the quantile ranks are clamped to valid values.
    """
    opening, closing = _kernel_sizes(down_factor)
    values = widen(target)
    flat = values.flatten(-2, -1)
    count = flat.shape[-1]
    low_rank, high_rank = int(count * QUANTILE), int(count * (1 - QUANTILE))
    if not exact_reference:
        low_rank, high_rank = max(1, low_rank), min(count, max(1, high_rank))
    low = flat.kthvalue(low_rank, dim=-1).values[..., None, None]
    high = flat.kthvalue(high_rank, dim=-1).values[..., None, None]
    margin = 2 * flat.std(-1)[..., None, None]
    band = ((low - margin < values) & (values < high + margin)).float()
    band = _max_filter(band, closing)
    return (-_max_filter(-band, opening)).bool()
