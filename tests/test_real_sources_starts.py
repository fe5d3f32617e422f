"""Issue 17 against real sd-scripts code: asked means applied or one line, not asked means untouched, however the
real trainer is started in an enabled environment.

    LPL_SD_SCRIPTS_SOURCES=/path/to/shared/sd_scripts_sources python -m pytest tests/test_real_sources_starts.py

(or LPL_SD_SCRIPTS_DIR=/path/to/sd-scripts), with a python that has sd-scripts' packages and lpl-plugin. Every start
mode runs against v0.10.1 (or the named checkout), the plain `python trainer.py` start against every snapshot.

There are no model weights, so a real run cannot train; what it does before it loads them is observable enough. A
run that does not ask reaches sd-scripts' own `Loading settings` line and ends exactly as it does in an environment
where lpl-plugin is installed but not enabled: same exit status, same output once timestamps and the venv's folder
are taken out. A run that asks with an invalid `lpl_weight` stops with lpl-plugin's one line and exit 2 before any
model loads, which shows the plugin was armed in that start mode. Another trainer that asks stops with its one line.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from tests.enabled_env import Env, make_env, run
from tests.sd_sources import Source, real_sources
from tests.test_enable import enabled  # noqa: F401  (fixture: a venv in which `lpl-plugin enable` ran)
from tests.test_enable_starts import _module, _relative, _symlink

SOURCES, NOT_GIVEN = real_sources()
pytestmark = pytest.mark.skipif(not SOURCES, reason=NOT_GIVEN)
# Where every start mode runs: the named checkout, else v0.10.1 (the others get the plain start).
FULL = [s for s in SOURCES if s.checkout is not None or s.name == "v0.10.1"]
ACCELERATE = "accelerate"  # first argument of a start run by the venv's `accelerate` instead of its python
# The real runs must not reach for the network (the tokenizers sd-scripts loads first are not on this machine).
HOST_ENV = {"HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
RICH_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", re.MULTILINE)  # sd-scripts' log time column
LOADING = "Loading settings from"
# A notebook cell or GUI wrapper outside the checkout that runs a trainer module the way its __main__ block does
# (sd-scripts' read_config_from_file parses sys.argv again, so the options come on the wrapper's command line).
WRAPPER = """import sys
sys.path.insert(0, {checkout!r})
import {module} as trainer
from library import train_util
parser = trainer.setup_parser()
args = train_util.read_config_from_file(parser.parse_args(), parser)
trainer.{trainer_class}().train(args)
"""
NOT_ASKED = "[lpl]\nuse_lpl = false\nlpl_weight = -1\nlpl_num_blocks = 9\n"
ASKED_INVALID = "[lpl]\nuse_lpl = true\nlpl_weight = -1\n"


def _plain(tmp_path: Path, script: Path, config: Path) -> tuple[list, Path]:
    return [script, "--config_file", config], tmp_path


def _wrapper(tmp_path: Path, script: Path, config: Path) -> tuple[list, Path]:
    wrapper = tmp_path / "notebook_cell.py"
    trainer_class = "SdxlNetworkTrainer" if script.stem == "sdxl_train_network" else "NetworkTrainer"
    wrapper.write_text(WRAPPER.format(checkout=str(script.parent), module=script.stem, trainer_class=trainer_class),
                       encoding="utf-8")
    return [wrapper, "--config_file", config], tmp_path


def _accelerate(tmp_path: Path, script: Path, config: Path) -> tuple[list, Path]:
    return [ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", script.name, "--config_file", config], \
        script.parent


Start = Callable[[Path, Path, Path], tuple[list, Path]]
STARTS: list[Start] = [_plain, _relative, _symlink, _module, _wrapper, _accelerate]
CASES = [(s, start) for s in SOURCES for start in (STARTS if s in FULL else [_plain])]
IDS = [f"{s.name}-{start.__name__[1:]}" for s, start in CASES]


@pytest.fixture(scope="module")
def plain_env(tmp_path_factory) -> Env:
    """A venv with lpl-plugin and sd-scripts' packages importable, where `enable` was not run."""
    return make_env(tmp_path_factory.mktemp("not-enabled") / "venv")


def host_config(tmp_path: Path, lpl: str) -> Path:
    """A trainer TOML of a LoRA run whose model file does not exist, with an lpl block."""
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "cfg.toml"
    path.write_text(f"pretrained_model_name_or_path = \"{(tmp_path / 'no_model.safetensors').as_posix()}\"\n"
                    f"train_data_dir = \"{(tmp_path / 'data').as_posix()}\"\n"
                    f"output_dir = \"{(tmp_path / 'out').as_posix()}\"\nnetwork_module = \"networks.lora\"\n"
                    f"resolution = \"64,64\"\nmax_train_steps = 1\n{lpl}", encoding="utf-8")
    return path


def start_in(env: Env, args: list, cwd: Path) -> subprocess.CompletedProcess:
    """One start as a user would type it in that environment."""
    head = [env.root / "bin" / "accelerate"] if args[0] == ACCELERATE else [env.python]
    return run([*head, *(args[1:] if args[0] == ACCELERATE else args)], env=HOST_ENV, cwd=cwd)


def comparable(done: subprocess.CompletedProcess, env: Env) -> tuple[int, str, str]:
    """Exit status and output with the log timestamps and the venv's folder taken out."""
    def clean(text: str) -> str:
        return RICH_TIME.sub(" " * 20, text.replace(str(env.root), "<venv>"))

    return done.returncode, clean(done.stdout), clean(done.stderr)


def lpl_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The lines lpl-plugin printed."""
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("lpl-plugin")]


@pytest.mark.parametrize("source, start", CASES, ids=IDS)
def test_a_run_that_does_not_ask_ends_as_without_the_plugin(enabled, plain_env, tmp_path,  # noqa: F811
                                                            source: Source, start: Start):
    config = host_config(tmp_path, NOT_ASKED)
    args, cwd = start(tmp_path, source.root / "sdxl_train_network.py", config)
    with_plugin, without = start_in(enabled, args, cwd), start_in(plain_env, args, cwd)
    assert LOADING in without.stdout + without.stderr, without.stderr[-3000:]  # sd-scripts read its settings
    assert without.returncode != 0  # and stopped later, at the missing model or tokenizer files
    assert comparable(with_plugin, enabled) == comparable(without, plain_env)


@pytest.mark.parametrize("source, start", CASES, ids=IDS)
def test_a_run_that_asks_with_an_invalid_value_stops_in_one_line(enabled, tmp_path, source: Source,  # noqa: F811
                                                                 start: Start):
    config = host_config(tmp_path, ASKED_INVALID)
    args, cwd = start(tmp_path, source.root / "sdxl_train_network.py", config)
    done = start_in(enabled, args, cwd)
    output = done.stdout + done.stderr
    # a wrapper is checked on the namespace sd-scripts read (file and command line together), the others on the file
    where = "sd-scripts arguments (config file and command line):" if start is _wrapper else f"{config}: [lpl]"
    assert lpl_lines(done) == [f"lpl-plugin: {where} `lpl_weight` must be between 0 and 100, got -1"], output[-3000:]
    if start is _accelerate:  # accelerate reports its child's status in a traceback of its own
        assert done.returncode == 1 and "returned non-zero exit status 2" in output
    else:
        assert done.returncode == 2 and "Traceback" not in output
    if start is _wrapper:  # right after sd-scripts read its settings, before any model
        assert output.rstrip().endswith(lpl_lines(done)[0]) and LOADING in output
    else:  # checked when the trainer imported sd-scripts' library: before sd-scripts read anything
        assert LOADING not in output


OTHER = [(s, start) for s in SOURCES for start in ([_plain, _wrapper] if s in FULL else [_plain])]


@pytest.mark.parametrize("source, start", OTHER, ids=[f"{s.name}-{start.__name__[1:]}" for s, start in OTHER])
def test_another_trainer_that_asks_stops_in_one_line(enabled, tmp_path, source: Source, start: Start):  # noqa: F811
    config = host_config(tmp_path, "[lpl]\nuse_lpl = true\n")
    args, cwd = start(tmp_path, source.root / "train_network.py", config)
    done = start_in(enabled, args, cwd)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lpl_lines(done) == [
        "lpl-plugin: train_network.py asks for LPL (use_lpl), but LPL supports sdxl_train_network.py and "
        "sdxl_train.py only; this script would train without it, so the run is stopped: remove use_lpl or start one "
        "of those two"]


@pytest.mark.parametrize("source", FULL, ids=[s.name for s in FULL])
def test_use_lpl_false_on_the_command_line_is_accepted_and_leaves_the_run_alone(enabled, plain_env, tmp_path,  # noqa: F811
                                                                                source: Source):
    config = host_config(tmp_path, ASKED_INVALID)  # the TOML asks; the command line takes it back
    script = source.root / "sdxl_train_network.py"
    with_plugin = start_in(enabled, [script, "--config_file", config, "--use_lpl", "false", "--lpl_weight", "5"],
                           tmp_path)
    without = start_in(plain_env, [script, "--config_file", config], tmp_path)  # plain sd-scripts knows no --use_lpl
    assert LOADING in without.stdout + without.stderr
    assert comparable(with_plugin, enabled) == comparable(without, plain_env)


@pytest.mark.parametrize("source", FULL, ids=[s.name for s in FULL])
def test_lpl_plugin_off_runs_an_asking_run_as_plain_sd_scripts(enabled, plain_env, tmp_path,  # noqa: F811
                                                               source: Source):
    config = host_config(tmp_path, ASKED_INVALID)
    args = [source.root / "sdxl_train_network.py", "--config_file", config]
    off = run([enabled.python, *args], env={**HOST_ENV, "LPL_PLUGIN": "off"}, cwd=tmp_path)
    without = start_in(plain_env, args, tmp_path)
    assert LOADING in without.stdout + without.stderr
    assert comparable(off, enabled) == comparable(without, plain_env)
