"""Issue 17 with the stand-ins: asked means applied (or one line and exit 2), not asked means untouched, however
sd-scripts is started in an enabled environment.

Start modes run for real in the throw-away enabled venv (a symlink, a relative path, `python -m`, a wrapper that
imports the trainer module); the rest arm the same start-up hook in this process (`enabled_here`, as the `.pth` line
arms it) and run the stand-in scripts with runpy.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from lpl_plugin.patches import sd_scripts
from tests.enabled_env import logs, run, saved
from tests.standin_fixtures import STANDINS, on_path, root, standin, write_config
from tests.test_enable import LPL_ON, enabled, enabled_here, host_keys  # noqa: F401  (fixtures)

LPL_ONE_BLOCK = "use_lpl = true\nlpl_t_threshold = 1000\nlpl_num_blocks = 1\n"
WRAPPER = """import sys
sys.path.insert(0, {checkout!r})
import sdxl_train_network
from library import train_util
parser = sdxl_train_network.setup_parser()
args = train_util.read_config_from_file(parser.parse_args(["--config_file", {config!r}]), parser)
sdxl_train_network.SdxlNetworkTrainer().train(args)
"""


def trained_with_lpl(folder: Path) -> bool:
    """Whether a stand-in run logged LPL in every step and wrote the ss_lpl_* metadata."""
    entries = logs(folder)
    return bool(entries) and all(e.get("lpl/applied_fraction") == 1.0 for e in entries) and \
        saved(folder)[1].get("ss_lpl_enabled") == "True"


def trained_plainly(folder: Path) -> bool:
    """Whether a stand-in run trained and saved without any trace of LPL."""
    entries = logs(folder)
    return bool(entries) and not any(k.startswith("lpl/") for e in entries for k in e) and \
        not any(k.startswith("ss_lpl") for k in saved(folder)[1])


# -- start modes, for real -------------------------------------------------------------------------------------

def _symlink(tmp_path: Path, script: Path, config: Path) -> tuple[list, Path]:
    link = tmp_path / "bin" / "train-lora"
    link.parent.mkdir()
    link.symlink_to(script)
    return [link, "--config_file", config], tmp_path


def _relative(tmp_path: Path, script: Path, config: Path) -> tuple[list, Path]:
    return ["./sdxl_train_network.py", "--config_file", config], script.parent


def _module(tmp_path: Path, script: Path, config: Path) -> tuple[list, Path]:
    return ["-m", "sdxl_train_network", "--config_file", config], script.parent


def _wrapper(tmp_path: Path, script: Path, config: Path) -> tuple[list, Path]:
    wrapper = tmp_path / "notebook_cell.py"
    wrapper.write_text(WRAPPER.format(checkout=str(script.parent), config=str(config)))
    return [wrapper], tmp_path


@pytest.mark.parametrize("start", [_symlink, _relative, _module, _wrapper], ids=lambda f: f.__name__[1:])
def test_every_start_mode_trains_with_lpl(enabled, tmp_path, start):
    config = write_config(tmp_path, LPL_ONE_BLOCK, host_keys(tmp_path))
    args, cwd = start(tmp_path, root("v0_10_1") / "sdxl_train_network.py", config)
    done = run([enabled.python, *args], cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert trained_with_lpl(tmp_path)


def test_spawned_loader_workers_only_load_data(enabled, tmp_path):
    import json

    config = write_config(tmp_path, LPL_ONE_BLOCK, host_keys(tmp_path) + "\nmax_data_loader_n_workers = 1")
    done = run([enabled.python, root("v0_10_1") / "sdxl_train_network.py", "--config_file", config])
    assert done.returncode == 0 and "lpl-plugin" not in done.stderr, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["loader_pids"] and summary["main_pid"] not in summary["loader_pids"]
    assert trained_with_lpl(tmp_path)


def test_lpl_plugin_off_skips_activation_for_one_run(enabled, tmp_path):
    config = write_config(tmp_path, "use_lpl = true\nlpl_weight = -1\n", host_keys(tmp_path))
    done = run([enabled.python, root("v0_10_1") / "sdxl_train_network.py", "--config_file", config],
               env={"LPL_PLUGIN": "off"})
    assert done.returncode == 0 and "lpl-plugin" not in done.stderr, done.stderr[-3000:]
    assert trained_plainly(tmp_path)


# -- other scripts of the checkout --------------------------------------------------------------------------------

@pytest.mark.parametrize("asks", ["toml", "command line"])
def test_another_trainer_that_asks_stops_in_one_line(tmp_path, enabled_here, capsys, asks):
    config = write_config(tmp_path, "[lpl]\nuse_lpl = true\n" if asks == "toml" else "lpl_weight = 2.0\n")
    with standin("v0_10_1") as folder, pytest.raises(SystemExit) as stopped:
        enabled_here(folder / "train_network.py", "--config_file", config,
                     *(["--use_lpl"] if asks == "command line" else []))
    assert stopped.value.code == 2 and "library.train_util" not in sys.modules
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        "lpl-plugin: train_network.py asks for LPL (use_lpl), but LPL supports sdxl_train_network.py and "
        "sdxl_train.py only; this script would train without it, so the run is stopped: remove use_lpl or start one "
        "of those two"]


def test_another_trainer_that_does_not_ask_is_untouched(tmp_path, enabled_here, capsys):
    config = write_config(tmp_path, "[lpl]\nuse_lpl = false\nlpl_weight = -1\n")
    with standin("v0_10_1") as folder:
        enabled_here(folder / "train_network.py", "--config_file", config)
        assert sd_scripts.current() is None
        assert not hasattr(sys.modules["library.train_util"].conditional_loss, "__wrapped__")
    assert capsys.readouterr() == ("train_network.py read its settings: use_lpl=False\n", "")


def test_a_wrapper_importing_another_trainer_that_asks_stops_at_the_config_seam(tmp_path, capsys):
    import lpl_plugin_boot

    config = write_config(tmp_path, "use_lpl = true\n")
    with standin("v0_10_1"):
        sys.argv = [str(tmp_path / "notebook.py"), "--config_file", str(config)]  # sd-scripts parses it again
        lpl_plugin_boot.boot()
        try:
            import train_network
            from library import train_util

            parser = train_network.setup_parser()
            with pytest.raises(SystemExit) as stopped:
                train_util.read_config_from_file(parser.parse_args(), parser)
        finally:
            lpl_plugin_boot.disarm()
    assert stopped.value.code == 2
    assert "lpl-plugin: train_network.py asks for LPL" in capsys.readouterr().err


# -- LPL_PLUGIN -------------------------------------------------------------------------------------------------

@pytest.fixture()
def renamed_copy(tmp_path):
    """A copy of the v0.10.1 stand-in checkout with sdxl_train_network.py also saved as my_lora.py."""
    checkout = tmp_path / "sd-scripts"
    shutil.copytree(root("v0_10_1"), checkout, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(checkout / "sdxl_train_network.py", checkout / "my_lora.py")
    with on_path(checkout):
        sys.path.append(str(STANDINS))  # the copy's `library` looks for the shared bodies beside itself
        yield checkout


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_lpl_plugin_on_arms_a_start_the_automatic_check_cannot_see(tmp_path, renamed_copy, enabled_here, capsys,
                                                                  monkeypatch, mode):
    monkeypatch.setenv("LPL_PLUGIN", mode)
    config = write_config(tmp_path, LPL_ONE_BLOCK, host_keys(tmp_path, steps=1))
    if mode == "auto":  # another script of the checkout, as far as the automatic check can tell
        with pytest.raises(SystemExit) as stopped:
            enabled_here(renamed_copy / "my_lora.py", "--config_file", config)
        assert stopped.value.code == 2
        assert "LPL supports sdxl_train_network.py and sdxl_train.py" in capsys.readouterr().err
    else:
        enabled_here(renamed_copy / "my_lora.py", "--config_file", config)
        assert trained_with_lpl(tmp_path)


def test_lpl_plugin_with_another_value_stops_in_one_line(tmp_path, enabled_here, capsys, monkeypatch):
    monkeypatch.setenv("LPL_PLUGIN", "maybe")
    config = write_config(tmp_path, "", host_keys(tmp_path, steps=1))
    with standin("v0_10_1") as folder, pytest.raises(SystemExit) as stopped:
        enabled_here(folder / "sdxl_train_network.py", "--config_file", config)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "lpl-plugin: LPL_PLUGIN='maybe' is not one of off, on, auto; unset it for the automatic check, or set it to "
        "off to run this training without LPL"]


# -- the loss seam ------------------------------------------------------------------------------------------------

def test_a_run_whose_loss_bypasses_the_wrapped_function_stops_at_its_first_step(tmp_path, enabled_here, capsys):
    config = write_config(tmp_path, LPL_ONE_BLOCK, host_keys(tmp_path))
    with standin("v0_10_1") as folder:
        # a release computing its loss somewhere the adapter does not wrap: the trainer calls the unwrapped original
        bypass = tmp_path / "bypass.py"
        bypass.write_text(
            f"import types, runpy, sys\nsys.argv[0] = {str(folder / 'sdxl_train_network.py')!r}\n"
            "import train_network\nfrom library import train_util as tu\n"
            "train_network.NetworkTrainer.loss_helpers = types.SimpleNamespace(get_noise_noisy_latents_and_timesteps="
            "tu.get_noise_noisy_latents_and_timesteps, get_huber_threshold_if_needed=tu.get_huber_threshold_if_needed,"
            " conditional_loss=tu.conditional_loss.__wrapped__)\n"
            f"runpy.run_path({str(folder / 'sdxl_train_network.py')!r}, run_name='__main__')\n")
        with pytest.raises(SystemExit) as stopped:
            enabled_here(folder / "sdxl_train_network.py", "--config_file", config, runner=bypass)
    assert stopped.value.code == 2 and not (tmp_path / "out" / "model.safetensors").exists()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lpl-plugin cannot hook into the sd-scripts at {folder}: the first optimizer step's loss "
                           "did not go through library.train_util.conditional_loss, where LPL is added; LPL would not "
                           "run, so the run is refused")


# -- not asked: untouched ---------------------------------------------------------------------------------------

def _oversized(tmp_path: Path) -> tuple[str, list[str]]:
    return "lpl_weight = 5000.0\n" + "# padding\n" * 120_000, []


def _bad_dataset_config(tmp_path: Path) -> tuple[str, list[str]]:
    (tmp_path / "data.toml").write_text("[[datasets]]\nlpl_weight = 1.0\n[[datasets.subsets]]\nimage_dir = 'x'\n")
    return f"dataset_config = \"{(tmp_path / 'data.toml').as_posix()}\"\n", []


def _use_lpl_false(tmp_path: Path) -> tuple[str, list[str]]:
    return "[lpl]\nuse_lpl = false\nlpl_weight = -1\nlpl_num_blocks = 9\n", []


def _command_line_false(tmp_path: Path) -> tuple[str, list[str]]:
    return "[lpl]\nuse_lpl = true\nlpl_weight = -1\n", ["--use_lpl", "false", "--lpl_t_threshold", "5"]


@pytest.mark.parametrize("case", [_oversized, _bad_dataset_config, _use_lpl_false, _command_line_false],
                         ids=lambda f: f.__name__[1:])
def test_a_run_that_does_not_ask_trains_as_plain_sd_scripts(tmp_path, enabled_here, capsys, case):
    lpl, extra = case(tmp_path)
    config = write_config(tmp_path, lpl, host_keys(tmp_path, steps=1))
    with standin("v0_10_1") as folder:
        enabled_here(folder / "sdxl_train_network.py", "--config_file", config, *extra)
    assert trained_plainly(tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) <= 1 and all(line.startswith("lpl-plugin: warning:") for line in err)


# -- GUI strings ----------------------------------------------------------------------------------------------

def test_a_flat_gui_toml_of_strings_trains_with_lpl(tmp_path, enabled_here):
    gui = 'use_lpl = "true"\nlpl_weight = "1.0"\nlpl_t_threshold = "1000"\nlpl_num_blocks = "1"\n'
    config = write_config(tmp_path, gui, host_keys(tmp_path))
    with standin("v0_10_1") as folder:
        enabled_here(folder / "sdxl_train_network.py", "--config_file", config)
    assert trained_with_lpl(tmp_path)
    metadata = saved(tmp_path)[1]
    assert (metadata["ss_lpl_weight"], metadata["ss_lpl_t_threshold"]) == ("1.0", "1000")
