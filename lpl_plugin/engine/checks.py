"""Checks of the engine's public arguments: one error naming the argument, what it needs and what it got.

LatentPerceptualLoss and LPLHook call these first, so a wrong VAE, config or latent tensor ends in the package's
own ArgumentError / ArgumentTypeError / VaeMismatch (all UserErrors; also ValueError / TypeError) instead of a torch
error from deep inside the decoder.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import ArgumentError, ArgumentTypeError, VaeMismatch
from lpl_plugin.settings.messages import show_value, type_name


def check_config(config: Any, owner: str) -> LPLConfig:
    """`config` if it is an LPLConfig; a dict gets the hint to build one with LPLConfig.from_mapping."""
    if isinstance(config, LPLConfig):
        return config
    if isinstance(config, Mapping):
        raise ArgumentTypeError(f"{owner}: `config` must be an LPLConfig, got a {type(config).__name__}; build one "
                                "with LPLConfig.from_mapping(your_dict) (it checks every key)")
    raise ArgumentTypeError(f"{owner}: `config` must be an LPLConfig, got {_kind(config)}")


def _kind(value: Any) -> str:
    """A short description of a received value for messages: None, or its type (and value when short)."""
    if value is None:
        return "None"
    return f"{show_value(value, 40)} ({type_name(value)})" if isinstance(value, (str, int, float)) else \
        f"a {type(value).__name__}"


def check_vae(vae: Any, owner: str) -> int:
    """Check that `vae` is an AutoencoderKL-like module with parameters; returns its latent channels."""
    if not isinstance(vae, nn.Module):
        raise ArgumentTypeError(f"{owner}: `vae` must be a diffusers AutoencoderKL (such as the SDXL VAE), got "
                                f"{_kind(vae)}")
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, nn.Module) or not hasattr(decoder, "mid_block") or not hasattr(decoder, "up_blocks"):
        raise VaeMismatch(f"{owner}: `vae` must be a diffusers AutoencoderKL with decoder.mid_block and "
                          f"decoder.up_blocks, got a {type(vae).__name__} without them")
    if next(iter(decoder.parameters()), None) is None:
        raise VaeMismatch(f"{owner}: `vae` ({type(vae).__name__}) has no decoder parameters; pass a VAE with its "
                          "weights (an empty or stripped module cannot decode)")
    channels = latent_channels(vae)
    if channels is None:
        raise VaeMismatch(f"{owner}: cannot tell the latent channels of `vae` ({type(vae).__name__}): it has no "
                          "config.latent_channels and no decoder.conv_in")
    return channels


def latent_channels(vae: nn.Module) -> int | None:
    """Channels of the latents a VAE decodes: its config's latent_channels, else its first layer's input."""
    value = getattr(getattr(vae, "config", None), "latent_channels", None)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    for layer in (getattr(vae, "post_quant_conv", None), getattr(getattr(vae, "decoder", None), "conv_in", None)):
        channels = getattr(layer, "in_channels", None)
        if isinstance(channels, int) and channels > 0:
            return channels
    return None


def _check_tensor(name: str, value: Any, channels: int, owner: str) -> Tensor:
    """One latent tensor: a non-empty floating-point (B, C, H, W) tensor with C == the VAE's latent channels."""
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(f"{owner}: `{name}` must be a torch.Tensor of latents (B, {channels}, H, W), got "
                                f"{_kind(value)}")
    if not value.is_floating_point():
        raise ArgumentTypeError(f"{owner}: `{name}` must be a floating-point tensor (float32, bfloat16 or "
                                f"float16), got {value.dtype}")
    if value.dim() != 4:
        raise ArgumentError(f"{owner}: `{name}` must be 4-D latents (batch, {channels}, height, width), got shape "
                            f"{tuple(value.shape)}")
    if value.numel() == 0:
        raise ArgumentError(f"{owner}: `{name}` is empty (shape {tuple(value.shape)}); LPL needs at least one "
                            "sample of at least 1x1 latents")
    if value.shape[1] != channels:
        raise ArgumentError(f"{owner}: `{name}` has {value.shape[1]} channels, but the VAE's latents have "
                            f"{channels} (shape {tuple(value.shape)}; expected (batch, {channels}, height, width))")
    return value


def check_latents(pred: Any, target: Any, channels: int, owner: str) -> None:
    """Prediction and target latents: each a valid latent tensor, with the same shape and on the same device."""
    _check_tensor("pred_latents", pred, channels, owner)
    _check_tensor("target_latents", target, channels, owner)
    if pred.shape != target.shape:
        raise ArgumentError(f"{owner}: `pred_latents` and `target_latents` must have the same shape, got "
                            f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.device != target.device:
        raise ArgumentError(f"{owner}: `pred_latents` and `target_latents` must be on the same device, got "
                            f"{pred.device} and {target.device}")


def check_device(device: Any, owner: str) -> None:
    """A device argument: None, a torch.device, or text torch understands ('cpu', 'cuda:0')."""
    if device is None or isinstance(device, torch.device):
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(f"{owner}: `device` must be a torch.device or text like \"cpu\" or \"cuda:0\", got "
                            f"{_kind(device)}") from None
