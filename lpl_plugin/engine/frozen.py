"""Frozen-weight decoder layers whose backward keeps only what the input gradient needs.

LPL never trains the decoder, so a convolution's backward needs its weight but not its input, and GroupNorm + SiLU
can be recomputed from its input for the price of an elementwise pass. The private decoder copy therefore runs each
ResNet block and upsampler as one autograd function: a ResNet block keeps its input and its first convolution's
output (two maps instead of six; with `recompute=True` only its input, redoing the first convolution in backward),
and their backward passes work through wide maps a channel slice at a time. An upsampler keeps nothing and runs
its 3x3 convolution of the 2x-upsampled map as four 2x2 convolutions of the small one (2.25x fewer operations).
The math is the diffusers blocks' own; only the upsamplers sum in another order (float32 rounding apart).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lpl_plugin.engine.tensors import channel_slices


def _needs_input_grad_only(x: Tensor, module: nn.Module) -> bool:
    """Whether autograd needs x's gradient through a module and no parameter gradient."""
    return (torch.is_grad_enabled() and x.requires_grad
            and not any(p.requires_grad for p in module.parameters()))


def _conv_input_grad(conv: nn.Conv2d, grad: Tensor, input_shape: torch.Size) -> Tensor:
    """d(loss)/d(input) of a stride-1 convolution from d(loss)/d(output): its transposed convolution."""
    return torch.nn.grad.conv2d_input(input_shape, conv.weight, grad, 1, conv.padding)


def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """silu(norm(x)) without a graph (SiLU in place on the fresh normalized map)."""
    return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps), inplace=True)


def _norm_silu_backward_(norm: nn.GroupNorm, x: Tensor, grad: Tensor) -> Tensor:
    """Input gradient of silu(norm(x)) written over `grad` (a fresh tensor the caller owns), whole groups at a time."""
    per_group = x.shape[1] // norm.num_groups
    for part in channel_slices(x.shape, per_group):
        grad[:, part] = _norm_silu_backward_part(norm, x[:, part], grad[:, part], part)
    return grad


def _norm_silu_backward_part(norm: nn.GroupNorm, x: Tensor, grad: Tensor, part: slice) -> Tensor:
    """Input gradient of silu(norm(x)) for the channels `part` (whole groups), recomputing the normalized map."""
    xs = x.contiguous()
    n, c = xs.shape[:2]
    hw = xs[0, 0].numel()
    groups = c // (norm.num_channels // norm.num_groups)
    weight = None if norm.weight is None else norm.weight[part]
    bias = None if norm.bias is None else norm.bias[part]
    normed, mean, rstd = torch.native_group_norm(xs, weight, bias, n, c, hw, groups, norm.eps)
    silu_grad = torch.ops.aten.silu_backward(grad, normed)
    del normed
    return torch.ops.aten.native_group_norm_backward(silu_grad, xs, mean, rstd, weight, n, c, hw, groups,
                                                     [True, False, False])[0]


class FrozenConv2d(nn.Conv2d):
    """A stride-1 Conv2d that, when its weights are frozen, keeps no input for backward."""

    @classmethod
    def supports(cls, conv: nn.Module) -> bool:
        """Whether a convolution has the plain layout this class handles."""
        return (type(conv).__name__ in ("Conv2d", "LoRACompatibleConv", "FrozenConv2d")
                and isinstance(conv, nn.Conv2d) and getattr(conv, "lora_layer", None) is None
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))

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
        if _needs_input_grad_only(x, self):
            return _ConvFunction.apply(x, self)
        return F.conv2d(x, self.weight, self.bias, 1, self.padding)


class _ConvFunction(torch.autograd.Function):
    """A frozen convolution that saves nothing but its input's shape."""

    @staticmethod
    def forward(ctx, x: Tensor, conv: FrozenConv2d) -> Tensor:  # type: ignore[override]
        """Plain convolution."""
        ctx.conv, ctx.shape = conv, x.shape
        return F.conv2d(x, conv.weight, conv.bias, 1, conv.padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        """The transposed convolution of the incoming gradient."""
        return _conv_input_grad(ctx.conv, grad, ctx.shape), None


def _plain_resnet(block: nn.Module) -> bool:
    """Whether a diffusers ResnetBlock2D computes conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)."""
    convs = [getattr(block, "conv1", None), getattr(block, "conv2", None)]
    if getattr(block, "conv_shortcut", None) is not None:
        convs.append(block.conv_shortcut)
    return (type(block).__name__ == "ResnetBlock2D" and type(getattr(block, "norm1", None)) is nn.GroupNorm
            and type(getattr(block, "norm2", None)) is nn.GroupNorm
            and type(getattr(block, "nonlinearity", None)) is nn.SiLU
            and getattr(block, "upsample", None) is None and getattr(block, "downsample", None) is None
            and getattr(block, "time_emb_proj", None) is None
            and getattr(block, "time_embedding_norm", "default") in ("default", "group")
            and all(FrozenConv2d.supports(c) for c in convs))


class LeanResnet(nn.Module):
    """A diffusers ResnetBlock2D (no time embedding) run as one frozen-weight autograd function.

    Holds the block's own submodules under their own names, so parameter names are unchanged.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.conv1, self.norm2 = block.norm1, block.conv1, block.norm2
        self.dropout, self.conv2, self.conv_shortcut = block.dropout, block.conv2, block.conv_shortcut
        self.output_scale_factor = float(block.output_scale_factor)
        self.in_channels, self.out_channels = block.in_channels, block.out_channels

    def run(self, x: Tensor, keep_hidden: bool = False) -> tuple[Tensor, Tensor | None]:
        """The block's output without a graph, and conv1's output when asked (else it is freed early)."""
        h = self.conv1(_norm_silu(self.norm1, x))
        hidden = _norm_silu(self.norm2, h)
        kept = h if keep_hidden else None
        del h
        out = self.conv2(self.dropout(hidden))
        del hidden
        out = out.add_(self.conv_shortcut(x) if self.conv_shortcut is not None else x)
        return (out if self.output_scale_factor == 1.0 else out.div_(self.output_scale_factor)), kept

    def forward(self, x: Tensor, temb: Tensor | None = None, *, recompute: bool = False,
                scale: float = 1.0) -> Tensor:
        """The block's output; with `recompute`, backward redoes the first half instead of keeping conv1's output.

        `scale` is the LoRA scale diffusers < 0.26 passes to every resnet (sd-scripts v0.9.1 pins 0.25.0); unused.
        """
        if temb is not None:
            raise ValueError("LPL's decoder copy runs without a time embedding")
        if _needs_input_grad_only(x, self):
            return _ResnetFunction.apply(x, self, recompute)
        return self.run(x)[0]


class _ResnetFunction(torch.autograd.Function):
    """A LeanResnet as one autograd node: keeps x, and conv1's output unless recomputing it."""

    @staticmethod
    def forward(ctx, x: Tensor, block: LeanResnet, recompute: bool) -> Tensor:  # type: ignore[override]
        """Run the block without a graph, keeping what backward needs."""
        out, hidden = block.run(x, keep_hidden=not recompute)
        ctx.block, ctx.hidden = block, hidden  # internal map: held on ctx so backward can free it early
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        """The main path in reverse, freeing each map once used; the input gradient slice by slice of channels.

        conv1's input gradient for a slice of input channels needs only those channels' weights, so each slice is
        finished at once (GroupNorm + SiLU backward, the shortcut's gradient added) and written to the result:
        beside the result only slice-sized scratch is alive.
        """
        block: LeanResnet = ctx.block
        (x,) = ctx.saved_tensors
        h = ctx.hidden if ctx.hidden is not None else block.conv1(_norm_silu(block.norm1, x))
        ctx.hidden = None
        if block.output_scale_factor != 1.0:
            grad = grad / block.output_scale_factor
        g = _norm_silu_backward_(block.norm2, h, _conv_input_grad(block.conv2, grad, h.shape))
        del h
        result = torch.empty_like(x)
        norm1, conv1, shortcut = block.norm1, block.conv1, block.conv_shortcut
        for part in channel_slices(x.shape, norm1.num_channels // norm1.num_groups):
            shape = (x.shape[0], part.stop - part.start, *x.shape[2:])
            gx = torch.nn.grad.conv2d_input(shape, conv1.weight[:, part], g, 1, conv1.padding)
            gx = _norm_silu_backward_part(norm1, x[:, part], gx, part)
            if shortcut is not None:
                gx.add_(torch.nn.grad.conv2d_input(shape, shortcut.weight[:, part], grad, 1, shortcut.padding))
            else:
                gx.add_(grad[:, part])
            result[:, part] = gx
        return result, None, None


def _plain_upsampler(block: nn.Module) -> bool:
    """Whether a diffusers Upsample2D is nearest 2x interpolation followed by a plain 3x3 convolution."""
    conv = getattr(block, "conv", None)
    return (type(block).__name__ == "Upsample2D" and getattr(block, "interpolate", True)
            and getattr(block, "use_conv", False) and not getattr(block, "use_conv_transpose", False)
            and getattr(block, "norm", None) is None and getattr(block, "name", "conv") == "conv"
            and FrozenConv2d.supports(conv) and conv.kernel_size == (3, 3) and conv.padding == (1, 1))


def _fold(kernel: Tensor, dim: int, phase: int) -> Tensor:
    """Three taps along `dim` folded to two: output phase 0 sees (k0, k1 + k2), phase 1 sees (k0 + k1, k2)."""
    k0, k1, k2 = kernel.unbind(dim)
    return torch.stack((k0, k1 + k2) if phase == 0 else (k0 + k1, k2), dim)


def _phase_kernels(weight: Tensor) -> list[tuple[int, int, Tensor]]:
    """The four 2x2 kernels (row phase, column phase, kernel) that give conv3x3(upsample2x(x)) from x itself.

    Output pixel (2i + a, 2j + b) sees low-resolution rows i - 1 + a and i + a and the same for columns, each row
    of the 3x3 kernel landing on one of them: 16 taps per low-resolution pixel instead of 36 on the upsampled map.
    """
    return [(a, b, _fold(_fold(weight, 2, a), 3, b)) for a in (0, 1) for b in (0, 1)]


def _upsample_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(interpolate(x, 2x nearest)) computed phase by phase on the low-resolution map."""
    b, _, h, w = x.shape
    out = x.new_empty(b, conv.out_channels, 2 * h, 2 * w)
    phases = out.view(b, conv.out_channels, h, 2, w, 2)
    for a, c, kernel in _phase_kernels(conv.weight):
        phases[:, :, :, a, :, c] = F.conv2d(x, kernel, conv.bias, 1, 1)[:, :, a:a + h, c:c + w]
    return out


class LeanUpsample(nn.Module):
    """A diffusers Upsample2D (nearest 2x, then a 3x3 convolution) that keeps nothing and works on the small map."""

    def __init__(self, block: nn.Module, exact: bool = False):
        super().__init__()
        self.conv = block.conv
        self.channels = block.channels
        self.exact = exact

    def forward(self, x: Tensor, output_size: object = None, *unused: object, **unused_kw: object) -> Tensor:
        """conv(interpolate(x, 2x nearest))."""
        if output_size is not None:
            raise ValueError("LPL's decoder copy upsamples by exactly 2")
        if _needs_input_grad_only(x, self):
            return _UpsampleFunction.apply(x, self)
        return self.run(x)

    def run(self, x: Tensor) -> Tensor:
        """The output without a graph: on the small map, or (`exact`) as diffusers computes it."""
        if self.exact:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return _upsample_conv(x, self.conv)


class _UpsampleFunction(torch.autograd.Function):
    """A LeanUpsample as one autograd node; backward is the four phase kernels' transposed convolutions."""

    @staticmethod
    def forward(ctx, x: Tensor, block: LeanUpsample) -> Tensor:  # type: ignore[override]
        """Upsample and convolve without a graph."""
        ctx.block, ctx.shape = block, x.shape
        return block.run(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        """Sum over the phases of each phase gradient, padded back to the 2x2 kernel's output, transposed."""
        b, _, h, w = ctx.shape
        phases = grad.reshape(b, -1, h, 2, w, 2)
        grad_x = None
        for a, c, kernel in _phase_kernels(ctx.block.conv.weight):
            padded = F.pad(phases[:, :, :, a, :, c], (c, 1 - c, a, 1 - a))
            part = torch.nn.grad.conv2d_input(ctx.shape, kernel, padded, 1, 1)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None


def freeze_layers(module: nn.Module, exact_upsampling: bool = False) -> int:
    """Swap lean frozen layers into a private module copy in place; returns how many modules were replaced.

    `exact_upsampling` keeps the upsamplers' forward bit-identical to diffusers (compat mode: L1's gradient is the
    sign of a difference, which float32 rounding of another summation order can flip).
    """
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _plain_resnet(child) or _plain_upsampler(child):
                for inner, conv in list(child.named_children()):
                    if FrozenConv2d.supports(conv):
                        setattr(child, inner, FrozenConv2d.from_conv(conv))
                lean = LeanResnet(child) if _plain_resnet(child) else LeanUpsample(child, exact_upsampling)
                setattr(parent, name, lean)
                swapped += 1
            elif FrozenConv2d.supports(child) and not isinstance(child, FrozenConv2d):
                setattr(parent, name, FrozenConv2d.from_conv(child))
                swapped += 1
    return swapped


def frozen_backward_nodes() -> tuple[type, ...]:
    """The autograd node types of the lean layers, none of which reads its output in backward."""
    return tuple(f._backward_cls for f in (_ConvFunction, _ResnetFunction, _UpsampleFunction))  # type: ignore
