"""A small registry of loss hooks that hosts call at their loss computation (in the spirit of pluggy)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

log = logging.getLogger("lpl_plugin")

# Third-party hooks advertise themselves here; lpl_plugin.training.plugins finds and starts them.
ENTRY_POINT_GROUP = "lpl_plugin.hooks"


@dataclass(frozen=True)
class LossContext:
    """Everything a loss hook may ask for at one training step; hooks name the fields they need."""

    latents: Tensor                      # clean latents z0, scaled as the trainer holds them
    noisy_latents: Tensor                # x_t, the input the model actually saw
    timesteps: Tensor                    # (B,) integer timesteps
    model_pred: Tensor                   # the model output
    target: Tensor                       # the diffusion loss target
    prediction_type: str = "epsilon"     # epsilon | v_prediction | sample | flow_matching
    alphas_cumprod: Tensor | None = None  # DDPM schedule, for epsilon / v_prediction
    sigmas: Tensor | None = None         # (B,) flow-matching noise levels s
    noise_weights: Tensor | None = None  # (B,) the host's own noise-level loss weights, if it applies any
    snr_gamma: float | None = None       # the host's min-SNR gamma, if set
    step: int = 0                        # optimizer steps taken so far
    is_training: bool = True             # False during validation: hooks must not add loss there
    log_stats: bool = False              # True on steps whose scalars will be logged
    num_train_timesteps: int = 1000      # the scheduler's training timesteps
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Number of samples in the step."""
        return int(self.latents.shape[0])


CONTEXT_FIELDS = tuple(f.name for f in dataclasses.fields(LossContext))


@dataclass
class HookResult:
    """A hook's contribution: per-sample extra loss (B,) and scalars to log (0-dim tensors or floats)."""

    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)


@dataclass
class Applied:
    """The sum of every hook's per-sample loss, and all their scalars under their own names."""

    loss: Tensor
    logs: dict[str, Tensor | float]


class HookError(ValueError):
    """A hook could not be registered or returned something unusable."""


def _parameters(hook: Callable[..., Any]) -> tuple[list[str], bool]:
    """A hook's keyword parameter names, and whether it takes **kwargs."""
    signature = inspect.signature(hook)
    names, var_keyword = [], False
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            raise HookError(f"hook parameters must be passable by keyword; `{parameter}` is not")
        else:
            names.append(parameter.name)
    return names, var_keyword


class HookRegistry:
    """Named loss hooks, checked at registration and called with keyword arguments from a LossContext."""

    def __init__(self) -> None:
        self._hooks: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {}

    def register(self, name: str, hook: Callable[..., Any], *, replace: bool = False) -> Callable[..., Any]:
        """Add a hook under a unique name after checking that it asks only for LossContext fields."""
        if not name or not isinstance(name, str):
            raise HookError(f"a hook name must be a non-empty string, got {name!r}")
        if name in self._hooks and not replace:
            raise HookError(f"a hook named {name!r} is already registered (registered: {', '.join(self)}); "
                            "unregister it first or pass replace=True")
        names, var_keyword = _parameters(hook)
        unknown = [n for n in names if n not in CONTEXT_FIELDS]
        if unknown:
            raise HookError(f"hook {name!r} asks for {', '.join(unknown)}, which a LossContext does not have "
                            f"(it has: {', '.join(CONTEXT_FIELDS)})")
        wanted = CONTEXT_FIELDS if var_keyword else tuple(names)
        self._hooks[name] = (hook, wanted)
        return hook

    def unregister(self, name: str) -> None:
        """Remove a hook by name."""
        if name not in self._hooks:
            raise HookError(f"no hook named {name!r} (registered: {', '.join(self) or 'none'})")
        del self._hooks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._hooks)

    def __contains__(self, name: object) -> bool:
        return name in self._hooks

    def __len__(self) -> int:
        return len(self._hooks)

    def get(self, name: str) -> Callable[..., Any]:
        """The hook registered under a name."""
        return self._hooks[name][0]

    def apply(self, ctx: LossContext) -> Applied:
        """Call every hook with the fields it asks for; sum their per-sample losses and collect their scalars."""
        total = torch.zeros(ctx.batch_size, device=ctx.latents.device, dtype=torch.float32)
        logs: dict[str, Tensor | float] = {}
        for name, (hook, wanted) in self._hooks.items():
            result = hook(**{n: getattr(ctx, n) for n in wanted})
            if result is None:
                continue
            if not isinstance(result, HookResult):
                result = HookResult(loss=result)
            if result.loss.shape != (ctx.batch_size,):
                raise HookError(f"hook {name!r} returned a loss of shape {tuple(result.loss.shape)}; "
                                f"expected one value per sample ({ctx.batch_size},)")
            total = total + result.loss.float()
            logs.update(result.logs)
        return Applied(total, logs)


registry = HookRegistry()
