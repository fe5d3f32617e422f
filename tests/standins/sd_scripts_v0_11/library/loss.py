"""Stand-in of the v0.11 library/loss.py (upstream PR #2343): the loss helpers moved out of train_util (tests only)."""

from typing import Optional, Tuple

import torch

import standin_host as host


def get_timesteps(min_timestep: int, max_timestep: int, b_size: int, device: torch.device) -> torch.Tensor:
    raise NotImplementedError("the stand-in samples timesteps in get_noise_noisy_latents_and_timesteps")


def get_noise_noisy_latents_and_timesteps(
    args, noise_scheduler, latents: torch.FloatTensor
) -> Tuple[torch.FloatTensor, torch.FloatTensor, torch.IntTensor]:
    return host.noise_and_timesteps(args, noise_scheduler, latents)


def get_huber_threshold_if_needed(args, timesteps: torch.Tensor, noise_scheduler) -> Optional[torch.Tensor]:
    return host.huber_threshold(args, timesteps)


def conditional_loss(
    model_pred: torch.Tensor, target: torch.Tensor, loss_type: str, reduction: str, huber_c: Optional[torch.Tensor] = None
):
    return host.elementwise_loss(model_pred, target, loss_type, reduction, huber_c)


def reduce_per_sample_loss(loss: torch.Tensor, weighting: Optional[torch.Tensor] = None,
                           loss_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    if weighting is not None:
        loss = loss * weighting.reshape(loss.shape[0], *([1] * (loss.dim() - 1)))
    loss = loss.mean(dim=tuple(range(1, loss.dim())))
    return loss if loss_weights is None else loss * loss_weights
