"""`lpl-plugin doctor --sd-scripts PATH [--config cfg.toml]`: can LPL run here, and with which settings?

Reads the sd-scripts checkout's source without importing or running it, then checks this environment the way a run
would use it: torch and CUDA, xformers actually running, bitsandbytes' 8-bit AdamW taking a real step.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from lpl_plugin.settings.errors import UserError

MINIMUMS = {"diffusers": "0.25.0", "accelerate": "0.30.0"}


def sd_scripts_report(root: Path) -> tuple[list[str], bool]:
    """Lines about a checkout (revision or fingerprint, layout, each script) and whether both scripts are supported."""
    from lpl_plugin.patches.sd_scripts_seams import (KIND_NAMES, KNOWN_FINGERPRINTS, SCRIPTS, SourceReader, detect,
                                                     fingerprint, show)
    from lpl_plugin.settings.files import is_file
    from lpl_plugin.settings.messages import show_path

    if not is_file(root / "library" / "train_util.py"):
        raise UserError(f"--sd-scripts {show_path(root)}: not an sd-scripts checkout (no library/train_util.py)")
    reader = SourceReader(root)
    lines = [f"sd-scripts: {show_path(root.resolve())}"]
    print_ = fingerprint(reader)
    described = git_describe(root)
    if described:
        lines.append(f"  revision: {described} (git describe); seam fingerprint {print_}")
    else:
        known = KNOWN_FINGERPRINTS.get(print_, "not a release lpl-plugin was tested with")
        lines.append(f"  revision: no .git folder; seam fingerprint {print_} = {known}")
    lines.append(tested_line(root))
    ok = True
    for script, kind in SCRIPTS.items():
        layout, problems = detect(reader, kind)
        if layout is not None:
            lines.append(f"  {script} ({KIND_NAMES[kind]}): supported, {layout.releases} layout: "
                         f"{layout.noise_values}-value noise helper, conditional_loss{show(layout.conditional_loss)}")
        else:
            ok = False
            lines.append(f"  {script} ({KIND_NAMES[kind]}): NOT supported: " + "; ".join(problems))
    return lines, ok


def tested_line(root: Path) -> str:
    """Whether the checkout's files are those of a commit CI tests against, naming it, or else the ones it does."""
    from lpl_plugin.patches.sd_scripts_tested import all_tested_labels, find_tested_commit

    try:
        commit = find_tested_commit(root)
    except UserError as error:
        return f"  tested in CI: cannot tell ({error}); tested commits: {all_tested_labels()}"
    if commit is None:
        return f"  tested in CI: not this commit (its trainer and library/*.py files match none of the tested " \
               f"commits: {all_tested_labels()})"
    return f"  tested in CI: {commit.label}: lpl-plugin's real-source tests run against exactly these files"


def git_describe(root: Path) -> str | None:
    """`git describe --tags --always --dirty` of a checkout with a .git folder, else None."""
    if not os.path.lexists(root / ".git"):
        return None
    import subprocess

    try:
        done = subprocess.run(["git", "-C", str(root), "describe", "--tags", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def torch_report() -> list[str]:
    """torch, CUDA and the package versions the engine needs."""
    from importlib import metadata

    import torch

    lines = [f"python {platform.python_version()}; torch {torch.__version__}"]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no (LPL decoder runs in float32)"
        lines.append(f"CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s): {names}; bfloat16: {bf16}")
    else:
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        lines.append(f"CUDA: not available (torch is {build}); LPL runs on the CPU in float32")
    for name, low in MINIMUMS.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            lines.append(f"{name}: NOT installed (needs >= {low})")
            continue
        lines.append(f"{name} {version}: {'ok' if _at_least(version, low) else f'too old, needs >= {low}'}")
    return lines


def _at_least(version: str, low: str) -> bool:
    """Whether an installed release is at least `low` (PEP 440, local tags such as +cu130 ignored)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release >= Version(low).release
    except InvalidVersion:
        return False


def xformers_report() -> str:
    """Whether xformers' attention runs here (imported and one real call on the GPU)."""
    import torch

    from lpl_plugin.engine.attention import xformers_usable

    device = "cuda" if torch.cuda.is_available() else "cpu"
    usable, reason = xformers_usable(device, torch.float16 if device == "cuda" else torch.float32)
    return f"xformers: {'usable' if usable else 'not usable'} ({reason}); LPL's decoder uses " + \
        ("xformers" if usable else "PyTorch SDPA, which is fine")


def bitsandbytes_report() -> str:
    """Whether bitsandbytes' AdamW8bit takes one step that changes a parameter and keeps 8-bit state."""
    import torch

    try:
        import bitsandbytes as bnb
    except Exception as error:  # not installed, or a broken build raising anything at import
        return f"bitsandbytes 8-bit AdamW: not usable (not importable: {type(error).__name__}: {error})"[:200]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        weight = torch.nn.Parameter(torch.ones(64, 64, device=device))  # 4096 values: large enough for 8-bit state
        optimizer = bnb.optim.AdamW8bit([weight], lr=1e-2)
        weight.grad = torch.full_like(weight, 0.5)
        optimizer.step()
        state = optimizer.state[weight].get("state1")
        moved = bool(torch.isfinite(weight).all() and (weight != 1).any())
    except Exception as error:  # no kernel for this device or build
        return f"bitsandbytes {bnb.__version__} 8-bit AdamW: not usable on {device} ({type(error).__name__}: " \
               f"{str(error).splitlines()[0][:120] if str(error) else ''})"
    if not moved:
        return f"bitsandbytes {bnb.__version__} 8-bit AdamW: not usable on {device} (the step changed nothing)"
    bits = "8-bit state" if state is not None and state.dtype == torch.uint8 else "state not 8-bit"
    return f"bitsandbytes {bnb.__version__} 8-bit AdamW: works on {device} (one step taken, {bits})"


def config_report(path: str) -> tuple[list[str], bool]:
    """The effective LPL settings of a trainer TOML, or its problems."""
    from lpl_plugin.settings.messages import show_path
    from lpl_plugin.settings.preflight import check_training_config
    from lpl_plugin.settings.problems import ConfigError
    from lpl_plugin.settings.toml_io import render_toml

    checked = check_training_config(path)
    lines = list(checked.warnings)
    if checked.problems or checked.config is None:
        return lines + [f"config {show_path(path)}: {len(checked.problems)} problem(s):"] + \
            [f"  {line}" for line in ConfigError(checked.problems).lines()], False
    state = "on" if checked.config.use_lpl else "off"
    lines.append(f"config {show_path(path)}: valid; LPL is {state}; effective settings:")
    lines += [f"  {line}" for line in render_toml(checked.config, comments=False).splitlines()]
    return lines, True


def _doctor(args: argparse.Namespace) -> int:
    """Print the report; status 0 when LPL can run with this checkout and config, else 1."""
    from lpl_plugin import __version__

    lines = [f"lpl-plugin {__version__}"]
    ok = True
    if args.sd_scripts:
        host, ok = sd_scripts_report(Path(args.sd_scripts))
        lines += host
    from lpl_plugin.cli.enable import report
    from lpl_plugin.patches.environment import uv_report

    lines += [report(), *uv_report()]
    lines += torch_report() + [xformers_report(), bitsandbytes_report()]
    if args.config:
        config, fine = config_report(args.config)
        lines += config
        ok = ok and fine
    lines.append("ready" if ok else "NOT ready: see the lines above")
    print("\n".join(lines))
    return 0 if ok else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `doctor`."""
    p = subparsers.add_parser("doctor", help="check an sd-scripts checkout, this environment and a config")
    p.add_argument("--sd-scripts", metavar="PATH", help="an sd-scripts checkout (its source is read, not run)")
    p.add_argument("--config", metavar="TOML", help="a trainer TOML whose effective LPL settings to show")
    p.set_defaults(func=_doctor)
