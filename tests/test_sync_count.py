"""Host reads and host-to-device copies of the adapter's training steps, counted with PyTorch's own modes.

The sd-scripts adapter runs LPL inside the v0.10.1 stand-in, step by step as the host calls it: noise helper (after
which sd-scripts v0.10.1 moves `alphas_cumprod` back to the CPU), UNet, conditional_loss, per-sample mean, min-SNR
weights, backward, and on logging steps the step logs. tests/sync_counter.py watches the plugin's part of each step
(conditional_loss with the hooks, backward, step logs) with a TorchFunctionMode and a TorchDispatchMode and records
every value read back to the host and every tensor made on the training device from host data.

On the CPU a copy cannot be told by device: the counter treats the scheduler's `alphas_cumprod`, which sd-scripts
keeps on the CPU, as host data, so any `.to(...)` of it in a step is counted (on a GPU that call copies and blocks),
and any tensor built from Python numbers or lists (`torch.tensor(index, device=...)`) is counted on either device.
With CUDA present the same test also runs on the GPU, where transfers are seen by device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lpl_plugin.patches import sd_scripts
from lpl_plugin.training.schedule import forget_tables
from tests.standin_fixtures import module, standin, write_config
from tests.sync_counter import SyncCounter

STEPS = 4
LOG_EVERY = 2  # steps 2 and 4 are logging steps
LPL = "[lpl]\nuse_lpl = true\nlpl_t_threshold = 600\nlpl_num_blocks = 2\n"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def counted_steps(tmp_path: Path, device: str, prediction: str = "epsilon") -> list[dict]:
    """Reads and copies of each of STEPS adapter training steps on `device`."""
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    dev = torch.device(device)
    forget_tables()  # as in a new process: this run's schedule reaches the device in its own first LPL step
    with standin("v0_10_1"):
        session = sd_scripts.install("lora")
        host = "min_snr_gamma = 5.0\n" + ("v_parameterization = true\n" if prediction == "v_prediction" else "")
        parser = module("sdxl_train_network").setup_parser()
        sys.argv = ["sdxl_train_network.py", "--config_file", str(write_config(tmp_path, LPL, host))]
        train_util = module("library.train_util")
        args = train_util.read_config_from_file(parser.parse_args(), parser)
        standin_host = module("standin_host")
        tracker = type("Tracker", (standin_host.JsonTracker, GeneralTracker), {})
        accelerator = Accelerator(cpu=dev.type == "cpu", log_with=[tracker(str(tmp_path / "logs"))])
        accelerator.init_trackers("sync")
        module("library.sdxl_train_util").load_target_model(args, accelerator, "sdxl", torch.float32)
        scheduler = standin_host.make_scheduler(dev)
        trainer = module("sdxl_train_network").SdxlNetworkTrainer()
        weight = torch.zeros((), device=dev, requires_grad=True)
        optimizer = torch.optim.SGD([weight], lr=0.1)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        functions = module("library.custom_train_functions")
        torch.manual_seed(0)
        steps = []
        for step in range(1, STEPS + 1):
            latents = torch.randn(2, 4, 8, 8, device=dev)
            noise, noisy, timesteps = train_util.get_noise_noisy_latents_and_timesteps(args, scheduler, latents)
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.cpu()  # what sd-scripts v0.10.1 does here
            counter = SyncCounter(dev)
            counter.mark_host(scheduler.alphas_cumprod)
            pred = noise * 0.5 + noisy * 0.1 + weight
            with counter:
                loss = train_util.conditional_loss(pred, noise, "l2", "none", None).mean(dim=(1, 2, 3))
            loss = functions.apply_snr_weight(loss, timesteps, scheduler, args.min_snr_gamma, args.v_parameterization)
            with counter:
                loss.mean().backward()
                logs = trainer.generate_step_logs(args, 1.0, 1.0, lr_scheduler, None) if step % LOG_EVERY == 0 else {}
            optimizer.step()
            optimizer.zero_grad()
            steps.append({"step": step, "reads": counter.count("read"), "copies": counter.count("copy"),
                          "events": [f"{e.kind} {e.op} at {e.where}" for e in counter.events],
                          "logged": sorted(k for k in logs if k.startswith("lpl/"))})
        assert session.steps == STEPS
        return steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_training_step_reads_once_and_copies_nothing_from_the_host(tmp_path, device, prediction):
    steps = counted_steps(tmp_path, device, prediction)
    shown = json.dumps(steps, indent=1)
    for entry in steps:
        logging = entry["step"] % LOG_EVERY == 0
        assert entry["reads"] <= (2 if logging else 1), shown
        assert bool(entry["logged"]) == logging and (not logging or "lpl/loss" in entry["logged"]), shown
    # the schedule's table reaches the device once, in the first step that uses it; no step copies after that
    assert sum(entry["copies"] for entry in steps) <= 1, shown
    print(shown)  # the measured counts (pytest -s shows them; the README quotes them)
