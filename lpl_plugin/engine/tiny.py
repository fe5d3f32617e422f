"""Tiny SDXL-shaped diffusers models built in code (no downloads) for the demo, tests and benchmarks."""

from __future__ import annotations

from typing import Sequence

import torch

from lpl_plugin.settings.errors import UserError
from lpl_plugin.settings.messages import show_path, shown
from lpl_plugin.settings.vae_io import vae_config

SDXL_SCALING_FACTOR = 0.13025
SDXL_VAE_CHANNELS = (128, 256, 512, 512)
# Pooled text embedding width plus six time ids of `addition_time_embed_dim` each, as SDXL's `text_time` uses.
TINY_TEXT_DIM = 32
TINY_POOLED_DIM = 32
TINY_TIME_EMBED_DIM = 8


def tiny_vae(channels: Sequence[int] = (8, 16, 32, 32), *, layers_per_block: int = 2, groups: int = 8,
             seed: int = 0, dtype: torch.dtype = torch.float32, **options: object):
    """An AutoencoderKL with SDXL's block layout (4 blocks, post_quant_conv, factor 0.13025) and small widths.

    Extra keyword options go to AutoencoderKL unchanged (e.g. `use_post_quant_conv=False`).
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=layers_per_block, norm_num_groups=groups, sample_size=64,
        scaling_factor=SDXL_SCALING_FACTOR, **options,
    )
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()  # AutoencoderKL.to(dtype) warns


def sdxl_vae(seed: int = 0):
    """An AutoencoderKL with SDXL's full architecture and random weights (for benchmarks; about 84 M parameters)."""
    return tiny_vae(SDXL_VAE_CHANNELS, layers_per_block=2, groups=32, seed=seed)


def tiny_unet(seed: int = 0, *, channels: Sequence[int] = (32, 64, 64), sample_size: int = 16):
    """A UNet2DConditionModel with SDXL's `text_time` conditioning, block types and small widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=TINY_TEXT_DIM, attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=1, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_POOLED_DIM + 6 * TINY_TIME_EMBED_DIM,
    )


def sdxl_conditioning(batch: int, resolution: int, *, seed: int = 0, tokens: int = 8):
    """Random text states plus SDXL's added conditions (pooled text and the six size/crop time ids)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, tokens, TINY_TEXT_DIM, generator=generator)
    pooled = torch.randn(batch, TINY_POOLED_DIM, generator=generator)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    return text, {"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1)}


def random_vae(spec: str):
    """A VAE with random weights by name (`tiny`, `sdxl`) or from a diffusers VAE folder or its config.json."""
    if spec == "tiny":
        return tiny_vae()
    if spec == "sdxl":
        return sdxl_vae()
    config, data = vae_config(spec)
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_config(data).eval()
    except Exception as error:  # wrong types or sizes in the config: the user's to fix, in one line
        raise UserError(f"--vae: {show_path(config)} is not a usable AutoencoderKL config ({type(error).__name__}: "
                        f"{shown(str(error).strip().splitlines()[0] if str(error).strip() else '', 120)})") from None
