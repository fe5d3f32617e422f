"""A third-party loss hook, built and installed as its own distribution, runs beside LPL inside sd-scripts.

Two tiny distributions are written here and installed with pip (`--target`, so nothing outside tmp changes): a
total-variation hook with its own option, log name and state, and one whose import fails. The stand-in trainer
then runs with them on PYTHONPATH, where importlib.metadata finds their entry points.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lpl_plugin import launch
from tests.enabled_env import logs, make_env, run
from tests.hook_dists import TV_HOOK, pip_install, write_distribution
from tests.standin_fixtures import root, standin, write_config

LPL_ON = "[lpl]\nuse_lpl = true\nlpl_t_threshold = 1000\nlpl_num_blocks = 1\n"
@pytest.fixture(scope="module")
def hooks_site(tmp_path_factory) -> Path:
    """A folder with the two hook distributions pip-installed into it."""
    base = tmp_path_factory.mktemp("hooks")
    tv = write_distribution(base / "src" / "tv", "lpl-tv-hook", "lpl_tv_hook", "tv", TV_HOOK)
    broken = write_distribution(base / "src" / "broken", "lpl-broken-hook", "lpl_broken_hook", "broken",
                                'raise ImportError("needs cupy, which is not installed")\n')
    site = pip_install(base / "site", tv, broken)
    assert sorted(p.name for p in site.glob("*.dist-info")) == ["lpl_broken_hook-1.0.dist-info",
                                                                 "lpl_tv_hook-1.0.dist-info"]
    return site


def host_keys(folder: Path) -> str:
    return f"logging_dir = \"{(folder / 'logs').as_posix()}\"\nmax_train_steps = 2\nsave_state = true\ntv_weight = 0.5"


BROKEN = ("lpl-plugin: hook `broken` of lpl-broken-hook 1.0 could not be loaded (ImportError: needs cupy, which is "
          "not installed); it will not run")


def test_installed_hook_runs_beside_lpl_in_an_enabled_sd_scripts_run(hooks_site, tmp_path):
    env = make_env(tmp_path / "venv")
    assert env.lpl_plugin("enable").returncode == 0
    on, off = tmp_path / "on", tmp_path / "off"
    for folder in (on, off):
        folder.mkdir()
    script = root("v0_10_1") / "sdxl_train_network.py"
    done = run([env.python, script, "--config_file", write_config(on, LPL_ON, host_keys(on))],
               env={"PYTHONPATH": str(hooks_site)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("lpl-plugin:")] == [BROKEN]
    first = logs(on)[0]
    assert first["tv/loss"] > 0 and first["lpl/loss"] > 0
    state = json.loads((on / "out" / "state" / "lpl_plugin_state.json").read_text())
    assert state["hooks"] == {"tv": {"calls": 2}} and state["hook"]["engine"]["learned"]["chunk_size"] == 1

    # the same run with the hook turned off, through the launcher in this process
    sys.path.insert(0, str(hooks_site))
    try:
        with standin("v0_10_1") as folder:
            assert launch.main([str(folder / "sdxl_train_network.py"), "--config_file",
                                str(write_config(off, LPL_ON, host_keys(off))), "--disable_loss_hooks", "tv"]) == 0
    finally:
        sys.path.remove(str(hooks_site))
        sys.modules.pop("lpl_tv_hook", None)
    without = logs(off)[0]
    assert "tv/loss" not in without and without["lpl/loss"] == pytest.approx(first["lpl/loss"], rel=1e-4)
    # the hook's term reached the host's loss as it returned it: 0.5 x its mean over the batch
    assert first["loss/current"] - without["loss/current"] == pytest.approx(0.5 * first["tv/loss"], rel=1e-3)


def test_hook_options_show_in_the_trainer_help(hooks_site, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(hooks_site))
    with standin("v0_9_1") as folder, pytest.raises(SystemExit) as stopped:
        launch.main([str(folder / "sdxl_train_network.py"), "--help"])
    assert stopped.value.code == 0
    captured = capsys.readouterr()
    assert "--tv_weight TV_WEIGHT" in captured.out and "--disable_loss_hooks NAME[,NAME]" in captured.out
    assert "(installed: tv)" in " ".join(captured.out.split())
    assert captured.err.strip().splitlines() == [BROKEN]
    sys.modules.pop("lpl_tv_hook", None)


def test_the_readme_hook_example_works():
    import argparse
    import re
    import types

    import torch

    from lpl_plugin import HookRegistry, HostContext, LossContext

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Loss hooks from other packages", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = types.ModuleType("tv_hook")
    exec(compile(source, "README.md", "exec"), example.__dict__)
    parser = argparse.ArgumentParser()
    example.add_arguments(parser)
    assert example.make_hook(HostContext(args=parser.parse_args([]))) is None
    hook = example.make_hook(HostContext(args=parser.parse_args(["--tv_weight", "0.5"])))
    registry = HookRegistry()
    registry.register("tv", hook)
    pred = torch.randn(3, 4, 8, 8)
    applied = registry.apply(LossContext(latents=pred, noisy_latents=pred, timesteps=torch.zeros(3), model_pred=pred,
                                         target=pred))
    expected = (pred[..., 1:] - pred[..., :-1]).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(applied.loss, 0.5 * expected)
    assert set(applied.logs) == set(hook.log_names) == {"tv/loss"}
