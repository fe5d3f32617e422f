"""The LPL engine (Berrada et al., ICLR 2025): per-sample distance between VAE-decoder features of z0_hat and z0.

The package's layers, each looking only down:
- `config`: the validated settings;
- layer math (`distances`, `norms`, `outliers`): pure functions of tensors and their hand-derived gradients;
- decoder trunk (`features`, `frozen`, `attention`): a private frozen copy of the decoder stages, no losses;
- lean passes (`lean`): the gradient taken inside the call, stored and replayed in the host's backward;
- this engine: one object that owns the gradient strategy (chunking, out-of-memory back-off, recomputation,
  float16 loss scale, the non-finite filter) with everything it learns at run time in one `EngineState`;
- above it the `lpl` hook (gating, z0_hat, weights), the hook registry, and the host adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lpl_plugin.engine.checks import check_config, check_device, check_latents, check_vae
from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.engine.distances import layer_distance, layer_rules, prepare_target
from lpl_plugin.engine.trunk import DecoderTrunk
from lpl_plugin.engine.guard import finite_gradient
from lpl_plugin.engine.lean import Decoding, StoredGradient, backpropagate, lean_chunk, layer_gradients, target_batch_scales
from lpl_plugin.engine.memory import is_out_of_memory, release_cached_memory
from lpl_plugin.engine.precision import LossScale, resolve_dtype
from lpl_plugin.engine.tensors import widen

log = logging.getLogger("lpl_plugin")
STATE_VERSION = 2


class LPLOutOfMemory(RuntimeError):
    """Even one sample at a time, with every recomputation allowed, does not fit in memory."""


@dataclass(frozen=True)
class LPLResult:
    """One engine call: per-sample LPL (differentiable in the prediction) and what happened on the way.

    `layers` is the detached (B, 1 + lpl_num_blocks) breakdown when asked for. `nonfinite` (a device tensor, read
    it on logging steps only) counts the samples zeroed because their value or gradient was inf/NaN in this call,
    plus gradients zeroed during backward passes since the previous call. `skipped` means the call ran out of
    memory even for one sample: LPL is zero this time.
    """

    per_sample: Tensor
    layers: Tensor | None
    nonfinite: Tensor
    skipped: bool


class EngineState:
    """What the engine learned while running, kept apart from the user's settings; saved and restored whole.

    `chunk_size` and `checkpointing` are what the engine uses now (the settings' values until memory ran short),
    the loss scale is float16's, and the counters run over the engine's life. `zeroed` counts, on the device,
    the gradients the non-finite filter zeroed during backward passes; each call reports those not reported yet.
    """

    def __init__(self, config: LPLConfig, dtype: torch.dtype, device: torch.device):
        self.settings = {"lpl_chunk_size": config.lpl_chunk_size, "lpl_checkpointing": config.lpl_checkpointing,
                         "lpl_dtype": str(dtype).replace("torch.", "")}
        self.chunk_size = config.lpl_chunk_size
        self.checkpointing = "none" if config.lpl_checkpointing == "auto" else config.lpl_checkpointing
        self.loss_scale = LossScale(dtype, device)
        self.calls = self.oom_retries = self.oom_skips = 0
        self.nonfinite_samples = torch.zeros((), dtype=torch.int64, device=device)
        self.zeroed = torch.zeros((), dtype=torch.int64, device=device)
        self.zeroed_reported = torch.zeros((), dtype=torch.int64, device=device)

    def state_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-safe values (reads the device: call at save time only)."""
        return {"version": STATE_VERSION, "settings": dict(self.settings),
                "learned": {"chunk_size": self.chunk_size, "checkpointing": self.checkpointing,
                            "loss_scale": self.loss_scale.state_dict()},
                "counters": {"calls": self.calls, "oom_retries": self.oom_retries, "oom_skips": self.oom_skips,
                             "nonfinite_samples": int(self.nonfinite_samples + self.zeroed
                                                      - self.zeroed_reported)}}

    def load_state_dict(self, saved: dict[str, Any]) -> list[str]:
        """Restore a saved state; what was learned under other settings is dropped. Returns what differed.

        The counters always carry over. The chunk size and the switch to recomputation carry over only when the
        setting they were learned under is unchanged; the loss scale only when the decoder precision is.
        """
        counters = saved.get("counters", {})
        self.calls = int(counters.get("calls", self.calls))
        self.oom_retries = int(counters.get("oom_retries", self.oom_retries))
        self.oom_skips = int(counters.get("oom_skips", self.oom_skips))
        device = self.nonfinite_samples.device
        self.nonfinite_samples = torch.tensor(int(counters.get("nonfinite_samples", 0)), device=device)
        before, learned = saved.get("settings", {}), saved.get("learned", {})
        changed = [f"{key} = {before[key]!r} then, {value!r} now" for key, value in self.settings.items()
                   if key in before and before[key] != value]
        if before.get("lpl_chunk_size") == self.settings["lpl_chunk_size"] and "chunk_size" in learned:
            self.chunk_size = max(1, min(int(learned["chunk_size"]), self.chunk_size))
        if (before.get("lpl_checkpointing") == self.settings["lpl_checkpointing"] == "auto"
                and learned.get("checkpointing") == "resnet"):
            self.checkpointing = "resnet"
        if before.get("lpl_dtype") == self.settings["lpl_dtype"] and "loss_scale" in learned:
            self.loss_scale.load_state_dict(learned["loss_scale"])
        return changed

    def take_zeroed(self) -> Tensor:
        """The gradients zeroed in backward passes and not reported yet (a device tensor; no sync)."""
        fresh = self.zeroed - self.zeroed_reported
        self.zeroed_reported = self.zeroed.clone()
        return fresh


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
        """Per-sample LPL (B,), mean over layers, with the (B, 1 + num_blocks) breakdown when `with_layers`."""
        check_latents(pred_latents, target_latents, self.latent_channels, "LatentPerceptualLoss")
        state = self.state
        state.calls += 1
        target_latents = target_latents.detach()
        skipped = False
        try:
            per_sample, layers, bad = self._evaluate(pred_latents, target_latents)
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
            per_sample = StoredGradient.apply(pred_latents, layers.sum(dim=1), torch.zeros_like(pred_latents))
            bad = torch.zeros((), dtype=torch.int64, device=state.zeroed.device)
        bad = bad.to(state.zeroed.device) + state.take_zeroed()
        state.nonfinite_samples = state.nonfinite_samples + bad
        return LPLResult(per_sample, layers if with_layers else None, bad, skipped)

    def _evaluate(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample LPL, its detached (B, L) breakdown and the count of non-finite samples."""
        if self.config.lpl_grad_mode == "lean" and pred.requires_grad and torch.is_grad_enabled():
            return self._lean(pred, target)
        # Plain autograd: a sample whose gradient is inf/NaN (a 0 * inf in backward) gets none, and is counted.
        x = finite_gradient(pred, self.state.zeroed)
        with self.trunk.no_autocast():
            targets = self.prepare_targets(self.target_features(target))
            features = self.trunk(self.unscale(x), self.state.checkpointing)
            layers = torch.stack([layer_distance(rule, h, y, mask) for rule, h, (y, mask)
                                  in zip(self.rules, features, targets)], dim=1)
        finite = torch.isfinite(layers).all(dim=1)
        layers = torch.where(finite[:, None], layers, torch.zeros_like(layers))
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
        finite = torch.isfinite(layers).all(dim=1) & torch.isfinite(grads).flatten(1).all(dim=1)
        scale.update(~finite.all())
        layers = torch.where(finite[:, None], layers, torch.zeros_like(layers))
        grads = torch.where(finite.reshape(-1, *([1] * (grads.dim() - 1))), grads, torch.zeros_like(grads))
        per_sample = StoredGradient.apply(pred, layers.sum(dim=1) / self.num_layers, grads)
        return per_sample, layers, (~finite).sum()

    def _chunks(self, pred: Tensor, target: Tensor, factor: Tensor | float) -> tuple[Tensor, Tensor]:
        """Distances and gradients chunk by chunk, halving the chunk (or recomputing more) on out-of-memory."""
        decoding = self._decoding()
        batch = pred.shape[0]
        scales = None
        if self.config.lpl_norm_type == "batch" and batch > self.state.chunk_size:
            scales = self._retrying(lambda: target_batch_scales(decoding, target, self.state.chunk_size))
        grads = widen(torch.zeros_like(pred))
        layers = grads.new_zeros(batch, self.num_layers)
        start = 0
        while start < batch:
            stop = min(batch, start + self.state.chunk_size)
            done = self._attempt(lambda: lean_chunk(decoding, pred[start:stop], target[start:stop], scales,
                                                    self.state.checkpointing, factor))
            if done is None:
                continue
            layers[start:stop], grads[start:stop] = done
            start = stop
        return layers, grads

    def _compat_chunks(self, pred: Tensor, target: Tensor, factor: Tensor | float) -> tuple[Tensor, Tensor]:
        """Compatibility mode in chunks: the loss side on the whole batch, as the reference computes it, then the
        decoder's backward chunk by chunk (convolutions round differently with the batch size, and L1's gradient is
        the sign of a difference that rounding can flip)."""
        decoding = self._decoding()
        layers, layer_grads = layer_gradients(decoding, pred, target, factor)
        grads = widen(torch.zeros_like(pred))
        start = 0
        while start < pred.shape[0]:
            stop = min(pred.shape[0], start + self.state.chunk_size)
            part = [g[start:stop] for g in layer_grads]
            done = self._attempt(lambda: backpropagate(decoding, pred[start:stop], part, self.state.checkpointing))
            if done is None:
                continue
            grads[start:stop] = done
            start = stop
        return layers, grads

    def _attempt(self, work: Any) -> Any:
        """`work()`, or None after backing off from an out-of-memory error (call again with the new settings)."""
        failure = None
        try:
            return work()
        except Exception as error:  # the traceback pins the chunk's tensors: handle it after the except block
            if not is_out_of_memory(error):
                raise
            failure = str(error)
        self._back_off(failure)
        return None

    def _retrying(self, work: Any) -> Any:
        """`work()`, backing off and retrying until it fits (or LPLOutOfMemory ends the call)."""
        while True:
            done = self._attempt(work)
            if done is not None:
                return done

    def _back_off(self, error: str) -> None:
        """After an out-of-memory error: halve the chunk, else recompute more (`auto` only), else give up."""
        state = self.state
        release_cached_memory()
        if state.chunk_size > 1:
            state.chunk_size //= 2
            log.warning("LPL ran out of memory; retrying with lpl_chunk_size = %d", state.chunk_size)
        elif self.config.lpl_checkpointing == "auto" and state.checkpointing == "none":
            state.checkpointing = "resnet"
            log.warning("LPL ran out of memory with one sample per pass; recomputing decoder activations "
                        "(as lpl_checkpointing = \"resnet\") from now on")
        else:
            raise LPLOutOfMemory(error)
        state.oom_retries += 1
