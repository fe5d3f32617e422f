"""Checks run before any model is loaded: the lpl keys of a trainer TOML and how they fit the rest of the run.

Besides each key on its own (config.py), this looks at what only the whole run shows: LPL keys that the host never
reads (a dataset config, arrays of tables, tables nested too deep), settings under which LPL can never apply, and
what the local VAE / model folder named by `vae` or `pretrained_model_name_or_path` allows. Model folders are read
as data only: exactly `config.json`, `vae/config.json` and `scheduler/scheduler_config.json` of the folder named,
never weights, never a search.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from lpl_plugin.settings.config import (DEFAULT_NUM_TRAIN_TIMESTEPS, FP16_FIX_VAE, LPLConfig, config_from_mapping,
                                        is_lpl_key)
from lpl_plugin.settings.errors import FileError
from lpl_plugin.settings.files import MAX_DEPTH, data_depth, is_dir, path_stat, read_json_object
from lpl_plugin.settings.messages import show_path, show_value, shown, type_name
from lpl_plugin.settings.problems import ConfigError, Problem
from lpl_plugin.settings.toml_io import read_toml

Report = Callable[[str, str], None]  # adds a problem: (key, message)


@dataclass
class Preflight:
    """The outcome of checking a training config: the settings, or the problems; plus warnings either way."""

    config: LPLConfig | None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def raise_for_problems(self) -> LPLConfig:
        """The config, or ConfigError listing every problem."""
        if self.problems or self.config is None:
            raise ConfigError(self.problems)
        return self.config


def check_training_config(path: str | os.PathLike[str], *, num_train_timesteps: int | None = None) -> Preflight:
    """Validate a trainer TOML's lpl keys and their context without loading any model; collects every problem.

    `num_train_timesteps` is the host's scheduler length when the caller knows it (sd-scripts: 1000); otherwise it
    is read from a local model folder's scheduler config, else 1000.
    """
    data, problems = read_toml(path)
    if data is None:
        return Preflight(None, problems)
    return check_training_mapping(data, show_path(path), num_train_timesteps=num_train_timesteps)


def check_training_mapping(data: Mapping[str, Any], source: str, *,
                           num_train_timesteps: int | None = None) -> Preflight:
    """The checks of check_training_config on parsed TOML data or a flat mapping of the host's arguments.

    Keys whose value is None (argparse's unset options) count as absent. `source` is shown as given (escape it
    with messages.show_path when it comes from a user).
    """
    if not isinstance(data, Mapping):
        return Preflight(None, [Problem(source, "", f"expected a mapping of settings, got {type_name(data)}")])
    depth = data_depth(data)
    if depth > MAX_DEPTH:
        return Preflight(None, [Problem(source, "", f"settings nest {depth} levels deep or refer to themselves (at "
                                        f"most {MAX_DEPTH} levels are read)")])
    data = {key: value for key, value in data.items() if value is not None}
    if _is_dataset_config(data):
        return _dataset_config(data, source)
    config, problems = config_from_mapping(data, source=source)
    stray = [_stray(source, location, key, nested) for location, key, nested in _unread_lpl_keys(data)]
    if stray:  # an [[lpl]] array is also reported by name as a misspelt key: keep the precise message only
        arrays = {str(key) for key, value in data.items() if isinstance(value, list)}
        problems = [p for p in problems if p.key not in arrays] + stray
    host = _host_values(data)
    problems += _referenced_dataset_config(host, source)
    result = Preflight(None if problems else config, problems)
    if config is not None and not problems:
        if config.use_lpl:
            _check_context(config, host, source, num_train_timesteps, result)
        elif not host.keys() & {"use_lpl", "lpl_enabled"} and any(map(is_lpl_key, host)):
            result.warnings.append(f"{source}: warning: lpl_* keys are set but `use_lpl` is not, so LPL is off; "
                                   "add `use_lpl = true` to turn it on")
        if result.problems:
            result.config = None
    return result


# -- where the keys sit ------------------------------------------------------------------------------------------

def _host_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys and those one table deep, merged the way sd-scripts flattens its --config_file."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update((k, v) for k, v in value.items() if isinstance(k, str))
        elif isinstance(key, str):
            flat[key] = value
    return flat


def _is_dataset_config(data: Mapping[str, Any]) -> bool:
    """Whether parsed TOML is an sd-scripts dataset config (it has [[datasets]])."""
    datasets = data.get("datasets")
    return isinstance(datasets, list) and all(isinstance(d, dict) for d in datasets)


def _lpl_keys(value: Any, location: str) -> Iterator[tuple[str, str, int]]:
    """Every LPL key anywhere inside a value: (table location, key, table depth; -1 inside an array)."""
    def walk(node: Any, where: str, depth: int) -> Iterator[tuple[str, str, int]]:
        if isinstance(node, dict):
            for key, inner in node.items():
                if is_lpl_key(key) and not isinstance(inner, dict):
                    yield where, key, depth
                if isinstance(inner, (dict, list)):
                    name = f"{where}.{key}" if where else str(key)
                    yield from walk(inner, name, depth + 1 if depth >= 0 and isinstance(inner, dict) else -1)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, where, -1)
    return walk(value, location, 0)


def _unread_lpl_keys(data: Mapping[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """LPL keys the host never reads and config_from_toml does not report: in arrays, or three tables deep."""
    for where, key, depth in _lpl_keys(data, ""):
        if depth < 0 or depth >= 3:
            yield where, key, depth < 0


def _stray(source: str, location: str, key: str, in_array: bool) -> Problem:
    """The problem for an LPL key sd-scripts never reads."""
    if in_array:
        return Problem(source, key, f"[[{shown(location)}]] `{shown(key)}` sits in an array of tables, which "
                       "sd-scripts does not read as settings; write a plain [lpl] table (single brackets) or move it "
                       "to the top level")
    return Problem(source, key, f"[{shown(location)}] `{shown(key)}` is three or more tables deep; sd-scripts reads "
                   "only the top level and one table, so move it to the top level or an [lpl] table")


def _dataset_config(data: Mapping[str, Any], source: str) -> Preflight:
    """A dataset config: LPL keys in it do nothing, so each one is a problem."""
    problems = [_in_dataset_config(source, where, key) for where, key, _ in _lpl_keys(data, "")]
    if problems:
        return Preflight(None, problems)
    return Preflight(LPLConfig(), [], [f"{source}: warning: this is a dataset config ([[datasets]]); LPL reads its "
                                       "keys from the training config (--config_file), so check that file instead"])


def _in_dataset_config(source: str, where: str, key: str) -> Problem:
    """The problem for an LPL key in a dataset config."""
    place = f"[{shown(where)}] " if where else ""
    return Problem(source, key, f"{place}`{shown(key)}` is in a dataset config ([[datasets]]), where it does nothing: "
                   "sd-scripts reads LPL keys only from the training config (--config_file); move it there")


def _referenced_dataset_config(host: Mapping[str, Any], source: str) -> list[Problem]:
    """LPL keys inside the dataset config file a training config names with `dataset_config` (that file only)."""
    named = host.get("dataset_config")
    if not isinstance(named, str) or not named:
        return []
    try:
        path_stat(named)
    except FileError as error:
        if error.errno == errno.ENOENT:  # sd-scripts reports a missing dataset config itself
            return []
    data, problems = read_toml(named)
    if data is None:  # the problem's source is the dataset config's path (with :line:column for syntax errors)
        return [Problem(f"{source}: `dataset_config` {p.source}", "dataset_config", p.message) for p in problems]
    where = f"{source}: `dataset_config` {show_path(named)}"
    return [_in_dataset_config(where, place, key) for place, key, _ in _lpl_keys(data, "")]


# -- the rest of the run -----------------------------------------------------------------------------------------

def _int_setting(host: Mapping[str, Any], key: str) -> int | None:
    """An integer host setting, or None when absent or not an integer (the host reports those itself)."""
    value = host.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_context(config: LPLConfig, host: Mapping[str, Any], source: str, num_train_timesteps: int | None,
                   result: Preflight) -> None:
    """Cross-key checks for a run with LPL on: whether LPL can ever apply, and what the named VAE allows."""
    def problem(key: str, message: str) -> None:
        result.problems.append(Problem(source, key, message))

    max_steps = _int_setting(host, "max_train_steps")
    if max_steps is not None and host.get("max_train_epochs") is None and config.lpl_start >= max_steps:
        problem("lpl_start", f"`lpl_start` = {config.lpl_start} is not below `max_train_steps` = "
                f"{show_value(max_steps)}, so LPL would never apply in this run; lower lpl_start or set use_lpl = "
                "false")
    min_t = _int_setting(host, "min_timestep")
    if min_t is not None and min_t >= config.lpl_t_threshold:
        problem("lpl_t_threshold", f"`lpl_t_threshold` = {config.lpl_t_threshold} is not above `min_timestep` = "
                f"{show_value(min_t)}, so no sample is ever below the threshold and LPL never applies; raise "
                "lpl_t_threshold or lower min_timestep")
    vae_key, vae_dir, vae_config = _named_vae(host, result, source)
    model = _local_dir(host.get("pretrained_model_name_or_path"))
    steps, steps_file = _scheduler_steps(model, num_train_timesteps, result, source)
    if config.lpl_t_threshold > steps:
        problem("lpl_t_threshold", f"`lpl_t_threshold` = {config.lpl_t_threshold} is beyond the scheduler's "
                f"{show_value(steps)} training timesteps{f' ({steps_file})' if steps_file else ''}; set it to at most "
                f"{show_value(steps)}")
    if vae_config is not None:
        _check_vae(config, vae_key, vae_dir, vae_config, problem)
    if config.lpl_dtype == "float16":
        _check_float16(config, host, vae_config, problem, result, source)


def _check_vae(config: LPLConfig, key: str, folder: Path, vae_config: Mapping[str, Any], problem: Report) -> None:
    """Whether the VAE's decoder has the up blocks LPL compares (read from its config.json)."""
    blocks = vae_config.get("up_block_types")
    folder_text = show_path(folder)
    if not isinstance(blocks, list):
        problem(key, f"`{key}` names {folder_text}, whose VAE has no decoder up blocks (its config.json lists no "
                "up_block_types: not an AutoencoderKL); LPL needs an AutoencoderKL such as the SDXL VAE, or set "
                "use_lpl = false")
    elif len(blocks) < config.lpl_num_blocks:
        has, fix = ("no decoder up blocks", "lpl_num_blocks = 0 (mid block only)") if not blocks else \
            (f"only {len(blocks)} decoder up blocks", f"lpl_num_blocks to at most {len(blocks)}")
        problem("lpl_num_blocks", f"`lpl_num_blocks` = {config.lpl_num_blocks} but the VAE named by `{key}` "
                f"({folder_text}) has {has}; set {fix} or use the SDXL VAE")


def _check_float16(config: LPLConfig, host: Mapping[str, Any], vae_config: Mapping[str, Any] | None,
                   problem: Report, result: Preflight, source: str) -> None:
    """lpl_dtype = "float16" against what the config says about the VAE's float16 range."""
    fix = f"set lpl_dtype = \"auto\" or \"bfloat16\", or use an fp16-safe VAE such as {FP16_FIX_VAE}"
    if host.get("no_half_vae") is True:
        problem("lpl_dtype", "`lpl_dtype` = \"float16\" conflicts with `no_half_vae` = true, which says this VAE "
                f"must not run in half precision; {fix}")
    elif vae_config is not None and vae_config.get("force_upcast") is True:
        problem("lpl_dtype", "`lpl_dtype` = \"float16\" but the VAE's config.json sets force_upcast (it overflows "
                f"in float16, as the SDXL VAE does); {fix}")
    elif vae_config is None and "fp16" not in str(host.get("vae", "")).lower():
        result.warnings.append(f"{source}: warning: `lpl_dtype` = \"float16\": the SDXL VAE overflows in float16 "
                               "unless it is an fp16-fixed one; bad samples are zeroed and the run stops after "
                               f"lpl_max_bad_steps = {config.lpl_max_bad_steps} bad steps in a row; prefer \"auto\"")


# -- folders named by the config (read as data, nothing else) -----------------------------------------------------

def _local_dir(value: Any) -> Path | None:
    """The folder a string setting names, when it is an existing local directory (no globbing, no ~ expansion)."""
    if not isinstance(value, str) or not value:
        return None
    return Path(value) if is_dir(value) else None


def _present(path: Path) -> bool:
    """Whether anything at all is at a path (a broken or looping symbolic link counts: reading it says why)."""
    return os.path.lexists(path)


def _read_json(path: Path, key: str, result: Preflight, source: str) -> dict[str, Any] | None:
    """A folder's JSON config through the safe reader, or None (unreadable ones add a problem naming the key)."""
    try:
        return read_json_object(path, what="a JSON config")
    except FileError as error:
        result.problems.append(Problem(source, key, f"`{key}` names a folder whose {error.path} is not a readable "
                                       f"JSON config ({error.reason}); repair or replace that file"))
        return None


def _named_vae(host: Mapping[str, Any], result: Preflight,
               source: str) -> tuple[str, Path | None, dict[str, Any] | None]:
    """The key naming the VAE the run uses, its local folder, and that folder's config.json (if local)."""
    key = "vae" if host.get("vae") else "pretrained_model_name_or_path"
    folder = _local_dir(host.get(key))
    if folder is None:
        return key, None, None
    candidates = [folder / "config.json", folder / "vae" / "config.json"] if key == "vae" else \
        [folder / "vae" / "config.json"]
    for path in candidates:
        if _present(path):
            return key, path.parent, _read_json(path, key, result, source)
    return key, None, None


def _scheduler_steps(model: Path | None, given: int | None, result: Preflight,
                     source: str) -> tuple[int, str | None]:
    """Training timesteps of the run: the caller's, else a local model folder's scheduler config, else 1000."""
    if given is not None:
        return given, None
    if model is not None:
        path = model / "scheduler" / "scheduler_config.json"
        data = _read_json(path, "pretrained_model_name_or_path", result, source) if _present(path) else None
        steps = data.get("num_train_timesteps") if data else None
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
            return steps, show_path(path)
    return DEFAULT_NUM_TRAIN_TIMESTEPS, None
