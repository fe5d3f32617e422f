"""Stand-in of sd-scripts v0.9.1 train_network.py: the loss code inline in NetworkTrainer.train (tests only)."""

import argparse

import torch

import library.train_util as train_util
import standin_host as host
from library.custom_train_functions import (
    add_v_prediction_like_loss,
    apply_debiased_estimation,
    apply_masked_loss,
    apply_snr_weight,
    scale_v_prediction_loss_like_noise_prediction,
)


class NetworkTrainer:
    def __init__(self):
        self.vae_scale_factor = 0.18215
        self.is_sdxl = False

    def generate_step_logs(self, args: argparse.Namespace, current_loss, avr_loss, lr_scheduler, lr_descriptions,
                           keys_scaled=None, mean_norm=None, maximum_norm=None):
        return {"loss/current": current_loss, "loss/average": avr_loss, "lr/unet": lr_scheduler.get_last_lr()[0]}

    def train(self, args):
        def loss_fn(batch, unet, vae, noise_scheduler, accelerator, weight_dtype, is_train):
            latents = batch["latents"].to(accelerator.device, dtype=weight_dtype) * self.vae_scale_factor
            noise, noisy_latents, timesteps, huber_c = train_util.get_noise_noisy_latents_and_timesteps(
                args, noise_scheduler, latents)
            with torch.set_grad_enabled(is_train), accelerator.autocast():
                noise_pred = unet(noisy_latents.to(weight_dtype), timesteps)
            target = noise_scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise
            loss = train_util.conditional_loss(noise_pred.float(), target.float(), reduction="none",
                                               loss_type=args.loss_type, huber_c=huber_c)
            if args.masked_loss or ("alpha_masks" in batch and batch["alpha_masks"] is not None):
                loss = apply_masked_loss(loss, batch)
            loss = loss.mean([1, 2, 3])
            loss = loss * batch["loss_weights"]
            if args.min_snr_gamma:
                loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, args.v_parameterization)
            if args.scale_v_pred_loss_like_noise_pred:
                loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler)
            if args.v_pred_like_loss:
                loss = add_v_prediction_like_loss(loss, timesteps, noise_scheduler, args.v_pred_like_loss)
            if args.debiased_estimation_loss:
                loss = apply_debiased_estimation(loss, timesteps, noise_scheduler, args.v_parameterization)
            return loss.mean()

        def load(args, accelerator, weight_dtype):
            _, _, vae, unet = self.load_target_model(args, weight_dtype, accelerator)
            return vae, unet

        host.train(args, load=load, loss_fn=loss_fn, step_logs=self.generate_step_logs, lora=True)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    train_util.add_training_arguments(parser, True)
    return parser
