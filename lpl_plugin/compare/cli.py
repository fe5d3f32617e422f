"""The `lpl-plugin compare` subcommand's options."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpl_plugin.settings.values import bounded_int, number

DEFAULT_OUT = Path("lpl-compare")


def weight_list(text: str) -> list[float]:
    """--weights: comma-separated LPL weights (0 is LPL off), at least two."""
    values = [number(part) for part in text.split(",") if part.strip()]
    if len(values) < 2 or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected at least two different weights >= 0 separated by commas, got "
                                         f"{text!r}")
    return values


def arm_list(text: str) -> str:
    """--arms: off and on, in either order."""
    names = [part.strip() for part in text.split(",")]
    if sorted(names) != ["off", "on"]:
        raise argparse.ArgumentTypeError(f"expected off,on or on,off, got {text!r}")
    return ",".join(names)


def timestep_list(text: str) -> list[int]:
    """--noise-levels: comma-separated training timesteps in [1, 999]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(1 <= v <= 999 for v in values):
        raise argparse.ArgumentTypeError(f"expected timesteps between 1 and 999 separated by commas, got {text!r}")
    return values


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register compare."""
    p = subparsers.add_parser(
        "compare", help="train the same sd-scripts run with and without LPL and report the difference",
        description="Train your sd-scripts SDXL run once per arm (LPL off / on, or a sweep of lpl_weight), one arm "
                    "after the other with everything else equal, then write DIR/report.html, report.md and "
                    "report.json: samples at fixed seeds, a measure computed inside each training process, curves, "
                    "step times and peak memory.")
    p.add_argument("--sd-scripts", required=True, type=Path, metavar="CHECKOUT", help="the sd-scripts checkout")
    p.add_argument("--config", required=True, type=Path, metavar="TOML", help="your trainer TOML (--config_file)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--arms", type=arm_list, default="off,on", help="off,on (default): LPL off and LPL as your "
                       "TOML sets it")
    group.add_argument("--weights", type=weight_list, metavar="W,W,...", help="a sweep of lpl_weight (0 = LPL off)")
    p.add_argument("--steps", type=bounded_int(1, 10 ** 7), default=None, help="optimizer steps per arm (default: "
                   "the TOML's max_train_steps)")
    p.add_argument("--seeds", type=bounded_int(1, 100), default=1, help="training seeds per arm (default 1; with "
                   "more, the report shows the spread between seeds)")
    p.add_argument("--holdout", type=bounded_int(1, 10 ** 5), default=None, metavar="N",
                   help="keep N images out of training and measure on them (default: measure on training images)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR", help=f"output folder ({DEFAULT_OUT})")
    p.add_argument("--checkpoints", type=bounded_int(1, 100), default=4,
                   help="sample and measure this many times during training, plus before the first step (4)")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE", help="sample prompts, one per line "
                   "(default: up to --prompt-count prompts made from the dataset's captions)")
    p.add_argument("--prompt-count", type=bounded_int(1, 50), default=2, help="prompts made from captions (2)")
    p.add_argument("--sample-steps", type=bounded_int(1, 200), default=20, help="sampler steps per sample (20)")
    p.add_argument("--measure-images", type=bounded_int(1, 1000), default=8,
                   help="training images to measure on without --holdout (8)")
    p.add_argument("--noise-levels", type=timestep_list, default=[50, 100, 150], metavar="T,T,...",
                   help="the low training timesteps the measure noises images to (50,100,150)")
    p.add_argument("--noise-seeds", type=bounded_int(1, 100), default=2, help="noise seeds per image and level (2)")
    p.add_argument("--size", type=bounded_int(64, 4096, multiple_of=8), default=None,
                   help="sample and measure resolution (default: the TOML's resolution, else 1024)")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    """Check everything, train the arms one by one, write the report; returns the exit status."""
    from lpl_plugin.compare.run import compare

    return compare(args)
