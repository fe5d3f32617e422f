"""`lpl-plugin bench --suite gpu`: the GPU report in one command, as report.md and report.json.

On a CUDA device: the side-by-side table at 1024 px (SDXL VAE architecture with random weights, B = 1, 4 blocks,
bfloat16; the diffusers reference under bfloat16 autocast when `--reference` names its `lpl_loss.py`) with xformers
on and off, each shipped preset's LPL settings with the measured CUDA peak against `lpl-plugin estimate`, and a short
demo run in bfloat16. On a CPU the same report, reduced: 256 px, float32, PyTorch's attention only (xformers cannot
run there), one call per variant and a few demo steps. Every measurement runs in its own process (bench workers).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lpl_plugin.settings.errors import UserError

SIZES = {"cuda": {"resolution": 1024, "dtype": "bfloat16", "calls": 3, "demo_steps": 40},
         "cpu": {"resolution": 256, "dtype": "float32", "calls": 1, "demo_steps": 6}}
ENGINE_VARIANTS = ("lean", "speed", "lean-resnet")
GB = 1e9


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware the report was measured on."""
    import torch

    from lpl_plugin.engine.attention import xformers_usable

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
                            "cpu_threads": torch.get_num_threads()}
    for name in ("diffusers", "accelerate", "xformers"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    info["xformers_usable"], info["xformers_reason"] = xformers_usable(device.split(":")[0], torch.bfloat16)
    return info


def _worker_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    """A copy of the suite's arguments for one bench worker."""
    return argparse.Namespace(**{**vars(args), **changes})


def side_by_side(args: argparse.Namespace, cuda: bool) -> list[dict[str, Any]]:
    """The reference (when given) and the engine's variants, with each attention backend, ratios per backend."""
    from lpl_plugin.bench.worker import spawn

    names = (["reference"] if args.reference else []) + list(ENGINE_VARIANTS)
    rows = []
    for attention in (("xformers", "sdpa") if cuda else ("sdpa",)):
        results = {name: spawn(_worker_args(args, attention=attention), name) for name in names}
        baseline = results[names[0]]
        for name, result in results.items():
            best, base = min(result["times"]), min(baseline["times"])
            rows.append({"variant": name, "attention_requested": attention, "attention": result["attention"],
                         "time": best, "peak": result["peak"], "loss": result["loss"], "baseline": names[0],
                         "time_ratio": best / base if base else None,
                         "peak_ratio": result["peak"] / baseline["peak"] if baseline["peak"] > 0 else None})
    return rows


def preset_rows(args: argparse.Namespace, cuda: bool) -> list[dict[str, Any]]:
    """Each preset's LPL settings at the suite's resolution: measured peak of one call against the estimate."""
    from lpl_plugin.bench.worker import spawn
    from lpl_plugin.settings.config import LPLConfig
    from lpl_plugin.engine.estimate import estimate_for
    from lpl_plugin.settings.presets import preset_names, preset_text
    from lpl_plugin.settings.files import parse_toml

    rows = []
    for name in preset_names():
        data = parse_toml(preset_text(name), f"preset {name}")
        config = LPLConfig.from_mapping(data, source=f"preset {name}")
        batch = int(data.get("train_batch_size", 1))
        dtype = config.lpl_dtype if cuda else "float32"  # bfloat16 convolutions are slow on most CPUs
        settings = {"lpl_num_blocks": config.lpl_num_blocks, "lpl_checkpointing": config.lpl_checkpointing,
                    "lpl_chunk_size": config.lpl_chunk_size, "lpl_dtype": dtype}
        result = spawn(_worker_args(args, attention="auto", batch=batch, blocks=config.lpl_num_blocks, dtype=dtype,
                                     settings=json.dumps(settings)), "lean")
        estimate = estimate_for(args.vae, resolution=args.latent * 8, batch=batch, blocks=config.lpl_num_blocks,
                                dtype=dtype, chunk=config.lpl_chunk_size, checkpointing=config.lpl_checkpointing,
                                device="cuda" if cuda else "cpu").peak
        rows.append({"preset": name, "batch": batch, **settings, "time": min(result["times"]),
                     "peak": result["peak"], "estimate": estimate,
                     "estimate_ratio": estimate / result["peak"] if result["peak"] > 0 else None})
    return rows


def demo_run(args: argparse.Namespace, out: Path, cuda: bool, steps: int) -> dict[str, Any]:
    """A short `lpl-plugin demo` (bfloat16 on CUDA) in its own process; its summary.json, trimmed."""
    folder = out / "demo"
    argv = [sys.executable, "-m", "lpl_plugin", "demo", "--out", str(folder), "--steps", str(steps), "--device",
            "cuda" if cuda else "cpu", "--no-progress"] + (["--mixed-precision", "bf16"] if cuda else [])
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--suite: the demo run failed (exit {done.returncode}): {tail}")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    runs = {name: {"steps_per_second": run.get("steps_per_second"), "final": run.get("losses", {}).get("final")}
            for name, run in summary.get("runs", {}).items()}
    return {"steps": summary.get("steps"), "wall": time.perf_counter() - began, "seconds": summary.get("seconds"),
            "peak_memory": summary.get("peak_memory"), "runs": runs, "folder": str(folder)}


def _cell(value: float | None, unit: str = "", digits: int = 2) -> str:
    """A table cell: a number with its unit, or a dash."""
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: environment, side-by-side table, presets table, demo line."""
    env, s = report["environment"], report["settings"]
    where = env.get("gpu") or f"CPU ({env['cpu_threads']} threads)"
    lines = [f"# lpl-plugin bench --suite gpu: {where}", "",
             f"torch {env['torch']}, CUDA {env.get('cuda') or '–'}, diffusers {env['diffusers']}, xformers "
             f"{env['xformers'] or 'not installed'} ({'usable' if env['xformers_usable'] else env['xformers_reason']})",
             "", "## One LPL call (forward + backward), side by side",
             "", f"vae={s['vae']}, {s['resolution']} px, batch 1, 4 blocks, {s['dtype']}, shared norm, pow-law, "
             f"outlier masks; best of {s['calls']} calls in a fresh process per row; peak = "
             f"{'torch.cuda.max_memory_allocated' if s['cuda'] else 'peak RSS'} above the model and inputs.", "",
             "| variant | attention (used) | time / call | time vs " + report["side_by_side"][0]["baseline"] +
             " | peak extra | memory vs " + report["side_by_side"][0]["baseline"] + " | loss |",
             "|---|---|---|---|---|---|---|"]
    for r in report["side_by_side"]:
        lines.append(f"| {r['variant']} | {r['attention_requested']} ({r['attention']}) | {_cell(r['time'], ' s', 3)} "
                     f"| {_cell(r['time_ratio'], '×')} | {_cell(r['peak'] / GB, ' GB')} | {_cell(r['peak_ratio'], '×')}"
                     f" | {r['loss']:.6g} |")
    lines += ["", f"## Presets: measured peak against `lpl-plugin estimate` ({s['resolution']} px)", "",
              "| preset | batch | blocks | checkpointing | dtype | time / call | measured peak | estimate | "
              "estimate / measured |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["presets"]:
        lines.append(f"| {r['preset']} | {r['batch']} | {r['lpl_num_blocks']} | {r['lpl_checkpointing']} | "
                     f"{r['lpl_dtype']} | {_cell(r['time'], ' s', 3)} | {_cell(r['peak'] / GB, ' GB')} | "
                     f"{_cell(r['estimate'] / GB, ' GB')} | {_cell(r['estimate_ratio'], '×')} |")
    demo = report["demo"]
    rates = ", ".join(f"{name} {_cell(run['steps_per_second'], ' steps/s')}" for name, run in demo["runs"].items())
    lines += ["", "## Demo", "", f"`lpl-plugin demo` for {demo['steps']} steps per run"
              f"{' in bf16' if s['cuda'] else ''}: {_cell(demo['wall'], ' s', 1)} in all; {rates}; peak memory "
              f"{demo['peak_memory']}.", ""]
    return "\n".join(lines)


def run_suite(args: argparse.Namespace) -> int:
    """Measure everything, write report.json and report.md into --out, print the Markdown."""
    cuda = str(args.device).startswith("cuda")
    size = SIZES["cuda" if cuda else "cpu"]
    resolution = args.resolution or size["resolution"]
    if resolution < 8 or resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8, got {resolution}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as error:
        raise UserError(f"--out {args.out}: cannot write there ({error.strerror or error})") from None
    if args.reference:
        from lpl_plugin.bench.worker import load_reference

        load_reference(args.reference)
    from lpl_plugin.engine.estimate import layout_vae

    layout_vae(args.vae)
    args = _worker_args(args, latent=resolution // 8, batch=1, blocks=4, dtype=size["dtype"], rounds=1,
                        calls=args.calls or size["calls"], settings="{}")
    report: dict[str, Any] = {"environment": environment(args.device),
                              "settings": {"vae": args.vae, "resolution": resolution, "dtype": size["dtype"],
                                           "calls": args.calls, "cuda": cuda, "reference": bool(args.reference)}}
    print("# side-by-side table", file=sys.stderr, flush=True)
    report["side_by_side"] = side_by_side(args, cuda)
    print("# presets", file=sys.stderr, flush=True)
    report["presets"] = preset_rows(args, cuda)
    print("# demo", file=sys.stderr, flush=True)
    report["demo"] = demo_run(args, out, cuda, args.demo_steps or size["demo_steps"])
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    text = markdown(report)
    (out / "report.md").write_text(text, encoding="utf-8")
    print(text)
    return 0
