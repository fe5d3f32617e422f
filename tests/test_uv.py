"""lpl-plugin in a uv-managed project environment, as kohya_ss v26 makes one: `.venv` by `uv venv`, a `uv.lock`.

Everything runs offline with the real uv from PyPI (a test extra): `uv lock` of a project without dependencies,
`uv venv` with this interpreter, this test environment's packages linked in by a `.pth` (so torch is not
installed again), lpl-plugin installed with `uv pip install --no-deps`, then `enable`, `doctor`, a stand-in training
run, `disable`, and a real `uv sync` that removes lpl-plugin, as doctor warns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import lpl_plugin_boot
from lpl_plugin.patches.environment import locks_lpl_plugin, uv_report
from tests.enabled_env import Env, link_parent, logs, run
from tests.standin_fixtures import root, write_config

uv = pytest.importorskip("uv", reason="uv is a test extra (pip install -e .[test])")
REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"UV_OFFLINE": "1", "UV_PYTHON_DOWNLOADS": "never", "UV_NO_CACHE": "1", "UV_NO_CONFIG": "1"}
PROJECT = '[project]\nname = "kohya-ss"\nversion = "26.0"\nrequires-python = ">=3.10"\ndependencies = []\n'


def uv_run(*args: str | Path, cwd: Path) -> str:
    """The real uv with arguments, offline; its output (asserting it succeeded)."""
    done = run([uv.find_uv_bin(), *args], env=OFFLINE, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A uv project (pyproject.toml, uv.lock) with `.venv` made by `uv venv` and lpl-plugin installed by uv."""
    folder = tmp_path_factory.mktemp("kohya_ss")
    (folder / "pyproject.toml").write_text(PROJECT, encoding="utf-8")
    uv_run("lock", "--python", sys.executable, cwd=folder)
    uv_run("venv", "--python", sys.executable, ".venv", cwd=folder)
    link_parent(Env(folder / ".venv"))
    uv_run("pip", "install", "--python", folder / ".venv" / "bin" / "python", "--no-deps", "--no-build-isolation",
           REPO, cwd=folder)
    return folder


def test_doctor_names_the_uv_environment_and_warns_about_uv_sync(project):
    venv = Env(project / ".venv")
    where = venv.run_python("-c", "import lpl_plugin; print(lpl_plugin.__file__)", cwd=project).stdout.strip()
    assert Path(where).is_relative_to(venv.root), where  # uv's install, not the linked test environment's
    version = uv_run("--version", cwd=project).split()[1]
    script = project / ".venv" / "bin" / "lpl-plugin"
    assert run([script, "enable"]).returncode == 0
    assert (venv.purelib / lpl_plugin_boot.PTH_NAME).is_file()
    doctor = run([script, "doctor"])
    assert doctor.returncode == 0, doctor.stderr
    lines = doctor.stdout.splitlines()
    assert f"environment: {venv.root} is created by uv {version}; its project is locked by {project / 'uv.lock'}" \
        in lines, doctor.stdout
    warning = [line for line in lines if "WARNING: `uv sync` removes" in line]
    assert len(warning) == 1 and f"uv pip install --python {venv.python} lpl-plugin" in warning[0], doctor.stdout
    assert f"`{script} enable` again" in warning[0]

    # an enabled sd-scripts run of this environment's python gets LPL
    out = project / "run"
    out.mkdir()
    config = write_config(out, "[lpl]\nuse_lpl = true\nlpl_t_threshold = 1000\nlpl_num_blocks = 1\n",
                          f"logging_dir = \"{(out / 'logs').as_posix()}\"\nmax_train_steps = 2")
    trained = run([venv.python, root("v0_10_1") / "sdxl_train_network.py", "--config_file", config])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert logs(out)[0]["lpl/loss"] > 0

    assert run([script, "disable"]).returncode == 0
    assert not (venv.purelib / lpl_plugin_boot.PTH_NAME).exists()
    assert "activation: disabled" in run([script, "doctor"]).stdout

    # what the warning says: `uv sync` takes lpl-plugin out of the environment
    synced = uv_run("sync", cwd=project)
    assert "- lpl-plugin==" in synced, synced
    assert not script.exists() and not list(venv.purelib.glob("lpl_plugin-*.dist-info"))


def test_no_uv_no_lines_and_a_lock_that_lists_lpl_plugin_keeps_it(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "pyvenv.cfg").write_text("home = /usr/bin\nversion_info = 3.11.7\n", encoding="utf-8")
    assert uv_report(plain) == []
    made = tmp_path / "project" / ".venv"
    made.mkdir(parents=True)
    (made / "pyvenv.cfg").write_text("home = /usr/bin\nuv = 0.13.10\n", encoding="utf-8")
    assert uv_report(made) == [f"environment: {made} is created by uv 0.13.10"]  # no project, nothing to warn of
    lock = made.parent / "uv.lock"
    lock.write_text('version = 1\n\n[[package]]\nname = "lpl-plugin"\nversion = "0.1.0"\n', encoding="utf-8")
    assert locks_lpl_plugin(lock)
    lines = uv_report(made)
    assert lines[0].endswith("is created by uv 0.13.10; its project is locked by " + str(lock)), lines
    assert lines[1:] == ["  uv.lock lists lpl-plugin, so `uv sync` keeps it"]
    lock.write_text('version = 1\n\n[[package]]\nname = "lpl-plugin-extras"\n', encoding="utf-8")
    assert not locks_lpl_plugin(lock) and "WARNING" in uv_report(made)[1]
    assert os.path.basename(lines[0].split()[1]) == ".venv"
