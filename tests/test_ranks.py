"""Several training processes agree on every LPL decision: two real gloo processes (torchrun) on the stand-ins.

The stand-in's test knobs make the ranks differ on purpose: LPL_STANDIN_TIMESTEPS gives each rank its own
timestep (rank 0 above lpl_t_threshold, rank 1 below), LPL_STANDIN_NAN_RANK makes one rank's model output NaN.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import lpl_plugin
from lpl_plugin.training.plugins import Plugin
from lpl_plugin.training.rank_hooks import disagreement, hook_versions
from lpl_plugin.training.ranks import Reduced, agreed_int, drop_if_any, max_over_ranks, reduce_logs, rule, world_size
from tests.enabled_env import Env, logs, make_env, run
from tests.hook_dists import TV_HOOK, pip_install, write_distribution
from tests.standin_fixtures import root, write_config

STOP = "LPL was inf/NaN in 2 evaluations in a row (lpl_max_bad_steps = 2), so the run was stopped"


@pytest.fixture(scope="module")
def enabled(tmp_path_factory) -> Env:
    """A venv in which `lpl-plugin enable` was run."""
    env = make_env(tmp_path_factory.mktemp("ranks") / "venv")
    assert env.lpl_plugin("enable").returncode == 0
    return env


def torchrun(env: Env, config, knobs: dict[str, str]):
    """`torchrun --nproc_per_node 2 sdxl_train_network.py --config_file ...` with the venv's python (gloo, CPU)."""
    script = root("v0_10_1") / "sdxl_train_network.py"
    return run([env.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                "--config_file", config], env=knobs, timeout=240)


def test_one_process_is_left_alone():
    term = torch.tensor([1.0, 2.0])
    assert world_size() == 1 and drop_if_any(term, True) is term and max_over_ranks(term) is term
    assert agreed_int(7, "cpu") == 7


def test_one_process_reduction_is_the_scalars_themselves():
    logs_ = {"lpl/loss": torch.tensor(0.5), "lpl/applied_fraction": 0.5, "lpl/weighted": 0.25, "lpl/oom_skips": 3.0}
    names = ["lpl/loss", "lpl/weighted", "lpl/applied_fraction", "lpl/layer/mid", "lpl/oom_skips"]
    out = reduce_logs(logs_, names, batch=4, device="cpu")
    assert {k: round(float(v.value), 6) for k, v in out.items()} == {
        "lpl/loss": 0.5, "lpl/weighted": 0.25, "lpl/applied_fraction": 0.5, "lpl/layer/mid": 0.0, "lpl/oom_skips": 3.0}
    assert float(out["lpl/layer/mid"].weight) == 0 and float(out["lpl/loss"].weight) == 2  # 2 gated samples
    assert isinstance(out["lpl/loss"], Reduced)
    assert [rule(n) for n in names] == ["gated", "batch", "batch", "gated", "sum"]


def test_guard_stop_on_one_rank_ends_every_rank_with_the_same_line(enabled, tmp_path):
    config = write_config(tmp_path, "[lpl]\nuse_lpl = true\nlpl_t_threshold = 500\nlpl_num_blocks = 1\n"
                                    "lpl_max_bad_steps = 2\n", "max_train_steps = 8")
    done = torchrun(enabled, config, {"LPL_STANDIN_TIMESTEPS": "900,10", "LPL_STANDIN_NAN_RANK": "1"})
    # lines printed inside a host process carry the plugin's prefix
    lines = [line.removeprefix("lpl-plugin: ") for line in done.stderr.splitlines()
             if line.startswith("lpl-plugin: LPL was inf/NaN")]
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith(STOP), done.stderr[-3000:]
    # the first rank to exit makes torchrun end the other (whose line is already out), so only its status shows
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr
    assert "Connection closed" not in done.stderr and not (tmp_path / "out" / "model.safetensors").exists()


def test_logged_scalars_are_reduced_over_processes(enabled, tmp_path):
    config = write_config(tmp_path, "[lpl]\nuse_lpl = true\nlpl_t_threshold = 500\nlpl_num_blocks = 1\n",
                          f"max_train_steps = 2\nlogging_dir = \"{(tmp_path / 'logs').as_posix()}\"")
    done = torchrun(enabled, config, {"LPL_STANDIN_TIMESTEPS": "900,10"})
    assert done.returncode == 0, done.stderr[-3000:]
    entries = logs(tmp_path)  # written by rank 0, whose own samples were never gated
    assert len(entries) == 2
    for entry in entries:
        assert entry["lpl/applied_fraction"] == 0.5  # rank 0: 0 of 2 samples, rank 1: 2 of 2
        assert entry["lpl/loss"] > 0 and entry["lpl/layer/mid"] > 0  # rank 1's values, over its gated samples
        assert entry["lpl/weighted"] > 0


CHILD = r'''
import json, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
from lpl_plugin import LPLConfig, LPLHook
from lpl_plugin.training.ranks import agreed_int
from lpl_plugin.engine.tiny import tiny_vae
from diffusers import DDPMScheduler

torch.manual_seed(0)
hook = LPLHook(tiny_vae(), LPLConfig(use_lpl=True, lpl_t_threshold=1000, lpl_num_blocks=1, lpl_checkpointing="none"))
alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod


def out_of_memory(pred, target):
    """A stand-in for the CUDA allocator (which cannot run here) failing inside LPL on this rank."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")


if rank == 1:
    hook.loss._evaluate = out_of_memory
latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(rank))
pred = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10 + rank)).requires_grad_()
timesteps = torch.tensor([100, 300])
noisy = latents * alphas[timesteps].sqrt()[:, None, None, None]
result = hook(latents=latents, noisy_latents=noisy, timesteps=timesteps, model_pred=pred, prediction_type="epsilon",
              alphas_cumprod=alphas, sigmas=None, noise_weights=None, snr_gamma=None, step=0, is_training=True,
              log_stats=False)
result.loss.sum().backward()
open(f"{sys.argv[1]}/rank{rank}.json", "w").write(json.dumps({"rank": rank, "term": result.loss.tolist(), "loss": float(result.logs["lpl/loss"]),
                  "skips": hook.loss.state.oom_skips, "grad": float(pred.grad.abs().sum()),
                  "start": agreed_int(5 if rank == 1 else 0, "cpu")}))  # a file each: stdout lines can interleave
dist.barrier()
dist.destroy_process_group()  # a live gloo group at interpreter exit can abort the process (std::terminate)
'''


def test_an_out_of_memory_skip_on_one_rank_drops_lpl_on_all_of_them(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", child, tmp_path],
               timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert ranks[0]["skips"] == 0 and ranks[1]["skips"] == 1
    assert ranks[0]["loss"] > 0  # rank 0 evaluated LPL ...
    assert ranks[0]["term"] == [0.0, 0.0] and ranks[0]["grad"] == 0.0  # ... and drops it, as rank 1 had to
    assert ranks[1]["term"] == [0.0, 0.0] and ranks[1]["grad"] == 0.0
    assert ranks[0]["start"] == ranks[1]["start"] == 5  # a start step agreed by every process


# -- the processes agree on their loss hooks before any collective of theirs -------------------------------------

FLAKY_HOOK = '''
"""A hook whose import fails in the process of rank 1 only (as a missing CUDA extension would on one node)."""

import os

import torch

from lpl_plugin import HookResult

if os.environ.get("RANK") == "1":
    raise ImportError("libflaky.so: cannot open shared object file (rank 1 of this test)")


def make_hook(host):
    return lambda model_pred: HookResult(torch.zeros(model_pred.shape[0], device=model_pred.device), {})
'''
DIFFERENT = "lpl-plugin: the training processes would run different loss hooks ("


@pytest.fixture(scope="module")
def hook_sites(tmp_path_factory) -> dict[str, Path]:
    """pip-installed hook distributions: `tv` (for rank 0 only) and `flaky` (for every rank)."""
    base = tmp_path_factory.mktemp("rank_hooks")
    tv = write_distribution(base / "src" / "tv", "lpl-tv-hook", "lpl_tv_hook", "tv", TV_HOOK)
    flaky = write_distribution(base / "src" / "flaky", "lpl-flaky-hook", "lpl_flaky_hook", "flaky", FLAKY_HOOK)
    return {"tv": pip_install(base / "tv-site", tv), "flaky": pip_install(base / "flaky-site", flaky)}


def one_line_each(done, tmp_path) -> str:
    """The mismatch line, asserted to be printed once by each of the two processes, which both exit with status 2."""
    lines = [line for line in done.stderr.splitlines() if line.startswith(DIFFERENT)]
    assert len(lines) == 2 and lines[0] == lines[1], done.stderr[-3000:]
    # the first process to exit does so with status 2, and torchrun ends the other (whose line is out: a barrier
    # stands between the lines and the exits), so the other shows status 2 or SIGTERM; no traceback of theirs
    codes = re.findall(r"exitcode  : (-?\d+)", done.stderr)
    assert done.returncode != 0 and "2" in codes and set(codes) <= {"2", "-15"}, done.stderr[-3000:]
    assert "rank_hooks.py" not in done.stderr and "SystemExit" not in done.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()
    return lines[0]


def test_a_hook_installed_for_one_rank_only_stops_every_rank_with_one_line(enabled, hook_sites, tmp_path):
    """Rank 1's environment lacks the tv hook's distribution (a .pth puts it on rank 0's path only)."""
    rank0_only = enabled.purelib / "zz_rank0_hooks.pth"
    site = str(hook_sites["tv"])
    rank0_only.write_text(f"import os, sys; os.environ.get('RANK') == '0' and sys.path.append({site!r})\n",
                          encoding="utf-8")
    try:
        config = write_config(tmp_path, "[lpl]\nuse_lpl = true\nlpl_num_blocks = 1\n", "tv_weight = 0.5")
        done = torchrun(enabled, config, {})
    finally:
        rank0_only.unlink()
    line = one_line_each(done, tmp_path)
    assert "`tv` is lpl-tv-hook 1.0 on rank 0 and not running on rank 1" in line, line


def test_a_hook_that_fails_to_load_on_one_rank_stops_every_rank_with_one_line(enabled, hook_sites, tmp_path):
    """LPL is off, so rank 1's registry ends up empty: without the check it would skip every collective."""
    config = write_config(tmp_path, "[lpl]\nuse_lpl = false\n")
    done = torchrun(enabled, config, {"PYTHONPATH": str(hook_sites["flaky"])})
    assert "hook `flaky` of lpl-flaky-hook 1.0 could not be loaded (ImportError: libflaky.so" in done.stderr
    line = one_line_each(done, tmp_path)
    assert "`flaky` is lpl-flaky-hook 1.0 on rank 0 and not running on rank 1" in line, line


def test_the_mismatch_line_names_each_hook_its_versions_and_ranks():
    same = {"lpl": "lpl-plugin 0.3", "tv": "lpl-tv-hook 1.0"}
    assert disagreement([same, dict(same), dict(same)]) is None
    line = disagreement([same, {"lpl": "lpl-plugin 0.3", "tv": "lpl-tv-hook 1.1"}, {"lpl": "lpl-plugin 0.3"},
                         dict(same)])
    assert line is not None and line.startswith(DIFFERENT) and "\n" not in line
    assert ("`tv` is lpl-tv-hook 1.0 on ranks 0, 3 and lpl-tv-hook 1.1 on rank 1 and not running on rank 2"
            in line), line
    assert "`lpl`" not in line
    assert hook_versions(["lpl", "tv", "mine"], [Plugin("tv", "lpl-tv-hook 1.0", lambda host: None)]) == {
        "lpl": f"lpl-plugin {lpl_plugin.__version__}", "tv": "lpl-tv-hook 1.0", "mine": "a hook registered in code"}
