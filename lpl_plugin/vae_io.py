"""Loading a VAE from a local path: diffusers folders with safetensors weights only, never pickle."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError

SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFE_VARIANTS = (None, "fp16")
# Files that hold pickled weights, which can run code while they are read.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def _weights_name(variant: str | None) -> str:
    """The safetensors weights file of a variant (`diffusion_pytorch_model.fp16.safetensors`)."""
    return SAFE_WEIGHTS if variant is None else SAFE_WEIGHTS.replace(".safetensors", f".{variant}.safetensors")


def vae_folder(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """The diffusers folder holding the VAE (the path itself or its `vae/`) and the safetensors variant to load.

    Raises UserError, in one line, for a missing path, a single weights file, or a folder without safetensors.
    """
    root = Path(path)
    if root.is_file():
        if root.suffix.lower() in PICKLE_SUFFIXES:
            raise UserError(f"{root}: refusing to load pickle weights ({root.suffix}), which can run code when "
                            "read; convert them to safetensors or pass a diffusers folder with " + SAFE_WEIGHTS)
        raise UserError(f"{root}: a single weights file; pass a diffusers VAE folder (config.json and "
                        f"{SAFE_WEIGHTS})")
    if not root.is_dir():
        raise UserError(f"{root}: VAE folder not found; pass a local diffusers folder (config.json and "
                        f"{SAFE_WEIGHTS})")
    for folder in (root, root / "vae"):
        if not (folder / "config.json").is_file():
            continue
        for variant in SAFE_VARIANTS:
            name = _weights_name(variant)
            if (folder / name).is_file() or (folder / f"{name}.index.json").is_file():
                return folder, variant
        raise UserError(f"{folder}: no {SAFE_WEIGHTS} beside config.json; only safetensors weights are loaded "
                        "(pickle .bin files can run code when read), so convert the weights to safetensors")
    raise UserError(f"{root}: not a diffusers VAE folder (no config.json in it or in its vae/ folder)")


def load_vae(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None):
    """An AutoencoderKL from a local diffusers folder, read through safetensors only (no pickle, no network)."""
    from diffusers import AutoencoderKL

    folder, variant = vae_folder(path)
    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True, variant=variant,
                                            torch_dtype=dtype)
    except Exception as error:  # a corrupt or mismatched folder is the user's to fix: one line, not a traceback
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{folder}: could not load the VAE ({type(error).__name__}: {reason[:200]})") from error
    if device is not None:
        vae = vae.to(device)
    return vae.eval()
