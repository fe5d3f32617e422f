"""Expected peak memory of one lean LPL call, from the decoder's layout alone (`lpl-plugin estimate` prints it).

The estimate replays the lean path (lean.py) map by map: target and prediction run stage by stage, each stage keeps
what its backward needs (frozen.py: a ResNet block keeps its input and its first convolution's output, or only its
input when recomputed), each layer leaves one gradient map behind, and one backward through the kept graph ends
the chunk. Scratch space per step is counted in whole feature maps, as measured on the CPU; on GPUs the caching
allocator rounds up and keeps freed blocks, so leave some headroom above the figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from lpl_plugin.settings.errors import UserError

GIB = 2 ** 30
# Largest image side and batch estimated (beyond any SDXL training run; the figures are exact integers anyway).
MAX_RESOLUTION = 16384
MAX_BATCH = 4096
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Bytes per element, measured on the CPU: a stored outlier mask; the scratch of taking one layer's gradient on a
# channel slice (float32 work, the mask pass, widening of half-precision maps), by item size and masking.
MASK = 1
LAYER_WORK = {(4, False): 4, (4, True): 5, (2, False): 6, (2, True): 8}


@dataclass(frozen=True)
class Unit:
    """One step of a decoder stage: a ResNet block, an attention layer or an upsampler (channels and map size)."""

    kind: str
    in_channels: int
    out_channels: int
    height: int
    width: int

    def maps(self, batch: int, itemsize: int) -> tuple[int, int]:
        """Bytes of the unit's input map and of its output map."""
        scale = 2 if self.kind == "upsampler" else 1
        pixels = self.height * self.width
        return (batch * self.in_channels * pixels * itemsize,
                batch * self.out_channels * pixels * scale * scale * itemsize)


@dataclass
class Estimate:
    """Peak extra bytes of one LPL call, what is live at the peak, and the persistent decoder copy."""

    peak: int = 0
    phase: str = ""
    breakdown: dict[str, int] = field(default_factory=dict)
    weights: int = 0

    def see(self, phase: str, parts: dict[str, int]) -> None:
        """Record the live bytes at one moment; keep the largest."""
        total = sum(parts.values())
        if total > self.peak:
            self.peak, self.phase, self.breakdown = total, phase, dict(parts)


def decoder_units(trunk, latent_height: int, latent_width: int) -> list[list[Unit]]:
    """The units of each stage of a DecoderTrunk (mid block first) for latents of the given size."""
    from lpl_plugin.engine.trunk import has_upsampler

    height, width = latent_height, latent_width
    stages = []
    mid = trunk.mid_block
    units = []
    attentions = list(getattr(mid, "attentions", None) or [])
    for index, resnet in enumerate(mid.resnets):
        if index > 0 and index - 1 < len(attentions) and attentions[index - 1] is not None:
            units.append(Unit("attention", resnet.in_channels, resnet.in_channels, height, width))
        units.append(Unit("resnet", resnet.in_channels, resnet.out_channels, height, width))
    stages.append(units)
    for block in trunk.up_blocks:
        units = [Unit("resnet", r.in_channels, r.out_channels, height, width) for r in block.resnets]
        if has_upsampler(block):
            channels = block.resnets[-1].out_channels
            units.append(Unit("upsampler", channels, channels, height, width))
            height, width = height * 2, width * 2
        stages.append(units)
    return stages


def _kept(units: list[Unit], b: int, itemsize: int, checkpointing: str, stem: int) -> int:
    """Bytes a stage keeps for backward beyond its input feature map (`stem`: the mid block's input).

    A lean ResNet block keeps its input and its first convolution's output (only its input when recomputed), an
    attention layer its input, q, k, v and output, an upsampler nothing; recomputed stages keep only their input.
    """
    if checkpointing == "block" or (checkpointing == "resnet" and any(u.kind == "attention" for u in units)):
        return stem
    total = stem
    for position, unit in enumerate(units):
        inp, out = unit.maps(b, itemsize)
        if unit.kind == "upsampler":
            continue
        total += inp if position > 0 else 0
        if checkpointing == "none":
            total += out if unit.kind == "resnet" else 4 * inp
    return total


def _forward_scratch(unit: Unit, b: int, itemsize: int) -> int:
    """Bytes a unit allocates while it runs forward, its output included (measured on the CPU, in whole maps)."""
    inp, out = unit.maps(b, itemsize)
    if unit.kind == "upsampler":
        return 3 * out // 2  # the output, one phase's convolution output and its layout copy (quarter maps)
    if unit.kind == "attention":
        return 5 * inp
    return max(2 * inp + out, 3 * out)


def _backward_scratch(unit: Unit, b: int, itemsize: int, recompute: bool) -> int:
    """Bytes a unit allocates while it runs backward, beyond its incoming gradient (measured on the CPU).

    A ResNet block holds its first half's output and that output's gradient, then its input gradient and a few
    channel slices while that gradient is finished slice by slice; recomputing its first half needs the
    normalized input beside it.
    """
    from lpl_plugin.engine.tensors import SLICE_ELEMENTS

    inp, out = unit.maps(b, itemsize)
    if unit.kind == "upsampler":
        return 3 * out // 2  # per phase: its padded gradient, its input gradient, the sum (quarter maps)
    if unit.kind == "attention":
        return 6 * inp
    part = min(inp, SLICE_ELEMENTS * itemsize)
    scratch = max(2 * out, out + inp) + 3 * part
    return max(scratch, inp + out) if recompute else scratch


def _layer_scratch(feature: int, itemsize: int, channels: int, masked: bool) -> int:
    """Bytes of one layer's gradient: its gradient map, the masks, and the float32 work on a channel slice."""
    from lpl_plugin.engine.tensors import SLICE_ELEMENTS

    pixels = feature // itemsize
    per_channel = max(1, pixels // channels)
    part = min(pixels, max(1, SLICE_ELEMENTS // per_channel) * per_channel)
    return feature + (pixels * MASK if masked else 0) + part * LAYER_WORK.get((min(itemsize, 4), masked), 8)


def estimate_peak(trunk, latent_shape: Sequence[int], *, chunk: int = 1, checkpointing: str = "none",
                  masked_layers: Sequence[bool] | None = None) -> Estimate:
    """Peak extra memory of one lean LPL call of the given trunk on latents of `latent_shape` (B, C, H, W)."""
    batch, _, height, width = latent_shape
    b = min(chunk, batch)
    itemsize = trunk.dtype.itemsize
    checkpointing = "none" if checkpointing == "auto" else checkpointing
    stages = decoder_units(trunk, height, width)[:trunk.num_layers]
    masked = list(masked_layers) if masked_layers is not None else [False] * len(stages)
    result = Estimate(weights=sum(p.numel() for p in trunk.parameters()) * itemsize)
    kept = grads = 0
    stem = b * stages[0][0].in_channels * height * width * itemsize  # conv_in's output
    target = stem
    held = []  # bytes each stage keeps until backward, its feature map included
    for index, units in enumerate(stages):
        first = stem if index == 0 else 0
        for position, unit in enumerate(units):  # the target runs first, without a graph
            inp, _ = unit.maps(b, itemsize)
            result.see(f"forward (target), stage {index}", {
                "kept activations": kept + first, "layer gradients": grads,
                "target maps": target + (inp if position else 0), "scratch": _forward_scratch(unit, b, itemsize)})
        target = units[-1].maps(b, itemsize)[1]
        for position, unit in enumerate(units):
            inp, out = unit.maps(b, itemsize)
            so_far = _kept(units[:position], b, itemsize, checkpointing, first)
            current = inp if position and unit.kind != "upsampler" and checkpointing != "none" else 0
            result.see(f"forward, stage {index}", {
                "kept activations": kept + so_far + current, "layer gradients": grads, "target maps": target,
                "scratch": _forward_scratch(unit, b, itemsize)})
        feature = units[-1].maps(b, itemsize)[1]
        held.append(_kept(units, b, itemsize, checkpointing, first) + feature)
        kept += held[-1]
        result.see(f"layer gradient, stage {index}", {
            "kept activations": kept, "layer gradients": grads, "target maps": target,
            "scratch": _layer_scratch(feature, itemsize, units[-1].out_channels, masked[index])})
        grads += feature
    for index in range(len(stages) - 1, -1, -1):  # backward: the last stage first
        units = stages[index]
        whole = checkpointing == "block" or (checkpointing == "resnet" and _kept(units, b, itemsize, "resnet", 0)
                                             == 0 and any(u.kind == "attention" for u in units))
        mode = "none" if whole else checkpointing
        before = kept - held[index]  # what earlier stages keep; this stage's share shrinks unit by unit
        for position in range(len(units) - 1, -1, -1):
            unit = units[position]
            _, out = unit.maps(b, itemsize)
            recompute = checkpointing == "resnet" and unit.kind == "resnet" and not whole
            share = _kept(units[:position + 1], b, itemsize, mode, stem if index == 0 else 0)
            result.see(f"backward, stage {index}", {
                "kept activations": before + share, "layer gradients": grads,
                "scratch": out + _backward_scratch(unit, b, itemsize, recompute)})
        kept = before
    return result


def layout_vae(spec: str):
    """A VAE skeleton on the meta device (no weights) by name (`tiny`, `sdxl`) or diffusers folder / config.json."""
    import torch

    from lpl_plugin.engine.tiny import random_vae

    with torch.device("meta"):
        return random_vae(spec)


def estimate_for(spec: str, *, resolution: int, batch: int, blocks: int, dtype: str, chunk: int = 1,
                 checkpointing: str = "auto", device: str = "cuda", compat: bool = False,
                 outliers: bool = True) -> Estimate:
    """The estimate for a VAE given by name or path and the LPL settings of a run."""
    import logging

    import torch

    from lpl_plugin.settings.config import LPLConfig
    from lpl_plugin.engine.trunk import DecoderTrunk
    from lpl_plugin.engine.outliers import masked_layers
    from lpl_plugin.engine.precision import DTYPES

    if resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8, got {resolution}")
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    config = LPLConfig(use_lpl=True, lpl_num_blocks=blocks, lpl_remove_outliers=outliers,
                       lpl_compat="diffusers" if compat else "none")
    torch_dtype = torch.bfloat16 if dtype == "auto" and device == "cuda" else DTYPES.get(dtype, torch.float32)
    vae = layout_vae(spec)
    level = logging.getLogger("lpl_plugin").level
    logging.getLogger("lpl_plugin").setLevel(logging.WARNING)  # no attention-backend line for a skeleton
    try:  # a VAE with too few up blocks raises VaeMismatch, a UserError
        trunk = DecoderTrunk(vae, blocks, use_post_quant_conv=not compat, dtype=torch_dtype, device="meta")
    finally:
        logging.getLogger("lpl_plugin").setLevel(level)
    masks = masked_layers(config.lpl_remove_outliers, compat, trunk.downsample_factors)
    latent = resolution // 8
    return estimate_peak(trunk, (batch, 4, latent, latent), chunk=chunk, checkpointing=checkpointing,
                         masked_layers=[m is not None for m in masks])
