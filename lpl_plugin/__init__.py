"""Latent Perceptual Loss (Berrada et al., ICLR 2025) for the SDXL trainers people already run."""

from pathlib import Path as _Path

# In a source checkout `patches/` and `configs/` sit beside this package; setup.cfg's package_dir installs them
# as `lpl_plugin.patches` and `lpl_plugin.configs`. Mirror that mapping so both import the same way from source.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "patches").is_dir() and (_checkout / "setup.cfg").is_file():
    __path__.append(str(_checkout))  # type: ignore[name-defined]  # noqa: F821

import importlib as _importlib
import sys as _sys
import types as _types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below, for type checkers; at run time they are imported on first use (PEP 562)
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

# Where each public name lives. Importing the package stays light (no torch), so config checks, `lpl-plugin
# validate` and the launcher's preflight start fast; the engine's names import torch when first used.
_EXPORTS = {
    "ConfigError": "config", "LPLConfig": "config", "Problem": "config",
    "min_snr_weight": "diffusion", "predict_z0": "diffusion", "snr": "diffusion",
    "UserError": "errors", "NonFiniteLPLError": "guard", "launch_command": "gui", "LPLHook": "hook",
    "LatentPerceptualLoss": "loss", "HostContext": "plugins", "load_plugin_hooks": "plugins",
    "Preflight": "preflight", "check_training_config": "preflight", "check_training_mapping": "preflight",
    "ENTRY_POINT_GROUP": "registry", "HookRegistry": "registry", "HookResult": "registry", "LossContext": "registry",
    "add_arguments": "schema", "json_schema": "schema", "options": "schema", "validate": "schema",
    "load_config": "toml_io", "render_toml": "toml_io", "load_vae": "vae_io",
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
    return sorted(set(globals()) | set(_EXPORTS) | {"registry"})


class _Package(_types.ModuleType):
    """This package's module type: `lpl_plugin.registry` is the hook registry object, not the submodule.

    Importing the submodule `lpl_plugin.registry` makes the import system set that attribute to the module; the
    setter below ignores it, as the eager `from .registry import registry` used to overwrite it.
    """

    @property
    def registry(self):
        """The process-wide HookRegistry (imported on first use)."""
        return _importlib.import_module(".registry", __name__).registry

    @registry.setter
    def registry(self, value) -> None:
        pass


_sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ENTRY_POINT_GROUP", "HookRegistry", "HookResult", "HostContext", "LPLConfig", "LPLHook",
    "LatentPerceptualLoss", "LossContext", "NonFiniteLPLError", "Preflight", "Problem", "UserError",
    "add_arguments", "check_training_config", "check_training_mapping", "json_schema", "launch_command",
    "load_config", "load_plugin_hooks", "load_vae", "min_snr_weight", "options", "predict_z0", "registry",
    "render_toml", "snr", "validate",
]
