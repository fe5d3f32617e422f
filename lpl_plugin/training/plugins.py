"""Third-party loss hooks: found through the `lpl_plugin.hooks` entry-point group, started with what the host has.

An entry point names a module (or any object) with `make_hook(host)` and, optionally, `add_arguments(parser)`; a
bare callable is taken as `make_hook`. `add_arguments` adds the hook's own options to the host's parser (they show in
the trainer's `--help` and can sit in its TOML); `make_hook` gets a `HostContext` when the models are loaded and
returns the hook (any callable the HookRegistry accepts) or None when the hook's own settings leave it off. A hook
may list the scalars it logs in `log_names` (averaged over processes under data parallelism) and keep counters with
`state_dict()` / `load_state_dict()` (saved with the host's state). `--disable_loss_hooks NAME,...` (or the same key in
the TOML) turns hooks off by name in the sd-scripts adapter.

A hook that fails to import or to add its options only costs a warning line: it does not run, and a run that does
not use it goes on. A hook that raises in `make_hook` stops the run with one line: its settings asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lpl_plugin.settings.errors import UserError, write_lines
from lpl_plugin.training.registry import ENTRY_POINT_GROUP, HookRegistry

Warn = Callable[[str], None]
RESERVED = ("lpl",)
DISABLE_OPTION = "disable_loss_hooks"


@dataclass(frozen=True)
class HostContext:
    """What a hook factory gets when a run starts: the host's settings and models."""

    args: Any                                  # the host's parsed settings (sd-scripts: its argparse namespace)
    vae: nn.Module | None = None               # the run's VAE (frozen by the host; copy what you need)
    device: torch.device = torch.device("cpu")  # where training runs
    accelerator: Any = None                    # accelerate's Accelerator, when the host uses one
    host: str = ""                             # e.g. "sd-scripts v0.10.x and main, LoRA"
    weight_dtype: torch.dtype | None = None    # the dtype the host runs its model in


@dataclass
class Plugin:
    """One hook distribution's entry point, loaded."""

    name: str
    dist: str
    make_hook: Callable[[HostContext], Any]
    add_arguments: Callable[[Any], Any] | None = None
    options: list[str] = field(default_factory=list)


class HookStartError(UserError):
    """A third-party hook raised while starting (in make_hook); the run is refused rather than run without it."""


def _dist_name(point: Any) -> str:
    """`name version` of the distribution advertising an entry point."""
    dist = getattr(point, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown distribution"


def _one_line(error: BaseException) -> str:
    """An exception as `Type: first line`."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def discover(warn: Warn, group: str = ENTRY_POINT_GROUP) -> list[Plugin]:
    """Load every hook advertised under `group`; one warning line for each that cannot be loaded."""
    from importlib.metadata import entry_points

    found: dict[str, Plugin] = {}
    for point in entry_points(group=group):
        where = _dist_name(point)
        if point.name in RESERVED or point.name in found:
            taken = "is the built-in LPL hook" if point.name in RESERVED else f"is taken by {found[point.name].dist}"
            warn(f"lpl-plugin: hook `{point.name}` of {where} is ignored: the name {taken}")
            continue
        try:
            loaded = point.load()
        except Exception as error:  # a third-party import: anything can happen there
            warn(f"lpl-plugin: hook `{point.name}` of {where} could not be loaded ({_one_line(error)}); it will "
                 "not run")
            continue
        make_hook = getattr(loaded, "make_hook", None) or (loaded if callable(loaded) else None)
        if not callable(make_hook):
            warn(f"lpl-plugin: hook `{point.name}` of {where} has no make_hook(host); it will not run")
            continue
        add = getattr(loaded, "add_arguments", None)
        found[point.name] = Plugin(point.name, where, make_hook, add if callable(add) else None)
    return list(found.values())


def add_plugin_arguments(plugins: list[Plugin], parser: Any, warn: Warn) -> list[Plugin]:
    """Add each hook's options to the host's parser; a hook whose add_arguments raises is dropped with a warning."""
    kept = []
    for plugin in plugins:
        if plugin.add_arguments is not None:
            before = {a.dest for a in getattr(parser, "_actions", [])}
            try:
                plugin.add_arguments(parser)
            except Exception as error:
                warn(f"lpl-plugin: hook `{plugin.name}` of {plugin.dist} could not add its options "
                     f"({_one_line(error)}); it will not run")
                continue
            plugin.options = sorted({a.dest for a in getattr(parser, "_actions", [])} - before)
        kept.append(plugin)
    return kept


def to_stderr(line: str) -> None:
    """The default warning sink: one line on standard error."""
    write_lines([line])


def disabled_names(value: str | Iterable[str] | None) -> set[str]:
    """The hook names in `disable_loss_hooks`: "a,b", "a b" or a TOML list."""
    text = value if isinstance(value, str) or value is None else " ".join(map(str, value))
    return {name for name in (text or "").replace(",", " ").split() if name}


def start_hooks(plugins: Iterable[Plugin], host: HostContext, disabled: set[str],
                warn: Warn) -> list[tuple[str, Callable[..., Any]]]:
    """Each enabled plugin's hook for this run (None from make_hook: off); HookStartError when one raises."""
    plugins = list(plugins)
    unknown = sorted(disabled - {p.name for p in plugins} - set(RESERVED))
    if unknown:
        installed = ", ".join(p.name for p in plugins) or "none"
        warn(f"lpl-plugin: {DISABLE_OPTION} names {', '.join(unknown)}, which no installed hook is called "
             f"(installed: {installed}; LPL itself is turned off with use_lpl = false)")
    started = []
    for plugin in plugins:
        if plugin.name in disabled:
            continue
        try:
            hook = plugin.make_hook(host)
        except Exception as error:
            raise HookStartError(f"lpl-plugin: hook `{plugin.name}` of {plugin.dist} failed to start "
                                 f"({_one_line(error)}); fix its settings, uninstall it, or turn it off with "
                                 f"--{DISABLE_OPTION} {plugin.name}") from error
        if hook is not None:
            started.append((plugin.name, hook))
    return started


def load_plugin_hooks(registry: HookRegistry, host: HostContext, *, disabled: Iterable[str] = (),
                      warn: Warn = to_stderr, group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Discover, start and register every third-party hook for a run of your own loop; returns the names added."""
    added = []
    for name, hook in start_hooks(discover(warn, group), host, set(disabled), warn):
        registry.register(name, hook)
        added.append(name)
    return added
