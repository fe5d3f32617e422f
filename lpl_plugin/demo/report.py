"""The demo's closing report: its two runs as the arms of a compare report (report.html/md/json, grids, curves,
metric and cost tables, verdict), written by the compare's own report writer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from lpl_plugin.compare.report import ArmResult, Prompt, write_report
from lpl_plugin.demo.measure import NOISE_LEVELS, NOISE_SEEDS, sample_path

# The report's arm names for the demo's runs (those of `lpl-plugin compare`), reference first.
ARM_NAMES = {"baseline": "off", "lpl": "on"}


def lpl_share(history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """LPL's share of the loss on the steps it applied to: the mean over those steps of lpl_term / (diffusion +
    lpl_term), both batch means as logged (`lpl/weighted` and `loss/total` in TensorBoard)."""
    shares = [row["lpl_term"] / (row["diffusion"] + row["lpl_term"]) for row in history
              if row.get("applied_fraction", 0) > 0 and row["diffusion"] + row["lpl_term"] > 0]
    mean = sum(shares) / len(shares) if shares else None
    return {"mean": mean if mean is not None and math.isfinite(mean) else None, "applied_steps": len(shares),
            "steps": len(history)}


def step_times(history: Sequence[Mapping[str, float]]) -> list[float]:
    """Seconds of each logged step, from the cumulative training seconds the metrics log holds."""
    times, previous = [], None
    for row in history:
        if previous is not None:
            times.append(row["seconds"] - previous)
        previous = row["seconds"]
    return times


def curves(history: Sequence[Mapping[str, float]]) -> dict[str, list[tuple[int, float]]]:
    """The report's curves of one run: the loss, LPL's weighted term and raw loss, and the applied fraction."""
    return {"loss": [(r["step"], r["diffusion"] + r["lpl_term"]) for r in history],
            "lpl/weighted": [(r["step"], r["lpl_term"]) for r in history],
            "lpl/loss": [(r["step"], r["lpl_loss"]) for r in history if r["applied_fraction"] > 0],
            "lpl/applied_fraction": [(r["step"], r["applied_fraction"]) for r in history]}


def arm_result(name: str, run_dir: Path, settings: dict[str, Any], history: Sequence[Mapping[str, float]],
               scores: Sequence[Mapping[str, Any]], result: Mapping[str, Any], status: str, seed: int,
               prompts: int) -> ArmResult:
    """One demo run as a report arm."""
    memory = result.get("peak_memory") or {}
    peak = memory.get("cuda_max_allocated_bytes", memory.get("cpu_run_peak_rss_bytes",
                                                             memory.get("cpu_max_rss_bytes")))
    kind = ("CUDA max allocated" if "cuda_max_allocated_bytes" in memory else
            "peak RSS of this run" if "cpu_run_peak_rss_bytes" in memory else "peak RSS of the process")
    fractions = [r["applied_fraction"] for r in history]
    checkpoints = [int(row["step"]) for row in scores]
    return ArmResult(
        name=ARM_NAMES[name], settings=settings, status=status, seed=seed,
        scores={metric: {int(row["step"]): list(row[metric]) for row in scores} for metric in ("psnr", "ssim")},
        step_times=step_times(history), curves=curves(history),
        applied_fraction=sum(fractions) / len(fractions) if name == "lpl" and fractions else None,
        peak_memory=peak, memory_kind=kind,
        samples={f"p{i}": {step: sample_path(run_dir, step, i) for step in checkpoints} for i in range(prompts)})


def share_note(share: Mapping[str, Any], lpl: Mapping[str, Any]) -> str:
    """How LPL's share of the loss was measured, and what it came to."""
    shown = "not measured (LPL never applied)" if share["mean"] is None else f"{100 * share['mean']:.3g} %"
    return (f"LPL's share of the loss where it applied: {shown}, the mean over the {share['applied_steps']} of "
            f"{share['steps']} steps with at least one sample below lpl_t_threshold of lpl/weighted ÷ (diffusion "
            f"loss + lpl/weighted), batch means as logged (lpl_weight {lpl['lpl_weight']:g}, lpl_t_threshold "
            f"{lpl['lpl_t_threshold']}, lpl_scale {str(lpl['lpl_scale']).lower()}).")


def write_demo_report(out: Path, arms: Sequence[ArmResult], captions: Sequence[str], seed: int, images: int,
                      title: str, notes: Sequence[str]) -> dict[str, Any]:
    """report.json, report.md and report.html in `out`, with the baseline ("off") as the reference."""
    ordered = sorted(arms, key=lambda arm: arm.name != "off")
    prompts = [Prompt(f"p{i}", text, seed) for i, text in enumerate(captions)]
    levels = ", ".join(str(t) for t in NOISE_LEVELS)
    measured_on = (f"{images} training images (the model saw them; generated, with captions) × noise levels "
                   f"t = {levels} × {len(NOISE_SEEDS)} noise seeds")
    return write_report(out, ordered, prompts=prompts, reference="off", measured_on=measured_on, title=title,
                        notes=notes)
