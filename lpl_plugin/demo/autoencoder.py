"""The demo's VAE: the tiny SDXL-layout AutoencoderKL, briefly fitted to the generated images so decodes resemble them."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpl_plugin.engine.tiny import SDXL_SCALING_FACTOR, tiny_vae
from lpl_plugin.demo.data import generator

# SDXL's latents have a std of about 1 / 0.13025 before scaling; the demo's VAE is rescaled to match, so that the
# trainer-scaled latents have unit scale, as they do for SDXL.
LATENT_STD = 1.0 / SDXL_SCALING_FACTOR
FIT_BATCH = 8
FIT_LR = 5e-3
# One normalization group per layer: at these tiny widths, SDXL's 32 groups would leave one channel per group and the
# VAE could barely carry an image's mean color; with one group a short fit reconstructs far better.
GROUPS = 1


def build_vae(seed: int) -> nn.Module:
    """A fresh tiny VAE with SDXL's block layout (random weights, one norm group), quietly built."""
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a harmless notice about modules kept in float32
    try:
        return tiny_vae(groups=GROUPS, seed=seed)
    finally:
        quiet.setLevel(level)


def fit_vae(vae: nn.Module, images: Tensor, steps: int, seed: int) -> list[float]:
    """Fit encoder and decoder to reconstruct the images (MSE) for a few Adam steps; returns the losses."""
    if steps <= 0:
        return []
    vae.train().requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=FIT_LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=FIT_LR, total_steps=steps, pct_start=0.15)
    losses = []
    for step in range(steps):
        rows = torch.randint(0, images.shape[0], (min(FIT_BATCH, images.shape[0]),), generator=generator(seed, 5, step))
        batch = images[rows]
        latents = vae.encode(batch).latent_dist.mean
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def solve_output_layer(vae: nn.Module, images: Tensor, seed: int, max_rows: int = 1 << 18) -> float:
    """Set the decoder's last conv to the least-squares best map from its inputs to the images; returns the MSE.

    A closed-form finish for the short fit (about a second): the features before `conv_out` carry more color than
    the partly trained last layer shows.
    """
    inputs: list[Tensor] = []
    conv = vae.decoder.conv_out
    handle = conv.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    try:
        decode(vae, encode(vae, images))
    finally:
        handle.remove()
    features = torch.cat(inputs).float()
    columns = F.unfold(features, conv.kernel_size, padding=conv.padding).transpose(1, 2).flatten(0, 1)
    targets = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1]).float()
    if columns.shape[0] > max_rows:
        rows = torch.randperm(columns.shape[0], generator=generator(seed, 8))[:max_rows]
        columns, targets = columns[rows], targets[rows]
    design = torch.cat([columns, torch.ones(columns.shape[0], 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, targets.double()).solution.float()
    conv.weight.copy_(solution[:-1].T.reshape(conv.weight.shape))
    conv.bias.copy_(solution[-1])
    return float(F.mse_loss(decode(vae, encode(vae, images)) * 2 - 1, images))


@torch.no_grad()
def rescale_latents(vae: nn.Module, images: Tensor) -> float:
    """Scale the latent space so the images' latents have SDXL's std; decode(encode(x)) is unchanged.

    `quant_conv` gets the factor k on its mean outputs (and log k^2 on the log-variances), `post_quant_conv`
    1 / k on its inputs. Returns k.
    """
    current = float(encode(vae, images).std()) / SDXL_SCALING_FACTOR
    k = LATENT_STD / current
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= k
    vae.quant_conv.bias[:channels] *= k
    vae.quant_conv.bias[channels:] += 2 * math.log(k)
    vae.post_quant_conv.weight *= 1 / k
    return k


@torch.no_grad()
def encode(vae: nn.Module, images: Tensor, batch: int = 16) -> Tensor:
    """Trainer-scaled latents (the posterior mean times 0.13025), as sd-scripts caches them."""
    device = next(vae.parameters()).device
    parts = [vae.encode(images[i:i + batch].to(device)).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(parts).float().cpu() * SDXL_SCALING_FACTOR


@torch.no_grad()
def decode(vae: nn.Module, latents: Tensor, batch: int = 16) -> Tensor:
    """Images in [0, 1] from trainer-scaled latents."""
    device = next(vae.parameters()).device
    parts = [vae.decode(latents[i:i + batch].to(device) / SDXL_SCALING_FACTOR).sample
             for i in range(0, len(latents), batch)]
    return ((torch.cat(parts).float().cpu() + 1) / 2).clamp(0, 1)


def save_vae(vae: nn.Module, folder: Path) -> None:
    """Write the VAE as a diffusers folder (config.json + safetensors), loadable by `lpl-plugin inspect --vae`."""
    vae.save_pretrained(folder, safe_serialization=True)


def load_vae(folder: Path) -> nn.Module:
    """Read a VAE written by save_vae (safetensors only, no network)."""
    from lpl_plugin.settings.vae_io import load_vae as load_local_vae

    return load_local_vae(folder).requires_grad_(False)


def latent_std(latents: Tensor) -> float:
    """Std of trainer-scaled latents (about 1 for SDXL), for the summary."""
    value = float(latents.float().std())
    return value if math.isfinite(value) else float("nan")
