"""`lpl-plugin enable`: sd-scripts started the usual ways runs with LPL; every other process is left alone.

Subprocess tests run a real throw-away venv (tests/enabled_env.py) in which `python -m lpl_plugin enable` wrote the
activation file, and start the stand-in trainers the way users and GUIs do. In-process tests arm the same start-up
hook with `lpl_plugin_boot.boot()` and run the script with runpy, as Python would.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest

import lpl_plugin_boot
from lpl_plugin.cli import enable as cli_enable
from lpl_plugin.patches import sd_scripts
from tests.enabled_env import Env, logs, make_env, run, saved
from tests.standin_fixtures import root, standin, write_config

LPL_ON = "[lpl]\nuse_lpl = true\nlpl_t_threshold = 1000\nlpl_num_blocks = 1\n"


def host_keys(folder: Path, steps: int = 2) -> str:
    """Host settings of a short stand-in run logging to folder/logs."""
    return f"logging_dir = \"{(folder / 'logs').as_posix()}\"\nmax_train_steps = {steps}\nsave_state = true"


@pytest.fixture(scope="module")
def enabled(tmp_path_factory) -> Env:
    """A venv in which `lpl-plugin enable` was run."""
    env = make_env(tmp_path_factory.mktemp("enabled") / "venv")
    done = env.lpl_plugin("enable")
    assert done.returncode == 0, done.stderr
    return env


@pytest.fixture()
def enabled_here():
    """`python script args` in this process, with the start-up hook armed as the .pth line arms it."""
    def start(script: Path, *args: str | Path, runner: Path | None = None) -> None:
        """Start `script` with `args` (`runner`: another file run as __main__ with the script as argv[0])."""
        argv = [str(script), *map(str, args)]
        lpl_plugin_boot.boot()
        sys.argv = argv
        sys.path.insert(0, str(script.parent))  # restored by the stand-in context
        runpy.run_path(str(runner or script), run_name="__main__")

    yield start
    lpl_plugin_boot.disarm()


# -- enable, disable, doctor --------------------------------------------------------------------------------------

SEQUENCE = """
from lpl_plugin.cli.main import main
from lpl_plugin.cli.enable import report
for step in ("report", "enable", "report", "enable", "disable", "report", "disable"):
    print("==", step, flush=True)
    print(report()) if step == "report" else main([step])
"""


def test_enable_writes_the_line_disable_removes_it_and_doctor_says_which(tmp_path):
    env = make_env(tmp_path / "venv")
    pth = env.purelib / lpl_plugin_boot.PTH_NAME
    done = env.run_python("-c", SEQUENCE)  # the commands as `lpl-plugin` runs them, with the venv's python
    assert done.returncode == 0, done.stderr
    out = done.stdout.split("== ")
    assert out[1].startswith(f"report\nactivation: disabled for {env.python}")
    assert out[2] == (f"enable\nLPL enabled for {env.python}: {pth}\nsdxl_train_network.py and sdxl_train.py of "
                      "sd-scripts now read use_lpl / lpl_* from their TOML and command line however they are started; "
                      "`lpl-plugin disable` turns this off\n")
    assert out[3].startswith(f"report\nactivation: enabled for {env.python} ({pth})")
    assert "(it was already; the file was rewritten)" in out[4]
    assert out[5].startswith(f"disable\nLPL disabled for {env.python}: removed {pth}")
    assert out[6].startswith("report\nactivation: disabled")
    assert out[7].startswith(f"disable\nLPL was not enabled for {env.python}")
    env.lpl_plugin("enable")
    assert pth.read_text() == lpl_plugin_boot.pth_line(pth)  # and the console-script route writes the same line


def test_enable_refuses_a_site_packages_it_cannot_write(tmp_path, monkeypatch, capsys):
    from lpl_plugin.cli.main import main

    monkeypatch.setattr(cli_enable, "site_dir", lambda: tmp_path)
    # Mock of the OS permission check only: tests run as root, for whom every folder is writable.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert main(["enable"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"cannot enable LPL for {sys.executable}: {tmp_path} is not writable; run this as the user who "
                    "owns that environment, or install lpl-plugin into sd-scripts' virtual environment")
    assert not (tmp_path / lpl_plugin_boot.PTH_NAME).exists()


# -- every other process ------------------------------------------------------------------------------------------

def test_other_processes_import_nothing(enabled, tmp_path):
    started = enabled.run_python("-X", "importtime", "-c", "pass")
    imported = [line.rsplit("|", 1)[-1].strip() for line in started.stderr.splitlines() if "|" in line]
    assert started.returncode == 0 and "site" in imported
    assert not [name for name in imported if name.startswith(("lpl_plugin", "torch", "diffusers"))]
    # a script called sdxl_train.py importing a `library` that is no sd-scripts checkout's: nothing is armed
    script = tmp_path / "sdxl_train.py"
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "__init__.py").write_text("")
    script.write_text("import sys\nwatching = any(hasattr(f, 'lpl_plugin_watch') for f in sys.meta_path)\n"
                      "import library\nprint(watching, 'lpl_plugin' in sys.modules, any(hasattr(f, "
                      "'lpl_plugin_watch') for f in sys.meta_path))\n")
    done = enabled.run_python(str(script))
    assert (done.returncode, done.stdout, done.stderr) == (0, "True False False\n", "")


def test_uninstalled_while_enabled_an_sd_scripts_run_says_so_in_one_line_others_nothing(tmp_path):
    env = make_env(tmp_path / "venv", with_parent=False)  # lpl-plugin is not importable here
    pth = env.purelib / lpl_plugin_boot.PTH_NAME
    pth.write_text(lpl_plugin_boot.pth_line(pth))
    checkout = tmp_path / "sd-scripts"
    (checkout / "library").mkdir(parents=True)
    (checkout / "library" / "__init__.py").write_text("")
    (checkout / "library" / "train_util.py").write_text("VALUE = 7\n")
    (checkout / "sdxl_train_network.py").write_text("from library import train_util\nprint(train_util.VALUE)\n")
    done = env.run_python(str(checkout / "sdxl_train_network.py"), "--config_file", "missing.toml")
    assert (done.returncode, done.stdout) == (0, "7\n")
    assert done.stderr == (f"lpl-plugin: lpl-plugin is no longer installed in this Python environment but its "
                           f"activation file {pth} remains; LPL will not run in this training (delete {pth} to "
                           "remove this line)\n")
    other = env.run_python("-c", "import json, sys; print(len(sys.argv))")
    assert (other.returncode, other.stdout, other.stderr) == (0, "1\n", "")


# -- sd-scripts started the usual ways ----------------------------------------------------------------------------

# The command lines the GUIs build (read from their public repositories): kohya_ss (bmaltais) runs its venv's
# `accelerate launch` with its options, the script by path, `--config_file` and the "Additional parameters" box
# split on spaces; lora-scripts (Akegarasu) runs `python -m accelerate.commands.launch --num_cpu_threads_per_process
# N --quiet SCRIPT --config_file TOML`; LoRA_Easy_Training_Scripts runs `python SCRIPT --config_file=TOML
# --dataset_config=TOML` from its backend.
GUIS = {
    "kohya_ss": (lambda env, script, config: [env.root / "bin" / "accelerate", "launch", "--mixed_precision", "no",
                                              "--num_processes", "1", "--num_machines", "1",
                                              "--num_cpu_threads_per_process", "2", script, "--config_file", config,
                                              "--use_lpl", "--lpl_t_threshold", "1000", "--lpl_num_blocks", "1"],
                 "", {"PYTHONPATH": "{kohya}"}),
    "lora-scripts": (lambda env, script, config: [env.python, "-m", "accelerate.commands.launch",
                                                  "--num_cpu_threads_per_process", "2", "--quiet", script,
                                                  "--config_file", config],
                     LPL_ON, {"ACCELERATE_DISABLE_RICH": "1", "PYTHONUNBUFFERED": "1"}),
    "LoRA_Easy_Training_Scripts": (lambda env, script, config: [env.python, script, f"--config_file={config}",
                                                                f"--dataset_config={config.parent / 'data.toml'}"],
                                   "use_lpl = true\nlpl_t_threshold = 1000\nlpl_num_blocks = 1\n", {}),
}


@pytest.mark.parametrize("gui", list(GUIS))
def test_gui_command_lines_train_with_lpl(enabled, tmp_path, gui):
    make_argv, lpl, extra_env = GUIS[gui]
    config = write_config(tmp_path, lpl, host_keys(tmp_path))
    (tmp_path / "data.toml").write_text("[general]\n[[datasets]]\nbatch_size = 2\n")
    script = root("v0_10_1") / "sdxl_train_network.py"
    environment = {k: v.format(kohya=f"{tmp_path}{os.pathsep}{script.parent}") for k, v in extra_env.items()}
    done = run(make_argv(enabled, script, config), env=environment, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = logs(tmp_path)
    assert len(entries) == 2 and all(e["lpl/applied_fraction"] == 1.0 and e["lpl/loss"] > 0 for e in entries)
    assert "lpl/layer/mid" in entries[0] and saved(tmp_path)[1]["ss_lpl_num_blocks"] == "1"
    assert (tmp_path / "out" / "state" / sd_scripts.STATE_FILE).is_file()


def test_lpl_off_is_bit_identical_and_disable_restores_plain_runs(tmp_path):
    env = make_env(tmp_path / "venv")
    assert env.lpl_plugin("enable").returncode == 0
    script = root("v0_10_1") / "sdxl_train_network.py"
    runs = {}
    for name, lpl in (("use_lpl false", "[lpl]\nuse_lpl = false\nlpl_weight = 2.0\n"), ("disabled", LPL_ON)):
        if name == "disabled":
            assert env.lpl_plugin("disable").returncode == 0  # the same TOML with LPL on now trains plainly
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        done = env.run_python(str(script), "--config_file", str(write_config(folder, lpl, host_keys(folder))))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = (logs(folder), saved(folder))
    (off_logs, (off_weights, off_meta)), (plain_logs, (plain_weights, plain_meta)) = runs.values()
    assert off_logs == plain_logs and not any(key.startswith("lpl/") for entry in plain_logs for key in entry)
    assert off_weights.keys() == plain_weights.keys()
    assert all(off_weights[k].equal(plain_weights[k]) for k in off_weights)
    assert off_meta == plain_meta and "ss_lpl_enabled" not in plain_meta


# -- in this process: the checks, the refusal, the launcher -------------------------------------------------------

def test_config_mistakes_exit_2_before_the_script_loads_anything(tmp_path, enabled_here, capsys):
    config = write_config(tmp_path, "[lpl]\nuse_lpl = true\nlpl_wieght = 1.0\nlpl_num_blocks = 7\n")
    with standin("v0_10_1") as folder, pytest.raises(SystemExit) as stopped:
        enabled_here(folder / "sdxl_train_network.py", "--config_file", config)
    assert stopped.value.code == 2 and sd_scripts.current() is None
    assert "library.train_util" not in sys.modules
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lpl-plugin: {config}: [lpl] unknown option `lpl_wieght` (did you mean `lpl_weight`?)",
        f"lpl-plugin: {config}: [lpl] `lpl_num_blocks` must be between 0 and 4, got 7"]
    assert not (tmp_path / "out").exists()


def test_bad_command_line_value_exits_2_in_one_line(tmp_path, enabled_here, capsys):
    config = write_config(tmp_path, LPL_ON)
    with standin("v0_11") as folder, pytest.raises(SystemExit) as stopped:
        enabled_here(folder / "sdxl_train_network.py", "--config_file", config, "--lpl_weight", "-1")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "lpl-plugin: sd-scripts arguments (config file and command line): `lpl_weight` must be between 0 and 100, "
        "got -1.0"]


@pytest.mark.parametrize("asks", ["toml", "command line", "no"])
def test_unknown_release_is_refused_only_when_the_run_asks_for_lpl(tmp_path, enabled_here, capsys, asks):
    config = write_config(tmp_path, LPL_ON if asks == "toml" else "", host_keys(tmp_path, steps=1))
    cli = ["--use_lpl"] if asks == "command line" else []
    with standin("unsupported") as folder:
        if asks == "no":
            enabled_here(folder / "sdxl_train_network.py", "--config_file", config)
            assert sd_scripts.current() is None and not hasattr(
                sys.modules["library.train_util"].conditional_loss, "__wrapped__")
        else:
            with pytest.raises(SystemExit) as stopped:
                enabled_here(folder / "sdxl_train_network.py", "--config_file", config, *cli)
            assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    if asks == "no":
        assert err == [] and (tmp_path / "out" / "model.safetensors").is_file()
    else:
        (line,) = err
        assert "`library.train_util.conditional_loss` has signature" in line and "refused" in line
        assert not (tmp_path / "out").exists()


def test_enabled_and_launched_installs_the_adapter_once(tmp_path):
    from lpl_plugin import launch

    config = write_config(tmp_path, LPL_ON, host_keys(tmp_path, steps=1))
    with standin("v0_10_1") as folder:
        lpl_plugin_boot.boot()  # as if the launcher's process were armed too
        assert launch.main([str(folder / "sdxl_train_network.py"), "--config_file", str(config)]) == 0
        assert lpl_plugin_boot.armed() is None
        wrapped = sys.modules["library.train_util"].conditional_loss
        assert hasattr(wrapped, "__lpl_patcher__") and not hasattr(wrapped.__wrapped__, "__lpl_patcher__")
    assert logs(tmp_path)[0]["lpl/applied_fraction"] == 1.0


def test_help_lists_the_options(enabled_here, capsys):
    with standin("v0_9_1") as folder, pytest.raises(SystemExit) as stopped:
        enabled_here(folder / "sdxl_train_network.py", "--help")
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "--lpl_weight LPL_WEIGHT" in out and "--use_lpl [true|false]" in out

