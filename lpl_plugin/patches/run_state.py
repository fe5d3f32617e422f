"""What one training run keeps on an accelerate-based host: the hooks, the optimizer-step count, the hooks' pending
logs (combined over processes), the plugin's saved state and the `ss_lpl_*` metadata of saved models.

Host-neutral where it can be: the accelerator's save/load-state pre-hooks carry the step count and the hooks'
counters (lpl_plugin.patches.saved_state; the host adapter says what its own state files record); the hooks'
scalars leave the device in one read when the host logs, through its `accelerator.log` or a function returning its
step logs; `accelerator.prepare` notes the train loader's length for a start given in epochs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from lpl_plugin.training.hook import LPLHook
from lpl_plugin.training.ranks import Reduced, reduce_logs, world_size
from lpl_plugin.training.registry import HookRegistry

from lpl_plugin.patches.host_options import HostOptions
from lpl_plugin.patches.patcher import Patcher
from lpl_plugin.patches.saved_state import HostSteps, load_hook_states, resumed_state, save_state


class RunState:
    """One run's hooks, optimizer-step count and pending logs, and the accelerator wrappers that save and log them."""

    def __init__(self, options: HostOptions, registry: HookRegistry | None = None, host_steps: HostSteps | None = None):
        self.options = options
        self.registry = registry if registry is not None else HookRegistry()
        self.host_steps = host_steps  # the steps the host's own files record in a state saved without the plugin
        self.accelerator: Any = None
        self.steps = 0
        self.logs: dict[str, Tensor | float | Reduced] = {}
        self.loader_length: int | None = None
        self.loss_applied = False  # the wrapped loss ran in a training step
        self._patcher: Patcher | None = None

    @property
    def running(self) -> bool:
        """Whether any hook (LPL or a third-party one) takes part in this run's training steps."""
        return len(self.registry) > 0

    # -- the accelerator -------------------------------------------------------------------------------------

    def wire(self, accelerator: Any, patcher: Patcher, *, logs_through_accelerator: bool) -> None:
        """Save and load the run's state with the accelerator's; add the hooks' scalars to `accelerator.log` (a host
        that logs its step scalars there), else note the train loader's length in `accelerator.prepare`."""
        self._patcher = patcher
        accelerator.register_save_state_pre_hook(self._save_state)
        accelerator.register_load_state_pre_hook(self._load_state)
        if logs_through_accelerator:
            patcher.replace(accelerator, "log", self._log_with_hooks)
        else:  # --initial_epoch counts epochs of the prepared train loader
            patcher.replace(accelerator, "prepare", self._prepare_noting_loader)

    def _log_with_hooks(self, original: Callable[..., Any], values: dict, *args: Any, **kwargs: Any) -> Any:
        """accelerator.log with the hooks' scalars added."""
        return original({**values, **self.take_logs()}, *args, **kwargs)

    def _prepare_noting_loader(self, original: Callable[..., Any], *objects: Any, **kwargs: Any) -> Any:
        """accelerator.prepare, noting the length of the first data loader prepared (the host's train loader)."""
        result = original(*objects, **kwargs)
        loaders = [r for r in (result if isinstance(result, tuple) else (result,))
                   if isinstance(r, torch.utils.data.DataLoader)]
        if loaders and self.loader_length is None:
            self.loader_length = len(loaders[0])
        return result

    # -- saved state -----------------------------------------------------------------------------------------

    def _save_state(self, models: Any, weights: Any, output_dir: str) -> None:
        """accelerate save-state pre-hook: record the optimizer steps taken and the hooks' counters."""
        if self.accelerator.is_main_process:
            save_state(output_dir, self.steps, self.options.config, self.registry)

    def _load_state(self, models: Any, input_dir: str) -> None:
        """accelerate load-state pre-hook: restore the optimizer steps taken and the hooks' counters (optional)."""
        assert self._patcher is not None
        with self._patcher.reporting():
            self.steps, states = resumed_state(input_dir, self.host_steps)
            load_hook_states(self.registry, states)

    # -- logs and ranks --------------------------------------------------------------------------------------

    def reduced(self, logs: dict[str, Any], batch: int, tracking: bool, device: torch.device) -> dict[str, Any]:
        """With several processes, the scalars of every hook that names them, combined over processes."""
        if world_size() == 1:
            return logs
        names: list[str] = []
        for name in self.registry:
            hook = self.registry.get(name)
            listed = hook.log_names(tracking) if isinstance(hook, LPLHook) else getattr(hook, "log_names", ())
            names += [n for n in listed if n not in names]
        return {**logs, **reduce_logs(logs, names, batch, device)}

    def take_logs(self) -> dict[str, float]:
        """The hooks' scalars since the last logging step, as floats: the only place they leave the device, in one
        read for all of them."""
        logs, self.logs = self.logs, {}
        pairs = {key: (v.value, v.weight) if isinstance(v, Reduced) else (v, 1.0) for key, v in logs.items()}
        tensors = [x for pair in pairs.values() for x in pair if isinstance(x, Tensor)]
        read = iter(torch.stack([t.detach().float().reshape(()).to(tensors[0].device) for t in tensors]).tolist()
                    if tensors else [])
        values = {key: [next(read) if isinstance(x, Tensor) else float(x) for x in pair] for key, pair in pairs.items()}
        return {key: value for key, (value, weight) in values.items() if weight > 0}

    def on_step_logs(self, original: Callable[..., Any], args: tuple, kwargs: dict, bound: dict) -> Any:
        """A host function returning a step's log dict (sd-scripts' generate_step_logs): add the hooks' scalars."""
        logs = original(*args, **kwargs)
        if self.running and isinstance(logs, dict):
            logs.update(self.take_logs())
        return logs

    # -- metadata of saved models ----------------------------------------------------------------------------

    def on_model_spec(self, original: Callable[..., Any], args: tuple, kwargs: dict, bound: dict) -> Any:
        """A host function returning a saved model's metadata (sd-scripts' get_sai_model_spec): add the ss_lpl_* keys
        once LPL ran, unless the host's `no_metadata` is set."""
        metadata = original(*args, **kwargs)
        if self.options.active and self.loss_applied and isinstance(metadata, dict) and \
                not getattr(bound["args"], "no_metadata", False):
            metadata.update(self.metadata())
        return metadata

    def metadata(self) -> dict[str, str]:
        """The settings as `ss_lpl_*` metadata, stringified the way sd-scripts writes its own `ss_*` keys."""
        from lpl_plugin import __version__

        config = self.options.config
        assert config is not None
        items = {("lpl_enabled" if k == "use_lpl" else k): v for k, v in config.lpl_items().items()}
        return {"ss_lpl_version": __version__, **{f"ss_{k}": str(v) for k, v in items.items()}}
