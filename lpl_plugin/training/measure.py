"""The measure inside each arm's training process (started by `lpl-plugin compare`, inert otherwise).

Compare names a plan file in LPL_COMPARE_MEASURE. Then the sd-scripts adapter also wraps two host functions:
`prepare_accelerator`, to note the wall-clock time and the logged scalars of every optimizer step at its trackers
(no extra synchronization: the host already reads its loss each step), and `sample_images_common`, to score the
live model right after each sampling that wrote images: encode the plan's images, noise them at fixed low timesteps
with fixed noise seeds, decode the model's clean-latent estimate and score it against the image (PSNR, SSIM). Time
spent sampling and scoring is left out of the step times. Files in the plan's folder: steps.jsonl, scores.jsonl,
memory.json.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lpl_plugin.training.image_metrics import score_images

PLAN_ENV = "LPL_COMPARE_MEASURE"
STEP_KEYS = {"loss/current", "loss"}  # the per-step loss each trainer logs
SDXL_LATENT_SCALE = 0.13025  # sdxl_model_util.VAE_SCALE_FACTOR


class Recorder:
    """Step times, logged scalars, scores and peak memory of one arm, written as they come."""

    def __init__(self, plan: dict[str, Any]):
        self.plan = plan
        self.folder = Path(plan["out"])
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_step: int | None = None
        self.last_time: float | None = None
        self.offset: int | None = None  # added to the host's step numbers (a host that restarts counting on resume)
        self.paused = 0.0
        self.peak = 0
        atexit.register(self.write_memory)

    def append(self, name: str, record: dict[str, Any]) -> None:
        """Add one JSON line to a file in the plan's folder."""
        with (self.folder / name).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_log(self, original: Callable[..., Any], values: dict, *args: Any, **kwargs: Any) -> Any:
        """A tracker's log: note a training step's time (less sampling and scoring) and its scalars, then log as
        usual. Only per-step losses count (`loss/current` of sdxl_train_network.py, `loss` of sdxl_train.py), not
        epoch or validation logs; several trackers logging one step count once."""
        now = time.perf_counter()
        step = kwargs.get("step", args[0] if args else None)
        if not (isinstance(values, dict) and STEP_KEYS & values.keys()):
            step = None
        if isinstance(step, int) and step > 0 and values and self.offset is None:
            resumed_at = int(self.plan.get("resumed_at") or 0)
            self.offset = resumed_at if step <= resumed_at else 0
        if isinstance(step, int) and step > 0 and values and step + (self.offset or 0) != self.last_step:
            step += self.offset or 0
            seconds = None if self.last_time is None else now - self.last_time - self.paused
            scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
            self.append("steps.jsonl", {"step": step, "seconds": seconds, "values": scalars})
            self.last_step, self.last_time, self.paused = step, now, 0.0
        return original(values, *args, **kwargs)

    def note_peak(self) -> None:
        """Remember the training process's peak memory so far (before any scoring adds to it)."""
        self.peak = max(self.peak, peak_memory()[0])

    def write_memory(self) -> None:
        """memory.json: the peak noted before scoring (or now, when nothing was scored)."""
        if not self.peak:
            self.note_peak()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "memory.json").write_text(json.dumps({"peak_bytes": self.peak, "kind": peak_memory()[1]}))


def peak_memory() -> tuple[int, str]:
    """CUDA's max allocated bytes on a GPU, else this process's peak resident set (bytes)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "CUDA max allocated"
    import resource  # POSIX only; imported here so that the adapter still imports on Windows

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "peak RSS"


def sample_count(args: Any) -> int:
    """How many files sd-scripts' sampling has written under output_dir/sample so far."""
    folder = Path(getattr(args, "output_dir", "") or ".") / "sample"
    return sum(1 for _ in folder.glob("*.png")) if folder.is_dir() else 0


def load_images(plan: dict[str, Any]) -> torch.Tensor:
    """The plan's images, resized and centre-cropped to its size, as (N, 3, H, W) in [0, 1]."""
    from PIL import Image, ImageOps

    width, height = plan["size"]
    tensors = []
    for item in plan["images"]:
        with Image.open(item["path"]) as image:
            fitted = ImageOps.fit(image.convert("RGB"), (width, height), Image.BICUBIC)
        data = torch.frombuffer(bytearray(fitted.tobytes()), dtype=torch.uint8)
        tensors.append(data.view(height, width, 3).permute(2, 0, 1).float() / 255)
    return torch.stack(tensors)


def sdxl_conditioning(args: Any, tokenizers: Any, text_encoders: Any, captions: list[str], size: tuple[int, int],
                      device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text and vector embeddings of the captions through the host's own helpers."""
    import importlib

    train_util = importlib.import_module("library.train_util")
    sdxl_train_util = importlib.import_module("library.sdxl_train_util")
    tok1, tok2 = tokenizers
    enc1, enc2 = text_encoders
    ids = [tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
               return_tensors="pt").input_ids.to(enc.device).unsqueeze(1) for tok, enc in ((tok1, enc1), (tok2, enc2))]
    with torch.no_grad():
        hidden1, hidden2, pool2 = train_util.get_hidden_states_sdxl(None, ids[0], ids[1], tok1, tok2, enc1, enc2)
    height, width = size[1], size[0]
    sizes = torch.tensor([[height, width]] * len(captions))
    embs = sdxl_train_util.get_size_embeddings(sizes, torch.zeros_like(sizes), sizes, device)
    vector = torch.cat([pool2.to(device), embs.to(device)], dim=1).to(dtype)
    return torch.cat([hidden1, hidden2], dim=2).to(device, dtype), vector


def wants_conditioning(unet: torch.nn.Module) -> bool:
    """Whether the UNet's forward takes text and vector embeddings (SDXL) besides latents and timesteps."""
    return len(inspect.signature(unet.forward).parameters) >= 4


@torch.no_grad()
def score_model(plan: dict[str, Any], accelerator: Any, args: Any, vae: Any, tokenizers: Any, text_encoders: Any,
                unet: torch.nn.Module, scheduler_alphas: torch.Tensor) -> dict[str, list[float]]:
    """PSNR and SSIM per unit (image × timestep × noise seed, nested so) of the decoded clean-latent estimate."""
    from lpl_plugin.training.diffusion import predict_z0

    device = accelerator.device
    model = accelerator.unwrap_model(unet)
    images = load_images(plan)
    vae_device, vae_dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    vae.to(device)
    dtype = next(model.parameters()).dtype
    scale = float(getattr(sys.modules.get("library.sdxl_model_util"), "VAE_SCALE_FACTOR", SDXL_LATENT_SCALE))
    prediction = "v_prediction" if getattr(args, "v_parameterization", False) else "epsilon"
    conditioning = None
    if wants_conditioning(model):
        captions = [item.get("caption", "") for item in plan["images"]]
        conditioning = sdxl_conditioning(args, tokenizers, text_encoders, captions, tuple(plan["size"]), device, dtype)
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {"psnr": [], "ssim": []}
    try:
        for index in range(len(images)):
            real = images[index:index + 1]
            latent = vae.encode((real * 2 - 1).to(device, vae_dtype)).latent_dist.mean.float() * scale
            for timestep in plan["timesteps"]:
                for seed in plan["noise_seeds"]:
                    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed * 1000 + index))
                    t = torch.tensor([timestep], device=device)
                    a = scheduler_alphas[timestep].float()
                    noisy = a.sqrt() * latent + (1 - a).sqrt() * noise.to(device)
                    inputs = (noisy.to(dtype), t)
                    if conditioning is not None:
                        inputs += (conditioning[0][index:index + 1], conditioning[1][index:index + 1])
                    with accelerator.autocast():
                        pred = model(*inputs)
                    pred = getattr(pred, "sample", pred).float()
                    z0 = predict_z0(pred, noisy, prediction, timesteps=t, alphas_cumprod=scheduler_alphas.to(device))
                    decoded = vae.decode((z0 / scale).to(vae_dtype)).sample.float().cpu()
                    for key, values in score_images(real, (decoded + 1) / 2).items():
                        scores[key] += values
    finally:
        model.train(was_training)
        vae.to(vae_device)
    return scores


def training_alphas() -> torch.Tensor:
    """alphas_cumprod of sd-scripts' SDXL training schedule (scaled linear, 0.00085 to 0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False).alphas_cumprod


class Measure:
    """The two wrapper bodies the sd-scripts adapter adds when compare started the run."""

    def __init__(self, plan: dict[str, Any]):
        self.plan = plan
        self.recorder = Recorder(plan)

    def on_prepare_accelerator(self, original, args, kwargs, bound):
        """prepare_accelerator: once its trackers start, time every optimizer step they log (sd-scripts logs
        through accelerator.log or straight to a tracker)."""
        accelerator = original(*args, **kwargs)
        accelerator.init_trackers = functools.partial(self.on_init_trackers, accelerator.init_trackers, accelerator)
        return accelerator

    def on_init_trackers(self, original: Callable[..., Any], accelerator: Any, *args: Any, **kwargs: Any) -> Any:
        """accelerator.init_trackers: start them, then wrap each tracker's log."""
        result = original(*args, **kwargs)
        for tracker in accelerator.trackers:
            tracker.log = functools.partial(self.recorder.on_log, tracker.log)
        return result

    def on_sample_images(self, original, args, kwargs, bound):
        """sample_images_common: sample as usual; when that wrote images, score the live model too."""
        started = time.perf_counter()
        before = sample_count(bound["args"])
        result = original(*args, **kwargs)
        accelerator = bound["accelerator"]
        if sample_count(bound["args"]) > before and accelerator.is_main_process and self.plan.get("images"):
            self.recorder.note_peak()
            scores = score_model(self.plan, accelerator, bound["args"], bound["vae"], bound["tokenizer"],
                                 bound["text_encoder"], bound.get("unet_wrapped", bound.get("unet")), training_alphas())
            self.recorder.append("scores.jsonl", {"step": int(bound["steps"]), "scores": scores})
        self.recorder.paused += time.perf_counter() - started
        return result


def measure_targets() -> list[tuple[tuple[str, ...], str, Callable[..., Any]]]:
    """The adapter's extra targets when compare started this run (LPL_COMPARE_MEASURE names a plan), else none."""
    path = os.environ.get(PLAN_ENV)
    if not path:
        return []
    measure = Measure(json.loads(Path(path).read_text(encoding="utf-8")))
    return [(("library.train_util",), "prepare_accelerator", measure.on_prepare_accelerator),
            (("library.train_util",), "sample_images_common", measure.on_sample_images)]
