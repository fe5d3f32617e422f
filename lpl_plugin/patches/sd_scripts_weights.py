"""sd-scripts' per-sample noise-level loss weights (min-SNR, scale_v_pred, v_pred_like, debiased) as one table lookup.

The adapter needs the weights the host will multiply into its per-sample loss, to divide them out of the hooks'
terms. sd-scripts' functions index its SNR table with one 0-d tensor per sample; calling them every step would cost
a host sync per sample. Instead the table is built once per scheduler and settings by calling the host's own
functions on every timestep at once (they are element-wise), and each step does one `table[timesteps]` on the
device.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import Tensor

# The host's per-sample noise-level weights in its order: (argument, custom_train_functions function, its keywords).
HOST_WEIGHTS: tuple[tuple[str, str, Callable[[Any, Any], dict[str, Any]]], ...] = (
    ("min_snr_gamma", "apply_snr_weight", lambda a, v: {"gamma": v, "v_prediction": bool(a.v_parameterization)}),
    ("scale_v_pred_loss_like_noise_pred", "scale_v_prediction_loss_like_noise_prediction", lambda a, v: {}),
    ("v_pred_like_loss", "add_v_prediction_like_loss", lambda a, v: {"v_pred_like_loss": v}),
    ("debiased_estimation_loss", "apply_debiased_estimation",
     lambda a, v: {"v_prediction": bool(a.v_parameterization)}),
)


def settings(args: Any) -> tuple[tuple[str, Any], ...]:
    """The arguments the weights depend on, as a hashable key."""
    flags = tuple((flag, getattr(args, flag, None)) for flag, _, _ in HOST_WEIGHTS)
    return flags + (("v_parameterization", bool(getattr(args, "v_parameterization", False))),)


def host_weights(args: Any, timesteps: Tensor, scheduler: Any, loss: Tensor | None = None) -> Tensor | None:
    """The host's weights for `timesteps` from its own functions, chained on `loss` (ones by default); None: none."""
    functions = importlib.import_module("library.custom_train_functions")
    weights = loss
    for flag, name, options in HOST_WEIGHTS:
        value = getattr(args, flag, None)
        if value:
            if weights is None:
                weights = torch.ones(timesteps.shape[0], device=timesteps.device)
            weights = getattr(functions, name)(loss=weights, timesteps=timesteps, noise_scheduler=scheduler,
                                               **options(args, value))
    return None if weights is None or weights is loss else weights


def timestep_count(scheduler: Any) -> int:
    """How many training timesteps the host's weight functions can be asked about."""
    table = getattr(scheduler, "all_snr", None)
    return int(table.shape[0]) if table is not None else int(scheduler.config.num_train_timesteps)


class WeightTable:
    """The host's noise-level weights for every timestep, rebuilt only when the scheduler or the settings change."""

    def __init__(self) -> None:
        self._scheduler: Any = None
        self._key: tuple | None = None
        self.table: Tensor | None = None

    def __call__(self, args: Any, timesteps: Tensor, scheduler: Any) -> Tensor | None:
        """(B,) float32 weights of these timesteps on their device, or None when the host applies none."""
        key = (id(getattr(scheduler, "all_snr", None)), settings(args), timesteps.device)
        if scheduler is not self._scheduler or key != self._key:
            self.table = self.build(args, scheduler, timesteps.device)
            self._scheduler, self._key = scheduler, key
        return None if self.table is None else self.table[timesteps.long()]

    @staticmethod
    def build(args: Any, scheduler: Any, device: torch.device) -> Tensor | None:
        """Every timestep's weight, computed by the host's functions in one call each."""
        table = getattr(scheduler, "all_snr", None)
        every = torch.arange(timestep_count(scheduler), device=table.device if table is not None else device)
        weights = host_weights(args, every, scheduler)
        return None if weights is None else weights.detach().float().to(device)
