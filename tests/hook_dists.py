"""Tiny third-party hook distributions for tests: written here, built and installed with pip into a folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TV_HOOK = '''
"""Total variation of the model output along the width, as an extra per-sample loss (a test hook)."""

from lpl_plugin import HookResult


def add_arguments(parser):
    parser.add_argument("--tv_weight", type=float, default=0.0, help="weight of the total-variation hook (0: off)")


class TotalVariation:
    log_names = ("tv/loss",)

    def __init__(self, weight):
        self.weight, self.calls = weight, 0

    def __call__(self, model_pred):
        self.calls += 1
        value = (model_pred[..., 1:] - model_pred[..., :-1]).float().abs().mean(dim=(1, 2, 3))
        return HookResult(self.weight * value, {"tv/loss": value.detach().mean()})

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


def make_hook(host):
    weight = float(getattr(host.args, "tv_weight", 0.0) or 0.0)
    return TotalVariation(weight) if weight > 0 else None
'''


def write_distribution(folder: Path, name: str, module: str, entry: str, source: str) -> Path:
    """A pyproject-based distribution with one module and one `lpl_plugin.hooks` entry point."""
    folder.mkdir(parents=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    (folder / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "1.0"

        [project.entry-points."lpl_plugin.hooks"]
        {entry} = "{module}"

        [tool.setuptools]
        py-modules = ["{module}"]
    '''), encoding="utf-8")
    return folder


def pip_install(site: Path, *folders: Path) -> Path:
    """pip-install distributions into `site` (`--target`: nothing outside it changes; no index, no isolation)."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), *map(str, folders)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return site
