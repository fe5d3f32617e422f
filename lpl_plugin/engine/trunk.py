"""The decoder trunk: a private, frozen copy of the VAE decoder stages LPL reads, with optional recomputation.

It knows nothing of losses: it runs `[post_quant_conv] -> conv_in -> mid_block -> up_blocks[:n]` stage by stage in
its own precision, with the lean frozen layers of `frozen.py`, and recomputes in backward what the caller asks:
'block' keeps only each stage's input, 'resnet' only each ResNet block's input (attention stages whole).
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lpl_plugin.engine.attention import choose_attention
from lpl_plugin.settings.errors import VaeMismatch
from lpl_plugin.engine.frozen import LeanResnet, LeanUpsample, freeze_layers, frozen_backward_nodes

log = logging.getLogger("lpl_plugin")


def has_upsampler(block: nn.Module) -> bool:
    """Whether a decoder up block doubles the resolution."""
    return getattr(block, "upsamplers", None) is not None


class _Recompute(torch.autograd.Function):
    """Runs a function without keeping anything but its input; backward runs it again with a graph, then through it.

    Unlike torch.utils.checkpoint, nothing the function stores on its own (such as a lean block's kept maps)
    survives the forward pass: the forward runs without autograd, so no node is built at all.
    """

    @staticmethod
    def forward(ctx, x: Tensor, run: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        """Run without a graph, keeping only the input."""
        ctx.run = run
        ctx.save_for_backward(x)
        with torch.no_grad():
            return run(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        """Recompute with a graph (the host's autocast off) and backpropagate through it."""
        (x,) = ctx.saved_tensors
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            leaf = x.detach().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(ctx.run(leaf), leaf, grad)
        return grad_x, None


def release_output(x: Tensor) -> None:
    """Free a stage output's values when its backward does not read them (a lean block's or recomputed stage's
    output); the tensor stays usable as a graph root whose shape is all backward checks."""
    if type(x.grad_fn) in _OUTPUT_FREE_NODES:
        x.untyped_storage().resize_(0)


def recompute(run: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`run(x)`, recomputed in backward instead of kept (a plain call when no gradient is needed)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Recompute.apply(x, run)
    return run(x)


# Backward nodes that keep (at most) their input, never their output.
_OUTPUT_FREE_NODES = (frozen_backward_nodes() + (_Recompute._backward_cls,))  # type: ignore[attr-defined]


def _run_recomputing_resnets(stage: nn.Module, x: Tensor) -> Tensor:
    """An up block whose ResNet blocks keep only their inputs and recompute the rest in backward."""
    for resnet in stage.resnets:
        if isinstance(resnet, LeanResnet):
            x = resnet(x, None, recompute=True)
        else:
            x = recompute(lambda h, block=resnet: block(h, None), x)
    for upsampler in stage.upsamplers or []:
        x = upsampler(x) if isinstance(upsampler, LeanUpsample) else recompute(upsampler, x)
    return x


class DecoderTrunk(nn.Module):
    """`[post_quant_conv] -> conv_in -> mid_block -> up_blocks[:n]` of a diffusers AutoencoderKL, frozen.

    The modules are deep copies: the caller's VAE is never moved, cast or changed.
    """

    def __init__(self, vae: nn.Module, num_blocks: int, *, use_post_quant_conv: bool = True,
                 exact_upsampling: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        decoder = getattr(vae, "decoder", None)
        if decoder is None or not hasattr(decoder, "mid_block") or not hasattr(decoder, "up_blocks"):
            raise VaeMismatch("LPL needs a diffusers AutoencoderKL-like VAE with decoder.mid_block and "
                             "decoder.up_blocks")
        available = len(decoder.up_blocks)
        if num_blocks > available:
            raise VaeMismatch(f"lpl_num_blocks must be at most {available} for this VAE (its decoder has "
                             f"{available} up blocks), got {num_blocks}")
        if device is None:
            device = next(decoder.parameters()).device
        pqc = getattr(vae, "post_quant_conv", None) if use_post_quant_conv else None
        self.post_quant_conv = copy.deepcopy(pqc) if isinstance(pqc, nn.Module) else None
        self.conv_in = copy.deepcopy(decoder.conv_in)
        self.mid_block = copy.deepcopy(decoder.mid_block)
        self.up_blocks = nn.ModuleList(copy.deepcopy(b) for b in decoder.up_blocks[:num_blocks])
        self.requires_grad_(False)
        self.eval()
        freeze_layers(self, exact_upsampling)
        self.to(device=device, dtype=dtype)
        self.dtype = dtype
        self.device = torch.device(device)
        self.stage_names = ["mid"] + [f"up{i}" for i in range(num_blocks)]
        # Resolution of each feature map below the decoder's output, from the full decoder's layout.
        remaining = sum(has_upsampler(b) for b in decoder.up_blocks)
        factors = [2 ** remaining]
        for block in decoder.up_blocks[:num_blocks]:
            remaining -= has_upsampler(block)
            factors.append(2 ** remaining)
        self.downsample_factors = factors
        self.attention = choose_attention(self, self.device, dtype)

    @property
    def num_layers(self) -> int:
        """Number of feature maps produced: the mid block plus each up block used."""
        return len(self.stage_names)

    def _stages(self) -> list[nn.Module]:
        """The stages whose outputs are features, in order."""
        return [self.mid_block, *self.up_blocks]

    def _run(self, stage: nn.Module, x: Tensor, checkpointing: str) -> Tensor:
        """Run one stage, recomputing it ('block') or its ResNet blocks ('resnet') in backward when asked.

        The mid block (with attention) is recomputed whole under 'resnet'.
        """
        if checkpointing not in ("block", "resnet") or not (torch.is_grad_enabled() and x.requires_grad):
            return stage(x, None)
        if checkpointing == "resnet" and getattr(stage, "attentions", None) is None and hasattr(stage, "resnets"):
            return _run_recomputing_resnets(stage, x)
        return recompute(lambda h: stage(h, None), x)

    def no_autocast(self) -> torch.autocast:
        """A context that turns the host's autocast off, so the decoder runs in its own dtype."""
        return torch.autocast(self.device.type, enabled=False)

    def stem(self, z: Tensor) -> Tensor:
        """`[post_quant_conv] -> conv_in` of already unscaled latents, in the decoder's dtype."""
        x = z.to(self.dtype)
        if self.post_quant_conv is not None:
            x = self.post_quant_conv(x)
        return self.conv_in(x)

    def stage(self, index: int, x: Tensor, checkpointing: str = "none") -> Tensor:
        """The output of stage `index` (0 = mid block) given the previous stage's output."""
        return self._run(self._stages()[index], x, checkpointing)

    def walk(self, z: Tensor, checkpointing: str = "none", graph: bool | None = None) -> Iterator[Tensor]:
        """The one decoder walk: each stage's feature map of already unscaled latents z in turn, mid block first.

        A map is computed when the caller asks for the next one, in the decoder's own precision, and with autograd
        on (`graph` True) or off (False) whatever the caller's mode (None: the caller's); no mode is held between
        maps, so two walks can go side by side, one with a graph and one without.
        """
        x = z
        for index in range(self.num_layers):
            with self.no_autocast(), nullcontext() if graph is None else torch.set_grad_enabled(graph):
                x = self.stage(index, self.stem(x) if index == 0 else x, checkpointing)
            yield x

    def forward(self, z: Tensor, checkpointing: str = "none") -> list[Tensor]:
        """Feature maps (mid block output, then each up block's) of already unscaled latents z."""
        return list(self.walk(z, checkpointing))


def feature_shapes(trunk: DecoderTrunk, latent_shape: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Shapes (B, C, H, W) of each feature map for latents of the given shape, without running the decoder."""
    batch, _, height, width = latent_shape
    top = trunk.downsample_factors[0]
    channels = [trunk.mid_block.resnets[-1].out_channels] + [b.resnets[-1].out_channels for b in trunk.up_blocks]
    return [(batch, c, height * top // f, width * top // f) for c, f in zip(channels, trunk.downsample_factors)]
