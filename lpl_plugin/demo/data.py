"""The demo's data: shapes on gradients drawn in code, their captions, a fixed caption encoder and per-step batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lpl_plugin.engine.tiny import TINY_POOLED_DIM, TINY_TEXT_DIM, sdxl_conditioning

COLORS = {"red": (0.90, 0.15, 0.10), "green": (0.15, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
          "yellow": (0.95, 0.85, 0.10), "white": (0.97, 0.97, 0.97), "purple": (0.60, 0.20, 0.80)}
BACKGROUNDS = {"dark": ((0.02, 0.02, 0.06), (0.22, 0.22, 0.32)), "sunset": ((0.95, 0.55, 0.15), (0.35, 0.05, 0.35)),
               "sky": ((0.55, 0.80, 1.00), (0.10, 0.25, 0.60)), "grass": ((0.75, 0.90, 0.45), (0.10, 0.35, 0.10))}
SHAPES = ("circle", "square", "triangle")
TOKENS = 8
EDGE_PIXELS = 0.6


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from several integers (seed, step, rank, ...) without collisions."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass(frozen=True)
class Scene:
    """One generated image: a colored shape over a two-color linear gradient."""

    shape: str
    color: str
    background: str
    center: tuple[float, float]
    size: float
    angle: float

    @property
    def caption(self) -> str:
        """The image's caption."""
        return f"a {self.color} {self.shape} on a {self.background} gradient"


def make_scenes(count: int, seed: int) -> list[Scene]:
    """`count` scenes cycling through every shape, color and background, placed at random."""
    g = generator(seed, 1)
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    scenes = []
    for i in range(count):
        u = torch.rand(4, generator=g).tolist()
        scenes.append(Scene(SHAPES[i % len(SHAPES)], colors[(i // len(SHAPES)) % len(colors)],
                            backgrounds[(i // 2) % len(backgrounds)], (0.3 + 0.4 * u[0], 0.3 + 0.4 * u[1]),
                            0.16 + 0.12 * u[2], 2 * math.pi * u[3]))
    return scenes


def _signed_distance(scene: Scene, x: Tensor, y: Tensor) -> Tensor:
    """Distance to the shape's edge in image units (negative inside)."""
    dx, dy = x - scene.center[0], y - scene.center[1]
    if scene.shape == "circle":
        return torch.sqrt(dx ** 2 + dy ** 2) - scene.size
    if scene.shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.8 * scene.size
    normals = [(math.sin(a), math.cos(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]  # apex up
    return torch.stack([nx * dx + ny * dy for nx, ny in normals]).amax(0) - 0.5 * scene.size


def draw(scenes: list[Scene], resolution: int) -> Tensor:
    """The scenes as an (N, 3, R, R) float tensor in [-1, 1], edges anti-aliased."""
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    images = []
    for s in scenes:
        low, high = (torch.tensor(c)[:, None, None] for c in BACKGROUNDS[s.background])
        ramp = ((x - 0.5) * math.cos(s.angle) + (y - 0.5) * math.sin(s.angle)) / math.sqrt(0.5) + 0.5
        image = low + (high - low) * ramp.clamp(0, 1)
        alpha = torch.sigmoid(-_signed_distance(s, x, y) * resolution / EDGE_PIXELS)
        image = image * (1 - alpha) + torch.tensor(COLORS[s.color])[:, None, None] * alpha
        images.append(image)
    return torch.stack(images) * 2 - 1


def vocabulary() -> list[str]:
    """Every word a caption can hold, padding first."""
    words = {"a", "on", "gradient", *COLORS, *SHAPES, *BACKGROUNDS}
    return ["<pad>", *sorted(words)]


class CaptionEncoder:
    """A frozen stand-in for SDXL's text encoders: word plus position embeddings and a mean-pooled vector."""

    def __init__(self, seed: int = 0):
        g = generator(seed, 2)
        self.index = {w: i for i, w in enumerate(vocabulary())}
        self.words = torch.randn(len(self.index), TINY_TEXT_DIM, generator=g)
        self.positions = 0.3 * torch.randn(TOKENS, TINY_TEXT_DIM, generator=g)
        self.pool = torch.randn(TINY_TEXT_DIM, TINY_POOLED_DIM, generator=g) / math.sqrt(TINY_TEXT_DIM)

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token states (B, TOKENS, text dim) and pooled embeddings (B, pooled dim)."""
        ids = torch.zeros(len(captions), TOKENS, dtype=torch.long)
        for row, caption in enumerate(captions):
            tokens = [self.index[w] for w in caption.split()][:TOKENS]
            ids[row, :len(tokens)] = torch.tensor(tokens)
        used = (ids > 0).float()[..., None]
        states = (self.words[ids] + self.positions) * used
        pooled = (states.sum(1) / used.sum(1).clamp_min(1)) @ self.pool
        return states, pooled


@dataclass
class Conditioning:
    """SDXL's UNet conditioning for a set of captions: text states, pooled text and the six time ids."""

    text: Tensor
    pooled: Tensor
    time_ids: Tensor

    @classmethod
    def for_captions(cls, captions: list[str], resolution: int, encoder: CaptionEncoder) -> "Conditioning":
        """Encode captions; time ids say original = target = resolution, no crop."""
        text, pooled = encoder(captions)
        time_ids = sdxl_conditioning(len(captions), resolution)[1]["time_ids"]
        return cls(text, pooled, time_ids)

    def select(self, index: Tensor, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        """The UNet's `encoder_hidden_states` and `added_cond_kwargs` for some rows, on a device."""
        return (self.text[index].to(device), {"text_embeds": self.pooled[index].to(device),
                                              "time_ids": self.time_ids[index].to(device)})


def batch_indices(step: int, seed: int, count: int, batch_size: int, rank: int, world: int) -> Tensor:
    """The dataset rows of one rank at one step: a fresh permutation per epoch, each rank its own slice.

    A pure function of its arguments, so a resumed run draws exactly the batches an uninterrupted one would.
    """
    total = batch_size * world
    first = step * total + rank * batch_size
    positions = range(first, first + batch_size)
    epochs = {p // count: torch.randperm(count, generator=generator(seed, 3, p // count)) for p in positions}
    return torch.stack([epochs[p // count][p % count] for p in positions])


def batch_noise(shape: tuple[int, ...], step: int, seed: int, rank: int,
                num_train_timesteps: int) -> tuple[Tensor, Tensor]:
    """Noise and uniform timesteps of one rank at one step, again a pure function of (seed, step, rank)."""
    g = generator(seed, 4, step, rank)
    noise = torch.randn(shape, generator=g)
    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=g)
    return noise, timesteps
