"""sd-scripts adapter: LPL and third-party loss hooks inside sdxl_train_network.py (LoRA) and sdxl_train.py (full
fine-tune), no file changed.

Thin by design: wrappers around the host's own functions capture what one training step sees (clean latents, the
noisy latents the UNet got, timesteps, scheduler, model output), build a LossContext, call the hook registry (the
built-in LPLHook as "lpl" plus every hook of the `lpl_plugin.hooks` entry-point group) and hand the result back in the
host's shape. The math lives in lpl_plugin.training.hook.

Where the hooks' loss enters: inside `conditional_loss`, as a per-sample constant added to every element of the
host's element-wise loss (or to its mean). The host then treats it like its own loss: masked loss scales it by the
kept fraction of the image, `loss_weights` multiply it, and its noise-level weights (min-SNR, scale_v_pred,
v_pred_like, debiased) multiply it. The adapter divides those noise-level weights out beforehand (sd_scripts_weights),
so what the host ends up with is each hook's own term: LPL weighted by the host's weights when `lpl_scale` is on.

A Session composes three parts, one job each: the options and their checks (host_options, host-neutral), the loss
seams and the step count (sd_scripts_loss) and the run's logs, saved state and ranks (run_state, host-neutral); this
module wires them to sd-scripts' functions and starts the hooks when the host loads its models.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from lpl_plugin.training.hook import LPLHook
from lpl_plugin.training.measure import measure_targets
from lpl_plugin.training.plugins import DISABLE_OPTION, HostContext, disabled_names, start_hooks, to_stderr
from lpl_plugin.training.rank_hooks import agree_on_hooks, hook_versions
from lpl_plugin.training.registry import HookRegistry
from lpl_plugin.settings.config import LPLConfig

from lpl_plugin.patches.host_options import HostOptions, LossSeamCheck
from lpl_plugin.patches.patcher import Patcher, Target
from lpl_plugin.patches.run_state import RunState
from lpl_plugin.patches.sd_scripts_loss import LossInjection
from lpl_plugin.patches.sd_scripts_seams import (KIND_NAMES, Layout, ModuleReader, UnsupportedHost, detect, script_kind,
                                                 unsupported_here)
from lpl_plugin.patches.saved_state import STATE_FILE
from lpl_plugin.patches.sd_scripts_state import train_state_steps

log = logging.getLogger("lpl_plugin")

# sdxl_model_util.VAE_SCALE_FACTOR; single-file SDXL VAEs built by sd-scripts carry SD1's 0.18215 in vae.config.
SDXL_LATENT_SCALE = 0.13025
NUM_TRAIN_TIMESTEPS = 1000
SETTINGS_SOURCE = "sd-scripts arguments (config file and command line)"


class Session:
    """The adapter for one run: its options, its loss seams and its run state, wired to sd-scripts' functions."""

    def __init__(self, layout: Layout, kind: str, registry: HookRegistry | None = None):
        self.layout, self.kind = layout, kind
        self.options = HostOptions(self.host, SETTINGS_SOURCE, NUM_TRAIN_TIMESTEPS)
        self.run = RunState(self.options, registry, train_state_steps)
        self.loss = LossInjection(self.run, layout)
        self.patcher = Patcher(self.targets())
        self.seam_check = LossSeamCheck(self.patcher, f"{layout.loss_module}.conditional_loss",
                                        lambda: self.run.loss_applied, unsupported_here)

    @property
    def host(self) -> str:
        """The host as written in logs and HostContext."""
        return f"sd-scripts {self.layout.releases}, {KIND_NAMES[self.kind]}"

    @property
    def config(self) -> LPLConfig | None:
        """The run's LPL settings (None until the host has read its arguments)."""
        return self.options.config

    @property
    def active(self) -> bool:
        """Whether LPL is on for this run (known once the host has read its arguments)."""
        return self.options.active

    @property
    def running(self) -> bool:
        """Whether any hook (LPL or a third-party one) takes part in this run's training steps."""
        return self.run.running

    @property
    def registry(self) -> HookRegistry:
        """The hooks of this run."""
        return self.run.registry

    @registry.setter
    def registry(self, registry: HookRegistry) -> None:
        self.run.registry = registry

    @property
    def steps(self) -> int:
        """Optimizer steps taken (what `lpl_start` counts)."""
        return self.run.steps

    @steps.setter
    def steps(self, steps: int) -> None:
        self.run.steps = steps

    @property
    def logs(self) -> dict[str, Any]:
        """The hooks' scalars since the last logging step, still on the device."""
        return self.run.logs

    def take_logs(self) -> dict[str, float]:
        """The hooks' scalars since the last logging step, as floats (see RunState.take_logs)."""
        return self.run.take_logs()

    # -- installing ------------------------------------------------------------------------------------------

    def targets(self) -> list[Target]:
        """(modules, function, body) of every wrapped host function; re-exports (v0.11 shims) share one wrapper."""
        both = lambda module: tuple(dict.fromkeys(("library.train_util", module)))  # noqa: E731
        found: list[Target] = [
            (("library.sdxl_train_util",), "add_sdxl_training_arguments", self._on_add_arguments),
            (both(self.layout.args_module), "read_config_from_file", self._on_read_config),
            (both(self.layout.loss_module), "get_noise_noisy_latents_and_timesteps", self.loss.on_noise),
            (both(self.layout.loss_module), "conditional_loss", self.loss.on_loss),
            (("library.sdxl_train_util",), "load_target_model", self._on_load_model),
            (("library.train_util",), "get_sai_model_spec", self.run.on_model_spec),
        ]
        if self.kind == "lora":
            found.append((("train_network",), "NetworkTrainer.generate_step_logs", self.run.on_step_logs))
        found += measure_targets()  # `lpl-plugin compare` only (issue 20): step times and the in-process measure
        return found

    def patch(self) -> None:
        """Import the host modules and wrap their functions now (the launcher)."""
        self.patcher.patch()

    def patch_on_import(self) -> None:
        """Wrap each host module's functions the moment the script imports it (the enabled path)."""
        self.patcher.patch_on_import()

    def unpatch(self) -> None:
        """Put every wrapped function back and stop watching imports."""
        self.patcher.unpatch()

    # -- arguments, models and hooks -------------------------------------------------------------------------

    def _on_add_arguments(self, original: Callable[..., Any], args: tuple, kwargs: dict, bound: dict) -> Any:
        """add_sdxl_training_arguments: also add --use_lpl / --lpl_* and the third-party hooks' options."""
        result = original(*args, **kwargs)
        self.options.add_to(bound["parser"])
        return result

    def _on_read_config(self, original: Callable[..., Any], args: tuple, kwargs: dict, bound: dict) -> Any:
        """read_config_from_file: resolve the settings from the merged TOML and command line."""
        parsed = original(*args, **kwargs)
        self.options.configure(parsed)
        return parsed

    def _on_load_model(self, original: Callable[..., Any], args: tuple, kwargs: dict, bound: dict) -> Any:
        """load_target_model: start the hooks with the VAE just loaded."""
        self.patcher.settle()  # a wrapper imported train_network before sd-scripts' library: wrap it now
        result = original(*args, **kwargs)
        if self.config is None:
            self.options.configure(bound["args"])
        self.attach(_find_vae(result) if self.active else None, bound["accelerator"], bound["weight_dtype"],
                    bound["args"], models=result)
        return result

    def attach(self, vae: torch.nn.Module | None, accelerator: Any, weight_dtype: torch.dtype | None = None,
               args: Any = None, *, models: Any = None) -> None:
        """Start LPL (a private frozen decoder copy on the training device) and the third-party hooks of this run."""
        assert self.config is not None
        self.run.accelerator = accelerator
        self.loss.weight_dtype, self.loss.start_args = weight_dtype, args
        if self.active:
            assert vae is not None
            hook = LPLHook(vae, self.config, scaling_factor=SDXL_LATENT_SCALE, shift_factor=0.0,
                           device=accelerator.device)
            self.registry.register("lpl", hook, replace=True)
        plugins = self.options.plugins
        if plugins and args is not None:
            if vae is None and models is not None:
                found = _vaes(models)
                vae = found[0] if len(found) == 1 else None
            host = HostContext(args=args, vae=vae, device=accelerator.device, accelerator=accelerator,
                               host=self.host, weight_dtype=weight_dtype)
            for name, hook in start_hooks(plugins, host, disabled_names(getattr(args, DISABLE_OPTION, None)),
                                          to_stderr):
                self.registry.register(name, hook, replace=True)
                log.info("lpl-plugin: loss hook %s on", name)
        agree_on_hooks(hook_versions(self.registry, plugins or []))  # several processes: the same hooks
        if not self.running:
            return
        if self.active:
            self.patcher.replace(accelerator, "backward", self.seam_check.backward)
        # sdxl_train.py (full) logs its step scalars with accelerator.log; LoRA logs through generate_step_logs
        self.run.wire(accelerator, self.patcher, logs_through_accelerator=self.kind == "full")


def _vaes(models: Any) -> list[Any]:
    """The models among load_target_model's results that look like an AutoencoderKL (a decoder with up blocks)."""
    return [m for m in (models if isinstance(models, (tuple, list)) else (models,))
            if hasattr(getattr(m, "decoder", None), "up_blocks")]


def _find_vae(models: Any) -> torch.nn.Module:
    """The AutoencoderKL among load_target_model's results."""
    found = _vaes(models)
    if len(found) != 1:
        raise unsupported_here(f"load_target_model returned {len(found)} VAEs, expected 1")
    return found[0]


_current: Session | None = None


def current() -> Session | None:
    """The installed session, if any."""
    return _current


def install(kind: str, *, registry: HookRegistry | None = None, layout: Layout | None = None) -> Session:
    """Wrap the host's functions for a script kind ("lora": sdxl_train_network.py, "full": sdxl_train.py).

    Without `layout`, the importable sd-scripts (its checkout on sys.path) is checked against the known layouts and
    patched now (UnsupportedHost if none fits). With a layout already detected from the checkout's source (the
    enabled path), each module is patched as the script imports it.
    """
    global _current
    uninstall()
    if layout is None:
        reader = ModuleReader()
        layout, problems = detect(reader, kind)
        if layout is None:
            raise UnsupportedHost(reader.root, problems)
        session = Session(layout, kind, registry)
        session.patch()
    else:
        session = Session(layout, kind, registry)
        session.patch_on_import()
    _current = session
    return session


def uninstall() -> None:
    """Undo `install` (tests, or a GUI running several trainings in one process)."""
    global _current
    if _current is not None:
        _current.unpatch()
        _current = None


__all__ = ["STATE_FILE", "Session", "UnsupportedHost", "current", "install", "script_kind", "uninstall"]
