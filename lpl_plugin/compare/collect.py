"""Reading a finished arm's folder back: step times and curves, scores, peak memory and sample files."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from lpl_plugin.compare.report import ArmResult
from lpl_plugin.compare.runner import read_steps

# sd-scripts names samples [<output_name>_]<steps:06d>_<prompt index:02d>_<timestamp>[_<seed>].png, and the one
# before the first step (sample_at_first, called with epoch 0) e000000_...
SAMPLE_FILE = re.compile(r"(?:^|_)(\d{6}|e000000)_(\d{2})_(\d{14})(?:_\d+)?\.png$")


def samples(out: Path, prompt_ids: list[str]) -> dict[str, dict[int, Path]]:
    """prompt id -> step -> the newest sample file of that step (a resumed run may have sampled a step twice)."""
    found: dict[str, dict[int, tuple[str, Path]]] = {}
    folder = out / "sample"
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        match = SAMPLE_FILE.search(path.name)
        if match and int(match.group(2)) < len(prompt_ids):
            step, prompt, stamp = int(match.group(1).lstrip("e")), prompt_ids[int(match.group(2))], match.group(3)
            known = found.setdefault(prompt, {}).get(step)
            if known is None or known[0] <= stamp:
                found[prompt][step] = (stamp, path)
    return {prompt: {step: p for step, (_, p) in by_step.items()} for prompt, by_step in found.items()}


def scores(path: Path) -> dict[str, dict[int, list[float]]]:
    """metric -> step -> per-unit scores; the last record of a step wins."""
    found: dict[str, dict[int, list[float]]] = {}
    for record in read_steps(path):
        for metric, values in record["scores"].items():
            found.setdefault(metric, {})[int(record["step"])] = [float(v) for v in values]
    return found


def curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """The loss and lpl/* scalars per step (the last record of a step wins)."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.get("values", {}).items():
            if key.startswith("loss") or key.startswith("lpl/"):
                by_key.setdefault(key, {})[int(record["step"])] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def step_times(records: list[dict[str, Any]]) -> list[float]:
    """Seconds of each timed step in order (a step with no earlier step in its process has no time)."""
    return [float(r["seconds"]) for r in records if isinstance(r.get("seconds"), (int, float))]


def collect(folder: Path, name: str, seed: int, settings: dict[str, Any], status: str,
            prompt_ids: list[str]) -> ArmResult:
    """The ArmResult of one arm folder."""
    measure = folder / "measure"
    records = read_steps(measure / "steps.jsonl")
    lines = curves(records)
    applied = [v for _, v in lines.get("lpl/applied_fraction", [])]
    memory_file = measure / "memory.json"
    memory = json.loads(memory_file.read_text(encoding="utf-8")) if memory_file.is_file() else {}
    return ArmResult(name=name, settings=settings, status=status, seed=seed, scores=scores(measure / "scores.jsonl"),
                     step_times=step_times(records), curves=lines,
                     applied_fraction=statistics.fmean(applied) if applied else None,
                     peak_memory=memory.get("peak_bytes"), memory_kind=memory.get("kind", ""),
                     samples=samples(folder / "out", prompt_ids))
