"""The whole demo: data, the VAE, the LPL and baseline runs, then samples, plots and summary.json in one folder."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import FileError, UserError
from lpl_plugin.settings.files import is_file, path_stat, read_json_object
from lpl_plugin.engine.perceptual_loss import LatentPerceptualLoss
from lpl_plugin.engine.tiny import SDXL_SCALING_FACTOR, tiny_unet
from lpl_plugin.settings.messages import show_path
from lpl_plugin.settings.toml_io import render_toml
from lpl_plugin.demo.autoencoder import (build_vae, decode, encode, fit_vae, latent_std, load_vae, rescale_latents,
                                         save_vae, solve_output_layer)
from lpl_plugin.demo.data import CaptionEncoder, Conditioning, draw, make_scenes
from lpl_plugin.demo.evaluate import evaluate
from lpl_plugin.demo.measure import CheckpointMeasure, MeasureInputs, checkpoint_steps, read_scores
from lpl_plugin.demo.plots import plot_losses, sample_figure, save_grid
from lpl_plugin.demo.report import arm_result, lpl_share, share_note, write_demo_report
from lpl_plugin.demo.sampling import sample, training_scheduler
from lpl_plugin.demo.settings import SETTINGS_FILE, DemoSettings, write_settings
from lpl_plugin.demo.stopping import StopRequest, graceful_stop
from lpl_plugin.demo.train import METRICS_FILE, MetricsLog, RunData, RunOutcome, peak_memory, train_run

RUNS = ("lpl", "baseline")
DATASET_SIZE = 64
SAMPLE_COUNT = 8
# Training images the checkpoint measure scores (the first ones of the data set).
MEASURE_IMAGES = 32
RESULT_FILE = "result.json"
WEIGHTS_FILE = "unet.safetensors"
# What a demo writes into its folder; only these are replaced when a new demo reuses the folder.
OWN_OUTPUTS = ("runs", "tensorboard", "vae", "samples", "losses.png", "samples.png", "summary.json", "lpl.toml",
               "report", "report.json", "report.md", "report.html", SETTINGS_FILE)

Say = Callable[[str], None]


def check_folder(out: Path) -> bool:
    """Whether `out` holds an earlier demo to replace; UserError when it is a file or holds anything else."""
    try:
        found = path_stat(out)
    except FileError as error:
        if error.errno == errno.ENOENT:
            return False
        raise UserError(f"--out {error.path}: {error.reason}") from None
    if not stat.S_ISDIR(found.st_mode):
        raise UserError(f"--out {show_path(out)} is a file; pass a folder")
    if any(out.iterdir()):
        if not is_file(out / SETTINGS_FILE):
            raise UserError(f"--out {show_path(out)} is not empty and holds no earlier demo; pass an empty or new "
                            "folder")
        return True
    return False


def prepare_folder(out: Path, resume: bool, say: Say) -> None:
    """Create the output folder, or clear an earlier demo's outputs from it (never files the demo did not write)."""
    if resume:
        return
    if check_folder(out):
        say(f"note: replacing the earlier demo in {out}")
        for name in OWN_OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def prepare_vae(out: Path, images: torch.Tensor, settings: DemoSettings, state: Any) -> tuple[torch.nn.Module, dict]:
    """The main process fits the tiny VAE and saves it to `out/vae` (kept on resume); every process loads it."""
    folder = out / "vae"
    info_path = folder / "fit.json"
    if state.is_main_process and not is_file(info_path):
        vae = build_vae(settings.seed)
        losses = fit_vae(vae, images, settings.vae_steps, settings.seed)
        error = solve_output_layer(vae, images, settings.seed) if settings.vae_steps else None
        rescale_latents(vae, images)
        save_vae(vae, folder)
        info = {"fit_steps": settings.vae_steps, "fit_loss_first": losses[0] if losses else None,
                "reconstruction_mse": error}
        info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    state.wait_for_everyone()
    return load_vae(folder), read_json_object(info_path, what="the demo VAE's fit.json")


def load_finished(run_dir: Path) -> dict[str, Any] | None:
    """The result of a run that completed before an interruption, if any."""
    path = run_dir / RESULT_FILE
    return read_json_object(path, what="a run result") if os.path.lexists(path) else None


def finish_run(outcome: RunOutcome, run_dir: Path, evaluation: dict[str, float]) -> dict[str, Any]:
    """Save a completed run's weights (safetensors) and result, and return the result."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in outcome.unet.state_dict().items()},
              str(run_dir / WEIGHTS_FILE))
    result = {"steps": outcome.steps_done, "seconds": outcome.seconds,
              "steps_per_second": outcome.steps_done / outcome.seconds if outcome.seconds else None,
              "optimizer": outcome.optimizer, "weights_sha256": outcome.weights_sha256,
              "ranks_identical": outcome.ranks_identical, "peak_memory": outcome.peak_memory,
              "resumed_from": outcome.resumed_from, "eval": evaluation}
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def load_unet(run_dir: Path, settings: DemoSettings) -> torch.nn.Module:
    """A finished run's UNet from its safetensors weights."""
    from safetensors.torch import load_file

    unet = tiny_unet(settings.seed, sample_size=settings.latent_size)
    unet.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
    return unet


def losses_summary(history: list[dict[str, float]]) -> dict[str, Any]:
    """First, last and late-average values of the logged quantities (late: the last fifth of the steps)."""
    if not history:
        return {}
    late = history[-max(1, len(history) // 5):]
    keys = ("diffusion", "lpl_term", "lpl_loss", "applied_fraction")
    return {"first": {k: history[0][k] for k in keys}, "last": {k: history[-1][k] for k in keys},
            "late_mean": {k: sum(r[k] for r in late) / len(late) for k in keys},
            "mean": {k: sum(r[k] for r in history) / len(history) for k in keys}}


def finite(data: Any) -> Any:
    """Data with non-finite floats replaced by None, so summary.json is strict JSON."""
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def run_config(lpl: LPLConfig, name: str) -> LPLConfig:
    """The LPL settings of one run: the demo's for the LPL run, LPL off for the baseline."""
    return lpl if name == "lpl" else lpl.replace(use_lpl=False)


def run_status(result: dict[str, Any], kept: bool) -> str:
    """How a run came to be, for the report: trained in one go, resumed from a saved state, or kept from before."""
    resumed = result.get("resumed_from")
    done = f"resumed from {Path(resumed).name}" if resumed else "trained"
    return f"{done}; kept from before the interruption" if kept else done


def timing_notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """The runs' training seconds (wall clock, this machine, sampling and scoring left out)."""
    return [f"{name}: {result['steps']} steps in {result['seconds']:.1f} s of training (wall clock on this machine; "
            "checkpoint sampling and scoring not counted)" for name, result in results.items()
            if result.get("seconds")]


def run_demo(settings: DemoSettings, lpl: LPLConfig, lpl_source: str, out: Path, *, resume: bool,
             checkpoint: Path | None, say: Say) -> int:
    """Run the demo into `out`; returns 0, or 128 + the signal number when stopped by SIGTERM or Ctrl-C."""
    from accelerate import PartialState

    wall, cpu = time.perf_counter(), time.process_time()
    state = PartialState(cpu=settings.device == "cpu")
    main = state.is_main_process
    tell: Say = say if main else (lambda _: None)
    if main:
        prepare_folder(out, resume, tell)
        write_settings(out, settings, lpl, lpl_source)
        (out / "lpl.toml").write_text(f"# LPL settings of this demo (from {lpl_source})\n" + render_toml(lpl),
                                      encoding="utf-8")
        (out / "samples").mkdir(exist_ok=True)
    state.wait_for_everyone()

    scenes = make_scenes(DATASET_SIZE, settings.seed)
    images = draw(scenes, settings.resolution)
    fitted = is_file(out / "vae" / "fit.json")
    tell(f"data: {DATASET_SIZE} generated {settings.resolution}px images; "
         + ("loading the fitted tiny VAE" if fitted else f"fitting the tiny VAE ({settings.vae_steps} steps) ..."))
    vae, vae_info = prepare_vae(out, images, settings, state)
    latents = encode(vae, images)
    vae_info["latent_std"] = latent_std(latents)
    captions = [s.caption for s in scenes]
    conditioning = Conditioning.for_captions(captions, settings.resolution, CaptionEncoder(settings.seed))
    data = RunData(latents, conditioning)
    picks = torch.arange(SAMPLE_COUNT)
    sample_conditioning = Conditioning(conditioning.text[picks], conditioning.pooled[picks],
                                       conditioning.time_ids[picks])
    latent_shape = (4, settings.latent_size, settings.latent_size)
    grids: dict[str, torch.Tensor] = {}
    if main:
        grids["training image"] = (images[picks] + 1) / 2
        grids["VAE reconstruction"] = decode(vae, latents[picks])
        grids["before training"] = decode(vae, sample(tiny_unet(settings.seed, sample_size=settings.latent_size),
                                                      sample_conditioning, latent_shape, seed=settings.seed))
        save_grid(grids["VAE reconstruction"], out / "samples" / "data.png")
        save_grid(grids["before training"], out / "samples" / "before.png")
    engine = LatentPerceptualLoss(vae, lpl, SDXL_SCALING_FACTOR, device="cpu")
    alphas = training_scheduler().alphas_cumprod
    measured = torch.arange(min(MEASURE_IMAGES, DATASET_SIZE))
    inputs = MeasureInputs((images[measured] + 1) / 2, latents[measured],
                           Conditioning(conditioning.text[measured], conditioning.pooled[measured],
                                        conditioning.time_ids[measured]),
                           sample_conditioning, alphas, settings.seed)
    measure_at = frozenset(checkpoint_steps(settings.steps))
    kept: set[str] = set()

    histories: dict[str, list[dict[str, float]]] = {}
    results: dict[str, dict[str, Any]] = {}
    stopped = StopRequest()
    with graceful_stop() as stop:
        for name in RUNS:
            run_dir = out / "runs" / name
            finished = load_finished(run_dir) if resume else None
            if finished is not None:
                tell(f"{name}: finished before the interruption; kept")
                kept.add(name)
                histories[name] = MetricsLog(run_dir / METRICS_FILE, finished["steps"], enabled=False).rows
                results[name] = finished
                unet = load_unet(run_dir, settings) if main else None
            else:
                resume_here = checkpoint if checkpoint is not None and checkpoint.parents[1] == run_dir else None
                outcome = train_run(name, run_config(lpl, name), settings, data, vae, run_dir, out, stop,
                                    checkpoint=resume_here, resume=resume, say=tell, measure_at=measure_at,
                                    measure=CheckpointMeasure(run_dir, vae, inputs, latent_shape, enabled=main))
                histories[name] = outcome.history
                if stop:
                    stopped = stop
                    break
                unet = outcome.unet
                if main:
                    evaluation = evaluate(unet, latents[picks], sample_conditioning, engine, alphas,
                                          lpl.lpl_t_threshold, settings.seed)
                    results[name] = finish_run(outcome, run_dir, evaluation)
            if main:
                grids[f"after, {'with' if name == 'lpl' else 'without'} LPL"] = decode(
                    vae, sample(unet, sample_conditioning, latent_shape, seed=settings.seed))
                save_grid(grids[f"after, {'with' if name == 'lpl' else 'without'} LPL"],
                          out / "samples" / f"{name}.png")
            state.wait_for_everyone()

    if main:
        title = (f"tiny SDXL-shaped UNet, {settings.resolution}px, batch {settings.batch_size} x "
                 f"{state.num_processes} process(es), seed {settings.seed}")
        share = lpl_share(histories.get("lpl", []))
        report = None if stopped else write_demo_report(
            out, [arm_result(name, out / "runs" / name, {**settings.to_dict(), **run_config(lpl, name).lpl_items()},
                             histories[name], read_scores(out / "runs" / name, settings.steps), results[name],
                             run_status(results[name], name in kept), settings.seed, SAMPLE_COUNT) for name in RUNS],
            captions[:SAMPLE_COUNT], settings.seed, len(measured), f"lpl-plugin demo: {title}",
            [share_note(share, lpl.lpl_items()), *timing_notes(results)])
        plot_losses(histories, out / "losses.png", title)
        sample_figure(grids, captions[:SAMPLE_COUNT], out / "samples.png",
                      f"DDIM samples decoded with the tiny VAE ({title})")
        summary = {
            "interrupted": bool(stopped), "stopped_by": stopped.name if stopped else None,
            "steps": settings.steps, "seconds": {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu},
            "num_processes": state.num_processes, "device": str(state.device),
            "peak_memory": peak_memory(state.device),
            "settings": settings.to_dict(), "lpl": lpl.lpl_items(), "lpl_source": lpl_source, "vae": vae_info,
            "lpl_share": share, "verdict": report["verdict"] if report else None,
            "runs": {name: {**results.get(name, {}), "losses": losses_summary(histories.get(name, []))}
                     for name in RUNS},
            "artifacts": {"report": "report.html", "plot": "losses.png", "samples": "samples.png", "grids": "samples/",
                          "tensorboard": "tensorboard/", "metrics": "runs/*/metrics.jsonl", "vae": "vae/"},
        }
        (out / "summary.json").write_text(json.dumps(finite(summary), indent=2) + "\n", encoding="utf-8")
    state.wait_for_everyone()
    state.destroy_process_group()
    return stopped.exit_status if stopped else 0
