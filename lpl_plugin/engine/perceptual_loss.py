"""The LPL engine (Berrada et al., ICLR 2025): per-sample distance between VAE-decoder features of z0_hat and z0.

The engine's parts, each looking only down:
- layer math (`distances`, `norms`, `outliers`): pure functions of tensors and their hand-derived gradients;
- decoder trunk (`trunk`, `frozen`, `attention`): a private frozen copy of the decoder stages and the one walk
  through them, no losses;
- lean passes (`lean`): the gradient taken inside the call, stored and replayed in the host's backward;
- the chunk runner (`chunks`), the finite mask and gradient filter (`guard`), and what is learned at run time
  (`state`: chunk size, recomputation, float16 loss scale, counters);
- this engine: one object that owns the gradient strategy and reports each call in one `LPLResult`, the only
  thing its callers (the `lpl` hook above it) read of a call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lpl_plugin.engine.checks import check_config, check_device, check_latents, check_vae
from lpl_plugin.engine.chunks import ChunkRunner, LPLOutOfMemory
from lpl_plugin.engine.distances import layer_distance, layer_rules, prepare_target
from lpl_plugin.engine.guard import finite_gradient, zero_nonfinite_samples
from lpl_plugin.engine.lean import (Decoding, StoredGradient, backpropagate, layer_gradients, lean_chunk,
                                    target_batch_scales)
from lpl_plugin.engine.memory import is_out_of_memory, release_cached_memory
from lpl_plugin.engine.precision import resolve_dtype
from lpl_plugin.engine.state import EngineState
from lpl_plugin.engine.tensors import widen
from lpl_plugin.engine.trunk import DecoderTrunk
from lpl_plugin.settings.config import LPLConfig

log = logging.getLogger("lpl_plugin")


@dataclass(frozen=True)
class LPLResult:
    """One engine call: per-sample LPL (differentiable in the prediction) and what happened on the way.

    Everything a caller needs to know of a call is here; the tensors stay on the device (read them on logging
    steps, or together in one host read). `layers` is the detached (B, 1 + lpl_num_blocks) breakdown when asked
    for. `skipped` means the call ran out of memory even for one sample: LPL is zero this time.

    Non-finite counts: `nonfinite_in_call` is the samples whose value or gradient was inf/NaN in this call (zeroed);
    `nonfinite_in_backward` is a counter the non-finite filter adds to while the host's backward of this call's
    result runs (zero until then); `nonfinite` is `nonfinite_in_call` plus the gradients zeroed in backward passes
    since the previous call; `nonfinite_total` is the engine's running total of all of those reported so far.

    Memory and precision: `oom_retries` and `oom_skips` are the engine's running counts of out-of-memory back-offs
    and of skipped calls; `loss_scale` is float16's dynamic loss scale after this call (None for other decoder
    precisions) and `scale_floor_hits` counts the overflows met with that scale already at its floor.
    """

    per_sample: Tensor
    layers: Tensor | None
    nonfinite: Tensor
    skipped: bool
    nonfinite_in_call: Tensor
    nonfinite_in_backward: Tensor
    nonfinite_total: Tensor
    oom_retries: int
    oom_skips: int
    loss_scale: Tensor | None
    scale_floor_hits: Tensor


class LatentPerceptualLoss(nn.Module):
    """Per-sample LPL between predicted and target latents (both as the trainer holds them, i.e. scaled).

    Holds a private frozen copy of the decoder stages it needs; the VAE passed in is never changed. `dtype`
    overrides `lpl_dtype` (float64 gradient checks use it); `device` defaults to the VAE's.
    """

    def __init__(self, vae: nn.Module, config: LPLConfig | None = None, scaling_factor: float | None = None,
                 shift_factor: float | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.latent_channels = check_vae(vae, "LatentPerceptualLoss")
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
        self.rules = layer_rules(self.config, self.trunk.downsample_factors)
        self.state = EngineState(self.config, dtype, self.trunk.device)
        self.chunks = ChunkRunner(self.state, may_recompute=self.config.lpl_checkpointing == "auto")

    # -- what callers may read besides a call's LPLResult --------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """Name of each compared feature map, in the order of `LPLResult.layers`' columns ("mid", "up0", ...)."""
        return list(self.trunk.stage_names)

    @property
    def decoder_dtype(self) -> torch.dtype:
        """The precision the decoder copy runs in."""
        return self.trunk.dtype

    @property
    def device(self) -> torch.device:
        """The device the decoder copy and the engine's counters live on."""
        return self.trunk.device

    @property
    def uses_loss_scale(self) -> bool:
        """Whether calls carry float16's dynamic loss scale (`LPLResult.loss_scale` is not None)."""
        return self.state.loss_scale.active

    def run_state(self) -> dict[str, Any]:
        """What the engine learned and counted at run time, JSON-safe (reads the device: call at save time only)."""
        return self.state.state_dict()

    def load_run_state(self, saved: dict[str, Any]) -> list[str]:
        """Restore what `run_state` wrote, keeping this engine's settings; returns the settings that differed."""
        return self.state.load_state_dict(saved)

    @property
    def num_layers(self) -> int:
        """Number of compared feature maps (1 + lpl_num_blocks)."""
        return self.trunk.num_layers

    @property
    def layer_weights(self) -> list[float]:
        """Pow-law factor of each compared layer."""
        return [rule.weight for rule in self.rules]

    @property
    def outlier_factors(self) -> list[int | None]:
        """Downsampling factor of each layer whose target outliers are masked (None: not masked)."""
        return [rule.outlier_factor for rule in self.rules]

    def unscale(self, latents: Tensor) -> Tensor:
        """Trainer-scaled latents back to the VAE's latent space: z / scaling_factor + shift_factor."""
        return widen(latents) / self.scaling_factor + self.shift_factor

    def target_features(self, target_latents: Tensor) -> list[Tensor]:
        """Decoder features of the target latents, outside any autograd graph."""
        with torch.no_grad():
            return self.trunk(self.unscale(target_latents))

    def prepare_targets(self, features: list[Tensor]) -> list[tuple[Tensor, Tensor | None]]:
        """Target features in (at least) float32 with outliers zeroed, paired with their masks."""
        return [prepare_target(rule, y) for rule, y in zip(self.rules, features)]

    def _decoding(self) -> Decoding:
        """What the lean passes need from this engine."""
        return Decoding(self.trunk, self.rules, self.unscale)

    # -- a call --------------------------------------------------------------------------------------------------

    def forward(self, pred_latents: Tensor, target_latents: Tensor, *, with_layers: bool = False) -> LPLResult:
        """Per-sample LPL (B,), mean over layers, with the (B, 1 + num_blocks) breakdown when `with_layers`.

        The non-finite filter is applied here once, for both gradient modes: a sample whose gradient reaching
        `pred_latents` in the host's backward holds an inf or NaN gets none, and is counted.
        """
        check_latents(pred_latents, target_latents, self.latent_channels, "LatentPerceptualLoss")
        state = self.state
        state.calls += 1
        target_latents = target_latents.detach()
        in_backward = torch.zeros((), dtype=torch.int64, device=state.zeroed.device)
        pred = finite_gradient(pred_latents, in_backward, state.zeroed)
        skipped = False
        try:
            per_sample, layers, bad = self._evaluate(pred, target_latents)
        except Exception as error:  # the traceback pins the call's tensors: release them after the except block
            if not (isinstance(error, LPLOutOfMemory) or is_out_of_memory(error)):
                raise
            skipped = True
        if skipped:
            release_cached_memory()
            state.oom_skips += 1
            log.warning("LPL skipped for this step: out of memory even for one sample (%d steps skipped so far); "
                        "lower lpl_num_blocks, or set lpl_checkpointing = \"resnet\" or lpl_dtype = \"bfloat16\"",
                        state.oom_skips)
            layers = widen(pred_latents.new_zeros(pred_latents.shape[0], self.num_layers))
            per_sample = StoredGradient.apply(pred, layers.sum(dim=1), torch.zeros_like(pred_latents))
            bad = torch.zeros((), dtype=torch.int64, device=state.zeroed.device)
        bad = bad.to(state.zeroed.device)
        reported = bad + state.take_zeroed()
        state.nonfinite_samples = state.nonfinite_samples + reported
        scale = state.loss_scale
        return LPLResult(per_sample, layers if with_layers else None, reported, skipped, nonfinite_in_call=bad,
                         nonfinite_in_backward=in_backward, nonfinite_total=state.nonfinite_samples,
                         oom_retries=state.oom_retries, oom_skips=state.oom_skips,
                         loss_scale=scale.value if scale.active else None, scale_floor_hits=scale.floor_hits)

    def _evaluate(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample LPL, its detached (B, L) breakdown and the count of non-finite samples."""
        if self.config.lpl_grad_mode == "lean" and pred.requires_grad and torch.is_grad_enabled():
            return self._lean(pred, target)
        with self.trunk.no_autocast():  # plain autograd through the decoder
            targets = self.prepare_targets(self.target_features(target))
            features = self.trunk(self.unscale(pred), self.state.checkpointing)
            layers = torch.stack([layer_distance(rule, h, y, mask) for rule, h, (y, mask)
                                  in zip(self.rules, features, targets)], dim=1)
        (layers,), finite = zero_nonfinite_samples(layers)
        return layers.sum(dim=1) / self.num_layers, layers.detach(), (~finite).sum()

    def _lean(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The lean path: per-sample LPL attached to `pred` through a stored gradient."""
        scale = self.state.loss_scale
        factor = (scale.value if scale.active else 1.0) / self.num_layers
        if self.compat and self.state.chunk_size < pred.shape[0]:
            layers, grads = self._compat_chunks(pred, target, factor)
        else:
            layers, grads = self._chunks(pred, target, factor)
        if scale.active:
            grads = grads / scale.value
        (layers, grads), finite = zero_nonfinite_samples(layers, grads)
        scale.update(~finite.all())
        per_sample = StoredGradient.apply(pred, layers.sum(dim=1) / self.num_layers, grads)
        return per_sample, layers, (~finite).sum()

    def _chunks(self, pred: Tensor, target: Tensor, factor: Tensor | float) -> tuple[Tensor, Tensor]:
        """Distances and gradients chunk by chunk."""
        decoding = self._decoding()
        scales = None
        if self.config.lpl_norm_type == "batch" and pred.shape[0] > self.state.chunk_size:
            scales = target_batch_scales(decoding, target, self.chunks)
        grads = widen(torch.zeros_like(pred))
        layers = grads.new_zeros(pred.shape[0], self.num_layers)
        for part, (rows, grad) in self.chunks(pred.shape[0], lambda part: lean_chunk(
                decoding, pred[part], target[part], scales, self.state.checkpointing, factor)):
            layers[part], grads[part] = rows, grad
        return layers, grads

    def _compat_chunks(self, pred: Tensor, target: Tensor, factor: Tensor | float) -> tuple[Tensor, Tensor]:
        """Compatibility mode in chunks: the loss side on the whole batch, as the reference computes it, then the
        decoder's backward chunk by chunk (convolutions round differently with the batch size, and L1's gradient is
        the sign of a difference that rounding can flip)."""
        decoding = self._decoding()
        layers, layer_grads = layer_gradients(decoding, pred, target, factor)
        grads = widen(torch.zeros_like(pred))
        for part, grad in self.chunks(pred.shape[0], lambda part: backpropagate(
                decoding, pred[part], [g[part] for g in layer_grads], self.state.checkpointing)):
            grads[part] = grad
        return layers, grads
