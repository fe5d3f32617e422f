"""The demo's checkpoint measure, as `lpl-plugin compare` takes it: samples at fixed seeds, and PSNR/SSIM of the
decoded clean-latent estimates of the training images at fixed low noise levels with fixed noise seeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lpl_plugin.training.image_metrics import score_images
from lpl_plugin.training.diffusion import predict_z0
from lpl_plugin.demo.autoencoder import decode
from lpl_plugin.demo.data import Conditioning, generator
from lpl_plugin.demo.train import MetricsLog

# Timesteps of the measure (compare's default --noise-levels) and noise seeds per image and timestep.
NOISE_LEVELS = (50, 100, 150)
NOISE_SEEDS = (0, 1)
SCORES_FILE = "scores.jsonl"
SAMPLES = "samples"
BATCH = 64


def checkpoint_steps(steps: int, count: int = 3) -> list[int]:
    """The steps at which each run is sampled and scored: `count` evenly spaced ones ending at the last step."""
    return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def sample_path(run_dir: Path, step: int, prompt: int) -> Path:
    """Where a run's sample of one prompt at one checkpoint is saved."""
    return run_dir / SAMPLES / f"step-{step:06d}" / f"p{prompt}.png"


@dataclass
class MeasureInputs:
    """What every checkpoint of every run is measured on: the same images, conditioning, noise and prompts."""

    images: Tensor  # (N, 3, H, W) in [0, 1]
    latents: Tensor  # trainer-scaled latents of the images
    conditioning: Conditioning
    prompts: Conditioning  # the sample prompts' conditioning
    alphas_cumprod: Tensor
    seed: int

    @property
    def units(self) -> int:
        """Scores per metric and checkpoint: images × noise levels × noise seeds."""
        return len(self.images) * len(NOISE_LEVELS) * len(NOISE_SEEDS)


@torch.no_grad()
def score_unet(unet: nn.Module, vae: nn.Module, inputs: MeasureInputs) -> dict[str, list[float]]:
    """PSNR and SSIM per unit (image, then noise level, then noise seed) of the VAE decode of the UNet's clean-latent
    estimate against the real image."""
    device = next(unet.parameters()).device
    count = len(inputs.images)
    by_unit: dict[str, Tensor] = {}
    was_training = unet.training
    unet.eval()
    try:
        for level_index, level in enumerate(NOISE_LEVELS):
            for seed_index, noise_seed in enumerate(NOISE_SEEDS):
                noise = torch.randn(inputs.latents.shape, generator=generator(inputs.seed, 9, level, noise_seed))
                timesteps = torch.full((count,), level, dtype=torch.long)
                alpha = inputs.alphas_cumprod[level].float()
                noisy = alpha.sqrt() * inputs.latents + (1 - alpha).sqrt() * noise
                estimates = []
                for start in range(0, count, BATCH):
                    rows = torch.arange(start, min(count, start + BATCH))
                    text, added = inputs.conditioning.select(rows, device)
                    pred = unet(noisy[rows].to(device), timesteps[rows].to(device), text,
                                added_cond_kwargs=added).sample.float().cpu()
                    estimates.append(predict_z0(pred, noisy[rows], "epsilon", timesteps=timesteps[rows],
                                                alphas_cumprod=inputs.alphas_cumprod))
                scores = score_images(inputs.images, decode(vae, torch.cat(estimates)))
                for key, values in scores.items():
                    column = by_unit.setdefault(key, torch.empty(count, len(NOISE_LEVELS), len(NOISE_SEEDS)))
                    column[:, level_index, seed_index] = torch.tensor(values)
    finally:
        unet.train(was_training)
    return {key: values.flatten().tolist() for key, values in by_unit.items()}


class CheckpointMeasure:
    """Samples the prompts and scores the model at a run's checkpoints, writing both into the run's folder."""

    def __init__(self, run_dir: Path, vae: nn.Module, inputs: MeasureInputs, latent_shape: tuple[int, int, int],
                 enabled: bool):
        self.run_dir, self.vae, self.inputs, self.latent_shape = run_dir, vae, inputs, latent_shape
        self.enabled = enabled
        self.log: MetricsLog | None = None

    def open(self, start: int) -> None:
        """Keep the scores of checkpoints up to `start` (where a resumed run continues), drop any later ones."""
        self.log = MetricsLog(self.run_dir / SCORES_FILE, keep_until=start, enabled=self.enabled)

    def __call__(self, step: int, unet: nn.Module) -> None:
        """Sample and score the live model after `step`."""
        from lpl_plugin.demo.plots import save_grid
        from lpl_plugin.demo.sampling import sample

        images = decode(self.vae, sample(unet, self.inputs.prompts, self.latent_shape, seed=self.inputs.seed))
        for index, image in enumerate(images):
            path = sample_path(self.run_dir, step, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_grid(image[None], path, columns=1, scale=1)
        if self.log is None:
            raise RuntimeError("CheckpointMeasure.open() must come before the first checkpoint")
        self.log.add({"step": step, **score_unet(unet, self.vae, self.inputs)})

    def close(self) -> None:
        """Close the scores file."""
        if self.log is not None:
            self.log.close()


def read_scores(run_dir: Path, until: int) -> list[dict]:
    """A run's recorded checkpoint scores up to step `until`."""
    return MetricsLog(run_dir / SCORES_FILE, keep_until=until, enabled=False).rows
