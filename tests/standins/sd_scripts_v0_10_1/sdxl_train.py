"""Stand-in of sd-scripts v0.10.1 sdxl_train.py: the full fine-tune's inline loss code (tests only)."""

import argparse

import torch

import library.train_util as train_util
import standin_host as host
from library import sdxl_model_util, sdxl_train_util
from library.custom_train_functions import (
    add_v_prediction_like_loss,
    apply_debiased_estimation,
    apply_masked_loss,
    apply_snr_weight,
    scale_v_prediction_loss_like_noise_prediction,
)


def train(args):
    def load(args, accelerator, weight_dtype):
        _, _, _, vae, unet, _, _ = sdxl_train_util.load_target_model(args, accelerator, "sdxl", weight_dtype)
        return vae, unet

    def loss_fn(batch, unet, vae, noise_scheduler, accelerator, weight_dtype, is_train):
        latents = batch["latents"].to(accelerator.device, dtype=weight_dtype) * sdxl_model_util.VAE_SCALE_FACTOR
        noise, noisy_latents, timesteps = train_util.get_noise_noisy_latents_and_timesteps(args, noise_scheduler,
                                                                                           latents)
        noisy_latents = noisy_latents.to(weight_dtype)
        with torch.set_grad_enabled(is_train), accelerator.autocast():
            noise_pred = unet(noisy_latents, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise
        huber_c = train_util.get_huber_threshold_if_needed(args, timesteps, noise_scheduler)
        if (args.min_snr_gamma or args.scale_v_pred_loss_like_noise_pred or args.v_pred_like_loss
                or args.debiased_estimation_loss or args.masked_loss):
            loss = train_util.conditional_loss(noise_pred.float(), target.float(), args.loss_type, "none", huber_c)
            if args.masked_loss or ("alpha_masks" in batch and batch["alpha_masks"] is not None):
                loss = apply_masked_loss(loss, batch)
            loss = loss.mean([1, 2, 3])
            if args.min_snr_gamma:
                loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, args.v_parameterization)
            if args.scale_v_pred_loss_like_noise_pred:
                loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler)
            if args.v_pred_like_loss:
                loss = add_v_prediction_like_loss(loss, timesteps, noise_scheduler, args.v_pred_like_loss)
            if args.debiased_estimation_loss:
                loss = apply_debiased_estimation(loss, timesteps, noise_scheduler, args.v_parameterization)
            return loss.mean()
        return train_util.conditional_loss(noise_pred.float(), target.float(), args.loss_type, "mean", huber_c)

    host.train(args, load=load, loss_fn=loss_fn, step_logs=None, lora=False)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    train_util.add_training_arguments(parser, False)
    sdxl_train_util.add_sdxl_training_arguments(parser)
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    args = train_util.read_config_from_file(args, parser)
    train(args)
