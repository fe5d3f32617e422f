"""Memory-lean LPL gradient: taken inside the loss call chunk by chunk, stored, and replayed in the host's backward.

LPL of sample b depends on z0_hat[b] alone (the decoder normalizes per sample; target statistics carry no
gradient), so d(sum_b w_b LPL_b)/d z0_hat[b] = w_b * dLPL_b/dz0_hat[b] for any per-sample weights w the host applies
later. Storing dLPL_b/dz0_hat[b] (as small as the latents) lets every decoder activation be freed before the host's
backward, and lets chunks be processed one after another.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .norms import channel_std, moment_sums, widen
from .precision import LossScale

if TYPE_CHECKING:
    from .loss import LatentPerceptualLoss

log = logging.getLogger("lpl_plugin")

# Full-resolution maps are processed in channel slices of about this many elements, so that float32 scratch (loss
# math, GroupNorm backward) stays a small fraction of one map: 16 MiB of float32 per slice. Outlier masks use
# slices a quarter of that size: on the CPU, kthvalue clones its input with int64 indices (12 bytes an element).
SLICE_ELEMENTS = 2 ** 22
MASK_SLICE_ELEMENTS = 2 ** 20


def channel_slices(shape: torch.Size | tuple[int, ...], multiple: int = 1,
                   elements: int | None = None) -> list[slice]:
    """Slices over dim 1 of a (B, C, H, W) map holding about `elements` (SLICE_ELEMENTS) each, whole multiples."""
    channels = shape[1]
    per_channel = max(1, math.prod(shape) // max(1, channels))
    step = max(1, (elements or SLICE_ELEMENTS) // per_channel // multiple) * multiple
    return [slice(start, min(channels, start + step)) for start in range(0, channels, step)]


class LPLOutOfMemory(RuntimeError):
    """Even one sample at a time does not fit in memory."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an allocator failure (CUDA, or the CPU allocator's 'can't allocate memory')."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(error, oom_types):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release_cached_memory(device: torch.device) -> None:
    """Return cached blocks to the driver after an out-of-memory error."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


class StoredGradient(torch.autograd.Function):
    """Returns precomputed per-sample losses; its backward scales the stored gradient by the incoming weights."""

    @staticmethod
    def forward(ctx, pred: Tensor, losses: Tensor, grad: Tensor) -> Tensor:  # type: ignore[override]
        """Pass the loss values through, remembering dLoss_b/dpred[b]."""
        ctx.save_for_backward(grad)
        ctx.pred_dtype = pred.dtype
        return losses.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        """grad_pred[b] = grad_output[b] * stored[b]."""
        (grad,) = ctx.saved_tensors
        weights = grad_output.to(grad.dtype).reshape(-1, *([1] * (grad.dim() - 1)))
        return (weights * grad).to(ctx.pred_dtype), None, None


def _chunk(engine: "LatentPerceptualLoss", pred: Tensor, target: Tensor, batch_scales: list[Tensor] | None,
           checkpointing: str, scale: LossScale) -> tuple[Tensor, Tensor]:
    """Distances (b, L) and d(per-sample LPL)/d pred for one chunk; every decoder activation is freed on return.

    Target and prediction run through the decoder stage by stage side by side; each layer's distance gradient is
    taken as soon as both maps exist (so each target map is dropped at once), and one backward through the lean
    decoder graph finishes the chunk. Under float16 the layer gradients are multiplied by the loss scale before
    they are cast to the decoder's dtype, so small gradients do not flush to zero.
    """
    trunk = engine.trunk
    factor = scale.value / engine.num_layers if scale.active else 1.0 / engine.num_layers
    x = widen(pred.detach()).requires_grad_(True)
    rows, roots, grads = [], [], []
    with trunk.no_autocast():
        with torch.no_grad():
            t = trunk.stem(engine.unscale(target))
        with torch.enable_grad():
            h = trunk.stem(engine.unscale(x))
        for index in range(engine.num_layers):
            with torch.no_grad():
                t = trunk.stage(index, t)
            with torch.enable_grad():
                h = trunk.stage(index, h, checkpointing)
            row, grad = engine.layer_gradient(index, h, t, None if batch_scales is None else batch_scales[index],
                                              factor)
            rows.append(row)
            roots.append(h)
            grads.append(grad)
        del t, h
        torch.autograd.backward(roots, grads)
    del roots, grads
    assert x.grad is not None
    return torch.stack(rows, dim=1), (x.grad / scale.value if scale.active else x.grad)


def _target_batch_scales(engine: "LatentPerceptualLoss", target: Tensor) -> list[Tensor]:
    """Per-channel std of each target map over the whole batch, accumulated chunk by chunk."""
    totals: list[tuple[Tensor, ...]] = []
    for start in range(0, target.shape[0], engine.chunk_size):
        targets = engine.prepare_targets(engine.target_features(target[start:start + engine.chunk_size]))
        sums = [moment_sums(y, mask) for y, mask in targets]
        totals = sums if not totals else [tuple(a + b for a, b in zip(t, s)) for t, s in zip(totals, sums)]
    return [channel_std(t, widen(target).dtype) for t in totals]  # type: ignore[arg-type]


def _back_off(engine: "LatentPerceptualLoss", error: str) -> None:
    """After an out-of-memory error: halve the chunk, else recompute more (`auto` only), else give up."""
    release_cached_memory(engine.trunk.device)
    if engine.chunk_size > 1:
        engine.chunk_size //= 2
        log.warning("LPL ran out of memory; retrying with lpl_chunk_size = %d", engine.chunk_size)
    elif engine.config.lpl_checkpointing == "auto" and engine.checkpointing == "none":
        engine.checkpointing = "resnet"
        log.warning("LPL ran out of memory with one sample per pass; recomputing decoder activations "
                    "(as lpl_checkpointing = \"resnet\") from now on")
    else:
        raise LPLOutOfMemory(error)
    engine.stats.oom_retries += 1


def lean_loss(engine: "LatentPerceptualLoss", pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample LPL attached to `pred` through a stored gradient, and the detached (B, L) breakdown.

    Out-of-memory errors halve `engine.chunk_size`, then (with `lpl_checkpointing = "auto"`) switch on
    recomputation, and raise LPLOutOfMemory when one sample with recomputation still does not fit; both changes
    persist for later calls.
    """
    batch = pred.shape[0]
    scale = engine.loss_scale
    batch_scales = None
    if engine.config.lpl_norm_type == "batch" and not engine.compat and batch > engine.chunk_size:
        batch_scales = _target_batch_scales(engine, target)
    grads = widen(torch.zeros_like(pred))
    layers = grads.new_zeros(batch, engine.num_layers)
    start = 0
    while start < batch:
        stop = min(batch, start + engine.chunk_size)
        failure = None
        try:
            layers[start:stop], grads[start:stop] = _chunk(engine, pred[start:stop], target[start:stop],
                                                           batch_scales, engine.checkpointing, scale)
        except Exception as error:  # the traceback pins the chunk's tensors: handle it after the except block
            if not is_out_of_memory(error):
                raise
            failure = str(error)
        if failure is not None:
            _back_off(engine, failure)
            continue
        start = stop
    finite = torch.isfinite(layers).all(dim=1) & torch.isfinite(grads).flatten(1).all(dim=1)
    scale.update(~finite.all())
    layers = torch.where(finite[:, None], layers, torch.zeros_like(layers))
    grads = torch.where(finite.reshape(-1, *([1] * (grads.dim() - 1))), grads, torch.zeros_like(grads))
    engine.stats.count_nonfinite(~finite)
    per_sample = StoredGradient.apply(pred, layers.sum(dim=1) / engine.num_layers, grads)
    return per_sample, layers
