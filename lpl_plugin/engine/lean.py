"""Memory-lean LPL gradient passes: the gradient is taken inside the loss call, stored, and replayed in backward.

LPL of sample b depends on z0_hat[b] alone (the decoder normalizes per sample; target statistics carry no
gradient), so d(sum_b w_b LPL_b)/d z0_hat[b] = w_b * dLPL_b/dz0_hat[b] for any per-sample weights w the host applies
later. Storing dLPL_b/dz0_hat[b] (as small as the latents) lets every decoder activation be freed before the host's
backward, and lets chunks of samples be processed one after another. These functions know the trunk and the layer
rules, never the engine that calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lpl_plugin.engine.chunks import ChunkRunner
from lpl_plugin.engine.distances import LayerRule, layer_gradient, prepare_target
from lpl_plugin.engine.trunk import DecoderTrunk, release_output
from lpl_plugin.engine.norms import channel_std, moment_sums
from lpl_plugin.engine.tensors import widen


@dataclass(frozen=True)
class Decoding:
    """What a pass needs: the frozen decoder trunk, one rule per compared layer, and how latents are unscaled."""

    trunk: DecoderTrunk
    rules: list[LayerRule]
    unscale: Callable[[Tensor], Tensor]


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


def _scale(scales: list[Tensor] | None, index: int) -> Tensor | None:
    """The 'batch' normalizer of one layer, if any."""
    return None if scales is None else scales[index]


def lean_chunk(d: Decoding, pred: Tensor, target: Tensor, scales: list[Tensor] | None, checkpointing: str,
               factor: Tensor | float) -> tuple[Tensor, Tensor]:
    """Distances (b, L) and `factor` times d(sum over layers)/d pred for one chunk; every activation is freed on return.

    Target and prediction run through the decoder stage by stage side by side; each layer's gradient is taken as
    soon as both maps exist (so each target map is dropped at once), and one backward through the lean decoder
    graph finishes the chunk.
    """
    trunk = d.trunk
    x = widen(pred.detach()).requires_grad_(True)
    rows, roots, grads = [], [], []
    with torch.enable_grad():
        unscaled = d.unscale(x)
    targets = trunk.walk(d.unscale(target), graph=False)
    preds = trunk.walk(unscaled, checkpointing, graph=True)
    with trunk.no_autocast():
        for index, (rule, t, h) in enumerate(zip(d.rules, targets, preds)):
            row, grad = layer_gradient(rule, h, t, _scale(scales, index), factor)
            rows.append(row)
            roots.append(h)
            grads.append(grad)
        release_output(h)  # the last map has served its layer; earlier ones are the next stages' kept inputs
        del t, h, targets, preds, unscaled
        torch.autograd.backward(roots, grads)
    del roots, grads
    assert x.grad is not None
    return torch.stack(rows, dim=1), x.grad


def layer_gradients(d: Decoding, pred: Tensor, target: Tensor, factor: Tensor | float) -> tuple[Tensor, list[Tensor]]:
    """Distances (B, L) and `factor` times each layer's gradient w.r.t. its predicted map, without any graph.

    The whole batch goes through the decoder at once, as the reference computes it (compatibility mode).
    """
    rows, grads = [], []
    with d.trunk.no_autocast(), torch.no_grad():
        targets = d.trunk.walk(d.unscale(target))
        preds = d.trunk.walk(d.unscale(widen(pred.detach())))
        for rule, t, h in zip(d.rules, targets, preds):
            row, grad = layer_gradient(rule, h, t, None, factor)
            rows.append(row)
            grads.append(grad)
    return torch.stack(rows, dim=1), grads


def backpropagate(d: Decoding, pred: Tensor, grads: list[Tensor], checkpointing: str) -> Tensor:
    """d/d pred of sum_l <grads[l], feature_l(pred)>: the decoder run again with a graph, then backward through it."""
    x = widen(pred.detach()).requires_grad_(True)
    with d.trunk.no_autocast(), torch.enable_grad():
        roots = list(d.trunk.walk(d.unscale(x), checkpointing))
        torch.autograd.backward(roots, grads)
    assert x.grad is not None
    return x.grad


def target_batch_scales(d: Decoding, target: Tensor, chunks: ChunkRunner) -> list[Tensor]:
    """Per-channel std of each prepared target map over the whole batch, the decoder run chunk by chunk."""
    totals: list[tuple[Tensor, ...]] | None = None
    for _, sums in chunks(target.shape[0], lambda part: _target_moments(d, target[part])):
        totals = sums if totals is None else [tuple(a + b for a, b in zip(*pair)) for pair in zip(totals, sums)]
    assert totals is not None, "a batch has at least one chunk"
    return [channel_std(total, widen(target).dtype) for total in totals]


def _target_moments(d: Decoding, target: Tensor) -> list[tuple[Tensor, ...]]:
    """Per-channel moment sums of each prepared target map of some target latents (no graph)."""
    with d.trunk.no_autocast(), torch.no_grad():
        return [moment_sums(*prepare_target(rule, feature))
                for rule, feature in zip(d.rules, d.trunk.walk(d.unscale(target)))]
