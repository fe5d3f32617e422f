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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from lpl_plugin.patches.asked import asks_in, unasked_warning
from lpl_plugin.training.measure import measure_targets
from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import write_lines
from lpl_plugin.training.hook import LPLHook
from lpl_plugin.training.plugins import (DISABLE_OPTION, HostContext, Plugin, add_plugin_arguments, disabled_names, discover,
                                start_hooks, to_stderr)
from lpl_plugin.settings.preflight import check_training_mapping
from lpl_plugin.training.rank_hooks import agree_on_hooks, hook_versions
from lpl_plugin.training.ranks import Reduced, agreed_int, reduce_logs, world_size
from lpl_plugin.training.registry import HookRegistry, LossContext
from lpl_plugin.settings.schema import add_arguments

from lpl_plugin.patches.patcher import Patcher, Target
from lpl_plugin.patches.sd_scripts_seams import KIND_NAMES, Layout, ModuleReader, UnsupportedHost, detect, script_kind
from lpl_plugin.patches.sd_scripts_state import STATE_FILE, host_start_step, load_hook_states, resumed_state, save_state
from lpl_plugin.patches.sd_scripts_weights import WeightTable

log = logging.getLogger("lpl_plugin")

# sdxl_model_util.VAE_SCALE_FACTOR; single-file SDXL VAEs built by sd-scripts carry SD1's 0.18215 in vae.config.
SDXL_LATENT_SCALE = 0.13025
NUM_TRAIN_TIMESTEPS = 1000

@dataclass
class _Step:
    """What the noise helper saw and returned in the current step."""

    args: Any
    scheduler: Any
    latents: Tensor
    noisy_latents: Tensor
    timesteps: Tensor


class Session:
    """The adapter's state for one run: settings, hooks, the optimizer-step count and pending logs."""

    def __init__(self, layout: Layout, kind: str, registry: HookRegistry | None = None):
        self.layout, self.kind = layout, kind
        self.registry = registry if registry is not None else HookRegistry()
        self.config: LPLConfig | None = None
        self.accelerator: Any = None
        self.weight_dtype: torch.dtype | None = None
        self.steps = 0
        self.logs: dict[str, Tensor | float | Reduced] = {}
        self.plugins: list[Plugin] | None = None
        self.weights = WeightTable()
        self.loader_length: int | None = None
        self._start_args: Any = None
        self._started = False
        self._step: _Step | None = None
        self.loss_applied = False  # the wrapped loss ran in a training step
        self._backward_checked = False
        self.patcher = Patcher(self.targets())

    @property
    def active(self) -> bool:
        """Whether LPL is on for this run (known once the host has read its arguments)."""
        return self.config is not None and self.config.use_lpl

    @property
    def running(self) -> bool:
        """Whether any hook (LPL or a third-party one) takes part in this run's training steps."""
        return len(self.registry) > 0

    @property
    def host(self) -> str:
        """The host as written in logs and HostContext."""
        return f"sd-scripts {self.layout.releases}, {KIND_NAMES[self.kind]}"

    # -- installing ------------------------------------------------------------------------------------------

    def targets(self) -> list[Target]:
        """(modules, function, body) of every wrapped host function; re-exports (v0.11 shims) share one wrapper."""
        both = lambda module: tuple(dict.fromkeys(("library.train_util", module)))  # noqa: E731
        found: list[Target] = [
            (("library.sdxl_train_util",), "add_sdxl_training_arguments", self._on_add_arguments),
            (both(self.layout.args_module), "read_config_from_file", self._on_read_config),
            (both(self.layout.loss_module), "get_noise_noisy_latents_and_timesteps", self._on_noise),
            (both(self.layout.loss_module), "conditional_loss", self._on_loss),
            (("library.sdxl_train_util",), "load_target_model", self._on_load_model),
            (("library.train_util",), "get_sai_model_spec", self._on_model_spec),
        ]
        if self.kind == "lora":
            found.append((("train_network",), "NetworkTrainer.generate_step_logs", self._on_step_logs))
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

    # -- arguments and settings ------------------------------------------------------------------------------

    def _on_add_arguments(self, original, args, kwargs, bound):
        """add_sdxl_training_arguments: also add --use_lpl / --lpl_* and the third-party hooks' options."""
        result = original(*args, **kwargs)
        parser = bound["parser"]
        add_arguments(parser)
        if self.plugins is None:
            self.plugins = discover(to_stderr)
        if self.plugins:
            group = parser.add_argument_group("Loss hooks (lpl-plugin)")
            group.add_argument(f"--{DISABLE_OPTION}", default=None, metavar="NAME[,NAME]",
                               help="turn these third-party loss hooks off for this run (installed: "
                                    f"{', '.join(p.name for p in self.plugins)})")
            self.plugins = add_plugin_arguments(self.plugins, parser, to_stderr)
        return result

    def _on_read_config(self, original, args, kwargs, bound):
        """read_config_from_file: resolve the settings from the merged TOML and command line."""
        parsed = original(*args, **kwargs)
        self.configure(parsed)
        return parsed

    def configure(self, args: Any) -> LPLConfig:
        """Resolve the effective settings from the host's parsed arguments (TOML plus command line); ConfigError.

        Whether the run asks for LPL is decided first (lpl_plugin.patches.asked); only a run that asks is checked. One that
        does not keeps LPL off whatever its `lpl_*` values, with at most one warning line.
        """
        values = vars(args)
        if not asks_in(values):
            write_lines(unasked_warning(values))
            self.config = LPLConfig()
            return self.config
        source = "sd-scripts arguments (config file and command line)"
        checked = check_training_mapping(values, source, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
        self.config = checked.raise_for_problems()
        if self.active:
            c = self.config
            log.info("lpl-plugin: LPL on (%s): weight %s, t < %s, %d decoder blocks, from optimizer step %d",
                     self.host, c.lpl_weight, c.lpl_t_threshold, c.lpl_num_blocks, c.lpl_start)
        return self.config

    # -- models, state and logging ---------------------------------------------------------------------------

    def _on_load_model(self, original, args, kwargs, bound):
        """load_target_model: start the hooks with the VAE just loaded."""
        self.patcher.settle()  # a wrapper imported train_network before sd-scripts' library: wrap it now
        result = original(*args, **kwargs)
        if self.config is None:
            self.configure(bound["args"])
        self.attach(_find_vae(result) if self.active else None, bound["accelerator"], bound["weight_dtype"],
                    bound["args"], models=result)
        return result

    def attach(self, vae: torch.nn.Module | None, accelerator: Any, weight_dtype: torch.dtype | None = None,
               args: Any = None, *, models: Any = None) -> None:
        """Start LPL (a private frozen decoder copy on the training device) and the third-party hooks of this run."""
        assert self.config is not None
        self.accelerator, self.weight_dtype, self._start_args = accelerator, weight_dtype, args
        if self.active:
            assert vae is not None
            hook = LPLHook(vae, self.config, scaling_factor=SDXL_LATENT_SCALE, shift_factor=0.0,
                           device=accelerator.device)
            self.registry.register("lpl", hook, replace=True)
        if self.plugins and args is not None:
            if vae is None and models is not None:
                found = [m for m in (models if isinstance(models, (tuple, list)) else (models,)) if _is_vae(m)]
                vae = found[0] if len(found) == 1 else None
            host = HostContext(args=args, vae=vae, device=accelerator.device, accelerator=accelerator,
                               host=self.host, weight_dtype=weight_dtype)
            for name, hook in start_hooks(self.plugins, host, disabled_names(getattr(args, DISABLE_OPTION, None)),
                                          to_stderr):
                self.registry.register(name, hook, replace=True)
                log.info("lpl-plugin: loss hook %s on", name)
        agree_on_hooks(hook_versions(self.registry, self.plugins or []))  # several processes: the same hooks
        if not self.running:
            return
        if self.active:
            self.patcher.replace(accelerator, "backward", self._backward_after_loss)
        accelerator.register_save_state_pre_hook(self._save_state)
        accelerator.register_load_state_pre_hook(self._load_state)
        self._wrap_accelerator(accelerator)

    def _wrap_accelerator(self, accelerator: Any) -> None:
        """Full fine-tune: the hooks' scalars ride on accelerator.log; LoRA: note the train loader's length."""
        if self.kind == "full":  # sdxl_train.py logs its step scalars with accelerator.log
            self.patcher.replace(accelerator, "log", self._log_with_hooks)
        else:  # --initial_epoch counts epochs of the prepared train loader
            self.patcher.replace(accelerator, "prepare", self._prepare_noting_loader)

    def _log_with_hooks(self, original: Callable[..., Any], values: dict, *args: Any, **kwargs: Any) -> Any:
        """accelerator.log with the hooks' scalars added."""
        return original({**values, **self.take_logs()}, *args, **kwargs)

    def _backward_after_loss(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """accelerator.backward; the first one stops the run when the wrapped loss did not run in this step."""
        if not self._backward_checked:
            self._backward_checked = True
            if not self.loss_applied:
                with self.patcher.reporting():
                    raise UnsupportedHost(_host_root(), [
                        f"the first optimizer step's loss did not go through {self.layout.loss_module}."
                        "conditional_loss, where LPL is added"])
        return original(*args, **kwargs)

    def _prepare_noting_loader(self, original: Callable[..., Any], *objects: Any, **kwargs: Any) -> Any:
        """accelerator.prepare, noting the length of the first data loader prepared (sd-scripts' train loader)."""
        result = original(*objects, **kwargs)
        loaders = [r for r in (result if isinstance(result, tuple) else (result,))
                   if isinstance(r, torch.utils.data.DataLoader)]
        if loaders and self.loader_length is None:
            self.loader_length = len(loaders[0])
        return result

    def _save_state(self, models: Any, weights: Any, output_dir: str) -> None:
        """accelerate save-state pre-hook: record the optimizer steps taken and the hooks' counters."""
        if self.accelerator.is_main_process:
            save_state(output_dir, self.steps, self.config, self.registry)

    def _load_state(self, models: Any, input_dir: str) -> None:
        """accelerate load-state pre-hook: restore the optimizer steps taken and the hooks' counters (optional)."""
        with self.patcher.reporting():
            self.steps, states = resumed_state(input_dir)
            load_hook_states(self.registry, states)

    def take_logs(self) -> dict[str, float]:
        """The hooks' scalars since the last logging step, as floats: the only place they leave the device, in one
        read for all of them."""
        logs, self.logs = self.logs, {}
        pairs = {key: (v.value, v.weight) if isinstance(v, Reduced) else (v, 1.0) for key, v in logs.items()}
        tensors = [x for pair in pairs.values() for x in pair if isinstance(x, Tensor)]
        read = iter(torch.stack([t.detach().float().reshape(()).to(tensors[0].device) for t in tensors]).tolist()
                    if tensors else [])
        values = {key: [next(read) if isinstance(x, Tensor) else float(x) for x in pair] for key, pair in pairs.items()}
        return {key: value for key, (value, weight) in values.items() if weight > 0}

    def _on_step_logs(self, original, args, kwargs, bound):
        """NetworkTrainer.generate_step_logs: add the hooks' scalars to the LoRA step logs."""
        logs = original(*args, **kwargs)
        if self.running and isinstance(logs, dict):
            logs.update(self.take_logs())
        return logs

    def _on_model_spec(self, original, args, kwargs, bound):
        """get_sai_model_spec: add the ss_lpl_* keys to the metadata of every saved model."""
        metadata = original(*args, **kwargs)
        if self.active and self.loss_applied and isinstance(metadata, dict) and \
                not getattr(bound["args"], "no_metadata", False):
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
        if self.running:
            if not isinstance(result, tuple) or len(result) != self.layout.noise_values:
                count = len(result) if isinstance(result, tuple) else type(result).__name__
                expected = f"{self.layout.noise_values} (sd-scripts {self.layout.releases})"
                raise UnsupportedHost(_host_root(), [f"get_noise_noisy_latents_and_timesteps returned {count} "
                                                     f"values, expected {expected}"])
            self._step = _Step(bound["args"], bound["noise_scheduler"], bound["latents"], result[1], result[2])
        return result

    def _on_loss(self, original, args, kwargs, bound):
        """conditional_loss: add the hooks' per-sample terms in training steps, in the host's shape."""
        loss = original(*args, **kwargs)
        if not self.running:
            return loss
        step, self._step = self._step, None
        pred = bound["model_pred"]
        if not (torch.is_grad_enabled() and pred.requires_grad):  # validation: the same code without gradients
            return loss
        if step is None or tuple(step.latents.shape) != tuple(pred.shape):
            raise UnsupportedHost(_host_root(), ["conditional_loss was called in a training step without a matching "
                                                 "get_noise_noisy_latents_and_timesteps call before it"])
        extra = self.extra(step, pred, bound["target"])
        self.loss_applied = True
        return add_per_sample(loss, extra, bound["reduction"], pred)

    def start(self, device: torch.device) -> None:
        """At the first training step: count from the host's own start step, the same on every process."""
        self._started = True
        start = host_start_step(self._start_args, self.accelerator, self.loader_length)
        if start is not None:
            log.info("lpl-plugin: the host starts at optimizer step %d (--initial_step / --initial_epoch); "
                     "lpl_start counts from there", start)
            self.steps = start
        self.steps = agreed_int(self.steps, device)

    def extra(self, step: _Step, pred: Tensor, target: Tensor) -> Tensor:
        """The hooks' per-sample terms to add inside conditional_loss, with the host's noise-level weights divided
        out."""
        args = step.args
        if not self._started:
            self.start(pred.device)
        host = self.weights(args, step.timesteps, step.scheduler)
        noisy = step.noisy_latents.detach()
        if self.weight_dtype is not None:  # the UNet gets noisy_latents.to(weight_dtype)
            noisy = noisy.to(self.weight_dtype)
        tracking = bool(self.accelerator is not None and self.accelerator.log_with)  # the same on every process
        ctx = LossContext(
            latents=step.latents.detach(), noisy_latents=noisy, timesteps=step.timesteps, model_pred=pred,
            target=target.detach(), prediction_type="v_prediction" if getattr(args, "v_parameterization", False)
            else "epsilon", alphas_cumprod=step.scheduler.alphas_cumprod, noise_weights=host,
            snr_gamma=getattr(args, "min_snr_gamma", None) or None, step=self.steps, is_training=True,
            log_stats=tracking, num_train_timesteps=int(step.scheduler.config.num_train_timesteps))
        applied = self.registry.apply(ctx)
        self.logs.update(self.reduced(applied.logs, ctx.batch_size, tracking, pred.device))
        if self.accelerator is None or self.accelerator.sync_gradients:  # this micro-batch ends an optimizer step
            self.steps += 1
        if host is None:
            return applied.loss
        host = host.to(applied.loss)
        safe = torch.where(host > 0, host, torch.ones_like(host))
        return torch.where(host > 0, applied.loss / safe, torch.zeros_like(host))

    def reduced(self, logs: dict[str, Any], batch: int, tracking: bool, device: torch.device) -> dict[str, Any]:
        """With several processes, the scalars of every hook that names them, combined over processes."""
        if world_size() == 1:
            return logs
        names: list[str] = []
        for name in self.registry:
            hook = self.registry.get(name)
            listed = hook.log_names(tracking) if isinstance(hook, LPLHook) else getattr(hook, "log_names", ())
            names += [n for n in listed if n not in names]
        return {**logs, **reduce_logs(logs, names, batch, device)}


def add_per_sample(loss: Tensor, extra: Tensor, reduction: str, pred: Tensor) -> Tensor:
    """`loss` as if `extra[b]` had been added to every element of sample b before the host's reduction."""
    if reduction == "none":
        return loss + extra.to(loss.dtype).reshape(-1, *([1] * (loss.dim() - 1)))
    if reduction == "mean":
        return loss + extra.mean().to(loss.dtype)
    if reduction == "sum":
        return loss + (extra.sum() * pred[0].numel()).to(loss.dtype)
    raise UnsupportedHost(_host_root(), [f"conditional_loss was called with reduction={reduction!r}"])


def _is_vae(model: Any) -> bool:
    """Whether a model looks like an AutoencoderKL (a decoder with up blocks)."""
    return hasattr(getattr(model, "decoder", None), "up_blocks")


def _find_vae(models: Any) -> torch.nn.Module:
    """The AutoencoderKL among load_target_model's results."""
    found = [m for m in (models if isinstance(models, (tuple, list)) else (models,)) if _is_vae(m)]
    if len(found) != 1:
        raise UnsupportedHost(_host_root(), [f"load_target_model returned {len(found)} VAEs, expected 1"])
    return found[0]


def _host_root() -> str:
    """The checkout whose `library` package is imported."""
    return ModuleReader().root


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
