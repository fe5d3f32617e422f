"""The demo's noise schedule and sampler: SDXL's training schedule, and a few deterministic DDIM steps from fixed noise."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lpl_plugin.demo.data import Conditioning, generator

# SDXL's training noise schedule (scaled-linear betas over 1000 steps).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SAMPLE_STEPS = 20


def training_scheduler():
    """The DDPM scheduler the demo trains with (epsilon prediction), as sd-scripts builds it for SDXL."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, clip_sample=False, prediction_type="epsilon")


@torch.no_grad()
def sample(unet: nn.Module, conditioning: Conditioning, latent_shape: tuple[int, int, int], *, seed: int,
           steps: int = SAMPLE_STEPS) -> Tensor:
    """Trainer-scaled latents for every caption of `conditioning`, by DDIM (eta 0) from noise fixed by `seed`.

    Uses `trailing` timestep spacing, so the first step starts at t = 999 like the noise the model was trained on.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    count = conditioning.text.shape[0]
    rows = torch.arange(count)
    text, added = conditioning.select(rows, device)
    latents = torch.randn((count, *latent_shape), generator=generator(seed, 6)).to(device)
    was_training = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        timestep = torch.full((count,), int(t), device=device, dtype=torch.long)
        pred = unet(latents.to(dtype), timestep, text.to(dtype),
                    added_cond_kwargs={k: v.to(dtype) for k, v in added.items()}).sample
        latents = scheduler.step(pred.float(), t, latents).prev_sample
    unet.train(was_training)
    return latents.float().cpu()
