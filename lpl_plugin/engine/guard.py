"""Non-finite guard: bad LPL samples add exactly zero gradient, are counted on the device, and a streak stops the run.

The one finite mask (`zero_nonfinite_samples`) zeroes a sample's LPL value and gradient when either is not finite,
in the engine's forward and, through the gradient filter, in the host's backward; both are counted on the device.
Around that a training run gets device-side counters of bad evaluations and a stop with the likely cause after too
many in a row. Nothing here reads a device value on its own; the hook hands `check` the streak from its one existing
host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lpl_plugin.settings.config import FP16_FIX_VAE
from lpl_plugin.settings.errors import UserError


class NonFiniteLPLError(UserError):
    """LPL was not finite for `lpl_max_bad_steps` evaluations in a row; the message names the cause and the fix."""


def zero_nonfinite_samples(*tensors: Tensor) -> tuple[list[Tensor], Tensor]:
    """The tensors with every sample (dim 0) zeroed where any of them holds an inf or NaN, and the (B,) finite mask."""
    finite = torch.isfinite(tensors[0]).flatten(1).all(dim=1)
    for tensor in tensors[1:]:
        finite = finite & torch.isfinite(tensor).flatten(1).all(dim=1)
    kept = [torch.where(finite.reshape(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t)) for t in tensors]
    return kept, finite


class FiniteGradient(torch.autograd.Function):
    """Identity in forward; in backward zeroes the whole gradient of every sample that holds any inf or NaN.

    The number of samples zeroed is added, on the device, to each counter tensor the caller passes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, *counters: Tensor) -> Tensor:  # type: ignore[override]
        """Pass the input through unchanged."""
        ctx.counters = counters
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """grad[b] if every element of it is finite, else zeros (counted)."""
        (grad,), finite = zero_nonfinite_samples(grad)
        zeroed = (~finite).sum()
        for counter in ctx.counters:
            counter.add_(zeroed.to(counter.dtype))
        return (grad, *([None] * len(ctx.counters)))


def finite_gradient(x: Tensor, *counters: Tensor) -> Tensor:
    """`x` whose gradient is zeroed per sample wherever it is not finite, counted into each of `counters` (no-op
    without autograd)."""
    return FiniteGradient.apply(x, *counters) if x.requires_grad else x


def stop_message(streak: int, limit: int, decoder_dtype: torch.dtype) -> str:
    """One line: what happened, the likely cause for this decoder precision, and what to change."""
    if decoder_dtype == torch.float16:
        cause = ("the SDXL VAE overflows in float16 (lpl_dtype = \"float16\"): its activations pass float16's "
                 "maximum of 65504")
    else:
        cause = ("non-finite latents or predictions, most often latents cached with the SDXL VAE in float16, "
                 "which overflows (the LPL decoder itself runs in " + str(decoder_dtype).replace("torch.", "") + ")")
    return (f"LPL was inf/NaN in {streak} evaluations in a row (lpl_max_bad_steps = {limit}), so the run was "
            f"stopped; likely cause: {cause}; fix: set lpl_dtype = \"bfloat16\" or \"float32\" (a float32 decoder), "
            f"set no_half_vae = true and re-cache latents, or use an fp16-safe VAE such as {FP16_FIX_VAE}; "
            "lpl_max_bad_steps = 0 keeps training with the bad samples zeroed")


class NonFiniteGuard:
    """Counts LPL evaluations with non-finite samples on the device and stops after `max_bad_steps` in a row.

    An evaluation is bad when any sample's LPL value or gradient was not finite; a clean evaluation resets the
    streak; steps where LPL did not run leave it as it is (with a low threshold and a small batch most steps gate
    no sample). `max_bad_steps = 0` never stops. An evaluation whose gradients are zeroed only in the host's
    backward is bad too: `settle` counts them once that backward has run, before the streak is next read.
    """

    def __init__(self, max_bad_steps: int, decoder_dtype: torch.dtype, device: torch.device):
        self.max_bad_steps = max_bad_steps
        self.decoder_dtype = decoder_dtype
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        # the counters before the last evaluation, its bad samples and its backward's counter, for `settle`
        self._last: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None

    def state_dict(self) -> dict[str, int]:
        """The counters as plain numbers (read from the device: call at save time only)."""
        return {"streak": int(self.streak), "bad_steps": int(self.bad_steps)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what state_dict wrote; missing keys keep their current values."""
        device = self.streak.device
        self._last = None
        if "streak" in state:
            self.streak = torch.tensor(int(state["streak"]), dtype=torch.int64, device=device)
        if "bad_steps" in state:
            self.bad_steps = torch.tensor(int(state["bad_steps"]), dtype=torch.int64, device=device)

    def record(self, bad_samples: Tensor | int, zeroed_later: Tensor | None = None) -> None:
        """Account one LPL evaluation given how many of its samples were not finite (device tensor, no sync).

        `zeroed_later` is a device counter of the evaluation's gradients that the host's backward zeroes: `settle`
        adds them to this evaluation once that backward has run.
        """
        bad = torch.as_tensor(bad_samples, device=self.streak.device)
        self._last = (self.streak, self.bad_steps, bad, zeroed_later)
        self._count(bad)

    def settle(self) -> None:
        """Count the last evaluation again with the gradients its backward has zeroed since (device ops, no sync)."""
        if self._last is None or self._last[3] is None:
            return
        streak, bad_steps, bad, zeroed_later = self._last
        self.streak, self.bad_steps = streak, bad_steps
        self._count(bad + zeroed_later.to(bad.device))

    def _count(self, bad_samples: Tensor) -> None:
        """Extend the streak after an evaluation with bad samples, reset it after a clean one."""
        bad = bad_samples > 0
        self.streak = torch.where(bad, self.streak + 1, torch.zeros_like(self.streak))
        self.bad_steps = self.bad_steps + bad.to(self.bad_steps.dtype)

    def check(self, streak: int) -> None:
        """Raise NonFiniteLPLError when a streak read from the device has reached the limit."""
        if self.max_bad_steps and streak >= self.max_bad_steps:
            raise NonFiniteLPLError(stop_message(streak, self.max_bad_steps, self.decoder_dtype))
