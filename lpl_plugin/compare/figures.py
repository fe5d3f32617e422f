"""The report's pictures: one sample grid per prompt (rows = arms, columns = checkpoints) and all arms' curves."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

LABEL_WIDTH = 110
HEADER = 22
GAP = 4
TILE = 192
# The curves drawn (report.json keeps every loss and lpl/* scalar): the host's loss, LPL's term and how often it applied.
PLOTTED = ("loss", "loss/current", "loss/average", "lpl/loss", "lpl/weighted", "lpl/applied_fraction")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def grid_png(rows: Mapping[str, Mapping[int, Path]], columns: Sequence[int], path: Path, tile: int = TILE) -> None:
    """One PNG: a labelled row per arm, a column per checkpoint step, each sample scaled to `tile` pixels high;
    a missing sample is a grey tile saying so."""
    from PIL import Image, ImageDraw

    width = LABEL_WIDTH + len(columns) * (tile + GAP)
    height = HEADER + len(rows) * (tile + GAP)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, step in enumerate(columns):
        draw.text((LABEL_WIDTH + c * (tile + GAP) + 4, 5), f"step {step}", fill="black")
    for r, (arm, samples) in enumerate(rows.items()):
        top = HEADER + r * (tile + GAP)
        draw.text((6, top + tile // 2 - 6), arm, fill="black")
        for c, step in enumerate(columns):
            left = LABEL_WIDTH + c * (tile + GAP)
            source = samples.get(step)
            if source is None or not Path(source).is_file():
                draw.rectangle((left, top, left + tile - 1, top + tile - 1), fill=(225, 225, 225))
                draw.text((left + 6, top + tile // 2 - 6), "no sample", fill="black")
                continue
            with Image.open(source) as image:
                image = image.convert("RGB")
                scaled = image.resize((max(1, round(image.width * tile / image.height)), tile), Image.LANCZOS)
            canvas.paste(scaled.crop((0, 0, min(tile, scaled.width), tile)), (left, top))
    canvas.save(path)


def curves_png(series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path, title: str) -> list[str]:
    """One panel per quantity ("loss", "lpl/..."), one line per arm; returns the quantities drawn."""
    from matplotlib.figure import Figure

    present = {name for curves in series.values() for name, points in curves.items() if points}
    names = [name for name in PLOTTED if name in present]
    figure = Figure(figsize=(7.5, 2.2 * max(1, len(names)) + 0.6), dpi=100, layout="constrained")
    axes = figure.subplots(max(1, len(names)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        for index, (arm, curves) in enumerate(series.items()):
            points = curves.get(name) or []
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], color=COLORS[index % len(COLORS)],
                        marker="." if len(points) < 30 else None, linewidth=1.2, label=arm,
                        linestyle="--" if index == 0 else "-")
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("optimizer step")
    figure.suptitle(title, fontsize=10)
    figure.savefig(path)
    return names
