"""Shared bodies of the sd-scripts stand-ins (tests only; written for these tests, not sd-scripts code).

Each `sd_scripts_*` folder mimics one sd-scripts release as far as lpl-plugin sees it (module layout, signatures);
its functions delegate here. The loop trains a one-convolution "UNet" on cached latents of a tiny SDXL-layout VAE
in a few seconds on the CPU, with the host's order of calls: noise helper, UNet, conditional_loss, masking,
per-sample mean, loss_weights, noise-level weights, mean, backward, optimizer step.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lpl_plugin.toml_io import tomllib


# -- library functions ------------------------------------------------------------------------------------------

def noise_and_timesteps(args: Any, scheduler: Any, latents: torch.Tensor):
    """Noise, noisy latents and timesteps in [min_timestep, max_timestep)."""
    noise = torch.randn_like(latents)
    low = args.min_timestep or 0
    high = args.max_timestep or scheduler.config.num_train_timesteps
    batch = latents.shape[0]
    timesteps = torch.randint(low, high, (batch,)) if low < high else torch.full((batch,), high)
    timesteps = timesteps.long().to(latents.device)
    return noise, scheduler.add_noise(latents, noise, timesteps), timesteps


def huber_threshold(args: Any, timesteps: torch.Tensor):
    """A constant per-sample Huber threshold for huber / smooth_l1, else None."""
    if args.loss_type not in ("huber", "smooth_l1"):
        return None
    return torch.full((timesteps.shape[0],), float(args.huber_c), device=timesteps.device)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, reduction: str, huber_c):
    """l2, l1, huber or smooth_l1 with the given reduction."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction=reduction)
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction=reduction)
    c = huber_c.view(-1, *([1] * (pred.dim() - 1)))
    loss = 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c) * (c if loss_type == "huber" else 1)
    return {"mean": loss.mean, "sum": loss.sum}.get(reduction, lambda: loss)()


def prepare_scheduler(scheduler: Any, device: Any) -> None:
    """Attach the per-timestep SNR table the weight functions read."""
    ac = scheduler.alphas_cumprod
    scheduler.all_snr = (ac / (1 - ac)).to(device)


def _snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    return scheduler.all_snr[timesteps]


def min_snr(loss, timesteps, scheduler, gamma, v_prediction=False):
    """Min-SNR-gamma weight."""
    snr = _snr(scheduler, timesteps)
    return loss * (torch.clamp(snr, max=gamma) / (snr + 1 if v_prediction else snr)).to(loss.device)


def v_scale(timesteps, scheduler):
    """snr / (snr + 1) with the SNR capped at 1000."""
    snr = torch.clamp(_snr(scheduler, timesteps), max=1000)
    return snr / (snr + 1)


def debiased(loss, timesteps, scheduler, v_prediction=False):
    """1 / sqrt(snr) (1 / (snr + 1) for v-prediction) with the SNR capped at 1000."""
    snr = torch.clamp(_snr(scheduler, timesteps), max=1000)
    return loss * (1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr))


def masked(loss: torch.Tensor, batch: dict) -> torch.Tensor:
    """Multiply an element-wise loss by the batch's alpha masks resized to it."""
    masks = batch.get("alpha_masks")
    if masks is None:
        return loss
    return loss * F.interpolate(masks.to(loss.dtype).unsqueeze(1), size=loss.shape[2:], mode="area")


def read_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Flatten the TOML one table deep into a namespace and re-parse the command line over it."""
    if not args.config_file:
        return args
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    flat: dict[str, Any] = {}
    for key, value in tomllib.loads(Path(path).read_text(encoding="utf-8")).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return parser.parse_args(namespace=argparse.Namespace(**flat))


class JsonTracker:
    """An accelerate tracker appending logged scalars to `<logging_dir>/logs.jsonl`."""

    name = "json"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, folder: str):
        self.path = Path(folder) / "logs.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self

    def start(self) -> None:
        pass

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def finish(self) -> None:
        pass


def prepare_accelerator(args: argparse.Namespace):
    """An Accelerator with gradient accumulation and, when a logging_dir is set, the JSON tracker."""
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    tracker_class = type("StandinJsonTracker", (JsonTracker, GeneralTracker), {})
    trackers = [tracker_class(args.logging_dir)] if args.logging_dir else None
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, log_with=trackers, cpu=True)


def prepare_dtype(args: argparse.Namespace):
    """The UNet's weight dtype and the save dtype."""
    return (torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32), None


class Denoiser(nn.Module):
    """The stand-in UNet: one 3x3 convolution, called as `unet(noisy_latents, timesteps)`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def load_models(args: argparse.Namespace, accelerator: Any, weight_dtype: torch.dtype):
    """The seven values sd-scripts' sdxl_train_util.load_target_model returns, with tiny models."""
    from lpl_plugin.tiny import tiny_vae

    torch.manual_seed(args.seed)
    vae = tiny_vae().float()
    vae.config.scaling_factor = 0.18215  # what sd-scripts' single-file VAE config says; LPL must not trust it
    return False, None, None, vae, Denoiser(), None, None


def model_spec(args: argparse.Namespace) -> dict[str, str]:
    """A modelspec-like metadata dict."""
    return {"modelspec.architecture": "stand-in/sdxl"}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The host options the stand-ins read."""
    add = parser.add_argument
    add("--config_file")
    add("--output_dir")
    add("--logging_dir")
    add("--seed", type=int, default=0)
    add("--max_train_steps", type=int, default=4)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=1e-2)
    add("--mixed_precision", default="no")
    add("--loss_type", default="l2")
    add("--huber_c", type=float, default=0.1)
    add("--min_timestep", type=int)
    add("--max_timestep", type=int)
    add("--min_snr_gamma", type=float)
    add("--scale_v_pred_loss_like_noise_pred", action="store_true")
    add("--v_pred_like_loss", type=float)
    add("--debiased_estimation_loss", action="store_true")
    add("--v_parameterization", action="store_true")
    add("--masked_loss", action="store_true")
    add("--max_data_loader_n_workers", type=int, default=0)
    add("--save_state", action="store_true")
    add("--resume")
    add("--no_metadata", action="store_true")
    add("--max_train_epochs", type=int)


def add_sdxl_arguments(parser: argparse.ArgumentParser) -> None:
    """The SDXL options."""
    parser.add_argument("--cache_text_encoder_outputs", action="store_true")


# -- the tiny training loop ---------------------------------------------------------------------------------------

class CachedLatents(torch.utils.data.Dataset):
    """Eight cached (unscaled) latents; each item also says which process loaded it."""

    def __init__(self) -> None:
        self.latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 4

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index], "loss_weights": torch.tensor(1.0), "pid": os.getpid()}


def make_scheduler(device: Any):
    """sd-scripts' SDXL training scheduler, prepared for its custom loss weights."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    importlib.import_module("library.custom_train_functions").prepare_scheduler_for_custom_training(scheduler, device)
    return scheduler


LossFn = Callable[[dict, nn.Module, nn.Module, Any, Any, torch.dtype, bool], torch.Tensor]


def train(args: argparse.Namespace, *, load: Callable[..., tuple], loss_fn: LossFn,
          step_logs: Callable[..., dict] | None, lora: bool) -> None:
    """Train, validate once, save weights with metadata (and the state), and write summary.json."""
    train_util = importlib.import_module("library.train_util")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.txt").open("a") as f:
        f.write(f"{os.getpid()}\n")
    accelerator = train_util.prepare_accelerator(args)
    weight_dtype, _ = train_util.prepare_dtype(args)
    vae, unet = load(args, accelerator, weight_dtype)
    scheduler = make_scheduler(accelerator.device)
    workers = args.max_data_loader_n_workers
    loader = torch.utils.data.DataLoader(CachedLatents(), batch_size=2, num_workers=workers,
                                         persistent_workers=workers > 0,
                                         multiprocessing_context="spawn" if workers else None)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    done = 0  # like sd-scripts, a resumed run restarts its step count and stops at max_train_steps in total
    if args.resume:
        accelerator.load_state(args.resume)
        done = json.loads((Path(args.resume) / "train_state.json").read_text())["current_step"]
    if accelerator.log_with:
        accelerator.init_trackers("standin")
    losses: list[float] = []
    pids: set[int] = set()
    global_step = 0
    while global_step + done < args.max_train_steps:
        for batch in loader:
            pids.update(int(p) for p in batch.pop("pid"))
            with accelerator.accumulate(unet):
                loss = loss_fn(batch, unet, vae, scheduler, accelerator, weight_dtype, True)
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                global_step += 1
            current = loss.detach().item()
            losses.append(current)
            if len(accelerator.trackers) > 0:
                logs = step_logs(args, current, sum(losses) / len(losses), lr_scheduler, None) if step_logs \
                    else {"loss": current}
                accelerator.log(logs, step=global_step)
            if global_step + done >= args.max_train_steps:
                break
    batch = next(iter(loader))
    batch.pop("pid")
    validation = loss_fn(batch, unet, vae, scheduler, accelerator, weight_dtype, False).item()
    metadata = {"ss_output_name": "standin"}
    metadata.update(train_util.get_sai_model_spec(None, args, True, lora, False))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in accelerator.unwrap_model(unet).state_dict().items()},
              str(out / "model.safetensors"), metadata)
    if args.save_state:
        state = out / "state"
        accelerator.save_state(str(state))
        if lora:
            record = {"current_epoch": 1, "current_step": global_step + done}
            (state / "train_state.json").write_text(json.dumps(record))
    summary = {"losses": losses, "validation": validation, "main_pid": os.getpid(), "loader_pids": sorted(pids),
               "steps": global_step}
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    accelerator.end_training()
