"""The default mode's numbers against an independent float64 implementation written from the paper's definitions.

Features come from diffusers' own decoder modules (the real decode path: post_quant_conv, conv_in, mid block, up
blocks), outlier masks from `kthvalue` quantiles and max-pooling morphology, normalizers and per-channel statistics
written out plainly: nothing here calls the engine's layer math.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lpl_plugin import LatentPerceptualLoss, LPLConfig
from lpl_plugin.engine.outliers import outlier_mask

from .test_loss import latents

SCALING = 0.13025


def diffusers_features(vae64, z: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """Mid-block and up-block outputs of diffusers' decoder (float64) for trainer-scaled latents."""
    x = vae64.decoder.conv_in(vae64.post_quant_conv(z.double() / SCALING))
    features = [x := vae64.decoder.mid_block(x)]
    for block in vae64.decoder.up_blocks[:blocks]:
        features.append(x := block(x))
    return features


def paper_mask(y: torch.Tensor, down_factor: int) -> torch.Tensor:
    """Keep values inside each channel's 2 % / 98 % quantiles widened by 2 std, then close and open the band."""
    opening, closing = math.ceil(5 / down_factor), math.ceil(3 / down_factor)
    opening, closing = (3 if opening == 2 else opening), (1 if closing == 2 else closing)
    flat = y.flatten(-2, -1)
    count = flat.shape[-1]
    low = flat.kthvalue(max(1, int(count * 0.02)), dim=-1).values[..., None, None]
    high = flat.kthvalue(min(count, max(1, int(count * 0.98))), dim=-1).values[..., None, None]
    margin = 2 * flat.std(-1)[..., None, None]
    band = ((low - margin < y) & (y < high + margin)).double()
    band = F.max_pool2d(band, closing, stride=1, padding=(closing - 1) // 2)
    return (-F.max_pool2d(-band, opening, stride=1, padding=(opening - 1) // 2)).bool()


def paper_distances(xs, ys, norm: str, loss: str, pow_law: bool, outliers: bool) -> torch.Tensor:
    """(B, L) distances: both maps masked, normalized, compared, averaged over kept pixels and channels, weighted."""
    factors = [2 ** (len(xs) - 2 - i) if i < len(xs) - 1 else 1 for i in range(len(xs))]  # tiny VAE: 8, 4, 2, 1, 1
    rows = []
    for x, y, factor in zip(xs, ys, factors):
        mask = paper_mask(y, factor) if outliers and factor <= 2 else torch.ones_like(y, dtype=torch.bool)
        x, y = x * mask, y * mask
        if norm == "default":
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        elif norm == "shared":
            scale = y.pow(2).sum(1, keepdim=True).sqrt() + 1e-6
            x, y = x / scale, y / scale
        else:  # batch: each channel's unbiased std over the target batch and space, masked values left out
            stds = []
            for c in range(y.shape[1]):
                kept = y[:, c][mask[:, c]]
                stds.append(kept.std() if kept.numel() > 1 else torch.tensor(0.0, dtype=y.dtype))
            scale = torch.stack(stds).reshape(1, -1, 1, 1) + 1e-6
            x, y = x / scale, y / scale
        term = (x - y).pow(2) if loss == "mse" else (x - y).abs()
        per_channel = (term * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp_min(1)
        weight = factor / factors[0] if pow_law else 1.0
        rows.append(per_channel.mean(dim=1) * weight)
    return torch.stack(rows, dim=1)


@pytest.fixture(scope="module")
def vae64(vae):
    """The tiny test VAE in float64."""
    return copy.deepcopy(vae).double()


OPTIONS = list(itertools.product(["default", "shared", "batch"], ["mse", "l1"], [True, False], [True, False]))


@pytest.mark.parametrize("norm, loss, pow_law, outliers", OPTIONS)
@pytest.mark.parametrize("grad_mode", ["lean", "autograd"])
def test_distances_match_the_papers_definitions(vae, vae64, norm, loss, pow_law, outliers, grad_mode):
    config = LPLConfig(use_lpl=True, lpl_norm_type=norm, lpl_loss_type=loss, lpl_pow_law=pow_law,
                       lpl_remove_outliers=outliers, lpl_grad_mode=grad_mode, lpl_chunk_size=1)
    pred, target = latents(batch=3, size=8)
    with torch.no_grad():
        want = paper_distances(diffusers_features(vae64, pred, 4), diffusers_features(vae64, target, 4),
                               norm, loss, pow_law, outliers)
    got = LatentPerceptualLoss(vae, config, scaling_factor=SCALING)(pred.requires_grad_(True), target,
                                                                    with_layers=True)
    torch.testing.assert_close(got.layers.double(), want, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(got.per_sample.detach().double(), want.mean(dim=1), rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("norm", ["default", "shared", "batch"])
def test_gradient_matches_the_papers_definitions(vae, vae64, norm):
    pred, target = latents(batch=2, size=8)
    leaf64 = pred.double().requires_grad_(True)
    with torch.no_grad():
        targets = diffusers_features(vae64, target, 4)
    paper_distances(diffusers_features(vae64, leaf64, 4), targets, norm, "mse", True, True).mean(dim=1).sum().backward()
    engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_norm_type=norm), scaling_factor=SCALING)
    leaf = pred.clone().requires_grad_(True)
    engine(leaf, target).per_sample.sum().backward()
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-3, atol=1e-6 * leaf64.grad.abs().max().item())


@pytest.mark.parametrize("shape, factor", [((2, 5, 16, 12), 1), ((1, 3, 9, 7), 2), ((1, 4, 5, 6), 1),
                                           ((2, 2, 1, 8), 1)])
def test_outlier_mask_equals_quantiles_and_max_pool_morphology(shape, factor):
    g = torch.Generator().manual_seed(sum(shape))
    y = torch.randn(shape, generator=g) * torch.rand(shape[1], 1, 1, generator=g) * 4
    y[..., 0, 0] = 50.0  # a clear outlier in every channel
    want = paper_mask(y.double(), factor)
    got = outlier_mask(y, factor)
    assert got.dtype == torch.bool and torch.equal(got, want)


def test_outlier_regions_are_masked_and_isolated_pixels_closed_over():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, 3, 64, 64, generator=g)
    y[..., 10:15, 10:15] = 50.0  # an outlier region: dropped, its surroundings eroded with it
    y[..., 40, 40] = 50.0  # an isolated outlier pixel: the closing fills it back in, as in the paper
    mask = outlier_mask(y, 1)
    assert torch.equal(mask, paper_mask(y.double(), 1))
    assert not mask[..., 9:16, 9:16].any() and mask[..., 8, 8:17].all()  # the region, widened by the erosion
    assert mask[..., 40, 40].all() and mask[..., 30:35, 50:60].all()
