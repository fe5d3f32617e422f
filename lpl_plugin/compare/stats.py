"""Uncertainty and summaries for compare reports: bootstrap intervals, paired differences, step times, the verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
MIN_UNITS = 8  # fewer paired units than this: a bootstrap interval says too little for a verdict


@dataclass
class Interval:
    """A mean with a two-sided bootstrap interval over n units."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        """The interval as report.json writes it (non-finite values as null)."""
        return {"mean": finite(self.mean), "low": finite(self.low), "high": finite(self.high), "n": self.n}

    def excludes_zero(self) -> bool:
        """Whether the whole interval lies on one side of zero."""
        return self.low > 0 or self.high < 0

    def overlaps(self, other: "Interval") -> bool:
        """Whether two intervals share any value."""
        return self.low <= other.high and other.low <= self.high


def finite(value: float | None) -> float | None:
    """The value, or None when it is missing or not finite."""
    return float(value) if value is not None and math.isfinite(value) else None


def bootstrap_mean(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0,
                   level: float = LEVEL) -> Interval:
    """The mean of `values` with a percentile bootstrap interval (units resampled with replacement)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(data.mean()), float(low), float(high), int(data.size))


def paired_bootstrap(reference: Sequence[float], other: Sequence[float], *, resamples: int = RESAMPLES,
                     seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of other − reference over paired units (image × noise seed, same order) with a bootstrap interval."""
    if len(reference) != len(other):
        raise ValueError(f"paired scores differ in length: {len(reference)} and {len(other)}")
    difference = np.asarray(other, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return bootstrap_mean(difference.tolist(), resamples=resamples, seed=seed, level=level)


# The extra time over the reference arm is given only when both arms timed at least this many steps: a single step
# time says more about what else the machine was doing than about LPL.
MIN_TIMED_STEPS = 2


def median_step_seconds(step_times: Sequence[float], skip: int = 2) -> float | None:
    """The median seconds per step with the first `skip` steps (start-up, compilation, caches) left out."""
    kept = list(step_times[skip:]) if len(step_times) > skip else []
    return float(np.median(kept)) if kept else None


def describe(metric: dict[str, Any], arm: str, difference: dict[str, Any], reference: str) -> str:
    """One phrase for one arm's difference on one metric, e.g. "PSNR +0.41 dB (95 % interval 0.12 to 0.70)"."""
    unit = f" {metric['unit']}" if metric["unit"] else ""
    return (f"{metric['label']} {difference['mean']:+.3g}{unit} (95 % interval {difference['low']:+.3g} to "
            f"{difference['high']:+.3g}) for {arm} vs {reference}")


def verdict_line(metrics: Sequence[dict[str, Any]], reference: str) -> str:
    """What the final-checkpoint differences support, and no more: a difference is named only when its paired
    interval excludes zero; otherwise "no measurable difference"."""
    found, checked = [], []
    for metric in metrics:
        for arm, difference in metric["difference"].items():
            if difference["low"] is None or difference["high"] is None:
                continue
            checked.append(arm)
            if difference["n"] < MIN_UNITS:
                return (f"no verdict: {difference['n']} measured units (images x noise levels x noise seeds) are too "
                        f"few for an interval to mean much (at least {MIN_UNITS}); raise --measure-images or "
                        "--noise-seeds")
            if difference["low"] > 0 or difference["high"] < 0:
                better = (difference["mean"] > 0) == metric["higher_is_better"]
                found.append(f"{describe(metric, arm, difference, reference)}: {'better' if better else 'worse'}")
    if not checked:
        return "no verdict: no arm had scores to compare"
    step = metrics[0]["step"] if metrics else "?"
    if not found:
        return (f"no measurable difference from {reference} at step {step} (every paired 95 % interval includes 0) "
                "on this measure, these images and this many steps")
    return f"at step {step}, on this measure: " + "; ".join(found)
