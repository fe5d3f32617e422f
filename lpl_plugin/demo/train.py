"""One demo training run: accelerate, 8-bit AdamW, and the LPL hook applied at the loss through the hook registry."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.files import read_text
from lpl_plugin.training.hook import LPLHook
from lpl_plugin.training.registry import HookRegistry, LossContext
from lpl_plugin.engine.tiny import SDXL_SCALING_FACTOR, tiny_unet
from lpl_plugin.demo.data import Conditioning, batch_indices, batch_noise
from lpl_plugin.demo.settings import DemoSettings
from lpl_plugin.demo.state import latest_checkpoint, load_checkpoint, save_checkpoint
from lpl_plugin.demo.stopping import StopRequest

WARMUP_STEPS = 10
MAX_GRAD_NORM = 1.0
LOG_STATS_EVERY = 10
METRICS_FILE = "metrics.jsonl"
# Largest metrics log read back on resume (one line of a few hundred bytes per step).
MAX_METRICS_BYTES = 1 << 30
# Scalars reduced across processes every step, in this order; per-layer LPL sums follow.
_REDUCED = ("diffusion", "lpl_term", "lpl_sum", "gated", "stop")


class CheckpointHook(Protocol):
    """What a run calls at its measured checkpoints (the demo's samples and scores)."""

    def open(self, start: int) -> None:
        """Keep what earlier checkpoints up to `start` recorded (a resumed run), drop the rest."""

    def __call__(self, step: int, model: nn.Module) -> None:
        """Measure the live model after `step`."""

    def close(self) -> None:
        """Flush what was recorded."""


@dataclass
class RunData:
    """What every run trains on: trainer-scaled latents with their conditioning, as cached latents are."""

    latents: Tensor
    conditioning: Conditioning

    @property
    def count(self) -> int:
        """Number of training images."""
        return int(self.latents.shape[0])


@dataclass
class RunOutcome:
    """What a run leaves behind for sampling, plots and the summary."""

    name: str
    unet: nn.Module
    history: list[dict[str, float]]
    seconds: float
    steps_done: int
    stopped_by: StopRequest
    optimizer: str
    weights_sha256: str
    ranks_identical: bool
    peak_memory: dict[str, int] = field(default_factory=dict)
    resumed_from: str | None = None


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' import-time notice about an optional 4-bit CPU kernel the demo does not use."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def make_optimizer(params: list[nn.Parameter], settings: DemoSettings, device: torch.device,
                   say: Any) -> tuple[torch.optim.Optimizer, str]:
    """bitsandbytes' AdamW8bit when it runs on this device (probed with one real step), else torch's AdamW."""
    options = dict(lr=settings.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2)
    if settings.optimizer == "adamw8bit":
        try:
            quiet_bitsandbytes()
            import bitsandbytes as bnb

            probe = torch.zeros(4096, device=device, requires_grad=True)  # large enough for 8-bit state
            probe.grad = torch.ones_like(probe)
            bnb.optim.AdamW8bit([probe]).step()
            return bnb.optim.AdamW8bit(params, **options), "bitsandbytes.optim.AdamW8bit"
        except Exception as error:  # any failure to import or run means: fall back
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            say(f"note: bitsandbytes' 8-bit AdamW cannot run here ({reason}); using torch.optim.AdamW")
    return torch.optim.AdamW(params, **options), "torch.optim.AdamW"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, by name, to compare weights across processes and runs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def hook_state(hook: LPLHook, step: int) -> dict[str, Any]:
    """The LPL gating state of a run: its step counter against lpl_start, plus the hook's own counters if it has any."""
    state: dict[str, Any] = {"step": step, "use_lpl": hook.config.use_lpl, "lpl_start": hook.config.lpl_start,
                             "lpl_t_threshold": hook.config.lpl_t_threshold, "lpl_active": hook.config.use_lpl
                             and step >= hook.config.lpl_start}
    own = getattr(hook, "state_dict", None)
    if callable(own):
        state["hook"] = {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in own().items()}
    return state


def restore_hook(hook: LPLHook, state: dict[str, Any], checkpoint: Path) -> None:
    """Check that the checkpoint's gating settings are this run's, and restore the hook's own counters if any."""
    from lpl_plugin.settings.errors import UserError

    for key in ("use_lpl", "lpl_start", "lpl_t_threshold"):
        if key in state and state[key] != getattr(hook.config, key):
            raise UserError(f"{checkpoint}: saved with {key} = {state[key]}, resumed with "
                            f"{getattr(hook.config, key)}; resume with the run's own settings")
    own = getattr(hook, "load_state_dict", None)
    if callable(own) and "hook" in state:
        own(state["hook"])


def reset_run_peak() -> bool:
    """Restart Linux's peak-resident-set counter (VmHWM) of this process, so each run reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:  # not Linux, or not allowed: the run's peak is then the process's
        return False


def run_peak_rss() -> int | None:
    """Peak resident bytes since the last reset_run_peak (Linux's VmHWM), None where /proc is not available."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak resident memory of this process (and of the current run where Linux tells it) and, on CUDA, peak
    allocated GPU memory, in bytes."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, kilobytes on Linux
    peak = {"cpu_max_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale}
    run_peak = run_peak_rss()
    if run_peak is not None:
        peak["cpu_run_peak_rss_bytes"] = run_peak
    if device.type == "cuda":
        peak["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return peak


def _parse(line: str) -> dict[str, float] | None:
    """One metrics line, or None for a blank line or one cut short by a killed process."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
    return row if ok else None


class MetricsLog:
    """Per-step scalars as JSON lines (the main process writes them as it goes, so nothing is lost on a kill)."""

    def __init__(self, path: Path, keep_until: int, enabled: bool):
        self.path = path
        self.rows: list[dict[str, float]] = []
        if os.path.lexists(path):
            text = read_text(path, limit=MAX_METRICS_BYTES, what="a metrics log")
            self.rows = [r for r in map(_parse, text.splitlines())
                         if r is not None and r["step"] <= keep_until]
        self.file = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
            self.file = path.open("a", encoding="utf-8")

    def add(self, row: dict[str, float]) -> None:
        """Record one step."""
        self.rows.append(row)
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        """Close the file."""
        if self.file is not None:
            self.file.close()


def train_run(name: str, lpl: LPLConfig, settings: DemoSettings, data: RunData, vae: nn.Module, run_dir: Path,
              out: Path, stop: StopRequest, *, checkpoint: Path | None = None, resume: bool = False,
              say: Any = print, measure_at: frozenset[int] = frozenset(),
              measure: CheckpointHook | None = None) -> RunOutcome:
    """Train the tiny UNet from the demo's seed for `settings.steps` steps; LPL through the registry when enabled.

    Batches, noise and timesteps are a pure function of (seed, step, process), so a run resumed from a
    checkpoint continues exactly as the uninterrupted run would have. Stops after the current step when `stop` is
    set (on any process), saving a checkpoint first. After each step in `measure_at` the main process calls
    `measure(step, model)` (outside the timed part of the step).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object

    from lpl_plugin.demo.sampling import training_scheduler

    accelerator = Accelerator(cpu=settings.device == "cpu", mixed_precision=settings.mixed_precision,
                              log_with="tensorboard",
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / "tensorboard")))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_run_peak()
    scheduler = training_scheduler()
    unet = tiny_unet(settings.seed, sample_size=settings.latent_size).train()
    optimizer, optimizer_name = make_optimizer(list(unet.parameters()), settings,
                                               device, say if main else (lambda *_: None))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    hook = LPLHook(vae, lpl, scaling_factor=SDXL_SCALING_FACTOR, device=device)
    registry = HookRegistry()
    registry.register("lpl", hook)

    start, seconds = 0, 0.0
    if resume and checkpoint is None:
        checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, world)
        restore_hook(hook, state["lpl"], checkpoint)
        start, seconds = int(state["step"]), float(state["seconds"])
        if main:
            say(f"{name}: resuming from {checkpoint} (step {start}, LPL {'on' if state['lpl']['lpl_active'] else 'off'}"
                f" at that step, lpl_start = {lpl.lpl_start})")

    metrics = MetricsLog(run_dir / METRICS_FILE, keep_until=start, enabled=main)
    if measure is not None:
        measure.open(start)
    hparams = {**settings.to_dict(), **lpl.lpl_items(), "run": name}
    accelerator.init_trackers(name, config=hparams)
    layer_names = hook.loss.layer_names
    alphas = scheduler.alphas_cumprod.to(device)

    def checkpoint_state(step: int) -> dict[str, Any]:
        return {"run": name, "step": step, "seconds": seconds, "num_processes": world, "seed": settings.seed,
                "lpl": hook_state(hook, step)}

    from tqdm.auto import tqdm

    bar = tqdm(total=settings.steps, initial=start, desc=f"{name:>8}", disable=not (main and settings.progress),
               dynamic_ncols=True, leave=True, file=sys.stderr)
    step = start
    try:
        while step < settings.steps:
            began = time.perf_counter()
            index = batch_indices(step, settings.seed, data.count, settings.batch_size, rank, world)
            latents = data.latents[index].to(device)
            text, added = data.conditioning.select(index, device)
            noise, timesteps = batch_noise(tuple(latents.shape), step, settings.seed, rank,
                                           scheduler.config.num_train_timesteps)
            noise, timesteps = noise.to(device), timesteps.to(device)
            for group in optimizer.param_groups:  # linear warmup, a pure function of the step
                group["lr"] = settings.learning_rate * min(1.0, (step + 1) / WARMUP_STEPS)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            pred = unet(noisy, timesteps, text, added_cond_kwargs=added).sample
            per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            log_stats = (step + 1) % LOG_STATS_EVERY == 0
            extra = registry.apply(LossContext(latents=latents, noisy_latents=noisy, timesteps=timesteps,
                                               model_pred=pred, target=noise, prediction_type="epsilon",
                                               alphas_cumprod=alphas, step=step, log_stats=log_stats,
                                               num_train_timesteps=scheduler.config.num_train_timesteps))
            loss = (per_sample + extra.loss).mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            gated = float(extra.logs.get("lpl/applied_fraction", 0.0)) * latents.shape[0]
            layers = [torch.as_tensor(extra.logs.get(f"lpl/layer/{n}", 0.0), dtype=torch.float32) * gated
                      for n in layer_names]
            local = torch.stack([per_sample.detach().mean().float().cpu(), extra.loss.detach().mean().float().cpu(),
                                 torch.as_tensor(extra.logs.get("lpl/loss", 0.0), dtype=torch.float32).cpu() * gated,
                                 torch.tensor(gated), torch.tensor(float(bool(stop))), *[v.cpu() for v in layers]])
            total = accelerator.reduce(local.to(device), reduction="sum").cpu().tolist()
            values = dict(zip(_REDUCED, total))
            seconds += time.perf_counter() - began
            row = {"step": step, "diffusion": values["diffusion"] / world, "lpl_term": values["lpl_term"] / world,
                   "lpl_loss": values["lpl_sum"] / max(values["gated"], 1.0),
                   "applied_fraction": values["gated"] / (settings.batch_size * world),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}
            metrics.add(row)
            logs = {"loss/diffusion": row["diffusion"], "loss/total": row["diffusion"] + row["lpl_term"],
                    "lpl/term": row["lpl_term"], "lpl/loss": row["lpl_loss"],
                    "lpl/applied_fraction": row["applied_fraction"], "train/lr": row["lr"]}
            if log_stats and values["gated"] > 0:
                for n, v in zip(layer_names, total[len(_REDUCED):]):
                    logs[f"lpl/layer/{n}"] = v / values["gated"]
            accelerator.log(logs, step=step)
            bar.update(1)
            bar.set_postfix({"loss": f"{row['diffusion']:.4f}", "lpl": f"{row['lpl_term']:.2e}",
                             "lpl_frac": f"{row['applied_fraction']:.2f}"}, refresh=False)
            if measure is not None and step in measure_at:
                if main:
                    measure(step, accelerator.unwrap_model(unet))
                accelerator.wait_for_everyone()
            stopping = values["stop"] > 0
            if stopping or (settings.save_every and step % settings.save_every == 0):
                saved = save_checkpoint(accelerator, run_dir, step, checkpoint_state(step))
                if stopping and main:
                    bar.write(f"{name}: stop requested ({stop.name if stop else 'on another process'}); "
                              f"saved {saved}")
            if stopping:
                stop.signum = stop.signum or signal.SIGTERM  # another process was asked to stop
                break
    finally:
        bar.close()
        metrics.close()
        if measure is not None:
            measure.close()
        for tracker in accelerator.trackers:  # not end_training(): it would end the process group before the next run
            tracker.finish()

    model = accelerator.unwrap_model(unet)
    digest = weights_digest(model)
    digests = gather_object([digest])
    outcome = RunOutcome(name, model, metrics.rows, seconds, step, stop, optimizer_name, digest,
                         len(set(digests)) == 1, peak_memory(device), str(checkpoint) if checkpoint else None)
    accelerator.free_memory()
    return outcome
