"""Stand-in of sd-scripts v0.9.1 library/train_util.py: the real signatures lpl-plugin binds to, tiny bodies."""

import argparse
from typing import Optional

import torch

import standin_host as host
from standin_host import prepare_accelerator, prepare_dtype  # noqa: F401  (host functions with these signatures)


def get_timesteps_and_huber_c(args, min_timestep, max_timestep, noise_scheduler, b_size, device):
    raise NotImplementedError("the stand-in samples timesteps in get_noise_noisy_latents_and_timesteps")


def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
    noise, noisy_latents, timesteps = host.noise_and_timesteps(args, noise_scheduler, latents)
    return noise, noisy_latents, timesteps, host.huber_threshold(args, timesteps)


def conditional_loss(
    model_pred: torch.Tensor, target: torch.Tensor, reduction: str, loss_type: str, huber_c: Optional[torch.Tensor]
):
    return host.elementwise_loss(model_pred, target, loss_type, reduction, huber_c)


def read_config_from_file(args: argparse.Namespace, parser: argparse.ArgumentParser):
    return host.read_config(args, parser)


def get_sai_model_spec(state_dict: dict, args: argparse.Namespace, sdxl: bool, lora: bool, textual_inversion: bool,
                       is_stable_diffusion_ckpt: Optional[bool] = None):
    return host.model_spec(args)


def add_training_arguments(parser: argparse.ArgumentParser, support_dreambooth: bool):
    host.add_common_arguments(parser)


def sample_images_common(pipe_class, accelerator, args: argparse.Namespace, epoch, steps, device, vae, tokenizer,
                         text_encoder, unet_wrapped, prompt_replacement=None, controlnet=None):
    return host.sample_images_common(pipe_class, accelerator, args, epoch, steps, device, vae, tokenizer,
                                     text_encoder, unet_wrapped, prompt_replacement, controlnet)
