"""Latent Perceptual Loss (Berrada et al., ICLR 2025) for the SDXL trainers people already run."""

from pathlib import Path as _Path

# In a source checkout `patches/` and `configs/` sit beside this package; setup.cfg's package_dir installs them
# as `lpl_plugin.patches` and `lpl_plugin.configs`. Mirror that mapping so both import the same way from source.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "patches").is_dir() and (_checkout / "setup.cfg").is_file():
    __path__.append(str(_checkout))  # type: ignore[name-defined]  # noqa: F821

from .config import ConfigError, LPLConfig, Problem
from .diffusion import min_snr_weight, predict_z0, snr
from .errors import UserError
from .guard import NonFiniteLPLError
from .gui import launch_command
from .hook import LPLHook
from .loss import LatentPerceptualLoss
from .plugins import HostContext, load_plugin_hooks
from .preflight import Preflight, check_training_config, check_training_mapping
from .registry import ENTRY_POINT_GROUP, HookRegistry, HookResult, LossContext, registry
from .schema import add_arguments, json_schema, options, validate
from .toml_io import load_config, render_toml
from .vae_io import load_vae

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ENTRY_POINT_GROUP", "HookRegistry", "HookResult", "HostContext", "LPLConfig", "LPLHook",
    "LatentPerceptualLoss", "LossContext", "NonFiniteLPLError", "Preflight", "Problem", "UserError",
    "add_arguments", "check_training_config", "check_training_mapping", "json_schema", "launch_command",
    "load_config", "load_plugin_hooks", "load_vae", "min_snr_weight", "options", "predict_z0", "registry",
    "render_toml", "snr", "validate",
]
