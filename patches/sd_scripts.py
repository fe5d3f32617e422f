"""sd-scripts adapter: LPL inside sdxl_train_network.py (LoRA) and sdxl_train.py (full fine-tune), no file changed.

Thin by design: wrappers around the host's own functions capture what one training step sees (clean latents, the
noisy latents the UNet got, timesteps, scheduler, model output), build a LossContext, call the hook registry (the
built-in LPLHook as "lpl") and hand the result back in the host's shape. The math lives in lpl_plugin.hook.

Where LPL enters: inside `conditional_loss`, as a per-sample constant added to every element of the host's
element-wise loss (or to its mean). The host then treats it like its own loss: masked loss scales it by the kept
fraction of the image, `loss_weights` multiply it, and its noise-level weights (min-SNR, scale_v_pred,
v_pred_like, debiased) multiply it. The adapter computes those noise-level weights with the host's own functions
applied to ones and divides them out beforehand, so the LPL the host ends up with is the hook's term: weighted by
the host's noise-level weights when `lpl_scale` is on, not weighted when it is off.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from lpl_plugin.config import LPLConfig
from lpl_plugin.errors import FileError, UserError
from lpl_plugin.files import read_json_object
from lpl_plugin.hook import LPLHook
from lpl_plugin.messages import show_path, shown
from lpl_plugin.preflight import check_training_mapping
from lpl_plugin.registry import HookRegistry, LossContext
from lpl_plugin.schema import add_arguments

from .sd_scripts_seams import Layout, ModuleReader, UnsupportedHost, detect, script_kind  # noqa: F401

log = logging.getLogger("lpl_plugin")

# sdxl_model_util.VAE_SCALE_FACTOR; single-file SDXL VAEs built by sd-scripts carry SD1's 0.18215 in vae.config.
SDXL_LATENT_SCALE = 0.13025
STATE_FILE = "lpl_plugin_state.json"
HOST_STATE_FILE = "train_state.json"
NUM_TRAIN_TIMESTEPS = 1000
# The host's per-sample noise-level weights: (argument, custom_train_functions function, its extra keywords).
HOST_WEIGHTS: tuple[tuple[str, str, Callable[[Any, Any], dict[str, Any]]], ...] = (
    ("min_snr_gamma", "apply_snr_weight", lambda a, v: {"gamma": v, "v_prediction": bool(a.v_parameterization)}),
    ("scale_v_pred_loss_like_noise_pred", "scale_v_prediction_loss_like_noise_prediction", lambda a, v: {}),
    ("v_pred_like_loss", "add_v_prediction_like_loss", lambda a, v: {"v_pred_like_loss": v}),
    ("debiased_estimation_loss", "apply_debiased_estimation",
     lambda a, v: {"v_prediction": bool(a.v_parameterization)}),
)

Body = Callable[[Callable[..., Any], tuple, dict, dict], Any]


@dataclass
class _Step:
    """What the noise helper saw and returned in the current step."""

    args: Any
    scheduler: Any
    latents: Tensor
    noisy_latents: Tensor
    timesteps: Tensor


class Session:
    """The adapter's state for one run: the effective settings, the LPL hook, the optimizer-step count, pending logs."""

    def __init__(self, layout: Layout, kind: str, registry: HookRegistry | None = None):
        self.layout, self.kind = layout, kind
        self.registry = registry if registry is not None else HookRegistry()
        self.config: LPLConfig | None = None
        self.accelerator: Any = None
        self.weight_dtype: torch.dtype | None = None
        self.steps = 0
        self.logs: dict[str, Tensor | float] = {}
        self._step: _Step | None = None
        self._patches: list[tuple[object, str, Any]] = []
        self._busy: set[str] = set()

    @property
    def active(self) -> bool:
        """Whether LPL is on for this run (known once the host has read its arguments)."""
        return self.config is not None and self.config.use_lpl

    # -- installing ------------------------------------------------------------------------------------------

    def patch(self) -> None:
        """Wrap the host's functions; re-exports of one function (v0.11 shims) share one wrapper."""
        both = lambda module: tuple(dict.fromkeys(("library.train_util", module)))  # noqa: E731
        targets: list[tuple[tuple[str, ...], str, Body]] = [
            (("library.sdxl_train_util",), "add_sdxl_training_arguments", self._on_add_arguments),
            (both(self.layout.args_module), "read_config_from_file", self._on_read_config),
            (both(self.layout.loss_module), "get_noise_noisy_latents_and_timesteps", self._on_noise),
            (both(self.layout.loss_module), "conditional_loss", self._on_loss),
            (("library.sdxl_train_util",), "load_target_model", self._on_load_model),
            (("library.train_util",), "get_sai_model_spec", self._on_model_spec),
        ]
        if self.kind == "lora":
            targets.append((("train_network",), "NetworkTrainer.generate_step_logs", self._on_step_logs))
        for modules, name, body in targets:
            wrappers: dict[int, Callable[..., Any]] = {}
            for module in modules:
                owner: Any = importlib.import_module(module)
                *path, attr = name.split(".")
                for part in path:
                    owner = getattr(owner, part)
                original = getattr(owner, attr, None)
                if original is None:  # a shim module without this re-export
                    continue
                wrapper = wrappers.setdefault(id(original), self._wrap(name, original, body))
                setattr(owner, attr, wrapper)
                self._patches.append((owner, attr, original))

    def unpatch(self) -> None:
        """Put every wrapped function back."""
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches.clear()

    def _wrap(self, name: str, original: Callable[..., Any], body: Body) -> Callable[..., Any]:
        """A wrapper binding the host's call by parameter name; a shim calling a wrapped original runs it once."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name in self._busy:
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self._busy.add(name)
            try:
                return body(original, args, kwargs, bound.arguments)
            finally:
                self._busy.discard(name)
        return wrapper

    # -- arguments and settings ------------------------------------------------------------------------------

    def _on_add_arguments(self, original, args, kwargs, bound):
        """add_sdxl_training_arguments: also add --use_lpl / --lpl_* to the host's parser."""
        result = original(*args, **kwargs)
        add_arguments(bound["parser"])
        return result

    def _on_read_config(self, original, args, kwargs, bound):
        """read_config_from_file: resolve the settings from the merged TOML and command line."""
        parsed = original(*args, **kwargs)
        self.configure(parsed)
        return parsed

    def configure(self, args: Any) -> LPLConfig:
        """Resolve the effective settings from the host's parsed arguments (TOML plus command line); ConfigError."""
        source = "sd-scripts arguments (config file and command line)"
        checked = check_training_mapping(vars(args), source, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
        self.config = checked.raise_for_problems()
        if self.active:
            c = self.config
            log.info("lpl-plugin: LPL on (sd-scripts %s layout, %s): weight %s, t < %s, %d decoder blocks, from "
                     "optimizer step %d", self.layout.name, self.kind, c.lpl_weight, c.lpl_t_threshold,
                     c.lpl_num_blocks, c.lpl_start)
        return self.config

    # -- models, state and logging ---------------------------------------------------------------------------

    def _on_load_model(self, original, args, kwargs, bound):
        """load_target_model: build the LPL hook from the VAE just loaded."""
        result = original(*args, **kwargs)
        if self.config is None:
            self.configure(bound["args"])
        if self.active:
            self.attach(_find_vae(result), bound["accelerator"], bound["weight_dtype"])
        return result

    def attach(self, vae: torch.nn.Module, accelerator: Any, weight_dtype: torch.dtype | None = None) -> None:
        """Build the LPL hook from the host's VAE (a private frozen decoder copy on the training device)."""
        assert self.config is not None
        hook = LPLHook(vae, self.config, scaling_factor=SDXL_LATENT_SCALE, shift_factor=0.0,
                       device=accelerator.device)
        self.registry.register("lpl", hook, replace=True)
        self.accelerator, self.weight_dtype = accelerator, weight_dtype
        accelerator.register_save_state_pre_hook(self._save_state)
        accelerator.register_load_state_pre_hook(self._load_state)
        if self.kind == "full":  # sdxl_train.py logs its step scalars with accelerator.log
            original = accelerator.log

            @functools.wraps(original)
            def log_with_lpl(values: dict, *args: Any, **kwargs: Any) -> Any:
                return original({**values, **self.take_logs()}, *args, **kwargs)
            accelerator.log = log_with_lpl
            self._patches.append((accelerator, "log", original))

    def _save_state(self, models: Any, weights: Any, output_dir: str) -> None:
        """accelerate save-state pre-hook: record the optimizer steps taken and the hook's counters."""
        if self.accelerator.is_main_process:
            data = {"optimizer_steps": self.steps, "settings": self.config.lpl_items() if self.config else None,
                    "hook": self.registry.get("lpl").state_dict()}
            Path(output_dir, STATE_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def _load_state(self, models: Any, input_dir: str) -> None:
        """accelerate load-state pre-hook: restore the optimizer steps taken and the hook's counters (optional)."""
        self.steps, hook_state = resumed_state(Path(input_dir))
        if hook_state:
            self.registry.get("lpl").load_state_dict(hook_state)

    def take_logs(self) -> dict[str, float]:
        """The LPL scalars since the last logging step, as floats (the only place they leave the device)."""
        logs, self.logs = self.logs, {}
        return {key: float(value) for key, value in logs.items()}

    def _on_step_logs(self, original, args, kwargs, bound):
        """NetworkTrainer.generate_step_logs: add the LPL scalars to the LoRA step logs."""
        logs = original(*args, **kwargs)
        if self.active and isinstance(logs, dict):
            logs.update(self.take_logs())
        return logs

    def _on_model_spec(self, original, args, kwargs, bound):
        """get_sai_model_spec: add the ss_lpl_* keys to the metadata of every saved model."""
        metadata = original(*args, **kwargs)
        if self.active and isinstance(metadata, dict) and not getattr(bound["args"], "no_metadata", False):
            metadata.update(self.metadata())
        return metadata

    def metadata(self) -> dict[str, str]:
        """The settings as `ss_lpl_*` metadata, stringified the way sd-scripts writes its own `ss_*` keys."""
        from lpl_plugin import __version__

        assert self.config is not None
        items = {("lpl_enabled" if k == "use_lpl" else k): v for k, v in self.config.lpl_items().items()}
        return {"ss_lpl_version": __version__, **{f"ss_{k}": str(v) for k, v in items.items()}}

    # -- the loss --------------------------------------------------------------------------------------------

    def _on_noise(self, original, args, kwargs, bound):
        """get_noise_noisy_latents_and_timesteps: remember what this step's UNet input is made of."""
        result = original(*args, **kwargs)
        if self.active:
            if not isinstance(result, tuple) or len(result) != self.layout.noise_values:
                count = len(result) if isinstance(result, tuple) else type(result).__name__
                expected = f"{self.layout.noise_values} (sd-scripts {self.layout.releases})"
                raise UnsupportedHost(_host_root(), [f"get_noise_noisy_latents_and_timesteps returned {count} "
                                                     f"values, expected {expected}"])
            self._step = _Step(bound["args"], bound["noise_scheduler"], bound["latents"], result[1], result[2])
        return result

    def _on_loss(self, original, args, kwargs, bound):
        """conditional_loss: add LPL in training steps, in the host's shape."""
        loss = original(*args, **kwargs)
        if not self.active:
            return loss
        step, self._step = self._step, None
        pred = bound["model_pred"]
        if not (torch.is_grad_enabled() and pred.requires_grad):  # validation: the same code without gradients
            return loss
        if step is None or tuple(step.latents.shape) != tuple(pred.shape):
            raise UnsupportedHost(_host_root(), ["conditional_loss was called in a training step without a matching "
                                                 "get_noise_noisy_latents_and_timesteps call before it"])
        extra = self.lpl(step, pred, bound["target"])
        return add_per_sample(loss, extra, bound["reduction"], pred)

    def lpl(self, step: _Step, pred: Tensor, target: Tensor) -> Tensor:
        """The per-sample LPL to add inside conditional_loss, with the host's later noise-level weights divided out."""
        if "lpl" not in self.registry:
            raise UnsupportedHost(_host_root(), ["LPL is on but the VAE was never seen (sd-scripts did not load its "
                                                 "models through sdxl_train_util.load_target_model)"])
        args = step.args
        host = self.host_weights(args, step.timesteps, step.scheduler)
        noisy = step.noisy_latents.detach()
        if self.weight_dtype is not None:  # the UNet gets noisy_latents.to(weight_dtype)
            noisy = noisy.to(self.weight_dtype)
        ctx = LossContext(
            latents=step.latents.detach(), noisy_latents=noisy, timesteps=step.timesteps, model_pred=pred,
            target=target.detach(), prediction_type="v_prediction" if getattr(args, "v_parameterization", False)
            else "epsilon", alphas_cumprod=step.scheduler.alphas_cumprod, noise_weights=host,
            snr_gamma=getattr(args, "min_snr_gamma", None) or None, step=self.steps, is_training=True,
            log_stats=bool(self.accelerator is not None and len(self.accelerator.trackers) > 0),
            num_train_timesteps=int(step.scheduler.config.num_train_timesteps))
        applied = self.registry.apply(ctx)
        self.logs.update(applied.logs)
        if self.accelerator is None or self.accelerator.sync_gradients:  # this micro-batch ends an optimizer step
            self.steps += 1
        if host is None:
            return applied.loss
        host = host.to(applied.loss)
        safe = torch.where(host > 0, host, torch.ones_like(host))
        return torch.where(host > 0, applied.loss / safe, torch.zeros_like(host))

    def host_weights(self, args: Any, timesteps: Tensor, scheduler: Any) -> Tensor | None:
        """The host's per-sample noise-level weights, from its own functions applied to ones (None: it has none)."""
        functions = importlib.import_module("library.custom_train_functions")
        weights = None
        for flag, name, options in HOST_WEIGHTS:
            value = getattr(args, flag, None)
            if value:
                loss = weights if weights is not None else torch.ones(timesteps.shape[0], device=timesteps.device)
                weights = getattr(functions, name)(loss=loss, timesteps=timesteps, noise_scheduler=scheduler,
                                                   **options(args, value))
        return None if weights is None else weights.detach().float()


def add_per_sample(loss: Tensor, extra: Tensor, reduction: str, pred: Tensor) -> Tensor:
    """`loss` as if `extra[b]` had been added to every element of sample b before the host's reduction."""
    if reduction == "none":
        return loss + extra.to(loss.dtype).reshape(-1, *([1] * (loss.dim() - 1)))
    if reduction == "mean":
        return loss + extra.mean().to(loss.dtype)
    if reduction == "sum":
        return loss + (extra.sum() * pred[0].numel()).to(loss.dtype)
    raise UnsupportedHost(_host_root(), [f"conditional_loss was called with reduction={reduction!r}"])


def resumed_state(folder: Path) -> tuple[int, dict[str, Any]]:
    """Optimizer steps and hook counters of a saved state: the plugin's file, else train_state.json's steps, else 0."""
    for name, key in ((STATE_FILE, "optimizer_steps"), (HOST_STATE_FILE, "current_step")):
        path = folder / name
        if os.path.lexists(path):
            try:
                data = read_json_object(path, what="a state file")  # the safe reader (issue 12)
                steps, hook = int(data[key]), dict(data.get("hook") or {}) if name == STATE_FILE else {}
            except (UserError, ValueError, KeyError, TypeError, AttributeError) as error:
                reason = error.reason if isinstance(error, FileError) else f"{type(error).__name__}: {shown(error)}"
                raise UnsupportedHost(show_path(folder), [f"{show_path(path)} is unreadable ({reason}); delete it "
                                                          "to resume with the step count sd-scripts saved"])
            log.info("lpl-plugin: resuming after %d optimizer steps (from %s)", steps, show_path(path.name))
            return steps, hook
    log.info("lpl-plugin: %s has no %s or %s; counting optimizer steps from 0 for lpl_start", show_path(folder),
             STATE_FILE, HOST_STATE_FILE)
    return 0, {}


def _find_vae(models: Any) -> torch.nn.Module:
    """The AutoencoderKL among load_target_model's results."""
    found = [m for m in (models if isinstance(models, (tuple, list)) else (models,))
             if hasattr(getattr(m, "decoder", None), "up_blocks")]
    if len(found) != 1:
        raise UnsupportedHost(_host_root(), [f"load_target_model returned {len(found)} VAEs, expected 1"])
    return found[0]


def _host_root() -> str:
    """The checkout whose `library` package is imported."""
    return ModuleReader().root


_current: Session | None = None


def install(kind: str, *, registry: HookRegistry | None = None) -> Session:
    """Check the importable sd-scripts against the known layouts and wrap its functions; UnsupportedHost if none fits.

    `kind` is "lora" (sdxl_train_network.py) or "full" (sdxl_train.py); the checkout must be on sys.path.
    """
    global _current
    uninstall()
    reader = ModuleReader()
    layout, problems = detect(reader, kind)
    if layout is None:
        raise UnsupportedHost(reader.root, problems)
    session = Session(layout, kind, registry)
    session.patch()
    _current = session
    return session


def uninstall() -> None:
    """Undo `install` (tests, or a GUI running several trainings in one process)."""
    global _current
    if _current is not None:
        _current.unpatch()
        _current = None
