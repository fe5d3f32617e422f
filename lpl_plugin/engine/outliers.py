"""Outlier masks for target decoder features (Berrada et al., 2025, Sec. 3): quantile band plus morphology.

A value is kept when it lies inside its channel's 2 % and 98 % quantiles widened by twice the channel's std; the
band is then dilated and eroded (the paper's morphological cleanup) with square windows whose size shrinks on
lower-resolution maps. The quantiles are exact order statistics (`topk`, which equals `kthvalue` and is cheaper),
and the morphology works on the boolean mask with shifted logical operations, which equal max-pooling with
`-inf` padding on the 0/1 map.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from lpl_plugin.engine.tensors import widen

QUANTILE = 0.02
OPENING = 5
CLOSING = 3


def masked_layers(remove_outliers: bool, compat: bool, downsample_factors: Sequence[int]) -> list[int | None]:
    """Downsampling factor used for each masked layer (None: not masked).

    Compat: the reference's fixed indices (2 -> 2; 3 and 4 -> 1). Default: every map at most 2x below the
    decoder output, its factor read from the decoder's layout (the same three maps for SDXL).
    """
    if not remove_outliers:
        return [None] * len(downsample_factors)
    if compat:
        fixed = {2: 2, 3: 1, 4: 1}
        return [fixed.get(i) for i in range(len(downsample_factors))]
    return [f if f <= 2 else None for f in downsample_factors]


def kernel_sizes(down_factor: int) -> tuple[int, int]:
    """Morphology window sizes (opening, closing) for a map `down_factor` times below the decoder output."""
    opening = math.ceil(OPENING / down_factor)
    closing = math.ceil(CLOSING / down_factor)
    return (3 if opening == 2 else opening), (1 if closing == 2 else closing)


def _window(mask: Tensor, size: int, combine: Callable[..., Tensor]) -> Tensor:
    """Combine each pixel with its in-bounds neighbours within a square window of odd `size` (separably)."""
    radius = size // 2
    for dim in (2, 3):
        length = mask.shape[dim]
        out = mask.clone()
        for shift in range(1, min(radius, length - 1) + 1):
            head, tail = out.narrow(dim, shift, length - shift), out.narrow(dim, 0, length - shift)
            combine(head, mask.narrow(dim, 0, length - shift), out=head)
            combine(tail, mask.narrow(dim, shift, length - shift), out=tail)
        mask = out
    return mask


def quantile_ranks(count: int) -> tuple[int, int]:
    """1-based ranks of the low and high quantiles among `count` values, clamped to valid ranks.

    The reference takes int(count * 0.02), which is 0 (an error) on maps of fewer than 50 pixels.
    """
    low, high = int(count * QUANTILE), int(count * (1 - QUANTILE))
    return max(1, low), min(count, max(1, high))


@torch.no_grad()
def outlier_mask(target: Tensor, down_factor: int) -> Tensor:
    """Boolean mask (B, C, H, W) keeping target values inside the per-channel 2 % quantiles widened by 2 std."""
    opening, closing = kernel_sizes(down_factor)
    values = widen(target)
    flat = values.flatten(-2, -1)
    count = flat.shape[-1]
    low_rank, high_rank = quantile_ranks(count)
    low = flat.topk(low_rank, dim=-1, largest=False, sorted=False).values.amax(dim=-1)
    high = flat.topk(count - high_rank + 1, dim=-1, largest=True, sorted=False).values.amin(dim=-1)
    margin = 2 * flat.std(-1)
    band = ((low - margin)[..., None, None] < values) & (values < (high + margin)[..., None, None])
    band = _window(band, closing, torch.logical_or)
    return _window(band, opening, torch.logical_and)
