"""sd-scripts' loss seams: what one training step's UNet input is made of, and the hooks' per-sample terms added
inside `conditional_loss` in the host's shape, counting optimizer steps as they end.

`get_noise_noisy_latents_and_timesteps` is watched for the clean latents, the noisy latents and the timesteps of the
step; the next `conditional_loss` with gradients builds a LossContext from them, calls the hook registry and adds
the result to every element of each sample (or to the reduced loss), with the host's noise-level weights divided out
beforehand (sd_scripts_weights). Validation calls the same function without gradients and is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from lpl_plugin.training.ranks import agreed_int
from lpl_plugin.training.registry import LossContext

from lpl_plugin.patches.run_state import RunState
from lpl_plugin.patches.sd_scripts_seams import Layout, unsupported_here
from lpl_plugin.patches.sd_scripts_state import host_start_step
from lpl_plugin.patches.sd_scripts_weights import WeightTable

log = logging.getLogger("lpl_plugin")


@dataclass
class _Step:
    """What the noise helper saw and returned in the current step."""

    args: Any
    scheduler: Any
    latents: Tensor
    noisy_latents: Tensor
    timesteps: Tensor


class LossInjection:
    """The hooks' terms added to sd-scripts' loss in each training step, and the optimizer steps counted."""

    def __init__(self, run: RunState, layout: Layout):
        self.run, self.layout = run, layout
        self.weights = WeightTable()
        self.weight_dtype: torch.dtype | None = None  # what the UNet gets its noisy latents in
        self.start_args: Any = None  # the host's arguments, for its own start step
        self._started = False
        self._step: _Step | None = None

    def on_noise(self, original: Callable[..., Any], args: tuple, kwargs: dict, bound: dict) -> Any:
        """get_noise_noisy_latents_and_timesteps: remember what this step's UNet input is made of."""
        result = original(*args, **kwargs)
        if self.run.running:
            if not isinstance(result, tuple) or len(result) != self.layout.noise_values:
                count = len(result) if isinstance(result, tuple) else type(result).__name__
                expected = f"{self.layout.noise_values} (sd-scripts {self.layout.releases})"
                raise unsupported_here(f"get_noise_noisy_latents_and_timesteps returned {count} values, expected "
                                       f"{expected}")
            self._step = _Step(bound["args"], bound["noise_scheduler"], bound["latents"], result[1], result[2])
        return result

    def on_loss(self, original: Callable[..., Any], args: tuple, kwargs: dict, bound: dict) -> Any:
        """conditional_loss: add the hooks' per-sample terms in training steps, in the host's shape."""
        loss = original(*args, **kwargs)
        if not self.run.running:
            return loss
        step, self._step = self._step, None
        pred = bound["model_pred"]
        if not (torch.is_grad_enabled() and pred.requires_grad):  # validation: the same code without gradients
            return loss
        if step is None or tuple(step.latents.shape) != tuple(pred.shape):
            raise unsupported_here("conditional_loss was called in a training step without a matching "
                                   "get_noise_noisy_latents_and_timesteps call before it")
        extra = self.extra(step, pred, bound["target"])
        self.run.loss_applied = True
        return add_per_sample(loss, extra, bound["reduction"], pred)

    def start(self, device: torch.device) -> None:
        """At the first training step: count from the host's own start step, the same on every process."""
        self._started = True
        start = host_start_step(self.start_args, self.run.accelerator, self.run.loader_length)
        if start is not None:
            log.info("lpl-plugin: the host starts at optimizer step %d (--initial_step / --initial_epoch); "
                     "lpl_start counts from there", start)
            self.run.steps = start
        self.run.steps = agreed_int(self.run.steps, device)

    def extra(self, step: _Step, pred: Tensor, target: Tensor) -> Tensor:
        """The hooks' per-sample terms to add inside conditional_loss, with the host's noise-level weights divided
        out."""
        args, run = step.args, self.run
        if not self._started:
            self.start(pred.device)
        host = self.weights(args, step.timesteps, step.scheduler)
        noisy = step.noisy_latents.detach()
        if self.weight_dtype is not None:  # the UNet gets noisy_latents.to(weight_dtype)
            noisy = noisy.to(self.weight_dtype)
        tracking = bool(run.accelerator is not None and run.accelerator.log_with)  # the same on every process
        ctx = LossContext(
            latents=step.latents.detach(), noisy_latents=noisy, timesteps=step.timesteps, model_pred=pred,
            target=target.detach(), prediction_type="v_prediction" if getattr(args, "v_parameterization", False)
            else "epsilon", alphas_cumprod=step.scheduler.alphas_cumprod, noise_weights=host,
            snr_gamma=getattr(args, "min_snr_gamma", None) or None, step=run.steps, is_training=True,
            log_stats=tracking, num_train_timesteps=int(step.scheduler.config.num_train_timesteps))
        applied = run.registry.apply(ctx)
        run.logs.update(run.reduced(applied.logs, ctx.batch_size, tracking, pred.device))
        if run.accelerator is None or run.accelerator.sync_gradients:  # this micro-batch ends an optimizer step
            run.steps += 1
        if host is None:
            return applied.loss
        host = host.to(applied.loss)
        safe = torch.where(host > 0, host, torch.ones_like(host))
        return torch.where(host > 0, applied.loss / safe, torch.zeros_like(host))


def add_per_sample(loss: Tensor, extra: Tensor, reduction: str, pred: Tensor) -> Tensor:
    """`loss` as if `extra[b]` had been added to every element of sample b before the host's reduction."""
    if reduction == "none":
        return loss + extra.to(loss.dtype).reshape(-1, *([1] * (loss.dim() - 1)))
    if reduction == "mean":
        return loss + extra.mean().to(loss.dtype)
    if reduction == "sum":
        return loss + (extra.sum() * pred[0].numel()).to(loss.dtype)
    raise unsupported_here(f"conditional_loss was called with reduction={reduction!r}")
