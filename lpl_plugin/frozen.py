"""Frozen-weight decoder layers whose backward keeps only what the input gradient needs.

LPL never trains the decoder, so a convolution's backward needs its weight but not its input, and a GroupNorm +
SiLU pair can be recomputed from its input in backward for the price of an elementwise pass. Swapping these layers
into the private decoder copy cuts a ResNet block's saved activations from six maps to two without recomputing any
convolution; the forward math is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def _frozen(*tensors: Tensor | None) -> bool:
    """Whether none of the given parameters asks for a gradient."""
    return not any(t is not None and t.requires_grad for t in tensors)


class _ConvInputGrad(torch.autograd.Function):
    """conv2d whose backward returns the input gradient only, saving the weight but not the input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                padding: tuple[int, int]) -> Tensor:
        """Plain convolution with stride 1."""
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
    """silu(group_norm(x)) that saves only x and recomputes the normalization in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                groups: int, eps: float) -> Tensor:
        """The fused forward."""
        ctx.save_for_backward(x, weight, bias)
        ctx.groups, ctx.eps = groups, eps
        return F.silu(F.group_norm(x, groups, weight, bias, eps))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        """Recompute the pair locally and take its input gradient."""
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = F.silu(F.group_norm(leaf, ctx.groups, weight, bias, ctx.eps))
            (grad_x,) = torch.autograd.grad(out, leaf, grad)
        return grad_x, None, None, None, None


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
        if torch.is_grad_enabled() and x.requires_grad and _frozen(self.weight, self.bias):
            return _ConvInputGrad.apply(x, self.weight, self.bias, self.padding)
        return F.conv2d(x, self.weight, self.bias, 1, self.padding)


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm followed by SiLU in one layer that keeps only its input for backward."""

    @classmethod
    def from_norm(cls, norm: nn.GroupNorm) -> "GroupNormSiLU":
        """A fused layer sharing the parameters of `norm`."""
        new = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine, device="meta")
        new.weight = norm.weight
        new.bias = norm.bias
        return new

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """silu(group_norm(x))."""
        if torch.is_grad_enabled() and x.requires_grad and _frozen(self.weight, self.bias):
            return _GroupNormSiLU.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


def _fusable_resnet(block: nn.Module) -> bool:
    """Whether a diffusers ResnetBlock2D runs norm -> SiLU -> conv twice with nothing in between."""
    return (type(block).__name__ == "ResnetBlock2D" and type(getattr(block, "norm1", None)) is nn.GroupNorm
            and type(getattr(block, "norm2", None)) is nn.GroupNorm
            and type(getattr(block, "nonlinearity", None)) is nn.SiLU
            and getattr(block, "upsample", None) is None and getattr(block, "downsample", None) is None
            and getattr(block, "time_emb_proj", None) is None
            and getattr(block, "time_embedding_norm", "default") in ("default", "group"))


def freeze_layers(module: nn.Module) -> int:
    """Swap the lean frozen layers into a private module copy in place; returns how many layers were swapped."""
    swapped = 0
    for block in list(module.modules()):
        if _fusable_resnet(block):
            block.norm1 = GroupNormSiLU.from_norm(block.norm1)
            block.norm2 = GroupNormSiLU.from_norm(block.norm2)
            block.nonlinearity = nn.Identity()
            swapped += 2
        for name, child in list(block.named_children()):
            if FrozenConv2d.supports(child):
                setattr(block, name, FrozenConv2d.from_conv(child))
                swapped += 1
    return swapped
