"""Checks run before any model is loaded: the lpl keys of a trainer TOML and how they fit the rest of the run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import ConfigError, LPLConfig, Problem, is_lpl_key
from .toml_io import config_from_toml, read_toml


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


def _all_keys(data: dict) -> set[str]:
    """Keys at the top level and one table deep."""
    keys = {k for k, v in data.items() if not isinstance(v, dict)}
    return keys | {k for v in data.values() if isinstance(v, dict) for k in v}


def check_training_config(path: str | os.PathLike[str]) -> Preflight:
    """Validate a trainer TOML's lpl keys without loading any model; collects every problem."""
    data, problems = read_toml(path)
    if data is None:
        return Preflight(None, problems)
    config, problems = config_from_toml(data, source=str(path))
    result = Preflight(config, problems)
    keys = _all_keys(data)
    if config is not None and not config.use_lpl and not keys & {"use_lpl", "lpl_enabled"} and any(map(is_lpl_key, keys)):
        result.warnings.append(f"{path}: warning: lpl_* keys are set but `use_lpl` is not, so LPL is off; "
                               "add `use_lpl = true` to turn it on")
    return result
