"""Layer math of LPL (Berrada et al., 2025, Sec. 3): normalized, outlier-masked feature distances and gradients.

Pure functions of tensors. A `LayerRule` says how one decoder layer is compared (its weight, whether its target is
masked, the normalization, the distance, and whether the reference's arithmetic is reproduced); `layer_distance`
gives per-sample distances through plain autograd operations (the reference's own, in compatibility mode), and
`layer_gradient` gives the distance together with its gradient with respect to the predicted map, written out by
hand for 'shared' and 'batch' normalization so that it runs a channel slice at a time with little float32 scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.engine.norms import OWN_NORM_EPS, SHARED_NORM_EPS, channel_norm, channel_std, moment_sums
from lpl_plugin.engine.outliers import masked_layers, outlier_mask
from lpl_plugin.engine.tensors import channel_slices, kept_counts, widen


@dataclass(frozen=True)
class LayerRule:
    """How one decoder layer is compared: weight, outlier masking, normalization, distance, reference arithmetic."""

    weight: float
    outlier_factor: int | None
    norm: str
    loss: str
    compat: bool

    @property
    def masked(self) -> bool:
        """Whether target outliers are masked on this layer."""
        return self.outlier_factor is not None


def layer_rules(config: LPLConfig, downsample_factors: Sequence[int]) -> list[LayerRule]:
    """One rule per compared map, from the settings and each map's resolution below the decoder output.

    Pow-law weights: the reference's 2^-min(i, 3) in compat mode, else 1 / upsampling over the mid block.
    """
    compat = config.lpl_compat == "diffusers"
    count = len(downsample_factors)
    if not config.lpl_pow_law:
        weights = [1.0] * count
    elif compat:
        weights = [2.0 ** -min(i, 3) for i in range(count)]
    else:
        weights = [f / downsample_factors[0] for f in downsample_factors]
    factors = masked_layers(config.lpl_remove_outliers, compat, downsample_factors)
    return [LayerRule(w, f, config.lpl_norm_type, config.lpl_loss_type, compat) for w, f in zip(weights, factors)]


def prepare_target(rule: LayerRule, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """One target map in (at least) float32 with outliers zeroed, paired with its boolean mask."""
    y = widen(y)
    if not rule.masked:
        return y, None
    assert rule.outlier_factor is not None
    mask = outlier_mask(y, rule.outlier_factor)
    return y * mask, mask  # inf * 0 is NaN: a non-finite target value stays visible where the mask drops it


def layer_distance(rule: LayerRule, x: Tensor, y: Tensor, mask: Tensor | None,
                   scale: Tensor | None = None) -> Tensor:
    """Weighted distance per sample (B,) between predicted map x and prepared target map y, differentiable in x.

    In compatibility mode the operations and their order are the reference's: x is not masked, each map is divided
    by the normalizer separately, and the pow-law factor multiplies the masked sum before the count divides it.
    `scale` is the 'batch' normalizer (per-channel std over the target batch); it defaults to this batch's.
    """
    x = widen(x)
    if mask is not None and not rule.compat:
        x = x * mask  # the reference masks only the target: outliers still shift x's own norm (inf * 0 stays NaN)
    if rule.norm == "default":
        x = x / (channel_norm(x) + OWN_NORM_EPS)
        y = y / (channel_norm(y) + OWN_NORM_EPS)
    elif rule.norm == "shared":
        norm = channel_norm(y) + SHARED_NORM_EPS
        x, y = x / norm, y / norm
    elif not rule.compat:  # batch: the reference leaves features raw here
        scale = scale if scale is not None else channel_std(moment_sums(y, mask), y.dtype)
        x, y = x / scale, y / scale
    term = (x - y) ** 2 if rule.loss == "mse" else (x - y).abs()
    if rule.compat:
        if mask is None:
            return (term.sum(dim=(2, 3)) * rule.weight / (term.shape[2] * term.shape[3])).mean(dim=1)
        return ((term * mask).sum(dim=(2, 3)) * rule.weight / mask.sum(dim=(2, 3))).mean(dim=1)
    if mask is None:
        per_channel = term.mean(dim=(2, 3))
    else:
        per_channel = (term * mask).sum(dim=(2, 3)) / kept_counts(mask).clamp_min(1)
    return per_channel.mean(dim=1) * rule.weight


def _autograd_gradient(rule: LayerRule, x: Tensor, target: Tensor, scale: Tensor | None,
                       factor: Tensor | float) -> tuple[Tensor, Tensor]:
    """Distance and `factor` times its gradient through `layer_distance` on whole maps (couples the channels)."""
    y, mask = prepare_target(rule, target)
    leaf = widen(x.detach()).requires_grad_(True)
    with torch.enable_grad():
        row = layer_distance(rule, leaf, y, mask, scale)
        (grad,) = torch.autograd.grad(row.sum(), leaf)
    return row.detach(), (grad * factor).to(x.dtype)


def layer_gradient(rule: LayerRule, x: Tensor, target: Tensor, scale: Tensor | None = None,
                   factor: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """One layer's distance per sample (B,) and `factor` times its gradient w.r.t. map x, in x's dtype.

    The same value as `layer_distance` on the raw target map. For 'shared' and 'batch' normalization in the
    default mode the gradient is written out and computed in channel slices: with u = m (x - y) / s, per channel
    d = w / (C K) * sum(u^2) and grad = 2 w / (C K) * u / s (MSE), or sum|u| and w / (C K) * sign(u) / s (L1),
    where m is the outlier mask, K the kept pixels and s the normalizer. 'default' normalization (each map by its
    own norm, which couples the channels) and the compatibility mode (the reference's exact arithmetic, on which
    L1's sign depends) are differentiated through `layer_distance` on whole maps.
    """
    if rule.norm == "default" or rule.compat:
        return _autograd_gradient(rule, x, target, scale, factor)
    x = x.detach()
    parts = channel_slices(target.shape)
    masks: list[Tensor | None] = []
    squares: Tensor | None = None
    moments = []
    for part in parts:  # masks, then the shared normalizer or the per-channel statistics, slice by slice
        t = target[:, part]
        mask = outlier_mask(t, rule.outlier_factor) if rule.outlier_factor is not None else None
        masks.append(mask)
        if rule.norm == "shared":
            kept = t if mask is None else torch.where(mask, t, 0.0)
            part_squares = torch.linalg.vector_norm(kept, ord=2, dim=1, keepdim=True).square_()
            squares = part_squares if squares is None else squares.add_(part_squares)
        elif scale is None:
            moments.append(moment_sums(t, mask))
    if rule.norm == "shared":
        assert squares is not None
        inverse = squares.sqrt_().add_(SHARED_NORM_EPS).reciprocal_()  # (B, 1, H, W)
    else:
        if scale is None:
            scale = channel_std(tuple(torch.cat(m, dim=0) for m in zip(*moments)), torch.float32)  # type: ignore
        inverse = scale.reciprocal()  # (1, C, 1, 1)
    per_channel_weight = rule.weight / x.shape[1]
    row: Tensor | None = None
    grad = torch.empty_like(x)
    for part, mask in zip(parts, masks):
        u = x[:, part].to(torch.float32 if x.dtype != torch.float64 else x.dtype, copy=True).sub_(target[:, part])
        if mask is None:
            kept = torch.full(u.shape[:2], u.shape[2] * u.shape[3], dtype=u.dtype, device=u.device)
        else:  # a non-finite value anywhere in the maps must reach the row, also where the mask drops it
            poison = torch.linalg.vector_norm(u, ord=float("inf"), dim=(1, 2, 3)).mul_(0.0)
            u.masked_fill_(~mask, 0.0)
            kept = kept_counts(mask).to(u.dtype).clamp_min_(1)
        part_inverse = inverse if inverse.shape[1] == 1 else inverse[:, part]
        u.mul_(part_inverse)
        coef = per_channel_weight / kept
        if rule.loss == "mse":
            sums = torch.linalg.vector_norm(u, ord=2, dim=(2, 3)).square_()
            u.mul_((2.0 * coef)[..., None, None])
        else:
            sums = torch.linalg.vector_norm(u, ord=1, dim=(2, 3))
            u.sign_().mul_(coef[..., None, None])
        value = (coef * sums).sum(dim=1)
        if mask is not None:
            value.add_(poison)
        row = value if row is None else row.add_(value)
        if grad.dtype == u.dtype:
            torch.mul(u.mul_(part_inverse), factor, out=grad[:, part])
        else:
            grad[:, part] = u.mul_(part_inverse).mul_(factor)
    assert row is not None
    return row, grad
