"""A throw-away virtual environment in which `lpl-plugin enable` is run for real, for subprocess tests.

The environment has no packages of its own: a `.pth` line adds this test environment's site-packages (with
lpl-plugin, torch, diffusers, accelerate) as `site.addsitedir` would, so their own `.pth` files (an editable
install's finder) work too, except an activation file there: only `enable` in the throw-away environment turns it on.
`python -m lpl_plugin enable` run with its interpreter writes the activation file into its own
site-packages, exactly as in sd-scripts' venv; nothing outside the temporary folder is touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from safetensors import safe_open

import lpl_plugin_boot

# Sorts before lpl_plugin_activate.pth: site processes a folder's .pth files in name order.
PARENT_PTH = "00_lpl_tests_parent_site.pth"


@dataclass
class Env:
    """A virtual environment: its folder, interpreter and site-packages."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")

    @property
    def purelib(self) -> Path:
        return Path(self.run_python("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                    .stdout.strip())

    def run_python(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """This environment's python with arguments, captured."""
        return run([str(self.python), *args], **kwargs)

    def lpl_plugin(self, *args: str) -> subprocess.CompletedProcess:
        """`lpl-plugin ARGS` as this environment's console script would run it."""
        return self.run_python("-m", "lpl_plugin", *args)


def make_env(folder: Path, *, with_parent: bool = True) -> Env:
    """A new venv without pip; with_parent: this test environment's packages importable in it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    env = Env(folder)
    if with_parent:
        link_parent(env)
    return env


def link_parent(env: Env) -> None:
    """Make this test environment's packages importable in `env`, with accelerate's console script."""
    # as site.addsitedir(parent), less an activation file of the parent's own (a developer may have enabled it)
    parent = sysconfig.get_paths()["purelib"]
    (env.purelib / PARENT_PTH).write_text(  # no comprehension: site runs the line where names are locals
        f"import functools, os, site, sys; sys.path.append({parent!r}); list(map(functools.partial("
        f"site.addpackage, {parent!r}, known_paths=None), sorted(filter(lambda n: n.endswith('.pth') and n != "
        f"{lpl_plugin_boot.PTH_NAME!r}, os.listdir({parent!r})))))\n",
        encoding="utf-8")
    # accelerate's console script, as pip would write it into sd-scripts' venv (GUIs call it by path)
    script = env.root / "bin" / "accelerate"
    script.write_text(f"#!{env.python}\nimport sys\nfrom accelerate.commands.accelerate_cli import main\n"
                      "sys.exit(main())\n", encoding="utf-8")
    script.chmod(0o755)


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """A subprocess with captured text output and a clean environment for the stand-ins (no inherited knobs)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("LPL_STANDIN_", "PYTHONPATH", "ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                                 "MASTER_"))}
    base.update({"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    base.update(env or {})
    # its own process group, so that a timeout ends what it started too (torchrun's workers hanging in a collective)
    with subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base,
                          cwd=cwd, start_new_session=os.name != "nt") as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if os.name != "nt":
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()
            process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def logs(folder: Path) -> list[dict]:
    """The scalars the stand-in's tracker received."""
    path = folder / "logs" / "logs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def saved(folder: Path) -> tuple[dict, dict]:
    """Tensors and metadata of the stand-in's saved weights."""
    with safe_open(str(folder / "out" / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
