"""Stand-in of the v0.11 library/train_util.py: re-exports of the moved helpers plus what stayed (tests only)."""

import argparse
from typing import Optional

from library.args import add_training_arguments, read_config_from_file  # noqa: F401  (re-export shims)
from library.loss import (  # noqa: F401  (re-export shims)
    conditional_loss,
    get_huber_threshold_if_needed,
    get_noise_noisy_latents_and_timesteps,
    get_timesteps,
)

import standin_host as host
from standin_host import prepare_accelerator, prepare_dtype  # noqa: F401  (host functions with these signatures)


def get_sai_model_spec(state_dict: dict, args: argparse.Namespace, sdxl: bool, lora: bool, textual_inversion: bool,
                       is_stable_diffusion_ckpt: Optional[bool] = None, sd3: str = None, flux: str = None,
                       lumina: str = None, optional_metadata: dict = None):
    return host.model_spec(args)


def sample_images_common(pipe_class, accelerator, args: argparse.Namespace, epoch, steps, device, vae, tokenizer,
                         text_encoder, unet_wrapped, prompt_replacement=None, controlnet=None):
    return host.sample_images_common(pipe_class, accelerator, args, epoch, steps, device, vae, tokenizer,
                                     text_encoder, unet_wrapped, prompt_replacement, controlnet)
