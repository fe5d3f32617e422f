"""Latent Perceptual Loss (Berrada et al., ICLR 2025) for the SDXL trainers people already run."""

from .config import ConfigError, LPLConfig, Problem
from .diffusion import min_snr_weight, predict_z0, snr
from .errors import UserError
from .hook import LPLHook
from .loss import LatentPerceptualLoss
from .registry import ENTRY_POINT_GROUP, HookRegistry, HookResult, LossContext, registry
from .schema import add_arguments, json_schema, options, validate
from .toml_io import load_config, render_toml

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ENTRY_POINT_GROUP", "HookRegistry", "HookResult", "LPLConfig", "LPLHook", "LatentPerceptualLoss",
    "LossContext", "Problem", "UserError", "add_arguments", "json_schema", "load_config", "min_snr_weight",
    "options", "predict_z0", "registry", "render_toml", "snr", "validate",
]
