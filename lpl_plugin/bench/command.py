"""Benchmark of one LPL call (forward + backward): time, peak extra memory and loss, each variant in its own process.

`lpl-plugin bench` (or `python -m lpl_plugin bench`). Variants run round by round in fresh subprocesses (peak RSS only
grows within a process), interleaved so that load from other programs spreads evenly over them; the table gives
the median over rounds of each process's fastest call and ratios against a baseline variant. With `--reference
PATH/lpl_loss.py` the diffusers research-project loss runs side by side (loaded from that path, never shipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from lpl_plugin.bench.worker import DEFAULT_VARIANTS, VARIANTS, load_reference, run_worker, spawn
from lpl_plugin.settings.errors import UserError

GB = 1e9


def summarize(results: dict[str, list[dict[str, Any]]], baseline: str | None) -> list[dict[str, Any]]:
    """One row per variant: medians over rounds of each process's best call, largest peak, loss, ratios."""
    rows = []
    for name, runs in results.items():
        rows.append({"variant": name, "description": VARIANTS[name].description,
                     "time": statistics.median(min(r["times"]) for r in runs),
                     "cpu_time": statistics.median(min(r["cpu_times"]) for r in runs),
                     "peak": max(r["peak"] for r in runs), "loss": runs[-1]["loss"],
                     "attention": runs[-1]["attention"], "rounds": len(runs)})
    base = next((r for r in rows if r["variant"] == baseline), None)
    for row in rows:
        for key in ("time", "cpu_time", "peak"):
            row[f"{key}_ratio"] = row[key] / base[key] if base and base[key] > 0 else None
    return rows


def _ratio(value: float | None) -> str:
    """A ratio cell."""
    return f"{value:.2f}×" if value is not None else "–"


def markdown_table(rows: list[dict[str, Any]], baseline: str | None, cpu: bool = False) -> str:
    """The summary as a ready-to-paste markdown table (with CPU-time columns for CPU runs)."""
    vs = f" vs {baseline}" if baseline else ""
    head = ["variant", "setting", "time / call", f"time{vs}"]
    head += ["CPU time / call", f"CPU time{vs}"] if cpu else []
    head += ["peak extra", f"memory{vs}", "loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], r["description"], f"{r['time']:.2f} s", _ratio(r["time_ratio"])]
        cells += [f"{r['cpu_time']:.2f} s", _ratio(r["cpu_time_ratio"])] if cpu else []
        cells += [f"{r['peak'] / GB:.2f} GB", _ratio(r["peak_ratio"]), f"{r['loss']:.6g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    """Run every variant for several interleaved rounds and print the table."""
    names = list(args.variants or DEFAULT_VARIANTS)
    if args.reference and "reference" not in names:
        names.insert(0, "reference")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"unknown bench variant {unknown[0]!r}; valid: {', '.join(VARIANTS)}")
    if "reference" in names and not args.reference:
        raise UserError("the reference variant needs --reference PATH/lpl_loss.py")
    if args.reference:
        load_reference(args.reference)  # fail early, in this process, on a bad path
    from lpl_plugin.engine.estimate import layout_vae

    layout_vae(args.vae)  # likewise for a bad --vae, without building its weights
    baseline = args.baseline or ("reference" if "reference" in names else names[0])
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            result = spawn(args, name)
            results[name].append(result)
            print(f"# round {round_index + 1}/{args.rounds} {name}: {min(result['times']):.2f} s "
                  f"(CPU {min(result['cpu_times']):.2f} s), {result['peak'] / GB:.2f} GB, loss {result['loss']:.6g}",
                  file=sys.stderr, flush=True)
    rows = summarize(results, baseline)
    first = results[names[0]][0]
    if args.json:
        print(json.dumps({"rows": rows, "settings": vars(args) | {"variants": names}}, indent=2, default=str))
        return 0
    cpu = not first["device"].startswith("cuda")
    memory = ("peak RSS" + (", glibc mmap threshold pinned at 64 KiB" if args.malloc == "pinned" else "")
              if cpu else "torch.cuda.max_memory_allocated")
    print(f"LPL forward + backward: vae={args.vae}, batch={args.batch}, latent={args.latent}x{args.latent}, "
          f"blocks={args.blocks}, dtype={args.dtype}, norm={args.norm}, loss={args.loss}, "
          f"pow_law={not args.no_pow_law}, outliers={not args.no_outliers}, device={first['device']}, "
          f"threads={first['threads']}, attention={first['attention']}; {args.rounds} rounds x {args.calls} "
          f"calls, median of each process's best call; peak extra = {memory} above the model and inputs.\n")
    print(markdown_table(rows, baseline, cpu))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options, of `lpl-plugin bench`."""
    p = parser
    p.add_argument("--vae", default="sdxl", help="decoder architecture, random weights: tiny, sdxl (default), or a "
                   "diffusers VAE folder or config.json")
    p.add_argument("--batch", type=int, default=2, help="samples per LPL call")
    p.add_argument("--latent", type=int, default=32, help="latent height and width (pixels / 8)")
    p.add_argument("--blocks", type=int, default=4, help="lpl_num_blocks")
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"),
                   help="lpl_dtype; the reference runs under autocast to it when it is not float32")
    p.add_argument("--norm", default="shared", choices=("default", "shared", "batch"), help="lpl_norm_type")
    p.add_argument("--loss", default="mse", choices=("mse", "l1"), help="lpl_loss_type")
    p.add_argument("--no-pow-law", action="store_true", help="lpl_pow_law = false")
    p.add_argument("--no-outliers", action="store_true", help="lpl_remove_outliers = false")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help=f"variants to run (default: {' '.join(DEFAULT_VARIANTS)}); choices: {', '.join(VARIANTS)}")
    p.add_argument("--reference", metavar="PATH", help="a diffusers examples/research_projects/lpl/lpl_loss.py "
                   "to run side by side")
    p.add_argument("--reference-no-ckpt", action="store_true", help="run the reference with grad_ckpt=False")
    p.add_argument("--baseline", help="variant the ratios refer to (default: reference if run, else the first)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (one fresh process per variant each)")
    p.add_argument("--calls", type=int, help="LPL calls per process; the fastest counts (default: 2; --suite: 3 on "
                   "CUDA, 1 on a CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random latents")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--attention", default="auto", choices=("auto", "sdpa", "xformers"),
                   help="decoder attention: auto picks xformers where it runs, else SDPA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--malloc", default="default", choices=("default", "pinned"),
                   help="CPU runs: 'pinned' fixes glibc's mmap threshold at 64 KiB so that freed maps return to the "
                   "system and peak RSS follows the tensors alive (as torch.cuda.max_memory_allocated does); "
                   "'default' keeps glibc's growing heap, whose slack counts as well")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--suite", choices=("gpu",), help="run a whole report instead of one table: 'gpu' measures the "
                   "side-by-side table at 1024 px in bf16 (xformers on and off), each preset's LPL settings against "
                   "`estimate`, and a short demo run, and writes report.md and report.json to --out; on a CPU it "
                   "runs a reduced version")
    p.add_argument("--out", default="lpl-bench", help="folder of the --suite report (default: ./lpl-bench)")
    p.add_argument("--demo-steps", type=int, help="--suite: optimizer steps of the demo run")
    p.add_argument("--resolution", type=int, help="--suite: image side in pixels (default: 1024 on CUDA, 256 on CPU)")
    p.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)


def _resolve_device(args: argparse.Namespace) -> None:
    """Fill in the default device."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def _main(args: argparse.Namespace) -> int:
    """Entry point for both spellings of the command."""
    _resolve_device(args)
    if args.calls is None and not args.suite:
        args.calls = 2
    for name in ("batch", "latent", "rounds", "calls", "demo_steps", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    if args.suite:
        from lpl_plugin.bench.suite import run_suite

        return run_suite(args)
    return run_bench(args)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `lpl-plugin bench`."""
    p = subparsers.add_parser("bench", help="time and memory of one LPL call: lean, plain autograd, reference")
    add_arguments(p)
    p.set_defaults(func=_main)
