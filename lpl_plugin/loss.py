"""Latent Perceptual Loss (Berrada et al., ICLR 2025): distance between VAE-decoder features of z0_hat and z0."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .arguments import check_config, check_device, check_latents, check_vae
from .config import LPLConfig
from .features import DecoderTrunk
from .guard import finite_gradient
from .norms import OWN_NORM_EPS, SHARED_NORM_EPS, channel_norm, channel_std, moment_sums, widen
from .lean import (MASK_SLICE_ELEMENTS, LPLOutOfMemory, StoredGradient, channel_slices, is_out_of_memory,
                   lean_loss, release_cached_memory)
from .outliers import outlier_mask
from .precision import LossScale, resolve_dtype

log = logging.getLogger("lpl_plugin")

@dataclass
class LossStats:
    """Counters of an engine's life for logging; the non-finite count stays on the device (no sync)."""

    calls: int = 0
    oom_retries: int = 0
    oom_skips: int = 0
    nonfinite_samples: Tensor | int = 0
    last_nonfinite: Tensor | int = 0

    def count_nonfinite(self, bad: Tensor) -> None:
        """Add the samples whose LPL value or gradient was not finite in this call."""
        self.last_nonfinite = bad.sum()
        self.nonfinite_samples = self.nonfinite_samples + self.last_nonfinite


def outlier_factors(config: LPLConfig, downsample_factors: list[int]) -> list[int | None]:
    """Downsampling factor used for each masked layer (None: not masked).

    Compat: the reference's fixed indices (2 -> 2; 3 and 4 -> 1). Default: every map at most 2x below the
    decoder output, its factor read from the decoder's layout (the same three maps for SDXL).
    """
    if not config.lpl_remove_outliers:
        return [None] * len(downsample_factors)
    if config.lpl_compat == "diffusers":
        fixed = {2: 2, 3: 1, 4: 1}
        return [fixed.get(i) for i in range(len(downsample_factors))]
    return [f if f <= 2 else None for f in downsample_factors]


class LatentPerceptualLoss(nn.Module):
    """Per-sample LPL between predicted and target latents (both as the trainer holds them, i.e. scaled).

    Holds a private frozen copy of the decoder stages it needs; the VAE passed in is never changed. `dtype`
    overrides `lpl_dtype` (float64 gradient checks use it); `device` defaults to the VAE's.
    """

    def __init__(self, vae: nn.Module, config: LPLConfig | None = None, scaling_factor: float | None = None,
                 shift_factor: float | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.latent_channels = check_vae(vae, "LatentPerceptualLoss")  # argument checks (issue 12)
        self.config = LPLConfig(use_lpl=True) if config is None else check_config(config, "LatentPerceptualLoss")
        check_device(device, "LatentPerceptualLoss")
        self.compat = self.config.lpl_compat == "diffusers"
        vae_config = getattr(vae, "config", None)
        if scaling_factor is None:
            scaling_factor = getattr(vae_config, "scaling_factor", None) or 1.0
        if shift_factor is None:
            shift_factor = getattr(vae_config, "shift_factor", None) or 0.0
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        if device is None:
            device = next(vae.parameters()).device
        dtype = dtype or resolve_dtype(self.config.lpl_dtype, torch.device(device))
        self.trunk = DecoderTrunk(vae, self.config.lpl_num_blocks, use_post_quant_conv=not self.compat,
                                  exact_upsampling=self.compat, dtype=dtype, device=device)
        self.layer_weights = self._layer_weights()
        self.outlier_factors = self._outlier_factors()
        self.chunk_size = self.config.lpl_chunk_size
        # Recomputation in use: "auto" starts without and switches to "resnet" on running out of memory.
        self.checkpointing = "none" if self.config.lpl_checkpointing == "auto" else self.config.lpl_checkpointing
        self.loss_scale = LossScale(dtype, self.trunk.device)
        self.stats = LossStats()
        self.last_layer_stats: dict[str, Tensor] = {}

    # -- static layout ---------------------------------------------------------------------------------------

    def _layer_weights(self) -> list[float]:
        """Per-layer factor: the reference's 2^-min(i, 3) in compat mode, else 1 / upsampling over the mid block."""
        count = self.trunk.num_layers
        if not self.config.lpl_pow_law:
            return [1.0] * count
        if self.compat:
            return [2.0 ** -min(i, 3) for i in range(count)]
        top = self.trunk.downsample_factors[0]
        return [f / top for f in self.trunk.downsample_factors]

    def _outlier_factors(self) -> list[int | None]:
        """Downsampling factor used for each masked layer (None: not masked); see `outlier_factors`."""
        return outlier_factors(self.config, self.trunk.downsample_factors)

    @property
    def num_layers(self) -> int:
        """Number of compared feature maps (1 + lpl_num_blocks)."""
        return self.trunk.num_layers

    # -- math ------------------------------------------------------------------------------------------------

    def unscale(self, latents: Tensor) -> Tensor:
        """Trainer-scaled latents back to the VAE's latent space: z / scaling_factor + shift_factor."""
        return widen(latents) / self.scaling_factor + self.shift_factor

    def target_features(self, target_latents: Tensor) -> list[Tensor]:
        """Decoder features of the target latents, outside any autograd graph."""
        with torch.no_grad():
            return self.trunk(self.unscale(target_latents))

    def prepare_target(self, index: int, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """One target map in (at least) float32 with outliers zeroed, paired with its mask."""
        y = widen(y)
        factor = self.outlier_factors[index]
        if factor is None:
            return y, None
        mask = outlier_mask(y, factor, exact_reference=self.compat)
        return y * mask, mask

    def prepare_targets(self, features: list[Tensor]) -> list[tuple[Tensor, Tensor | None]]:
        """Target features in (at least) float32 with outliers zeroed, paired with their masks."""
        return [self.prepare_target(i, y) for i, y in enumerate(features)]

    def batch_scales(self, targets: list[tuple[Tensor, Tensor | None]]) -> list[Tensor]:
        """Per-channel std of each target map over batch and space (masked pixels excluded)."""
        return [channel_std(moment_sums(y, mask), y.dtype) for y, mask in targets]

    def layer_distance(self, index: int, x: Tensor, y: Tensor, mask: Tensor | None,
                       batch_scale: Tensor | None = None) -> Tensor:
        """Weighted distance per sample (B,) between predicted map x and prepared target map y of one layer."""
        norm = self.config.lpl_norm_type
        x = widen(x)
        if mask is not None and not self.compat:
            x = x * mask  # the reference masks only the target, so outliers still shift the prediction's norm
        if norm == "default":
            x = x / (channel_norm(x) + OWN_NORM_EPS)
            y = y / (channel_norm(y) + OWN_NORM_EPS)
        elif norm == "shared":
            scale = channel_norm(y) + SHARED_NORM_EPS
            x, y = x / scale, y / scale
        elif not self.compat:  # batch: the reference leaves features raw here
            scales = batch_scale if batch_scale is not None else channel_std(moment_sums(y, mask), y.dtype)
            x, y = x / scales, y / scales
        diff = x - y
        term = diff.square() if self.config.lpl_loss_type == "mse" else diff.abs()
        if mask is None:
            per_channel = term.mean(dim=(2, 3))
        else:
            kept = mask.sum(dim=(2, 3))
            per_channel = (term * mask).sum(dim=(2, 3)) / (kept if self.compat else kept.clamp_min(1))
        return per_channel.mean(dim=1) * self.layer_weights[index]

    def layer_gradient(self, index: int, x: Tensor, target: Tensor, batch_scale: Tensor | None = None,
                       factor: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
        """One layer's distance per sample (B,) and `factor` times its gradient w.r.t. map x, in x's dtype.

        Same value as `layer_distance` from the raw target map, computed in channel slices so that float32 scratch
        stays small at full resolution. For 'shared' and 'batch' normalization (and the reference's raw 'batch')
        the gradient is written out: with u = m (x - y) / s, per channel d = w / (C K) * sum(u^2) and
        grad = 2 w / (C K) * u / s (MSE), or sum|u| and w / (C K) * sign(u) / s (L1), where m is the outlier mask,
        K the kept pixels and s the normalizer. 'default' normalization (each map by its own norm, which couples
        the channels) is differentiated through `layer_distance` on whole maps.
        """
        norm = self.config.lpl_norm_type
        if norm == "default":
            y, mask = self.prepare_target(index, target)
            leaf = widen(x.detach()).requires_grad_(True)
            with torch.enable_grad():
                row = self.layer_distance(index, leaf, y, mask, batch_scale)
                (grad,) = torch.autograd.grad(row.sum(), leaf)
            return row.detach(), (grad * factor).to(x.dtype)
        masked = self.outlier_factors[index] is not None
        masks = torch.empty(target.shape, dtype=torch.bool, device=target.device) if masked else None
        squares: Tensor | float = 0.0
        stds = []
        # Masks, then the shared normalizer or the per-channel std, slice by slice.
        for part in channel_slices(target.shape, elements=MASK_SLICE_ELEMENTS if masked else None):
            y, mask = self.prepare_target(index, target[:, part])
            if masks is not None:
                masks[:, part] = mask
            if norm == "shared":
                squares = squares + y.square().sum(dim=1, keepdim=True)
            elif not self.compat and batch_scale is None:
                stds.append(channel_std(moment_sums(y, mask), y.dtype))
        if norm == "shared":
            scale: Tensor | None = torch.as_tensor(squares).sqrt() + SHARED_NORM_EPS
        elif self.compat:  # batch: the reference leaves features raw
            scale = None
        else:
            scale = batch_scale if batch_scale is not None else torch.cat(stds, dim=1)
        mse = self.config.lpl_loss_type == "mse"
        weight = self.layer_weights[index] / x.shape[1]
        row = 0.0
        grad = torch.empty_like(x)
        for part in channel_slices(target.shape):
            y = widen(target[:, part])
            mask = None if masks is None else masks[:, part]
            u = x[:, part].detach().to(y.dtype, copy=True).sub_(y if mask is None else y * mask)
            del y
            if mask is None:
                kept = torch.full(u.shape[:2], u.shape[2] * u.shape[3], dtype=u.dtype, device=u.device)
            else:
                u.mul_(mask)
                kept = mask.sum(dim=(2, 3)).to(u.dtype)
                kept = kept if self.compat else kept.clamp_min(1)
            part_scale = None if scale is None else (scale if scale.shape[1] == 1 else scale[:, part])
            if part_scale is not None:
                u.div_(part_scale)
            coef = weight / kept
            sums = torch.linalg.vector_norm(u, ord=2 if mse else 1, dim=(2, 3))
            row = row + (coef * (sums.square() if mse else sums)).sum(dim=1)
            u = u.mul_(2.0 * coef[..., None, None]) if mse else u.sign_().mul_(coef[..., None, None])
            if part_scale is not None:
                u.div_(part_scale)
            grad[:, part] = u.mul_(factor)
        return torch.as_tensor(row), grad

    def layer_distances(self, pred_features: list[Tensor], targets: list[tuple[Tensor, Tensor | None]],
                        batch_scales: list[Tensor] | None = None) -> Tensor:
        """Weighted distance per sample and layer, shape (B, num_layers)."""
        rows = [self.layer_distance(i, x, y, mask, None if batch_scales is None else batch_scales[i])
                for i, (x, (y, mask)) in enumerate(zip(pred_features, targets))]
        return torch.stack(rows, dim=1)

    def distances(self, pred_latents: Tensor, target_latents: Tensor,
                  batch_scales: list[Tensor] | None = None, checkpointing: str = "none") -> Tensor:
        """Plain autograd: (B, num_layers) distances differentiable w.r.t. pred_latents."""
        targets = self.prepare_targets(self.target_features(target_latents))
        if self.config.lpl_norm_type == "batch" and batch_scales is None:
            batch_scales = self.batch_scales(targets)
        features = self.trunk(self.unscale(pred_latents), checkpointing)
        return self.layer_distances(features, targets, batch_scales)

    def forward(self, pred_latents: Tensor, target_latents: Tensor, *,
                return_layers: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Per-sample LPL (B,), mean over layers; with `return_layers` also the (B, 1 + num_blocks) breakdown."""
        self.stats.calls += 1
        check_latents(pred_latents, target_latents, self.latent_channels, "LatentPerceptualLoss")  # issue 12
        target_latents = target_latents.detach()
        skipped = False
        try:
            per_sample, layers = self._compute(pred_latents, target_latents)
        except Exception as error:  # the traceback pins the call's tensors: release them after the except block
            if not (isinstance(error, LPLOutOfMemory) or is_out_of_memory(error)):
                raise
            skipped = True
        if skipped:
            release_cached_memory(self.trunk.device)
            self.stats.oom_skips += 1
            log.warning("LPL skipped for this step: out of memory even for one sample (%d steps skipped so far); "
                        "lower lpl_num_blocks, or set lpl_checkpointing = \"resnet\" or lpl_dtype = \"bfloat16\"",
                        self.stats.oom_skips)
            layers = widen(pred_latents.new_zeros(pred_latents.shape[0], self.num_layers))
            per_sample = StoredGradient.apply(pred_latents, layers.sum(dim=1), torch.zeros_like(pred_latents))
        return (per_sample, layers) if return_layers else per_sample

    def _compute(self, pred_latents: Tensor, target_latents: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample LPL and its detached (B, L) breakdown, through the lean or the plain autograd path."""
        if self.config.lpl_grad_mode == "lean" and pred_latents.requires_grad and torch.is_grad_enabled():
            return lean_loss(self, pred_latents, target_latents)
        # A sample whose gradient is inf/NaN (a 0 * inf in backward) gets none, as in lean mode.
        layers = self.distances(finite_gradient(pred_latents), target_latents, checkpointing=self.checkpointing)
        finite = torch.isfinite(layers).all(dim=1)
        self.stats.count_nonfinite(~finite)
        layers = torch.where(finite[:, None], layers, torch.zeros_like(layers))
        return layers.sum(dim=1) / self.num_layers, layers.detach()

