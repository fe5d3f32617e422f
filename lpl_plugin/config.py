"""LPL settings: one frozen dataclass with help text per field, strict validation and all errors collected."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .errors import UserError

PREFIX = "lpl_"
ALIASES = {"lpl_enabled": "use_lpl"}
# The noise schedules of the supported hosts have this many training timesteps.
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


def _option(default: Any, help: str, *, group: str = "loss", choices: tuple[str, ...] | None = None,
            minimum: float | None = None, maximum: float | None = None, step: float | None = None,
            exclusive_minimum: bool = False) -> Any:
    """A dataclass field carrying its help text, bounds and choices for validation, schemas and GUIs."""
    meta = {"help": help, "group": group, "choices": choices, "minimum": minimum, "maximum": maximum,
            "step": step, "exclusive_minimum": exclusive_minimum}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LPLConfig:
    """Settings of Latent Perceptual Loss (Berrada et al., ICLR 2025) as read from `use_lpl` / `lpl_*` keys."""

    use_lpl: bool = _option(False, "Turn Latent Perceptual Loss on (alias: lpl_enabled).", group="general")
    lpl_weight: float = _option(1.0, "Weight of LPL against the diffusion loss; 1.0 to 2.0 is the usual range.",
                                minimum=0.0, step=0.1)
    lpl_t_threshold: int = _option(200, "Apply LPL only to samples with timestep t < threshold (high SNR); "
                                   "100 to 200 is the usual range.", minimum=1,
                                   maximum=DEFAULT_NUM_TRAIN_TIMESTEPS, step=1)
    lpl_loss_type: str = _option("mse", "Distance between normalized decoder features.", choices=("mse", "l1"))
    lpl_norm_type: str = _option("shared", "Feature normalization: 'default' scales each map by its own channel "
                                 "norm, 'shared' scales both by the target's, 'batch' divides both by each "
                                 "channel's std over the target batch.", choices=("default", "shared", "batch"))
    lpl_pow_law: bool = _option(True, "Weight layer i by 1 / its upsampling factor over the mid block "
                                "(1, 1/2, 1/4, 1/8, 1/8 for SDXL).")
    lpl_num_blocks: int = _option(4, "Decoder up blocks whose outputs are compared (0 = mid block only).",
                                  minimum=0, maximum=4, step=1)
    lpl_remove_outliers: bool = _option(True, "Mask target-feature outliers (2 % quantiles widened by 2 std, "
                                        "then morphological smoothing) in the high-resolution layers.")
    lpl_scale: bool = _option(True, "Weight each sample's LPL by its noise level: the host's own loss weights "
                              "when it has any, else min-SNR with lpl_snr_gamma.")
    lpl_snr_gamma: float = _option(5.0, "Gamma of the min-SNR weight lpl_scale uses when the host has none.",
                                   minimum=0.0, exclusive_minimum=True, step=0.5)
    lpl_start: int = _option(0, "First optimizer step at which LPL is applied.", minimum=0, step=1)
    lpl_compat: str = _option("none", "'diffusers' reproduces the published reference exactly, its known "
                              "problems included; 'none' uses the corrected behaviour.", choices=("none", "diffusers"),
                              group="engine")
    lpl_dtype: str = _option("auto", "Decoder precision: 'auto' is bfloat16 on GPUs that support it, else "
                             "float32; float16 only on request (the SDXL VAE can overflow in it).",
                             choices=("auto", "float32", "bfloat16", "float16"), group="engine")
    lpl_grad_mode: str = _option("lean", "'lean' takes LPL's gradient inside the loss call chunk by chunk and "
                                 "frees the decoder activations at once; 'autograd' keeps them for the host's "
                                 "backward.", choices=("lean", "autograd"), group="engine")
    lpl_chunk_size: int = _option(1, "Samples per decoder pass in lean mode; halved automatically on "
                                  "out-of-memory.", minimum=1, step=1, group="engine")
    lpl_checkpointing: str = _option("auto", "Recompute decoder activations in backward: 'none' (fastest), "
                                     "'block', 'resnet' (least memory), or 'auto' ('none' until LPL runs out "
                                     "of memory with one sample per pass, then 'resnet').",
                                     choices=("auto", "none", "block", "resnet"), group="engine")
    lpl_max_bad_steps: int = _option(50, "Stop the run after this many LPL evaluations in a row whose value or "
                                     "gradient was not finite (inf/NaN), usually an fp16 VAE overflowing; "
                                     "0 never stops. Bad samples always contribute zero.", minimum=0, step=1,
                                     group="engine")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, source: str = "<mapping>") -> "LPLConfig":
        """Build a config from `use_lpl`/`lpl_*` keys at top level or one table deep; raises ConfigError."""
        from .toml_io import config_from_toml

        config, problems = config_from_toml(mapping, source=source)
        if problems:
            raise ConfigError(problems)
        assert config is not None
        return config

    def replace(self, **changes: Any) -> "LPLConfig":
        """A validated copy with some fields changed."""
        merged = dataclasses.asdict(self)
        merged.update(changes)
        config, problems = build_config(merged, source="<replace>")
        if problems:
            raise ConfigError(problems)
        assert config is not None
        return config

    def lpl_items(self) -> dict[str, Any]:
        """The settings as a plain dict keyed by TOML names."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Problem:
    """One user mistake: where it is, which key, and what is wrong."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.message}"


class ConfigError(UserError, ValueError):
    """Raised with every problem found in a config, one line each."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def fields() -> tuple[dataclasses.Field, ...]:
    """The option fields of LPLConfig, in declaration order."""
    return dataclasses.fields(LPLConfig)


def field_names() -> list[str]:
    """TOML names of every option."""
    return [f.name for f in fields()]


def is_lpl_key(key: str) -> bool:
    """Whether a TOML key belongs to this plugin."""
    return key.startswith(PREFIX) or key == "use_lpl"


def suggest(key: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean `x`?)' hint for a misspelt key, or ''."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def show(value: Any) -> str:
    """A value written the way TOML writes it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _type_name(value: Any) -> str:
    """A user-facing name of a value's type."""
    return {bool: "boolean", int: "integer", float: "float", str: "string"}.get(type(value), type(value).__name__)


def check_value(f: dataclasses.Field, value: Any) -> str | None:
    """The constraint a value breaks, phrased for a user, or None when it is valid."""
    kind, meta, name = f.type, f.metadata, f.name
    if kind == "bool":
        if not isinstance(value, bool):
            return f"`{name}` must be true or false, got {show(value)} ({_type_name(value)})"
        return None
    if kind == "str":
        if not isinstance(value, str) or value not in meta["choices"]:
            valid = ", ".join(f'"{c}"' for c in meta["choices"])
            return f"`{name}` must be one of {valid}, got {show(value)}"
        return None
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"`{name}` must be an integer, got {show(value)} ({_type_name(value)})"
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"`{name}` must be a number, got {show(value)} ({_type_name(value)})"
        if not math.isfinite(value):
            return f"`{name}` must be a finite number, got {show(value)}"
    low, high = meta["minimum"], meta["maximum"]
    if low is not None and high is not None and not low <= value <= high:
        return f"`{name}` must be between {_fmt(low)} and {_fmt(high)}, got {show(value)}"
    if low is not None and meta["exclusive_minimum"] and value <= low:
        return f"`{name}` must be greater than {_fmt(low)}, got {show(value)}"
    if low is not None and value < low:
        return f"`{name}` must be at least {_fmt(low)}, got {show(value)}"
    return None


def _fmt(number: float) -> str:
    """A bound printed without a spurious '.0'."""
    return str(int(number)) if float(number).is_integer() else str(number)


def build_config(values: Mapping[str, Any], *, source: str,
                 tables: Mapping[str, str] | None = None) -> tuple[LPLConfig | None, list[Problem]]:
    """Check canonical `lpl_*` values against every field; returns the config or the problems."""
    tables = tables or {}
    by_name = {f.name: f for f in fields()}
    problems: list[Problem] = []
    clean: dict[str, Any] = {}
    for key, value in values.items():
        f = by_name.get(key)
        if f is None:
            message = f"unknown option `{key}`{suggest(key, list(by_name) + list(ALIASES))}"
        else:
            message = check_value(f, value)
        if message:
            table = tables.get(key)
            problems.append(Problem(source, key, f"{table} {message}" if table else message))
        elif f is not None:
            clean[key] = float(value) if f.type == "float" else value
    if problems:
        return None, problems
    return LPLConfig(**clean), []
