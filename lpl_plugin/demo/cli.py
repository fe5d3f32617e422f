"""The `lpl-plugin demo` subcommand: options, the LPL settings to use, resuming, and the closing report."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from lpl_plugin.settings.values import bounded_int, integer, number
from lpl_plugin.settings.config import LPLConfig
from lpl_plugin.settings.errors import UserError, write_lines
from lpl_plugin.settings.messages import show_path
from lpl_plugin.demo.settings import (DEMO_LPL, DEVICES, MIXED_PRECISION, OPTIMIZERS, PRESETS, DemoSettings,
                                      demo_lpl_text, read_settings, resolve)

NEEDED = ("matplotlib", "tensorboard", "tqdm")
DEFAULT_OUT = Path("lpl-demo")


def _lpl_settings(path: str | None) -> tuple[LPLConfig, str]:
    """The LPL settings: the demo's built-in block (DEMO_LPL), or the `use_lpl`/`lpl_*` keys of a TOML file."""
    if path is None:
        return LPLConfig(use_lpl=True, **DEMO_LPL), f"the demo's built-in block ({demo_lpl_text()}; others default)"
    from lpl_plugin.settings.preflight import check_training_config

    checked = check_training_config(path)
    write_lines(checked.warnings)
    config = checked.raise_for_problems()
    if not config.use_lpl:
        raise UserError(f"{show_path(path)}: LPL is off (`use_lpl` is not true), but the demo compares runs with and "
                        "without LPL; set `use_lpl = true`")
    return config, show_path(path)


def _requested_processes() -> int | None:
    """N of the `accelerate launch ... --num_processes N` that started this process, read from its command line."""
    try:
        import psutil

        parent = psutil.Process().parent()
        words = parent.cmdline() if parent is not None else []
    except Exception:  # no psutil, or the parent is gone or not ours to read
        return None
    for index, word in enumerate(words):
        value = words[index + 1] if word == "--num_processes" and index + 1 < len(words) else None
        if word.startswith("--num_processes="):
            value = word.split("=", 1)[1]
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def _spread_over_cpu_processes(env: dict[str, str]) -> None:
    """Under `accelerate launch --cpu --num_processes N`, which starts one process without MPI, become N gloo
    processes through torchrun; refuse in one line when N cannot be read."""
    asked_for_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    ranked = any(k in env for k in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not (asked_for_cpu and "MASTER_ADDR" in env and not ranked):
        return
    count = _requested_processes()
    if count is None or count < 2:
        raise UserError("accelerate launch --cpu with --num_processes > 1 starts a single process unless MPI is set "
                        "up (--mpirun_hostfile); for N processes on this machine's CPUs run: accelerate launch "
                        "--multi_gpu --num_processes N -m lpl_plugin demo (without GPUs it uses gloo on the CPU), or "
                        "torchrun --nproc_per_node N -m lpl_plugin demo")
    import os
    import subprocess

    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
            "-m", "lpl_plugin", *sys.argv[1:]]
    child_env = {k: v for k, v in env.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    print(f"accelerate's --cpu launcher started one process; starting {count} gloo processes with torchrun",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    if os.name == "posix":
        os.execve(sys.executable, argv, child_env)  # torchrun takes this process's place and forwards signals
    raise SystemExit(subprocess.run(argv, env=child_env).returncode)


def _check_environment(settings: DemoSettings) -> None:
    """One-line errors for a missing demo dependency, a missing GPU or a launch that would run one process."""
    import os

    _spread_over_cpu_processes(dict(os.environ))
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the demo needs {', '.join(missing)}; install them with: python -m pip install "
                        "\"lpl-plugin[demo]\" (or \".[demo]\" in a checkout)")
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device cuda, but PyTorch {torch.__version__} sees no CUDA GPU; use --device cpu")


def _set_threads(threads: int | None) -> None:
    """CPU threads per process: --threads, else $OMP_NUM_THREADS, else 1 (the tiny models gain nothing from more,
    and on a shared machine extra threads spin against other work)."""
    import os

    import torch

    if threads is None:
        given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        threads = int(given) if given.isdigit() and 0 < len(given) < 5 and int(given) > 0 else 1
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def _demo(args: argparse.Namespace) -> int:
    """Train the tiny model with and without LPL and write the artifacts."""
    from lpl_plugin.demo.state import resume_point

    overrides = {k: getattr(args, k) for k in ("steps", "resolution", "batch_size", "seed", "learning_rate",
                                               "vae_steps", "save_every", "device", "mixed_precision",
                                               "optimizer")}
    overrides["progress"] = False if args.no_progress else None
    checkpoint = None
    if args.resume is not None:
        out, checkpoint = resume_point(Path(args.resume))
        if args.out is not None and Path(args.out).resolve() != out.resolve():
            raise UserError(f"--out {show_path(args.out)} differs from the resumed demo's folder {show_path(out)}; "
                            "leave --out out")
        saved, saved_lpl, source = read_settings(out)
        lpl = saved_lpl
        if args.config is not None:
            lpl, source = _lpl_settings(args.config)
            changed = [k for k, v in lpl.lpl_items().items() if saved_lpl.lpl_items().get(k) != v]
            if changed:
                raise UserError(f"--config {show_path(args.config)} changes {', '.join(changed)} of the interrupted "
                                "run; leave --config out to resume with its own settings")
        settings = resolve(overrides, saved, args.preset)
    else:
        out = Path(args.out) if args.out is not None else DEFAULT_OUT
        settings = resolve(overrides, None, args.preset)
        lpl, source = _lpl_settings(args.config)
    from lpl_plugin.demo.train import quiet_bitsandbytes

    quiet_bitsandbytes()  # before anything imports it (settings and config are checked first: no torch for those)
    from lpl_plugin.demo.pipeline import check_folder, run_demo

    if args.resume is None:
        check_folder(out)
    _check_environment(settings)
    _set_threads(args.threads)
    status = run_demo(settings, lpl, source, out, resume=args.resume is not None, checkpoint=checkpoint,
                      say=print)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return status
    shown = show_path(out)
    if status:
        print(f"stopped; what was written is in {shown}; continue with: lpl-plugin demo --resume {shown}",
              file=sys.stderr)
    else:
        print(f"done: {shown}/losses.png, {shown}/samples.png, {shown}/summary.json; "
              f"TensorBoard: tensorboard --logdir {shown}/tensorboard")
    return status


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `demo`."""
    d = DemoSettings()
    p = subparsers.add_parser(
        "demo", help="train a tiny SDXL-shaped model with and without LPL and write plots, samples and logs",
        description="Train a tiny SDXL-shaped UNet on generated images twice from the same seed, with and without "
                    "LPL, through the same hook registry the trainer adapters use; write a loss plot, sample "
                    "grids, TensorBoard logs and summary.json. Runs under `accelerate launch` as well.")
    p.add_argument("--out", help=f"output folder (default: ./{DEFAULT_OUT}/)")
    p.add_argument("--config", help="a TOML with use_lpl and lpl_* keys (default: the demo's block, "
                   f"{demo_lpl_text()}, the rest as `lpl-plugin defaults`)")
    long = PRESETS["long"]
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help=f"quick (the defaults below, about 3 minutes on 2 idle CPU cores; the samples stay colour "
                        f"blobs) or long ({long['steps']} steps and {long['vae_steps']} VAE steps, 15 to 30 minutes; "
                        "the samples show shapes); options given win")
    p.add_argument("--steps", type=integer, help=f"optimizer steps per run (default: {d.steps})")
    p.add_argument("--resolution", type=integer,
                   help=f"image side in pixels, a multiple of 32 up to 1024 (default: {d.resolution})")
    p.add_argument("--batch-size", type=integer, help=f"images per step and process (default: {d.batch_size})")
    p.add_argument("--seed", type=integer, help=f"seed of data, weights, noise and sampling (default: {d.seed})")
    p.add_argument("--learning-rate", type=number, help=f"peak learning rate (default: {d.learning_rate})")
    p.add_argument("--vae-steps", type=integer,
                   help=f"steps fitting the tiny VAE to the images (default: {d.vae_steps})")
    p.add_argument("--device", choices=DEVICES, help=f"where to train (default: {d.device})")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION,
                   help=f"accelerate's autocast for the UNet (default: {d.mixed_precision})")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=f"adamw8bit (bitsandbytes; torch's AdamW where it cannot run) or adamw (default: "
                        f"{d.optimizer})")
    p.add_argument("--save-every", type=integer,
                   help="save a resumable state every N steps (default: 0, only when stopped by SIGTERM or Ctrl-C)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue an interrupted demo: its --out folder (each run's latest state) or one checkpoint")
    p.add_argument("--threads", type=bounded_int(1, 1024),
                   help="CPU threads per process (default: $OMP_NUM_THREADS, else 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)
