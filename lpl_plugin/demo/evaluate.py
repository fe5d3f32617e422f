"""A fixed low-noise evaluation of a trained demo UNet: its diffusion loss, and the LPL distance of its z0 estimates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lpl_plugin.training.diffusion import predict_z0
from lpl_plugin.engine.perceptual_loss import LatentPerceptualLoss
from lpl_plugin.demo.data import Conditioning, generator


@torch.no_grad()
def evaluate(unet: nn.Module, latents: torch.Tensor, conditioning: Conditioning, engine: LatentPerceptualLoss,
             alphas_cumprod: torch.Tensor, t_threshold: int, seed: int) -> dict[str, float]:
    """Mean diffusion MSE and mean LPL distance over fixed samples, noise and timesteps spread below t_threshold.

    The same inputs for every run, so the numbers compare the runs where LPL acts (high SNR).
    """
    device = next(unet.parameters()).device
    count = latents.shape[0]
    g = generator(seed, 7)
    timesteps = torch.linspace(0, t_threshold - 1, count).round().long()
    noise = torch.randn(latents.shape, generator=g)
    alpha = alphas_cumprod[timesteps].float().sqrt().view(-1, 1, 1, 1)
    sigma = (1 - alphas_cumprod[timesteps].float()).sqrt().view(-1, 1, 1, 1)
    noisy = alpha * latents + sigma * noise
    text, added = conditioning.select(torch.arange(count), device)
    was_training = unet.training
    unet.eval()
    pred = unet(noisy.to(device), timesteps.to(device), text, added_cond_kwargs=added).sample.float().cpu()
    unet.train(was_training)
    z0_hat = predict_z0(pred, noisy, "epsilon", timesteps=timesteps, alphas_cumprod=alphas_cumprod)
    distance = engine(z0_hat.to(engine.device), latents.to(engine.device)).per_sample
    return {"diffusion_loss": float(F.mse_loss(pred, noise)), "lpl_distance": float(distance.mean()),
            "z0_mse": float(F.mse_loss(z0_hat, latents)), "timesteps_below": t_threshold}
