"""Stand-in of sd-scripts v0.10.1 sdxl_train.py: the full fine-tune's inline loss code (tests only)."""

import argparse

import library.train_util as train_util
import standin_host as host
from library import sdxl_model_util, sdxl_train_util


def train(args):
    def load(args, accelerator, weight_dtype):
        _, _, _, vae, unet, _, _ = sdxl_train_util.load_target_model(args, accelerator, "sdxl", weight_dtype)
        return vae, unet

    def loss_fn(batch, unet, vae, noise_scheduler, accelerator, weight_dtype, is_train):
        latents = batch["latents"].to(accelerator.device, dtype=weight_dtype) * sdxl_model_util.VAE_SCALE_FACTOR
        noise, noisy_latents, timesteps = train_util.get_noise_noisy_latents_and_timesteps(args, noise_scheduler,
                                                                                           latents)
        noise_pred = host.unet_output(unet, noisy_latents, timesteps, accelerator, weight_dtype, is_train)
        target = host.training_target(args, noise_scheduler, latents, noise, timesteps)
        huber_c = train_util.get_huber_threshold_if_needed(args, timesteps, noise_scheduler)
        if host.wants_per_sample_loss(args):
            loss = train_util.conditional_loss(noise_pred.float(), target.float(), args.loss_type, "none", huber_c)
            loss = host.per_sample(loss, batch, args)
            return host.noise_level_weights(loss, args, timesteps, noise_scheduler).mean()
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
