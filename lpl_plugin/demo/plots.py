"""The demo's pictures: loss curves of both runs and labeled grids of decoded samples (matplotlib without pyplot)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from torch import Tensor

COLORS = {"lpl": "tab:orange", "baseline": "tab:blue"}
STYLES = {"lpl": "-", "baseline": "--"}
PANELS = (("diffusion", "diffusion loss (MSE)"), ("lpl_term", "LPL term added to the loss"),
          ("applied_fraction", "fraction of samples with LPL"))


def smooth(values: Sequence[float], span: int) -> np.ndarray:
    """Exponential moving average with the given span, bias-corrected, for readable noisy curves."""
    alpha = 2.0 / (span + 1)
    out, mean, weight = np.empty(len(values)), 0.0, 0.0
    for i, v in enumerate(values):
        mean = (1 - alpha) * mean + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = mean / weight
    return out


def plot_losses(histories: Mapping[str, list[dict]], path: Path, title: str) -> None:
    """One panel per quantity (diffusion loss, LPL term, applied fraction), a faint raw and a smoothed curve per run."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 8), dpi=110, layout="constrained")
    axes = figure.subplots(len(PANELS), 1, sharex=True)
    for ax, (key, label) in zip(axes, PANELS):
        for name, history in histories.items():
            if not history:
                continue
            steps = [row["step"] for row in history]
            values = [row[key] for row in history]
            color, style = COLORS.get(name), STYLES.get(name, "-")
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.7)
            span = max(3, len(values) // 15)
            ax.plot(steps, smooth(values, span), color=color, linestyle=style, linewidth=1.6,
                    label=f"{name} (EMA over {span} steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "diffusion":
            ax.set_yscale("log")
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("optimizer step")
    figure.suptitle(title)
    figure.savefig(path)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [0, 1] as (N, H, W, 3) bytes."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def save_grid(images: Tensor, path: Path, columns: int = 4, scale: int = 2) -> None:
    """Images in [0, 1] tiled into one PNG with a 2-pixel gap, enlarged `scale` times (nearest neighbour)."""
    from PIL import Image

    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    gap = 2
    canvas = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(pixels):
        r, c = divmod(i, columns)
        canvas[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = tile
    image = Image.fromarray(canvas)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def sample_figure(rows: Mapping[str, Tensor], captions: Sequence[str], path: Path, title: str) -> None:
    """A labeled table of images: one row per label (data, before, after ...), one column per caption."""
    from matplotlib.figure import Figure

    columns = len(captions)
    figure = Figure(figsize=(1.3 * columns + 1.4, 1.45 * len(rows) + 0.6), dpi=110, layout="constrained")
    axes = np.asarray(figure.subplots(len(rows), columns, squeeze=False))
    for r, (label, images) in enumerate(rows.items()):
        for c, tile in enumerate(to_uint8(images[:columns])):
            ax = axes[r, c]
            ax.imshow(tile, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(captions[c].removeprefix("a ").replace(" on a ", "\n"), fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path)
