"""LPL settings: one frozen dataclass that validates itself, with help text and bounds per field, all errors collected.

Every way of building an LPLConfig (the constructor, `replace`, `from_mapping`, a TOML file, argparse, a GUI's
`validate`) runs the same checks (`problems_of`) and raises one ConfigError listing every problem. Choices are
`Literal` types, read by the schema, argparse and GUIs from here; numbers have bounds that keep the loss finite.
A string that reads as the option's type under the command line's rules (`"1.0"`, `"1000"`, `"true"`) is that value
wherever settings are read: GUIs such as LoRA_Easy_Training_Scripts write every extra value as a TOML string.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

from lpl_plugin.settings.messages import show_value, shown, type_name
from lpl_plugin.settings.problems import MAX_PROBLEMS, ConfigError, Problem
from lpl_plugin.settings.values import as_bool, as_number, described

PREFIX = "lpl_"
ALIASES = {"lpl_enabled": "use_lpl"}
# The noise schedules of the supported hosts have this many training timesteps.
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
# An fp16-safe SDXL VAE, named in advice about lpl_dtype = "float16".
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
# Upper bounds, each explained in the option's help text and in the README's "Configuration".
MAX_WEIGHT = 100.0
MAX_SNR_GAMMA = 10000.0
MAX_START = 10 ** 9
MAX_CHUNK = 1024
MAX_BAD_STEPS = 10 ** 6
# Keys longer than this get no "did you mean" hint (difflib would compare them in full), nor do problems after the
# first _MAX_HINTED of one config (only the first MAX_PROBLEMS are shown; a file of 50,000 typos stays quick).
_MAX_SUGGESTED = 100
_MAX_HINTED = 4 * MAX_PROBLEMS

LossType = Literal["mse", "l1"]
NormType = Literal["default", "shared", "batch"]
Compat = Literal["none", "diffusers"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
GradMode = Literal["lean", "autograd"]
Checkpointing = Literal["auto", "none", "block", "resnet"]


def _option(default: Any, help: str, *, group: str = "loss", minimum: float | None = None,
            maximum: float | None = None, step: float | None = None, exclusive_minimum: bool = False) -> Any:
    """A dataclass field carrying its help text and bounds for validation, schemas and GUIs."""
    meta = {"help": help, "group": group, "minimum": minimum, "maximum": maximum, "step": step,
            "exclusive_minimum": exclusive_minimum}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LPLConfig:
    """Settings of Latent Perceptual Loss (Berrada et al., ICLR 2025) as read from `use_lpl` / `lpl_*` keys."""

    use_lpl: bool = _option(False, "Turn Latent Perceptual Loss on (alias: lpl_enabled).", group="general")
    lpl_weight: float = _option(1.0, "Weight of LPL against the diffusion loss; 1.0 to 2.0 is the usual range. At "
                                "most 100: LPL is of the order of the diffusion loss, so more would drown it (and "
                                "a weight like 1e300 turns the loss into inf).", minimum=0.0, maximum=MAX_WEIGHT,
                                step=0.1)
    lpl_t_threshold: int = _option(200, "Apply LPL only to samples with timestep t < threshold (high SNR); "
                                   "100 to 200 is the usual range.", minimum=1,
                                   maximum=DEFAULT_NUM_TRAIN_TIMESTEPS, step=1)
    lpl_loss_type: LossType = _option("mse", "Distance between normalized decoder features.")
    lpl_norm_type: NormType = _option("shared", "Feature normalization: 'default' scales each map by its own "
                                      "channel norm, 'shared' scales both by the target's, 'batch' divides both by "
                                      "each channel's std over the target batch.")
    lpl_pow_law: bool = _option(True, "Weight layer i by 1 / its upsampling factor over the mid block "
                                "(1, 1/2, 1/4, 1/8, 1/8 for SDXL).")
    lpl_num_blocks: int = _option(4, "Decoder up blocks whose outputs are compared (0 = mid block only).",
                                  minimum=0, maximum=4, step=1)
    lpl_remove_outliers: bool = _option(True, "Mask target-feature outliers (2 % quantiles widened by 2 std, "
                                        "then morphological smoothing) in the high-resolution layers.")
    lpl_scale: bool = _option(True, "Weight each sample's LPL by its noise level: the host's own loss weights "
                              "when it has any, else min-SNR with lpl_snr_gamma.")
    lpl_snr_gamma: float = _option(5.0, "Gamma of the min-SNR weight lpl_scale uses when the host has none. At "
                                   "most 10000: beyond the largest SNR of SDXL's schedule (about 1175, at t = 0) "
                                   "gamma clips nothing, so larger values are typos.", minimum=0.0,
                                   maximum=MAX_SNR_GAMMA, exclusive_minimum=True, step=0.5)
    lpl_start: int = _option(0, "First optimizer step at which LPL is applied. At most 1e9: no run is that long, "
                             "so a larger value would silently mean never.", minimum=0, maximum=MAX_START, step=1)
    lpl_compat: Compat = _option("none", "'diffusers' reproduces the published reference exactly, its known "
                                 "problems included; 'none' uses the corrected behaviour.", group="engine")
    lpl_dtype: Dtype = _option("auto", "Decoder precision: 'auto' is bfloat16 on GPUs that support it, else "
                               "float32; float16 only on request (the SDXL VAE can overflow in it).", group="engine")
    lpl_grad_mode: GradMode = _option("lean", "'lean' takes LPL's gradient inside the loss call chunk by chunk and "
                                      "frees the decoder activations at once; 'autograd' keeps them for the host's "
                                      "backward.", group="engine")
    lpl_chunk_size: int = _option(1, "Samples per decoder pass in lean mode; halved automatically on "
                                  "out-of-memory. At most 1024: far more SDXL samples than any GPU holds in one "
                                  "pass (a chunk at least the batch size runs the whole batch at once).", minimum=1,
                                  maximum=MAX_CHUNK, step=1, group="engine")
    lpl_checkpointing: Checkpointing = _option("auto", "Recompute decoder activations in backward: 'none' "
                                               "(fastest), 'block', 'resnet' (least memory), or 'auto' ('none' "
                                               "until LPL runs out of memory with one sample per pass, then "
                                               "'resnet').", group="engine")
    lpl_max_bad_steps: int = _option(50, "Stop the run after this many LPL evaluations in a row whose value or "
                                     "gradient was not finite (inf/NaN), usually an fp16 VAE overflowing; "
                                     "0 never stops. Bad samples always contribute zero. At most 1e6: a longer "
                                     "streak is no guard (use 0 to turn the stop off).", minimum=0,
                                     maximum=MAX_BAD_STEPS, step=1, group="engine")

    def __post_init__(self) -> None:
        """Check every field (raising one ConfigError listing each problem) and store numbers as their type."""
        values = {f.name: getattr(self, f.name) for f in fields()}
        problems = problems_of(values, source="")
        if problems:
            raise ConfigError(problems)
        for name, value in normalized(values).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, source: str = "<mapping>") -> "LPLConfig":
        """Build a config from `use_lpl`/`lpl_*` keys at top level or one table deep; raises ConfigError."""
        config, problems = config_from_mapping(mapping, source=source)
        if problems or config is None:
            raise ConfigError(problems)
        return config

    def replace(self, **changes: Any) -> "LPLConfig":
        """A validated copy with some fields changed (an unknown name is a ConfigError too)."""
        merged = dataclasses.asdict(self)
        merged.update(changes)
        config, problems = build_config(merged, source="<replace>")
        if problems or config is None:
            raise ConfigError(problems)
        return config

    def lpl_items(self) -> dict[str, Any]:
        """The settings as a plain dict keyed by TOML names."""
        return dataclasses.asdict(self)


# -- the fields as data ---------------------------------------------------------------------------------------------

def fields() -> tuple[dataclasses.Field, ...]:
    """The option fields of LPLConfig, in declaration order."""
    return dataclasses.fields(LPLConfig)


def field_names() -> list[str]:
    """TOML names of every option."""
    return [f.name for f in fields()]


_HINTS = typing.get_type_hints(LPLConfig)


def kind(name: str) -> str:
    """The value kind of an option: 'bool', 'int', 'float' or 'str' (a choice)."""
    hint = _HINTS[name]
    return "str" if typing.get_origin(hint) is Literal else hint.__name__


def choices(name: str) -> tuple[str, ...] | None:
    """The valid values of a choice option, read from its Literal type; None for other options."""
    hint = _HINTS[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def is_lpl_key(key: Any) -> bool:
    """Whether a TOML key belongs to this plugin."""
    return isinstance(key, str) and (key.startswith(PREFIX) or key == "use_lpl")


def suggest(key: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean `x`?)' hint for a misspelt key, or ''."""
    if len(key) > _MAX_SUGGESTED:
        return ""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def show(value: Any) -> str:
    """A value written the way TOML writes it, shortened and escaped, for error messages."""
    return show_value(value)


def quoted_key(key: Any) -> str:
    """A user's key in backquotes, shortened and escaped."""
    return f"`{shown(key) if isinstance(key, str) else show_value(key)}`"


# -- checks ---------------------------------------------------------------------------------------------------------

def check_value(name: str, value: Any) -> str | None:
    """The constraint a value of option `name` breaks, phrased for a user, or None when it is valid."""
    kind_, f = kind(name), _FIELDS[name]
    key = f"`{name}`"
    # `[lpl_x]` and `lpl_x = {..}` parse alike, so a table gets advice that covers both
    table_hint = f"; write `{name} = ...` (not a [{name}] table or an inline table)" if isinstance(value, dict) else ""
    if kind_ == "bool":
        return None if as_bool(value) is not None else f"{key} must be true or false, {described(value)}{table_hint}"
    if kind_ == "str":
        valid = choices(name) or ()
        if isinstance(value, str) and value in valid:
            return None
        got = described(value) if not isinstance(value, str) else f"got {show_value(value)}"
        return f"{key} must be one of {', '.join(show_value(c) for c in valid)}, {got}{table_hint}"
    number = as_number(value, kind_)
    if number is None:
        noun = "an integer" if kind_ == "int" else "a number"
        return f"{key} must be {noun}, {described(value)}{table_hint}"
    if isinstance(number, float) and math.isnan(number):
        return f"{key} must be a finite number, got {show_value(value)}"
    meta = f.metadata
    low, high = meta["minimum"], meta["maximum"]
    if math.isinf(number) and kind_ == "float" and (isinstance(value, str) or not isinstance(value, numbers.Integral)):
        return f"{key} must be a finite number, got {show_value(value)}"
    if low is not None and high is not None and not low <= number <= high:
        return f"{key} must be between {_fmt(low)} and {_fmt(high)}, got {show_value(value)}"
    if low is not None and meta["exclusive_minimum"] and number <= low:
        return f"{key} must be greater than {_fmt(low)}, got {show_value(value)}"
    return None


def _fmt(number: float) -> str:
    """A bound printed without a spurious '.0'."""
    return str(int(number)) if float(number).is_integer() else str(number)


def normalized(values: Mapping[str, Any]) -> dict[str, Any]:
    """Valid option values as stored: floats as float, integers as int (numpy/torch scalars become Python's)."""
    out = {}
    for name, value in values.items():
        kind_ = kind(name)
        out[name] = as_number(value, kind_) if kind_ in ("int", "float") else as_bool(value) if kind_ == "bool" \
            else value
    return out


def problems_of(values: Mapping[Any, Any], *, source: str,
                tables: Mapping[str, str] | None = None) -> list[Problem]:
    """Every problem of canonical option values: unknown names and values that break their field's constraint.

    `tables` names the table each key came from (e.g. "[lpl]"), put before its message.
    """
    tables = tables or {}
    problems: list[Problem] = []
    for key, value in values.items():
        if not isinstance(key, str):
            problems.append(Problem(source, "", f"option name {show_value(key)} ({type_name(key)}) is not a "
                                    "string"))
            continue
        if key in _FIELDS:
            message = check_value(key, value)
        else:
            hint = suggest(key, list(_FIELDS) + list(ALIASES)) if len(problems) < _MAX_HINTED else ""
            message = f"unknown option {quoted_key(key)}{hint}"
        if message:
            table = tables.get(key)
            problems.append(Problem(source, key, f"{table} {message}" if table else message))
    return problems


def build_config(values: Mapping[str, Any], *, source: str,
                 tables: Mapping[str, str] | None = None) -> tuple[LPLConfig | None, list[Problem]]:
    """Check canonical `lpl_*` values against every field; returns the config or the problems."""
    problems = problems_of(values, source=source, tables=tables)
    if problems:
        return None, problems
    return LPLConfig(**values), []


_FIELDS = {f.name: f for f in fields()}


# -- reading a mapping the way sd-scripts flattens its TOML ---------------------------------------------------------

def _misspelt_prefix(key: str) -> str | None:
    """The canonical spelling of a key that looks meant for LPL but is not written as one, if any."""
    normal = key.lower().replace("-", "_")
    if is_lpl_key(key) or not (is_lpl_key(normal) or "lpl" in normal or normal.startswith("lp_")):
        return None
    return normal if is_lpl_key(normal) else key


def collect_lpl_keys(mapping: Mapping[str, Any], *,
                     source: str) -> tuple[dict[str, Any], dict[str, str], list[Problem]]:
    """Gather `use_lpl`/`lpl_*` values from the top level and one table deep, as sd-scripts flattens them.

    Returns the values by canonical name, the table each came from ('' at top level) and the problems found.
    A table named like an option (`[lpl_num_blocks]`, `lpl_weight = {value = 2}`) is that option's (wrong) value.
    """
    values: dict[str, Any] = {}
    tables: dict[str, str] = {}
    where: dict[str, str] = {}
    problems: list[Problem] = []
    known = field_names() + list(ALIASES)
    if not isinstance(mapping, Mapping):
        return values, tables, [Problem(source, "", f"expected a table of options (a mapping of option names to "
                                        f"values), {described(mapping)}")]

    def take(key: str, value: Any, location: str) -> None:
        canonical = ALIASES.get(key, key)
        here = f"{location} {quoted_key(key)}" if location else quoted_key(key)
        if canonical in values:
            problems.append(Problem(source, canonical, f"{here} repeats `{canonical}` already set at "
                                    f"{where[canonical]}; sd-scripts keeps only one of them, so set it once"))
            return
        values[canonical] = value
        tables[canonical] = location
        where[canonical] = here

    def look(key: Any, value: Any, location: str) -> None:
        if not isinstance(key, str):
            problems.append(Problem(source, "", f"{location + ' ' if location else ''}key {show_value(key)} "
                                    f"({type_name(key)}) is not a string; option names are strings"))
            return
        if is_lpl_key(key) or key in ALIASES:
            take(key, value, location)
            return
        respelt = _misspelt_prefix(key)
        if respelt is not None:
            hint = f" (did you mean `{respelt}`?)" if respelt in known else \
                suggest(respelt, known) if len(problems) < _MAX_HINTED else ""
            problems.append(Problem(source, key, f"{location + ' ' if location else ''}{quoted_key(key)} is not an "
                                    f"LPL option{hint}; LPL keys are lower case and start with `lpl_`"))

    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, dict) or is_lpl_key(key) or key in ALIASES:
            look(key, value, "")
            continue
        table = f"[{shown(key)}]"
        for inner, inner_value in value.items():
            if isinstance(inner_value, dict) and any(is_lpl_key(k) for k in inner_value):
                problems.append(Problem(source, str(inner), f"[{shown(key)}.{shown(inner)}] holds LPL keys two "
                                        "tables deep; sd-scripts reads only one table level, so move them to the "
                                        "top level or an [lpl] table"))
            elif key == "lpl" and isinstance(inner, str) and not (is_lpl_key(inner) or inner in ALIASES):
                hint = suggest("lpl_" + inner, known) if len(problems) < _MAX_HINTED else ""
                problems.append(Problem(source, inner, f"[lpl] {quoted_key(inner)} lacks the `lpl_` prefix; "
                                        f"sd-scripts flattens tables, so it would set its own {quoted_key(inner)}"
                                        f"{hint}"))
            else:
                look(inner, inner_value, table)
    return values, tables, problems


def config_from_mapping(data: Mapping[str, Any], *, source: str) -> tuple[LPLConfig | None, list[Problem]]:
    """Validate parsed TOML data or a flat mapping; returns the config or every problem found."""
    values, tables, problems = collect_lpl_keys(data, source=source)
    config, more = build_config(values, source=source, tables=tables)
    problems.extend(more)
    return (None if problems else config), problems
