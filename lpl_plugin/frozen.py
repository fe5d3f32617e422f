"""Frozen-weight decoder layers whose backward keeps only what the input gradient needs.

LPL never trains the decoder, so a convolution's backward needs its weight but not its input, and a GroupNorm +
SiLU pair can be recomputed from its input for the price of an elementwise pass. Swapping such layers into the
private decoder copy cuts a ResNet block's saved activations from six maps to two (its input and its first
convolution's output) without recomputing any convolution; with `recompute=True` only the input is kept and the
block's first convolution alone is redone in backward. The forward math is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .lean import channel_slices


def _needs_input_grad_only(x: Tensor, *params: Tensor | None) -> bool:
    """Whether autograd needs the input gradient of a layer and no parameter gradient."""
    return (torch.is_grad_enabled() and x.requires_grad
            and not any(p is not None and p.requires_grad for p in params))


class _ConvInputGrad(torch.autograd.Function):
    """Stride-1 conv2d whose backward returns the input gradient only, saving the weight but not the input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                padding: tuple[int, int]) -> Tensor:
        """Plain convolution."""
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        ctx.padding = padding
        return F.conv2d(x, weight, bias, 1, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        """The transposed convolution of the incoming gradient."""
        (weight,) = ctx.saved_tensors
        return torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, 1, ctx.padding), None, None, None


class _GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)) that saves only x and recomputes the normalization in backward, a few groups at a time."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                groups: int, eps: float) -> Tensor:
        """The fused forward (SiLU in place on the normalized map)."""
        ctx.save_for_backward(x, weight, bias)
        ctx.groups, ctx.eps = groups, eps
        return F.silu(F.group_norm(x, groups, weight, bias, eps), inplace=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        """Per slice of whole groups: recompute the normalized map, then SiLU's and GroupNorm's input gradients."""
        x, weight, bias = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        per_group = x.shape[1] // ctx.groups
        for part in channel_slices(x.shape, per_group):
            xs = x[:, part].contiguous()
            n, c = xs.shape[:2]
            hw = xs[0, 0].numel()
            ws = None if weight is None else weight[part]
            bs = None if bias is None else bias[part]
            groups = c // per_group
            normed, mean, rstd = torch.native_group_norm(xs, ws, bs, n, c, hw, groups, ctx.eps)
            gs = torch.ops.aten.silu_backward(grad[:, part], normed)
            del normed
            grad_x[:, part] = torch.ops.aten.native_group_norm_backward(gs, xs, mean, rstd, ws, n, c, hw, groups,
                                                                        [True, False, False])[0]
        return grad_x, None, None, None, None


def group_norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """silu(norm(x)), keeping only x for backward when the norm is frozen."""
    if _needs_input_grad_only(x, norm.weight, norm.bias):
        return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


class FrozenConv2d(nn.Conv2d):
    """A stride-1 Conv2d that, when its weights are frozen, keeps no input for backward."""

    @classmethod
    def supports(cls, conv: nn.Module) -> bool:
        """Whether a convolution has the plain layout this class handles."""
        return (type(conv).__name__ in ("Conv2d", "LoRACompatibleConv") and isinstance(conv, nn.Conv2d)
                and getattr(conv, "lora_layer", None) is None and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and isinstance(conv.padding, tuple))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FrozenConv2d":
        """A FrozenConv2d sharing the parameters of `conv`."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                  bias=conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def forward(self, x: Tensor, *unused: object, **unused_kw: object) -> Tensor:  # type: ignore[override]
        """Convolve; extra arguments (old diffusers' LoRA `scale`) are ignored."""
        if _needs_input_grad_only(x, self.weight, self.bias):
            return _ConvInputGrad.apply(x, self.weight, self.bias, self.padding)
        return F.conv2d(x, self.weight, self.bias, 1, self.padding)


def _plain_resnet(block: nn.Module) -> bool:
    """Whether a diffusers ResnetBlock2D computes conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)."""
    return (type(block).__name__ == "ResnetBlock2D" and type(getattr(block, "norm1", None)) is nn.GroupNorm
            and type(getattr(block, "norm2", None)) is nn.GroupNorm
            and type(getattr(block, "nonlinearity", None)) is nn.SiLU
            and getattr(block, "upsample", None) is None and getattr(block, "downsample", None) is None
            and getattr(block, "time_emb_proj", None) is None
            and getattr(block, "time_embedding_norm", "default") in ("default", "group"))


class LeanResnet(nn.Module):
    """A diffusers ResnetBlock2D (no time embedding) run with frozen-weight layers.

    Holds the block's own submodules under their own names, so parameter names are unchanged.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.conv1, self.norm2 = block.norm1, block.conv1, block.norm2
        self.dropout, self.conv2, self.conv_shortcut = block.dropout, block.conv2, block.conv_shortcut
        self.output_scale_factor = float(block.output_scale_factor)
        self.in_channels, self.out_channels = block.in_channels, block.out_channels

    def _first_half(self, x: Tensor) -> Tensor:
        """silu(norm2(conv1(silu(norm1(x))))): everything up to the second convolution."""
        return group_norm_silu(self.norm2, self.conv1(group_norm_silu(self.norm1, x)))

    def forward(self, x: Tensor, temb: Tensor | None = None, *, recompute: bool = False) -> Tensor:
        """The block's output; with `recompute`, backward redoes the first half instead of keeping conv1's output."""
        if temb is not None:
            raise ValueError("LPL's decoder copy runs without a time embedding")
        if recompute and torch.is_grad_enabled() and x.requires_grad:
            hidden = checkpoint(self._first_half, x, use_reentrant=False)
        else:
            hidden = self._first_half(x)
        hidden = self.conv2(self.dropout(hidden))  # a fresh map that no backward needs: add in place
        hidden = hidden.add_(self.conv_shortcut(x) if self.conv_shortcut is not None else x)
        return hidden if self.output_scale_factor == 1.0 else hidden.div_(self.output_scale_factor)


def freeze_layers(module: nn.Module) -> int:
    """Swap lean frozen layers into a private module copy in place; returns how many modules were replaced."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if FrozenConv2d.supports(child):
                setattr(parent, name, FrozenConv2d.from_conv(child))
                swapped += 1
            elif _plain_resnet(child):
                for inner, conv in list(child.named_children()):
                    if FrozenConv2d.supports(conv):
                        setattr(child, inner, FrozenConv2d.from_conv(conv))
                setattr(parent, name, LeanResnet(child))
                swapped += 1
    return swapped
