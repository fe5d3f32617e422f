"""Pixel-space scores of decoded images against the real ones: PSNR and a gaussian-window SSIM, in torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def psnr(real: Tensor, fake: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image of (N, C, H, W) images in [0, 1]."""
    error = (real.float() - fake.float().clamp(0, 1)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / error.clamp_min(1e-10))


def gaussian_window(size: int, sigma: float) -> Tensor:
    """A normalized 2-D gaussian kernel of shape (1, 1, size, size)."""
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    line = torch.exp(-offsets.pow(2) / (2 * sigma ** 2))
    line = line / line.sum()
    return (line[:, None] * line[None, :])[None, None]


def ssim(real: Tensor, fake: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image of (N, C, H, W) images in [0, 1], gaussian-weighted local statistics, averaged
    over channels and valid positions; images smaller than the window use a window as large as they are."""
    x, y = real.float(), fake.float().clamp(0, 1)
    size = min(window, x.shape[-1], x.shape[-2])
    kernel = gaussian_window(size, sigma * size / window).to(x.device)
    channels = x.shape[1]
    kernel = kernel.expand(channels, 1, size, size)

    def local(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = local(x), local(y)
    var_x = local(x * x) - mu_x ** 2
    var_y = local(y * y) - mu_y ** 2
    cov = local(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (numerator / denominator).flatten(1).mean(dim=1)


def score_images(real: Tensor, fake: Tensor) -> dict[str, list[float]]:
    """PSNR and SSIM of each image pair, as lists."""
    return {"psnr": psnr(real, fake).tolist(), "ssim": ssim(real, fake).tolist()}
