"""Shared fixtures: tiny real diffusers models built in code and the reference parity fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lpl_plugin.engine.tiny import tiny_unet, tiny_vae

GOLDEN = Path(__file__).parent / "golden" / "lpl_reference"

# LPL_TEST_THREADS overrides the thread count (parity under other thread counts; see golden/lpl_reference_extra).
torch.set_num_threads(int(os.environ.get("LPL_TEST_THREADS", "0")) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def vae():
    """A tiny AutoencoderKL with SDXL's layout; tests must not change it (copy it if they need to)."""
    return tiny_vae()


@pytest.fixture(scope="session")
def golden_vae():
    """The tiny VAE the parity fixtures were computed with."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(GOLDEN / "tiny_vae").eval()


@pytest.fixture()
def unet():
    """A fresh tiny SDXL-shaped UNet."""
    return tiny_unet()


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    """Write a TOML file under tmp_path and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path
