"""Stand-in of sd-scripts v0.9.1 train_network.py: the loss code inline in NetworkTrainer.train (tests only)."""

import argparse

import library.train_util as train_util
import standin_host as host


class NetworkTrainer(host.NetworkTrainerBase):
    def generate_step_logs(self, args: argparse.Namespace, current_loss, avr_loss, lr_scheduler, lr_descriptions,
                           keys_scaled=None, mean_norm=None, maximum_norm=None):
        return host.step_logs(current_loss, avr_loss, lr_scheduler)

    def train(self, args):
        def loss_fn(batch, unet, vae, noise_scheduler, accelerator, weight_dtype, is_train):
            latents = batch["latents"].to(accelerator.device, dtype=weight_dtype) * self.vae_scale_factor
            noise, noisy_latents, timesteps, huber_c = train_util.get_noise_noisy_latents_and_timesteps(
                args, noise_scheduler, latents)
            noise_pred = host.unet_output(unet, noisy_latents, timesteps, accelerator, weight_dtype, is_train)
            target = host.training_target(args, noise_scheduler, latents, noise, timesteps)
            loss = train_util.conditional_loss(noise_pred.float(), target.float(), reduction="none",
                                               loss_type=args.loss_type, huber_c=huber_c)
            loss = host.per_sample(loss, batch, args) * batch["loss_weights"]
            return host.noise_level_weights(loss, args, timesteps, noise_scheduler).mean()

        host.train_lora(self, args, loss_fn)


def setup_parser() -> argparse.ArgumentParser:
    return host.network_parser(train_util)
