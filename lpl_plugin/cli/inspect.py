"""`lpl-plugin inspect`: per decoder layer LPL compares, the target's feature energy and what outlier removal drops."""

from __future__ import annotations

import argparse
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lpl_plugin.settings.values import bounded_int
from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import FileError, UserError
from lpl_plugin.settings.files import check_output, open_image, write_bytes
from lpl_plugin.settings.messages import show_path

if TYPE_CHECKING:  # torch is imported when the command runs, after its arguments and files are checked
    from torch import Tensor, nn

MAX_SIDE = 2048
# Picture formats matplotlib writes, by extension.
OUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


@dataclass
class LayerView:
    """One compared feature map of the target: its per-pixel energy and the share of its channels masked."""

    name: str
    channels: int
    energy: Tensor         # (H, W) channel L2 norm at each pixel
    dropped: Tensor        # (H, W) fraction of channels masked as outliers at each pixel
    masked: bool           # whether LPL masks this layer at all

    @property
    def dropped_percent(self) -> float:
        """Share of all values of the map that outlier removal drops, in percent."""
        return 100.0 * float(self.dropped.mean())


def load_vae(spec: str) -> tuple[nn.Module, str]:
    """`tiny` (the tiny SDXL-layout VAE, random weights) or a local diffusers VAE folder (safetensors only, via
    vae_io)."""
    if spec == "tiny":
        from lpl_plugin.demo.autoencoder import build_vae

        return build_vae(seed=0), "tiny SDXL-layout VAE (random weights)"
    from lpl_plugin.settings.vae_io import load_vae as load_local_vae

    return load_local_vae(spec).requires_grad_(False), show_path(spec)


def read_picture(path: str, resolution: int | None):
    """An RGB PIL image, read through the safe reader (size checked before decoding), its shorter side resized to
    `resolution` if given and center-cropped to multiples of 8; needs no torch."""
    from PIL import Image

    try:
        image = open_image(path).convert("RGB")
    except FileError as error:
        raise FileError(f"--image {error.path}", error.reason) from None
    if resolution is not None:
        scale = resolution / min(image.size)
        image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))),
                             Image.BICUBIC)
    shown = f"--image {show_path(path)}"
    if max(image.size) > MAX_SIDE:
        raise UserError(f"{shown}: {image.width}x{image.height} is larger than {MAX_SIDE} px; pass "
                        "--resolution to resize it")
    width, height = image.width // 8 * 8, image.height // 8 * 8
    if width < 8 or height < 8:
        raise UserError(f"{shown}: {image.width}x{image.height} is too small (at least 8x8 px)")
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(image) -> "Tensor":
    """An RGB PIL image as (1, 3, H, W) in [-1, 1]."""
    import torch

    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    return pixels.permute(2, 0, 1)[None].float() / 127.5 - 1


def load_image(path: str, resolution: int | None) -> "Tensor":
    """An image file as (1, 3, H, W) in [-1, 1] (read_picture, then to_tensor)."""
    return to_tensor(read_picture(path, resolution))


def layer_views(vae: "nn.Module", image: "Tensor", config: LPLConfig,
                device: str = "cpu") -> tuple[list[LayerView], "Tensor"]:
    """The target features LPL would compare for this image, each with its energy and outlier mask.

    Uses the engine itself (LatentPerceptualLoss.target_features and prepare_targets), so the masks are the ones
    applied in training with each layer's factor from `outlier_factors`. Also returns the VAE's reconstruction.
    """
    import torch

    from lpl_plugin.engine.perceptual_loss import LatentPerceptualLoss
    from lpl_plugin.engine.norms import channel_norm

    with torch.no_grad():
        engine = LatentPerceptualLoss(vae, config, device=device)
        vae = vae.to(device)
        latents = vae.encode(image.to(device, next(vae.parameters()).dtype)).latent_dist.mean.float()
        scaled = (latents - engine.shift_factor) * engine.scaling_factor
        features = engine.target_features(scaled)
        views = []
        for name, raw, (_, mask), factor in zip(engine.trunk.stage_names, features,
                                                engine.prepare_targets(features), engine.outlier_factors):
            energy = channel_norm(raw.float())[0, 0].cpu()
            dropped = (1 - mask.float().mean(dim=1))[0].cpu() if mask is not None else torch.zeros_like(energy)
            views.append(LayerView(name, raw.shape[1], energy, dropped, factor is not None))
        reconstruction = vae.decode(latents.to(next(vae.parameters()).dtype)).sample.float().cpu()
    return views, reconstruction


def render(views: list[LayerView], image: "Tensor", reconstruction: "Tensor", path: Path, title: str) -> None:
    """A picture (format by extension): input and reconstruction, then per layer its energy map (top) and
    dropped-outlier map (bottom); written whole or not at all."""
    from matplotlib.figure import Figure

    columns = len(views) + 1
    figure = Figure(figsize=(2.6 * columns, 5.6), dpi=110, layout="constrained")
    axes = figure.subplots(2, columns, squeeze=False)
    for ax, picture, label in ((axes[0, 0], image, "input"), (axes[1, 0], reconstruction, "VAE reconstruction")):
        ax.imshow(((picture[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        ax.set_title(label, fontsize=9)
    for i, view in enumerate(views, start=1):
        height, width = view.energy.shape
        shown = axes[0, i].imshow(view.energy.numpy(), cmap="magma")
        figure.colorbar(shown, ax=axes[0, i], shrink=0.7)
        axes[0, i].set_title(f"{view.name}: {view.channels} ch @ {height}x{width}\nenergy |y| per pixel", fontsize=9)
        shown = axes[1, i].imshow(view.dropped.numpy(), cmap="viridis", vmin=0,
                                  vmax=max(0.05, float(view.dropped.max())))
        figure.colorbar(shown, ax=axes[1, i], shrink=0.7)
        what = f"outliers dropped: {view.dropped_percent:.2f} %" if view.masked else "not masked"
        axes[1, i].set_title(f"{view.name}: {what}\nshare of channels masked", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lower().lstrip("."))
    write_bytes(path, buffer.getvalue())


def _inspect(args: argparse.Namespace) -> int:
    """Write the picture and print one line per layer; every argument and file is checked before any work."""
    config = LPLConfig(use_lpl=True)
    if args.config is not None:
        from lpl_plugin.settings.toml_io import load_config

        config = load_config(args.config)
    out = check_output(args.out, OUT_SUFFIXES)
    if args.vae != "tiny":
        from lpl_plugin.settings.vae_io import vae_folder

        vae_folder(args.vae)  # every file diffusers would open, checked before torch is imported
    picture = read_picture(args.image, args.resolution)  # size and format, before torch and the VAE load
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu")
    vae, vae_name = load_vae(args.vae)
    image = to_tensor(picture)
    try:
        views, reconstruction = layer_views(vae, image, config, args.device)
    except UserError:
        raise
    except ValueError as error:  # e.g. lpl_num_blocks beyond this VAE's up blocks
        raise UserError(f"--vae {show_path(args.vae)}: {error}") from None
    title = (f"What LPL compares: {vae_name}, {show_path(Path(args.image).name)} at {image.shape[3]}x"
             f"{image.shape[2]}, lpl_num_blocks = {config.lpl_num_blocks}, lpl_remove_outliers = "
             f"{str(config.lpl_remove_outliers).lower()}").replace("$", "\\$")  # no mathtext from file names
    render(views, image, reconstruction, out, title)
    for view in views:
        mask = f"{view.dropped_percent:.2f} % of values dropped as outliers" if view.masked else "not masked"
        energy = float(view.energy.mean())
        print(f"{view.name}: {view.channels} ch @ {view.energy.shape[1]}x{view.energy.shape[0]}, mean energy "
              f"{energy:.4g}{'' if math.isfinite(energy) else ' (not finite!)'}, {mask}")
    print(f"wrote {show_path(out)}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register inspect."""
    p = subparsers.add_parser("inspect", help="picture the decoder features LPL compares and the outliers it drops",
                              description="Encode an image with a VAE and write a PNG with, for every decoder layer "
                                          "LPL uses, the target's feature energy (per-pixel channel L2 norm) and the "
                                          "outlier mask that lpl_remove_outliers applies.")
    p.add_argument("--vae", required=True, help="`tiny` (built in, random weights), or a local diffusers VAE folder "
                                                "such as lpl-demo/vae or an SDXL model's vae/ folder (safetensors)")
    p.add_argument("--image", required=True, help="an image file (PNG, JPEG, ...)")
    p.add_argument("--out", default="lpl-inspect.png", help="the picture to write: .png, .jpg, .pdf or .svg "
                                                            "(default: lpl-inspect.png)")
    p.add_argument("--resolution", type=bounded_int(8, MAX_SIDE),
                   help=f"resize the image's shorter side to this many pixels first (8 to {MAX_SIDE})")
    p.add_argument("--config", help="a TOML with lpl_* keys (default: the recommended settings)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run the VAE (default: cpu)")
    p.set_defaults(func=_inspect)
