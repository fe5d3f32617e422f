"""Diffusion algebra LPL needs: the clean-latent estimate z0_hat and noise-level (SNR) weights, in float32."""

from __future__ import annotations

import torch
from torch import Tensor

from lpl_plugin.training.schedule import device_table

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_matching")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor to broadcast over a B x C x H x W tensor, in float32."""
    return values.to(device=like.device, dtype=torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


def alpha_sigma(alphas_cumprod: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """Signal and noise scales sqrt(a_t) and sqrt(1 - a_t) of a DDPM schedule at the given timesteps (the schedule's
    device copy is made once per device, see lpl_plugin.training.schedule)."""
    a_t = device_table(alphas_cumprod, timesteps.device)[timesteps.long()]
    return a_t.sqrt().float(), (1.0 - a_t).sqrt().float()


def predict_z0(model_pred: Tensor, noisy_latents: Tensor, prediction_type: str, *,
               timesteps: Tensor | None = None, alphas_cumprod: Tensor | None = None,
               sigmas: Tensor | None = None) -> Tensor:
    """Clean latent implied by a model output and the noisy input the model saw (float32).

    epsilon: (x_t - sigma eps) / alpha; v_prediction: alpha x_t - sigma v; sample: the output itself;
    flow_matching with x_t = (1 - s) z0 + s eps and v = eps - z0: x_t - s v.
    """
    pred = model_pred.float()
    x_t = noisy_latents.float()
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow_matching":
        if sigmas is None:
            raise ValueError("flow_matching needs the per-sample sigmas s of x_t = (1 - s) z0 + s eps")
        return x_t - _per_sample(sigmas, x_t) * pred
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if alphas_cumprod is None or timesteps is None:
        raise ValueError(f"{prediction_type} needs timesteps and the scheduler's alphas_cumprod")
    alpha, sigma = (_per_sample(v, x_t) for v in alpha_sigma(alphas_cumprod, timesteps))
    if prediction_type == "epsilon":
        return (x_t - sigma * pred) / alpha
    return alpha * x_t - sigma * pred


def snr(*, timesteps: Tensor | None = None, alphas_cumprod: Tensor | None = None,
        sigmas: Tensor | None = None) -> Tensor:
    """Signal-to-noise ratio per sample: a_t / (1 - a_t) for DDPM, ((1 - s) / s)^2 for flow matching."""
    if sigmas is not None:
        s = sigmas.float()
        return ((1.0 - s) / s) ** 2
    if alphas_cumprod is None or timesteps is None:
        raise ValueError("snr needs either sigmas or timesteps with alphas_cumprod")
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    return (alpha / sigma) ** 2


def min_snr_weight(snr_values: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al., 2023) for the given prediction type."""
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type in ("v_prediction", "flow_matching"):
        return clipped / (snr_values + 1.0)
    return clipped
