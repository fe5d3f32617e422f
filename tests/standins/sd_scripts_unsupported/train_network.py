"""Stand-in of a future sd-scripts release train_network.py: NetworkTrainer (tests only)."""

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
                           optimizer=None, keys_scaled=None, mean_norm=None, maximum_norm=None, mean_grad_norm=None,
                           mean_combined_norm=None):
        return {"loss/current": current_loss, "loss/average": avr_loss, "lr/unet": lr_scheduler.get_last_lr()[0]}

    def post_process_loss(self, loss, args, timesteps: torch.IntTensor, noise_scheduler) -> torch.FloatTensor:
        if args.min_snr_gamma:
            loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, args.v_parameterization)
        if args.scale_v_pred_loss_like_noise_pred:
            loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler)
        if args.v_pred_like_loss:
            loss = add_v_prediction_like_loss(loss, timesteps, noise_scheduler, args.v_pred_like_loss)
        if args.debiased_estimation_loss:
            loss = apply_debiased_estimation(loss, timesteps, noise_scheduler, args.v_parameterization)
        return loss

    def get_sai_model_spec(self, args):
        return train_util.get_sai_model_spec(None, args, self.is_sdxl, True, False)

    def update_metadata(self, metadata, args):
        pass

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True) -> torch.Tensor:
        with torch.no_grad():
            latents = batch["latents"].to(accelerator.device) * self.vae_scale_factor
        noise, noisy_latents, timesteps = train_util.get_noise_noisy_latents_and_timesteps(args, noise_scheduler,
                                                                                           latents)
        with torch.set_grad_enabled(is_train), accelerator.autocast():
            noise_pred = unet(noisy_latents.to(weight_dtype), timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise
        huber_c = train_util.get_huber_threshold_if_needed(args, timesteps, noise_scheduler)
        loss = train_util.conditional_loss(noise_pred.float(), target.float(), args.loss_type, "none", huber_c)
        if args.masked_loss or ("alpha_masks" in batch and batch["alpha_masks"] is not None):
            loss = apply_masked_loss(loss, batch)
        loss = loss.mean(dim=list(range(1, loss.ndim)))
        loss = loss * batch["loss_weights"]
        loss = self.post_process_loss(loss, args, timesteps, noise_scheduler)
        return loss.mean()

    def train(self, args):
        def loss_fn(batch, unet, vae, scheduler, accelerator, weight_dtype, is_train):
            return self.process_batch(batch, [], unet, None, vae, scheduler, None, weight_dtype, accelerator, args,
                                      None, None, is_train=is_train)

        def load(args, accelerator, weight_dtype):
            _, _, vae, unet = self.load_target_model(args, weight_dtype, accelerator)
            return vae, unet

        host.train(args, load=load, loss_fn=loss_fn, step_logs=self.generate_step_logs, lora=True)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    train_util.add_training_arguments(parser, True)
    return parser
