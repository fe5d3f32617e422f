"""The report's pictures: one sample grid per prompt (rows = arms, columns = checkpoints) and all arms' curves."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

LABEL_WIDTH = 110
HEADER = 22
GAP = 4
TILE = 192
# The curves drawn (report.json keeps every loss and lpl/* scalar): the loss, LPL's term, how often LPL applied.
PLOTTED = ("loss", "loss/current", "loss/average", "lpl/loss", "lpl/weighted", "lpl/applied_fraction")
RGB = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


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
    """One panel per quantity ("loss/current", "lpl/loss", ...), one line per arm (the first wider), drawn with
    Pillow alone (sd-scripts' environment has no matplotlib); returns the quantities drawn."""
    from PIL import Image, ImageDraw

    present = {name for curves in series.values() for name, points in curves.items() if points}
    names = [name for name in PLOTTED if name in present]
    width, panel, left, right = 760, 190, 70, 110  # panel height and margins in pixels
    canvas = Image.new("RGB", (width, 30 + panel * max(1, len(names)) + 20), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 8), title, fill="black")
    steps = [s for curves in series.values() for points in curves.values() for s, _ in points] or [0, 1]
    low_step, high_step = min(steps), max(max(steps), min(steps) + 1)
    for row, name in enumerate(names):
        top, bottom = 30 + row * panel + 10, 30 + (row + 1) * panel - 25
        values = [v for curves in series.values() for s, v in curves.get(name, [])]
        low, high = min(values), max(values)
        if high - low < 1e-12:
            low, high = low - 0.5, high + 0.5
        x = lambda step: left + (step - low_step) / (high_step - low_step) * (width - left - right)  # noqa: E731
        y = lambda value: bottom - (value - low) / (high - low) * (bottom - top)  # noqa: E731
        draw.rectangle((left, top, width - right, bottom), outline=(150, 150, 150))
        draw.text((left + 4, top - 13), name, fill="black")
        draw.text((4, top), f"{high:.4g}", fill=(90, 90, 90))
        draw.text((4, bottom - 12), f"{low:.4g}", fill=(90, 90, 90))
        draw.text((left, bottom + 3), f"step {low_step}", fill=(90, 90, 90))
        draw.text((width - right - 50, bottom + 3), f"step {high_step}", fill=(90, 90, 90))
        for index, (arm, curves) in enumerate(series.items()):
            color = RGB[index % len(RGB)]
            points = [(x(s), y(v)) for s, v in curves.get(name, [])]
            if len(points) > 1:  # the reference arm wider, so that an arm drawn over it on the same values shows
                draw.line(points, fill=color, width=5 if index == 0 else 2)
            for px, py in points if len(points) < 30 else []:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
            draw.text((width - right + 8, top + 14 * index), arm, fill=color)
    canvas.save(path)
    return names
