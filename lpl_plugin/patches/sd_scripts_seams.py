"""What an sd-scripts checkout must look like for LPL to hook in: the known layouts and the signature checks.

The adapter binds to sd-scripts functions by parameter name, so it checks those names before it patches anything:
a checkout that matches none of the known layouts (v0.9.x, v0.10.x, the v0.11 `library/loss.py` + `library/args.py`
split) is refused with one line per function, naming the expected and the found signature. Signatures are read from
live modules (the launcher) or, without importing anything, from the source files (`lpl-plugin doctor`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

from lpl_plugin.settings.errors import UserError
from lpl_plugin.settings.files import is_file, read_text
from lpl_plugin.settings.messages import show_path

# A parameter as a string: "name", "name=" (has a default), "*name" or "**name".
Params = tuple[str, ...]
SCRIPTS = {"sdxl_train_network.py": "lora", "sdxl_train.py": "full"}
KIND_NAMES = {"lora": "LoRA", "full": "full fine-tune"}
# Largest host source file read (sd-scripts' train_util.py is about 250 kB).
MAX_SOURCE_BYTES = 16 << 20


@dataclass(frozen=True)
class Seam:
    """One host function: where it lives, the parameter names the adapter relies on, and whether only those."""

    module: str
    name: str
    params: tuple[str, ...]
    exact: bool = False

    @property
    def where(self) -> str:
        """`module.name` as written in messages."""
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Layout:
    """A known generation of sd-scripts' loss helpers."""

    name: str
    releases: str
    noise_values: int                  # what get_noise_noisy_latents_and_timesteps returns
    loss_module: str                   # where the noise helper and conditional_loss are defined
    args_module: str                   # where read_config_from_file is defined
    conditional_loss: tuple[str, ...]
    marker: Seam                       # a helper only this generation has


_LOSS_V10 = ("model_pred", "target", "loss_type", "reduction", "huber_c")
V0_9 = Layout("v0.9", "v0.9.x", 4, "library.train_util", "library.train_util",
              ("model_pred", "target", "reduction", "loss_type", "huber_c"),
              Seam("library.train_util", "get_timesteps_and_huber_c",
                   ("args", "min_timestep", "max_timestep", "noise_scheduler", "b_size", "device")))
V0_10 = Layout("v0.10", "v0.10.x and main", 3, "library.train_util", "library.train_util", _LOSS_V10,
               Seam("library.train_util", "get_huber_threshold_if_needed", ("args", "timesteps", "noise_scheduler")))
V0_11 = Layout("v0.11", "v0.11 (library/loss.py, library/args.py)", 3, "library.loss", "library.args", _LOSS_V10,
               Seam("library.loss", "get_huber_threshold_if_needed", ("args", "timesteps", "noise_scheduler")))
LAYOUTS = (V0_11, V0_10, V0_9)
# Seam fingerprints of released checkouts (see `fingerprint`), for `lpl-plugin doctor` without a .git folder.
KNOWN_FINGERPRINTS = {
    "44791a5e30a7": "sd-scripts v0.10.1 (ae72efb) or main/dev up to 48d368f",
    "2074c1c9ec02": "sd-scripts v0.9.1 (8f4ee8f)",
    "73b00647509b": "sd-scripts 5a18a03 (LoRA_Easy_Training_Scripts' pin) or 2e0fcc5 (kohya_ss v25.2.2's pin)",
}


def seams(layout: Layout, kind: str) -> list[Seam]:
    """Every host function the adapter wraps or calls for a layout and a script kind ("lora" or "full")."""
    found = [
        Seam(layout.loss_module, "get_noise_noisy_latents_and_timesteps", ("args", "noise_scheduler", "latents"),
             exact=True),
        Seam(layout.loss_module, "conditional_loss", layout.conditional_loss, exact=True),
        layout.marker,
        Seam(layout.args_module, "read_config_from_file", ("args", "parser"), exact=True),
        Seam("library.sdxl_train_util", "add_sdxl_training_arguments", ("parser",)),
        Seam("library.sdxl_train_util", "load_target_model", ("args", "accelerator", "model_version", "weight_dtype")),
        Seam("library.train_util", "get_sai_model_spec", ("state_dict", "args", "sdxl", "lora", "textual_inversion")),
        Seam("library.custom_train_functions", "apply_snr_weight",
             ("loss", "timesteps", "noise_scheduler", "gamma", "v_prediction")),
        Seam("library.custom_train_functions", "scale_v_prediction_loss_like_noise_prediction",
             ("loss", "timesteps", "noise_scheduler")),
        Seam("library.custom_train_functions", "add_v_prediction_like_loss",
             ("loss", "timesteps", "noise_scheduler", "v_pred_like_loss")),
        Seam("library.custom_train_functions", "apply_debiased_estimation",
             ("loss", "timesteps", "noise_scheduler", "v_prediction")),
    ]
    if kind == "lora":
        found.append(Seam("train_network", "NetworkTrainer.generate_step_logs",
                          ("self", "args", "current_loss", "avr_loss", "lr_scheduler", "lr_descriptions")))
    return found


class UnsupportedHost(UserError):
    """The sd-scripts checkout (or a call it made) does not match what the adapter binds to; nothing trains."""

    def __init__(self, where: str, problems: Iterable[str]):
        lines = [f"lpl-plugin cannot hook into the sd-scripts at {where}: {p}; LPL would not run, so the run is "
                 f"refused (see `lpl-plugin doctor --sd-scripts {where}`)" for p in problems]
        super().__init__("\n".join(lines))


class SignatureReader(Protocol):
    """Where signatures come from: live modules or source files."""

    def has_module(self, module: str) -> bool: ...

    def params(self, module: str, name: str) -> Params | None: ...


class ModuleReader:
    """Signatures of the importable host modules (the checkout's folder must be on sys.path)."""

    def has_module(self, module: str) -> bool:
        """Whether the module can be found (its parent package is imported to look)."""
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    def params(self, module: str, name: str) -> Params | None:
        """The parameters of `module.name` (name may be `Class.method`), or None when it does not exist."""
        if not self.has_module(module):
            return None
        target: object = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part, None)
            if target is None:
                return None
        return live_params(target) if callable(target) else None

    @property
    def root(self) -> str:
        """The folder holding the imported `library` package."""
        spec = importlib.util.find_spec("library")
        origin = spec.origin if spec and spec.origin else "library/__init__.py"
        return str(Path(origin).resolve().parent.parent)


def unsupported_here(problem: str) -> UnsupportedHost:
    """The refusal for one problem of the sd-scripts whose `library` package is imported (ModuleReader's root)."""
    return UnsupportedHost(ModuleReader().root, [problem])


class SourceReader:
    """Signatures read from a checkout's source files with `ast`; nothing is imported or run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._trees: dict[str, ast.Module | None] = {}

    def _path(self, module: str) -> Path:
        return self.root.joinpath(*module.split(".")).with_suffix(".py")

    def has_module(self, module: str) -> bool:
        """Whether the module's file exists."""
        return is_file(self._path(module))

    def _tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self._path(module)
            try:
                self._trees[module] = ast.parse(read_text(path, limit=MAX_SOURCE_BYTES, what="a Python source file"),
                                                str(path))
            except (UserError, SyntaxError, ValueError, RecursionError, MemoryError):
                self._trees[module] = None
        return self._trees[module]

    def params(self, module: str, name: str) -> Params | None:
        """The parameters of a top-level function or `Class.method` defined in the module's file."""
        body: list[ast.stmt] = getattr(self._tree(module), "body", [])
        *classes, function = name.split(".")
        for class_name in classes:
            found = [n for n in body if isinstance(n, ast.ClassDef) and n.name == class_name]
            if not found:
                return None
            body = found[-1].body
        defs = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function]
        return ast_params(defs[-1]) if defs else None


def live_params(function: Callable[..., object]) -> Params:
    """A callable's parameters in the `Params` notation."""
    out = []
    for p in inspect.signature(function).parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            out.append("*" + p.name)
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            out.append("**" + p.name)
        else:
            out.append(p.name + ("=" if p.default is not inspect.Parameter.empty else ""))
    return tuple(out)


def ast_params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> Params:
    """A parsed function's parameters in the `Params` notation."""
    a = node.args
    positional = [*a.posonlyargs, *a.args]
    first_default = len(positional) - len(a.defaults)
    out = [p.arg + ("=" if i >= first_default else "") for i, p in enumerate(positional)]
    if a.vararg:
        out.append("*" + a.vararg.arg)
    out += [p.arg + ("=" if d is not None else "") for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append("**" + a.kwarg.arg)
    return tuple(out)


def names(params: Params) -> tuple[str, ...]:
    """Bare parameter names."""
    return tuple(p.strip("*=") for p in params)


def show(params: Params | tuple[str, ...]) -> str:
    """A signature as written in messages, e.g. `(model_pred, target, huber_c=…)`."""
    return "(" + ", ".join(p.replace("=", "=…") for p in params) + ")"


def matches(found: Params, seam: Seam) -> bool:
    """Whether found parameters bind the way the adapter calls: the expected names first, anything else optional."""
    if seam.exact:
        return names(found) == seam.params
    head, rest = found[:len(seam.params)], found[len(seam.params):]
    return names(head) == seam.params and all(p.endswith("=") or p.startswith("*") for p in rest)


def check(reader: SignatureReader, seam: Seam) -> str | None:
    """The problem with one seam, or None."""
    found = reader.params(seam.module, seam.name)
    if found is None:
        return f"`{seam.where}` is missing (expected `{seam.where}{show(seam.params)}`)"
    if not matches(found, seam):
        rule = "" if seam.exact else " (further parameters must be optional)"
        return f"`{seam.where}` has signature {show(found)}, expected {show(seam.params)}{rule}"
    return None


def detect(reader: SignatureReader, kind: str) -> tuple[Layout | None, list[str]]:
    """The layout of a checkout for a script kind, or the problems (one per function) that rule every layout out."""
    candidates = [V0_11] if reader.has_module("library.loss") else [V0_10, V0_9]
    where = f"{candidates[0].loss_module}.conditional_loss"
    found = reader.params(candidates[0].loss_module, "conditional_loss")
    layout = next((c for c in candidates if found is not None and names(found) == c.conditional_loss), None)
    if layout is None:
        expected = " or ".join(f"{show(c.conditional_loss)} (sd-scripts {c.releases})" for c in candidates)
        return None, [f"`{where}` has signature {show(found) if found else '(missing)'}, expected {expected}"]
    problems = [p for p in (check(reader, s) for s in seams(layout, kind)) if p]
    return (None if problems else layout), problems


def fingerprint(reader: SignatureReader) -> str:
    """A short hash of every seam signature of every layout (missing ones included): equal for equal host APIs."""
    everything = sorted({s for layout in LAYOUTS for kind in KIND_NAMES for s in seams(layout, kind)},
                        key=lambda s: s.where)
    lines = [f"{s.where}{show(reader.params(s.module, s.name) or ('missing',))}" for s in everything]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def script_kind(script: str | Path) -> str:
    """"lora" or "full" for a supported sd-scripts SDXL script; UserError for anything else."""
    path = Path(script)
    kind = SCRIPTS.get(path.name)
    shown = show_path(script)
    if kind is None:
        supported = ", ".join(f"{name} ({KIND_NAMES[k]})" for name, k in SCRIPTS.items())
        raise UserError(f"{shown}: LPL supports the sd-scripts SDXL trainers {supported}; other scripts (SD 1.x, "
                        "SD3, FLUX, ControlNet) use other latents and losses and would train without LPL")
    if not is_file(path):
        raise UserError(f"{shown}: no such file; pass the path of sd-scripts' {path.name}")
    if not is_file(path.resolve().parent / "library" / "train_util.py"):
        raise UserError(f"{shown}: not inside an sd-scripts checkout (no library/train_util.py beside it)")
    return kind
