"""Stand-in of sd-scripts v0.9.1 library/custom_train_functions.py: real signatures, tiny bodies (tests only)."""

import torch

import standin_host as host


def prepare_scheduler_for_custom_training(noise_scheduler, device):
    host.prepare_scheduler(noise_scheduler, device)


def apply_snr_weight(loss: torch.Tensor, timesteps: torch.IntTensor, noise_scheduler, gamma, v_prediction=False):
    return host.min_snr(loss, timesteps, noise_scheduler, gamma, v_prediction)


def scale_v_prediction_loss_like_noise_prediction(loss: torch.Tensor, timesteps: torch.IntTensor, noise_scheduler):
    return loss * host.v_scale(timesteps, noise_scheduler)


def add_v_prediction_like_loss(loss: torch.Tensor, timesteps: torch.IntTensor, noise_scheduler, v_pred_like_loss):
    return loss + loss / host.v_scale(timesteps, noise_scheduler) * v_pred_like_loss


def apply_debiased_estimation(loss: torch.Tensor, timesteps: torch.IntTensor, noise_scheduler, v_prediction=False):
    return host.debiased(loss, timesteps, noise_scheduler, v_prediction)


def apply_masked_loss(loss, batch) -> torch.FloatTensor:
    return host.masked(loss, batch)
