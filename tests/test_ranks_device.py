"""Two processes on each backend the machine has: gloo on the CPU always; NCCL with two CUDA GPUs, gloo on one.

Each process (torchrun) runs the LPL hook on its device with rank-dependent timesteps, combines the logged scalars
over processes as the sd-scripts adapter does, agrees on a start step, checks that the processes' hook lists agree,
then presents a hook list that differs on rank 0 and must stop with the same line and status 2 on both.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.enabled_env import run

CHILD = r'''
import json, os, sys
import torch
import torch.distributed as dist

backend, device_kind, folder = sys.argv[1], sys.argv[2], sys.argv[3]
rank = int(os.environ["RANK"])
if device_kind == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
device = torch.device(device_kind, torch.cuda.current_device()) if device_kind == "cuda" else torch.device("cpu")
dist.init_process_group(backend)
torch.set_num_threads(1)
from diffusers import DDPMScheduler
from lpl_plugin import LPLConfig, LPLHook
from lpl_plugin.training.rank_hooks import agree_on_hooks
from lpl_plugin.training.ranks import agreed_int, reduce_logs
from lpl_plugin.engine.tiny import tiny_vae

torch.manual_seed(0)
hook = LPLHook(tiny_vae(), LPLConfig(use_lpl=True, lpl_t_threshold=500, lpl_num_blocks=1), device=device)
alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod  # on the CPU, as sd-scripts leaves it
latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(rank)).to(device)
pred = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10 + rank)).to(device).requires_grad_()
timesteps = torch.full((2,), 900 if rank == 0 else 10, device=device)  # rank 0 above the threshold, rank 1 below
noisy = latents * alphas.to(device)[timesteps].sqrt()[:, None, None, None]
result = hook(latents=latents, noisy_latents=noisy, timesteps=timesteps, model_pred=pred, prediction_type="epsilon",
              alphas_cumprod=alphas, sigmas=None, noise_weights=None, snr_gamma=None, step=0, is_training=True,
              log_stats=True)
(result.loss.sum() + 0 * pred.sum()).backward()  # the host's loss, which LPL joins
names = hook.log_names(True)
reduced = reduce_logs(result.logs, names, 2, device)
values = dict(zip(names, torch.stack([reduced[n].value for n in names]).tolist()))
record = {"rank": rank, "device": str(device), "values": values, "start": agreed_int(3 * rank, device)}
agree_on_hooks({"lpl": "lpl-plugin test"})  # the same on both: goes on
try:
    agree_on_hooks({"lpl": "lpl-plugin test", **({"tv": "lpl-tv-hook 1.0"} if rank == 0 else {})})
except SystemExit as stop:
    record["stopped"] = stop.code
open(f"{folder}/rank{rank}.json", "w").write(json.dumps(record))
'''

CUDA = torch.cuda.is_available()
BACKENDS = [
    pytest.param("gloo", "cpu", id="gloo-cpu"),
    pytest.param("nccl", "cuda", id="nccl-cuda", marks=pytest.mark.skipif(
        not CUDA or torch.cuda.device_count() < 2, reason="NCCL needs two CUDA GPUs (one process per GPU)")),
    pytest.param("gloo", "cuda", id="gloo-cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA")),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_two_processes_reduce_agree_and_stop_together(tmp_path, backend, device):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", child,
                backend, device, tmp_path], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["device"].startswith(device) for r in ranks)
    assert ranks[0]["values"] == ranks[1]["values"]  # one reduction, the same numbers on both
    values = ranks[0]["values"]
    assert values["lpl/applied_fraction"] == 0.5 and values["lpl/loss"] > 0 and values["lpl/layer/mid"] > 0
    assert ranks[0]["start"] == ranks[1]["start"] == 3
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("lpl-plugin: the training processes")]
    assert lines == [lines[0]] * 2 and "`tv` is lpl-tv-hook 1.0 on rank 0 and not running on rank 1" in lines[0]
