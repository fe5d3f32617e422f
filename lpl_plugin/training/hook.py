"""The built-in `lpl` loss hook: gating, z0_hat, noise-level weights and reduction around the LPL engine."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from lpl_plugin.engine.checks import check_config, check_vae
from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.training.diffusion import min_snr_weight, predict_z0, snr
from lpl_plugin.engine.guard import NonFiniteGuard
from lpl_plugin.engine.perceptual_loss import LatentPerceptualLoss
from lpl_plugin.engine.precision import SCALE_FLOOR
from lpl_plugin.training.ranks import drop_if_any, max_over_ranks
from lpl_plugin.training.registry import HookResult
from lpl_plugin.training.schedule import device_table

log = logging.getLogger("lpl_plugin")


class LPLHook:
    """Adds weight * LPL(z0_hat, z0) for samples with t < lpl_t_threshold from step lpl_start on.

    Returns one value per sample (zeros above the threshold), so a host that averages its per-sample loss over the
    batch gives LPL the weight lpl_weight / B per sample whatever the number of gated samples. In
    `lpl_compat = "diffusers"` mode the gated samples share lpl_weight among themselves, as the reference does.
    """

    def __init__(self, vae: nn.Module, config: LPLConfig, *, scaling_factor: float | None = None,
                 shift_factor: float | None = None, device: torch.device | str | None = None):
        check_vae(vae, "LPLHook")
        self.config = check_config(config, "LPLHook")
        self.loss = LatentPerceptualLoss(vae, config, scaling_factor, shift_factor, device=device)
        self.compat = config.lpl_compat == "diffusers"
        self.guard = NonFiniteGuard(config.lpl_max_bad_steps, self.loss.decoder_dtype, self.loss.device)
        self._floor_hits: Tensor | None = None  # the float16 loss scale's floor hits as the last call left them
        self._warned_floor = False

    def state_dict(self) -> dict[str, Any]:
        """The engine's learned state and the guard's counters (plain numbers, JSON-safe; read at save time only)."""
        self.guard.settle()  # saved after the step's backward: its zeroed gradients count in its streak entry
        return {"engine": self.loss.run_state(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict wrote, keeping this run's settings; warns when the saved settings differ.

        A state written by lpl-plugin 0.1 (flat counters) restores its counters only.
        """
        if "engine" not in state:  # 0.1: {"streak", "bad_steps", "nonfinite_samples", "oom_skips", ...}
            self.guard.load_state_dict(state)
            state = {"engine": {"counters": {k: state[k] for k in ("nonfinite_samples", "oom_skips") if k in state}}}
        else:
            self.guard.load_state_dict(state.get("guard", {}))
        changed = self.loss.load_run_state(state["engine"])
        if changed:
            log.warning("lpl-plugin: the resumed LPL state was saved with other settings (%s); this run keeps its "
                        "own settings and relearns what depends on them", "; ".join(changed))

    # -- agreement across processes (training.ranks; no-ops with one process) -----------------------------------------

    def agreed_streak(self) -> Tensor:
        """The guard's streak of bad evaluations, the largest over processes, so that all of them stop together."""
        return max_over_ranks(self.guard.streak)

    def log_names(self, log_stats: bool) -> list[str]:
        """Every scalar this hook may log in a step, in a fixed order (the same on every process)."""
        names = ["lpl/loss", "lpl/weighted", "lpl/applied_fraction"]
        if log_stats:
            names += [f"lpl/layer/{name}" for name in self.loss.layer_names]
            names += ["lpl/nonfinite_samples", "lpl/nonfinite_steps", "lpl/oom_skips"]
            if self.loss.uses_loss_scale:
                names.append("lpl/loss_scale")
        return names

    def _gate(self, timesteps: Tensor, prediction_type: str,
              alphas_cumprod: Tensor | None) -> tuple[Tensor, int, int]:
        """Indices of the samples LPL applies to (on the device), with the guard's streak and the float16 loss
        scale's floor hits; the number of gated samples and those two counters are the step's one host read.

        A sample applies when t < lpl_t_threshold and z0 is recoverable from the prediction: epsilon at a
        zero-terminal-SNR timestep (alphas_cumprod[t] == 0) has no signal left to recover, so it gets no LPL.
        The streak counts earlier evaluations, the last one with the gradients its backward zeroed (that backward
        has run by now), so a run stops at the call after its last allowed bad one.
        """
        gate = (timesteps < self.config.lpl_t_threshold).flatten()
        if prediction_type == "epsilon" and alphas_cumprod is not None:
            gate = gate & (device_table(alphas_cumprod, timesteps.device)[timesteps.long()].flatten() > 0)
        self.guard.settle()
        streak = self.agreed_streak()
        floor_hits = streak.new_zeros(()) if self._floor_hits is None else self._floor_hits
        gated = gate.to(device=streak.device, dtype=torch.int64).sum()
        count, streak_now, floor_now = torch.stack([gated, streak.reshape(()),
                                                    floor_hits.to(streak.device).reshape(())]).tolist()
        # the gated samples' positions in order, found on the device: a stable sort puts them first
        index = torch.sort((~gate).to(torch.uint8), stable=True).indices[:count]
        return index, int(streak_now), int(floor_now)

    def noise_level_weights(self, timesteps: Tensor, prediction_type: str, alphas_cumprod: Tensor | None,
                            sigmas: Tensor | None, noise_weights: Tensor | None,
                            snr_gamma: float | None) -> Tensor | None:
        """Per-sample weights applied when lpl_scale is on (None: no weighting)."""
        if not self.config.lpl_scale:
            return None
        if self.compat:  # the reference scales only when min-SNR gamma is set
            if snr_gamma is None:
                return None
            noise_weights = None
        if noise_weights is not None:
            return noise_weights.float()
        gamma = snr_gamma if snr_gamma is not None else self.config.lpl_snr_gamma
        if sigmas is None and alphas_cumprod is None:
            return None
        values = snr(timesteps=timesteps, alphas_cumprod=alphas_cumprod, sigmas=sigmas)
        return min_snr_weight(values, gamma, prediction_type)

    def __call__(self, latents: Tensor, noisy_latents: Tensor, timesteps: Tensor, model_pred: Tensor,
                 prediction_type: str, alphas_cumprod: Tensor | None, sigmas: Tensor | None,
                 noise_weights: Tensor | None, snr_gamma: float | None, step: int, is_training: bool,
                 log_stats: bool) -> HookResult:
        """The per-sample LPL term (B,) and its scalars; all zeros when LPL does not apply to this step."""
        batch = latents.shape[0]
        term = torch.zeros(batch, device=latents.device, dtype=torch.float32)
        if not (self.config.use_lpl and is_training and step >= self.config.lpl_start):
            return HookResult(term, {})
        # The one host sync per step: which samples are gated (the decoder runs for those alone), and the guard.
        index, streak, floor_hits = self._gate(timesteps, prediction_type, alphas_cumprod)
        self.guard.check(streak)
        if floor_hits and not self._warned_floor:
            self._warned_floor = True
            log.warning("LPL's float16 loss scale overflowed at its floor of %g (%d times so far): the decoder's "
                        "float16 gradients themselves overflow, so those samples get no LPL; set lpl_dtype = "
                        "\"bfloat16\" or \"float32\"", SCALE_FLOOR, floor_hits)
        gated = int(index.numel())
        logs: dict[str, Tensor | float] = {"lpl/applied_fraction": gated / batch}
        if gated == 0:
            logs["lpl/loss"] = 0.0
            return HookResult(drop_if_any(term, False), logs)  # every process takes part in the same collectives
        pick = (lambda t: None if t is None else t[index]) if gated < batch else (lambda t: t)
        z0_hat = predict_z0(model_pred[index], noisy_latents[index], prediction_type, timesteps=timesteps[index],
                            alphas_cumprod=alphas_cumprod, sigmas=pick(sigmas))
        result = self.loss(z0_hat, latents[index], with_layers=log_stats)
        self._floor_hits = result.scale_floor_hits
        per_sample = result.per_sample
        skipped_here = result.skipped
        if not skipped_here:  # an out-of-memory skip neither breaks nor extends a streak
            self.guard.record(result.nonfinite_in_call, result.nonfinite_in_backward)
        weights = self.noise_level_weights(timesteps[index], prediction_type, alphas_cumprod, pick(sigmas),
                                           pick(noise_weights), snr_gamma)
        value = per_sample if weights is None else per_sample * weights.to(per_sample.device)
        share = batch / gated if self.compat else 1.0
        term = term.index_put((index,), value * (self.config.lpl_weight * share))
        term = drop_if_any(term, skipped_here)  # any process skipped LPL for memory: all of them do this step
        logs["lpl/loss"] = per_sample.detach().mean()
        logs["lpl/weighted"] = term.detach().mean()
        if log_stats and result.layers is not None:
            for name, column in zip(self.loss.layer_names, result.layers.mean(dim=0)):
                logs[f"lpl/layer/{name}"] = column
            logs["lpl/nonfinite_samples"] = result.nonfinite_total
            logs["lpl/nonfinite_steps"] = self.guard.bad_steps
            logs["lpl/oom_skips"] = float(result.oom_skips)
            if result.loss_scale is not None:
                logs["lpl/loss_scale"] = result.loss_scale
        return HookResult(term, logs)
