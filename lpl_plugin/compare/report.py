"""The compare report (report.json, report.md, self-contained report.html) from each arm's results; shared by
`lpl-plugin compare` and `lpl-plugin demo`."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from lpl_plugin.compare.figures import curves_png, grid_png
from lpl_plugin.compare.render import write_html, write_markdown
from lpl_plugin.compare.stats import (MIN_TIMED_STEPS, bootstrap_mean, finite, median_step_seconds, paired_bootstrap,
                                      verdict_line)

SCHEMA = "lpl-plugin-compare/1"
METRICS = {"psnr": ("PSNR", "dB", True), "ssim": ("SSIM", "", True)}
MEASURE_NOTE = ("PSNR and SSIM between each real image and the VAE decode of the model's clean-latent estimate from "
                "that image noised at a few fixed low noise levels (fixed noise seeds), computed inside each arm's "
                "training process with the live model. This sits close to what LPL optimizes (the decoded "
                "clean-latent estimate at low noise), so it is the measure most likely to show LPL's effect; it is "
                "not a measure of sample quality in general.")


@dataclass
class Prompt:
    """A sample prompt and the fixed seed every arm samples it with."""

    id: str
    text: str
    seed: int


@dataclass
class ArmResult:
    """What one arm (one training run) produced, as the report reads it."""

    name: str
    settings: dict[str, Any]
    status: str = "trained"
    seed: int = 0
    scores: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    step_times: list[float] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    applied_fraction: float | None = None
    peak_memory: int | None = None
    memory_kind: str = ""
    samples: dict[str, dict[int, Path]] = field(default_factory=dict)


def arm_names(arms: Sequence[ArmResult]) -> list[str]:
    """The arm names in order of first appearance (several seeds share one name)."""
    return list(dict.fromkeys(arm.name for arm in arms))


def pooled(arms: Sequence[ArmResult], name: str, metric: str, step: int) -> list[float]:
    """One arm's scores at one step, its seeds' units one after the other (the same order in every arm)."""
    return [v for arm in arms if arm.name == name for v in arm.scores.get(metric, {}).get(step, [])]


def metric_entry(arms: Sequence[ArmResult], metric: str, reference: str, steps: list[int]) -> dict[str, Any]:
    """One metric's intervals per arm and step, the paired differences at the final step, and the seed spread."""
    label, unit, higher = METRICS.get(metric, (metric, "", True))
    names, final = arm_names(arms), steps[-1]
    by_step = {n: {str(s): bootstrap_mean(pooled(arms, n, metric, s)).as_dict() for s in steps
                   if pooled(arms, n, metric, s)} for n in names}
    base = pooled(arms, reference, metric, final)
    difference = {}
    for name in names:
        other = pooled(arms, name, metric, final)
        if name != reference and base and len(other) == len(base):
            difference[name] = paired_bootstrap(base, other).as_dict()
    spread: dict[str, float | None] | None = None
    if any(sum(1 for a in arms if a.name == n) > 1 for n in names):
        spread = {}
        for name in names:
            means = [statistics.fmean(a.scores[metric][final]) for a in arms
                     if a.name == name and a.scores.get(metric, {}).get(final)]
            spread[name] = finite(statistics.stdev(means)) if len(means) > 1 else None
    return {"name": metric, "label": label, "unit": unit, "higher_is_better": higher, "step": final,
            "per_arm": {n: by_step[n].get(str(final)) for n in names if by_step[n].get(str(final))},
            "difference": difference, "seed_spread": spread, "by_step": by_step}


def cost_entries(arms: Sequence[ArmResult], reference: str, skip: int) -> list[dict[str, Any]]:
    """Seconds per step (median, first steps left out), the extra over the reference, applied fraction, peak memory."""
    medians: dict[str, list[float]] = {}
    skipped: dict[str, int] = {}
    for arm in arms:  # a short run keeps at least one timed step
        used = min(skip, max(0, len(arm.step_times) - 1))
        skipped[arm.name] = max(skipped.get(arm.name, 0), used)
        value = median_step_seconds(arm.step_times, used)
        if value is not None:
            medians.setdefault(arm.name, []).append(value)
    timed = {name: sum(max(0, len(a.step_times) - skipped[name]) for a in arms if a.name == name)
             for name in arm_names(arms)}
    base = statistics.median(medians[reference]) if medians.get(reference) else None
    entries = []
    for name in arm_names(arms):
        group = [a for a in arms if a.name == name]
        seconds = statistics.median(medians[name]) if medians.get(name) else None
        fractions = [a.applied_fraction for a in group if a.applied_fraction is not None]
        memory = [a.peak_memory for a in group if a.peak_memory is not None]
        comparable = min(timed[name], timed.get(reference, 0)) >= MIN_TIMED_STEPS
        entries.append({
            "arm": name, "seconds_per_step": finite(seconds), "steps_timed": timed[name],
            "skipped_first": skipped[name], "enough_steps_timed": comparable,
            "extra_vs_reference": finite(seconds / base - 1) if seconds is not None and base and comparable else None,
            "applied_fraction": finite(statistics.fmean(fractions)) if fractions else None,
            "peak_memory_bytes": max(memory) if memory else None, "memory_kind": group[0].memory_kind})
    return entries


def split_settings(arms: Sequence[ArmResult]) -> dict[str, Any]:
    """The settings every arm shares, and per arm the ones that differ."""
    keys = sorted({k for arm in arms for k in arm.settings})
    shared = {k: arms[0].settings.get(k) for k in keys
              if all(json.dumps(a.settings.get(k), default=str) == json.dumps(arms[0].settings.get(k), default=str)
                     for a in arms)}
    differs = {}
    for arm in arms:
        label = arm.name if sum(1 for a in arms if a.name == arm.name) == 1 else f"{arm.name} seed {arm.seed}"
        differs[label] = {k: v for k, v in arm.settings.items() if k not in shared}
    return {"shared": shared, "differs": differs}


def slug(text: str) -> str:
    """A file-name-safe form of a prompt id."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:40] or "prompt"


def figures(folder: Path, arms: Sequence[ArmResult], prompts: Sequence[Prompt], title: str) -> tuple[list, dict]:
    """Write the grid PNGs (the first seed of each arm) and the curves PNG under folder/report/."""
    pictures = folder / "report"
    pictures.mkdir(parents=True, exist_ok=True)
    first = {}
    for arm in arms:
        first.setdefault(arm.name, arm)
    grids = []
    for prompt in prompts:
        rows = {name: arm.samples.get(prompt.id, {}) for name, arm in first.items()}
        columns = sorted({s for samples in rows.values() for s in samples})
        if not columns:
            continue
        png = pictures / f"grid_{slug(prompt.id)}.png"
        grid_png(rows, columns, png)
        grids.append({"prompt": prompt.text, "seed": prompt.seed, "png": png.relative_to(folder).as_posix(),
                      "rows": list(rows), "columns": columns})
    series = {name: {k: [[int(s), finite(v)] for s, v in points] for k, points in arm.curves.items()}
              for name, arm in first.items()}
    curves = {"png": None, "series": series}
    if any(points for arm_series in series.values() for points in arm_series.values()):
        png = pictures / "curves.png"
        curves_png({n: {k: [(s, v) for s, v in p if v is not None] for k, p in c.items()} for n, c in series.items()},
                   png, title)
        curves["png"] = png.relative_to(folder).as_posix()
    return grids, curves


def build_report(folder: Path, arms: Sequence[ArmResult], *, prompts: Sequence[Prompt], reference: str,
                 measured_on: str, title: str, notes: Sequence[str] = (), skip_steps: int = 2) -> dict[str, Any]:
    """The report.json dict (writing the pictures it names under folder/report/)."""
    steps = sorted({s for arm in arms for by_step in arm.scores.values() for s in by_step})
    metrics = [metric_entry(arms, m, reference, steps) for m in METRICS
               if steps and any(m in arm.scores for arm in arms)]
    grids, curves = figures(folder, arms, prompts, title)
    return {
        "schema": SCHEMA, "title": title, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": reference, "measured_on": measured_on, "measure_note": MEASURE_NOTE,
        "arms": [{"name": a.name, "seed": a.seed, "status": a.status, "settings": a.settings} for a in arms],
        "settings": split_settings(arms), "checkpoints": steps, "metrics": metrics,
        "costs": cost_entries(arms, reference, skip_steps), "curves": curves, "grids": grids,
        "verdict": verdict_line(metrics, reference) if metrics else "no verdict: no scores were measured",
        "notes": list(notes)}


def write_report(folder: Path, arms: Sequence[ArmResult], *, prompts: Sequence[Prompt], reference: str,
                 measured_on: str, title: str, notes: Sequence[str] = (), skip_steps: int = 2) -> dict[str, Any]:
    """Write folder/report.json, report.md, report.html (self-contained) and folder/report/*.png; return the dict."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(folder, arms, prompts=prompts, reference=reference, measured_on=measured_on, title=title,
                          notes=notes, skip_steps=skip_steps)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str, allow_nan=False) + "\n",
                                        encoding="utf-8")
    write_markdown(folder / "report.md", report)
    write_html(folder / "report.html", report, folder)
    return report
