"""Latent Perceptual Loss (Berrada et al., ICLR 2025) for the SDXL trainers people already run."""

import importlib as _importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below, for type checkers; at run time they are imported on first use (PEP 562)
    from lpl_plugin.engine.guard import NonFiniteLPLError
    from lpl_plugin.engine.perceptual_loss import LatentPerceptualLoss
    from lpl_plugin.patches.gui import launch_command
    from lpl_plugin.settings.config import LPLConfig
    from lpl_plugin.settings.errors import UserError
    from lpl_plugin.settings.preflight import Preflight, check_training_config, check_training_mapping
    from lpl_plugin.settings.problems import ConfigError, Problem
    from lpl_plugin.settings.schema import add_arguments, json_schema, options, validate
    from lpl_plugin.settings.toml_io import load_config, render_toml
    from lpl_plugin.settings.vae_io import load_vae
    from lpl_plugin.training.diffusion import min_snr_weight, predict_z0, snr
    from lpl_plugin.training.hook import LPLHook
    from lpl_plugin.training.plugins import HostContext, load_plugin_hooks
    from lpl_plugin.training.registry import ENTRY_POINT_GROUP, HookRegistry, HookResult, LossContext, registry

# Where each public name lives. Importing the package stays light (no torch), so config checks, `lpl-plugin
# validate` and the launcher's preflight start fast; the engine's names import torch when first used.
_EXPORTS = {
    "ConfigError": "settings.problems", "LPLConfig": "settings.config", "Problem": "settings.problems",
    "UserError": "settings.errors", "Preflight": "settings.preflight",
    "check_training_config": "settings.preflight", "check_training_mapping": "settings.preflight",
    "add_arguments": "settings.schema", "json_schema": "settings.schema", "options": "settings.schema",
    "validate": "settings.schema", "load_config": "settings.toml_io", "render_toml": "settings.toml_io",
    "load_vae": "settings.vae_io",
    "LatentPerceptualLoss": "engine.perceptual_loss", "NonFiniteLPLError": "engine.guard",
    "min_snr_weight": "training.diffusion", "predict_z0": "training.diffusion", "snr": "training.diffusion",
    "LPLHook": "training.hook", "HostContext": "training.plugins", "load_plugin_hooks": "training.plugins",
    "ENTRY_POINT_GROUP": "training.registry", "HookRegistry": "training.registry",
    "HookResult": "training.registry", "LossContext": "training.registry", "registry": "training.registry",
    "launch_command": "patches.gui",
}


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily imported ones included."""
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ENTRY_POINT_GROUP", "HookRegistry", "HookResult", "HostContext", "LPLConfig", "LPLHook",
    "LatentPerceptualLoss", "LossContext", "NonFiniteLPLError", "Preflight", "Problem", "UserError",
    "add_arguments", "check_training_config", "check_training_mapping", "json_schema", "launch_command",
    "load_config", "load_plugin_hooks", "load_vae", "min_snr_weight", "options", "predict_z0", "registry",
    "render_toml", "snr", "validate",
]
