"""report.md and report.html from a report.json dict: the same tables in two formats, the HTML self-contained."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from lpl_plugin.compare.stats import MIN_TIMED_STEPS

Table = tuple[list[str], list[list[str]]]


def interval_text(value: dict[str, Any] | None, digits: int = 4, signed: bool = False) -> str:
    """"mean [low, high]" or "–"."""
    if not value or value.get("mean") is None:
        return "–"
    spec = f"{'+' if signed else ''}.{digits}g"
    return f"{format(value['mean'], spec)} [{format(value['low'], spec)}, {format(value['high'], spec)}]"


def metric_table(report: dict[str, Any]) -> Table:
    """Per arm: each metric at the final checkpoint with its interval, and the paired difference to the reference."""
    metrics = report["metrics"]
    head = ["arm"] + [f"{m['label']}{' (' + m['unit'] + ')' if m['unit'] else ''} at step {m['step']}"
                      for m in metrics] + [f"{m['label']} − {report['reference']} (paired)" for m in metrics]
    names = list(dict.fromkeys(a["name"] for a in report["arms"]))
    rows = [[name] + [interval_text(m["per_arm"].get(name)) for m in metrics]
            + [interval_text(m["difference"].get(name), signed=True) if name != report["reference"] else "reference"
               for m in metrics] for name in names]
    return head, rows


def step_table(report: dict[str, Any]) -> Table:
    """Every metric at every checkpoint, per arm (means with intervals)."""
    head = ["metric", "arm"] + [f"step {s}" for s in report["checkpoints"]]
    rows = [[m["label"], arm] + [interval_text(by_step.get(str(s)), 3) for s in report["checkpoints"]]
            for m in report["metrics"] for arm, by_step in m["by_step"].items()]
    return head, rows


def cost_table(report: dict[str, Any]) -> Table:
    """Seconds per step, the extra over the reference, LPL's applied fraction and peak memory, per arm."""
    head = ["arm", "median s/step", "steps timed", f"extra vs {report['reference']}", "LPL applied to",
            "peak memory"]
    rows = []
    for c in report["costs"]:
        seconds = f"{c['seconds_per_step']:.3g}" if c["seconds_per_step"] is not None else "–"
        extra = f"{c['extra_vs_reference'] * 100:+.1f} %" if c["extra_vs_reference"] is not None else \
            "–" if c.get("enough_steps_timed", True) else f"– (under {MIN_TIMED_STEPS} steps timed)"
        applied = f"{c['applied_fraction'] * 100:.0f} % of samples" if c["applied_fraction"] is not None else "–"
        memory = (f"{c['peak_memory_bytes'] / 2 ** 30:.2f} GiB ({c['memory_kind']})"
                  if c["peak_memory_bytes"] is not None else "–")
        rows.append([c["arm"], seconds, f"{c['steps_timed']} (first {c['skipped_first']} left out)", extra, applied,
                     memory])
    return head, rows


def settings_table(report: dict[str, Any]) -> Table:
    """The settings that differ per arm, then the shared ones."""
    rows = [[arm, "; ".join(f"{k} = {json.dumps(v, default=str)}" for k, v in values.items()) or "–"]
            for arm, values in report["settings"]["differs"].items()]
    shared = report["settings"]["shared"]
    rows.append(["all arms", "; ".join(f"{k} = {json.dumps(v, default=str)}" for k, v in shared.items())])
    return ["arm", "settings"], rows


def arms_table(report: dict[str, Any]) -> Table:
    """How each arm's run came about (trained, reused, resumed)."""
    return ["arm", "training seed", "run"], [[a["name"], str(a["seed"]), a["status"]] for a in report["arms"]]


def tables(report: dict[str, Any]) -> list[tuple[str, Table]]:
    """The report's tables with their headings, in order."""
    found = [("Runs", arms_table(report))]
    if report["metrics"]:
        found += [(f"Measure on {report['measured_on']} (95 % bootstrap intervals)", metric_table(report)),
                  ("By checkpoint", step_table(report))]
    return found + [("Cost", cost_table(report)), ("Exact settings", settings_table(report))]


def markdown_table(table: Table) -> str:
    """A GitHub-style Markdown table."""
    head, rows = table
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(escape, row)) + " |" for row in rows])


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    """report.md: verdict, tables, and links to the PNG files beside it."""
    parts = [f"# {report['title']}", "", f"**Verdict:** {report['verdict']}", ""]
    parts += [f"- {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    parts += [report["measure_note"], ""]
    for heading, table in tables(report):
        parts += [f"## {heading}", "", markdown_table(table), ""]
    if report["curves"]["png"]:
        parts += ["## Curves", "", f"![loss and lpl/* curves]({report['curves']['png']})", ""]
    for grid in report["grids"]:
        parts += [f"## Samples: {grid['prompt']} (seed {grid['seed']})", "",
                  f"![rows: {', '.join(grid['rows'])}; columns: steps]({grid['png']})", ""]
    path.write_text("\n".join(parts), encoding="utf-8")


def html_table(table: Table) -> str:
    """An HTML table with escaped cells."""
    head, rows = table
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)  # noqa: E731
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f"<table><tr>{cells(head, 'th')}</tr>{body}</table>"


def embedded(folder: Path, relative: str) -> str:
    """A PNG beside the report as a data: URI (the HTML opens from disk with no network)."""
    data = base64.b64encode((folder / relative).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 8px;"
         "font-size:13px;text-align:left;vertical-align:top}th{background:#eee}.verdict{font-size:17px;"
         "background:#f4f4d8;padding:8px;border:1px solid #cc9}img{max-width:100%}")


def write_html(path: Path, report: dict[str, Any], folder: Path) -> None:
    """report.html: one file with every picture embedded, no script, no external resource."""
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(report['title'])}</title>",
             f"<style>{STYLE}</style></head><body><h1>{esc(report['title'])}</h1>",
             f"<p class='verdict'><b>Verdict:</b> {esc(report['verdict'])}</p>"]
    parts += [f"<p>{esc(note)}</p>" for note in report["notes"]]
    parts.append(f"<p><i>{esc(report['measure_note'])}</i></p>")
    for heading, table in tables(report):
        parts.append(f"<h2>{esc(heading)}</h2>{html_table(table)}")
    if report["curves"]["png"]:
        parts.append(f"<h2>Curves</h2><img alt='curves' src='{embedded(folder, report['curves']['png'])}'>")
    for grid in report["grids"]:
        parts.append(f"<h2>Samples: {esc(grid['prompt'])} (seed {grid['seed']})</h2><p>rows: "
                     f"{esc(', '.join(grid['rows']))}; columns: optimizer steps</p>"
                     f"<img alt='samples' src='{embedded(folder, grid['png'])}'>")
    parts.append(f"<p><small>{esc(report['schema'])}, written {esc(report['created'])}</small></p></body></html>")
    path.write_text("".join(parts), encoding="utf-8")
