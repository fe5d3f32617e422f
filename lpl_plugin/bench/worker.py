"""Bench workers: one way of computing LPL measured in a fresh process (time, peak extra memory, loss).

Each variant is an engine setting (TOML names) or the diffusers research-project loss loaded from a path the user
gives (never shipped). A worker is `python -m lpl_plugin bench --worker NAME ...`; `spawn` runs one and parses the
JSON line it prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpl_plugin.settings.errors import UserError


@dataclass(frozen=True)
class Variant:
    """One way of computing LPL: engine settings (TOML names) or the diffusers reference."""

    name: str
    description: str
    settings: dict[str, Any] = field(default_factory=dict)
    reference: bool = False


# The speed-first setting documented in the README: never recompute decoder activations, even when memory runs
# short (the default's "auto" switches to recomputation then). One sample per pass is the fastest on CPUs; on GPUs
# with memory to spare a larger lpl_chunk_size (the "batch" variant) can be faster still.
SPEED_FIRST = {"lpl_checkpointing": "none"}

VARIANTS = {v.name: v for v in (
    Variant("reference", "diffusers research-project `get_loss` (grad_ckpt=True)", reference=True),
    Variant("lean", "default: lean gradient, one sample per pass, no recomputation (\"auto\")", {}),
    Variant("speed", "speed-first: lean, never recompute (lpl_checkpointing = \"none\")", SPEED_FIRST),
    Variant("batch", "lean, the whole batch in one pass (lpl_chunk_size = 64), never recompute",
            {**SPEED_FIRST, "lpl_chunk_size": 64}),
    Variant("lean-resnet", "least memory: lean, lpl_checkpointing = \"resnet\"", {"lpl_checkpointing": "resnet"}),
    Variant("autograd", "plain autograd: features kept for the host's backward, no recomputation",
            {"lpl_grad_mode": "autograd", "lpl_checkpointing": "none"}),
    Variant("compat", "lpl_compat = \"diffusers\" (same loss as the reference), default engine",
            {"lpl_compat": "diffusers"}),
)}
DEFAULT_VARIANTS = ("lean", "batch", "autograd")


# -- measurement inside one worker process ------------------------------------------------------------------------

def make_latents(batch: int, size: int, seed: int = 0):
    """A target and a nearby prediction as trainer-scaled latents."""
    import torch

    g = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, 4, size, size, generator=g) * 0.8
    return target + 0.3 * torch.randn(target.shape, generator=g), target


def load_reference(path: str):
    """The `LatentPerceptualLoss` class of a diffusers `lpl_loss.py` given by path."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--reference: no such file {path}")
    spec = importlib.util.spec_from_file_location("lpl_reference_loss", file)
    if spec is None or spec.loader is None:
        raise UserError(f"--reference: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "LatentPerceptualLoss"):
        raise UserError(f"--reference: {path} has no LatentPerceptualLoss class")
    return module.LatentPerceptualLoss


def _loss_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The loss options shared by every variant."""
    return {"use_lpl": True, "lpl_num_blocks": args.blocks, "lpl_norm_type": args.norm, "lpl_loss_type": args.loss,
            "lpl_pow_law": not args.no_pow_law, "lpl_remove_outliers": not args.no_outliers,
            "lpl_dtype": args.dtype}


def _build_call(variant: Variant, vae, args: argparse.Namespace, device):
    """A function running one forward + backward and returning the mean loss, plus the attention backend used."""
    import contextlib

    import torch

    from lpl_plugin.engine.attention import choose_attention
    from lpl_plugin.settings.config import LPLConfig
    from lpl_plugin.engine.precision import resolve_dtype

    dtype = resolve_dtype(args.dtype, device)
    if variant.reference:
        reference = load_reference(args.reference)(
            vae, loss_type=args.loss, grad_ckpt=not args.reference_no_ckpt, pow_law=not args.no_pow_law,
            norm_type=args.norm, num_mid_blocks=args.blocks, feature_type="feature",
            remove_outliers=not args.no_outliers)
        backend = choose_attention(vae.decoder, device, dtype, prefer=args.attention)
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                    else contextlib.nullcontext())

        def call(pred, target):
            with autocast:
                value = reference.get_loss(pred, target)
            value.float().sum().backward()
            return value.detach().float().mean()

        return call, backend
    from lpl_plugin.engine.perceptual_loss import LatentPerceptualLoss

    config = LPLConfig.from_mapping({**_loss_settings(args), **variant.settings, **json.loads(args.settings)})
    engine = LatentPerceptualLoss(vae, config, device=device)
    backend = choose_attention(engine.trunk, device, engine.trunk.dtype, prefer=args.attention)

    def call(pred, target):
        value = engine(pred, target).per_sample
        value.sum().backward()
        return value.detach().mean()

    return call, backend


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one variant in this (fresh) process; returns times, peak extra bytes and the loss."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lpl_plugin.engine.memory import current_rss, peak_rss, reset_peak_rss
    from lpl_plugin.engine.tiny import random_vae

    device = torch.device(args.device)
    variant = VARIANTS[args.worker]
    vae = random_vae(args.vae).to(device).requires_grad_(False)  # frozen, as a trainer holds it
    call, backend = _build_call(variant, vae, args, device)
    pred, target = (t.to(device) for t in make_latents(args.batch, args.latent, args.seed))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        base = current_rss()
    times, cpu_times, loss = [], [], 0.0
    for _ in range(args.calls):
        leaf = pred.clone().requires_grad_(True)
        start, cpu_start = time.perf_counter(), time.process_time()
        value = call(leaf, target)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        loss = float(value)
        del leaf, value
    peak = (torch.cuda.max_memory_allocated(device) if cuda else peak_rss()) - base
    return {"variant": variant.name, "times": times, "cpu_times": cpu_times, "peak": peak, "loss": loss,
            "attention": backend, "device": str(device), "threads": torch.get_num_threads()}


def _worker_argv(args: argparse.Namespace, name: str) -> list[str]:
    """The command line of one worker process."""
    argv = [sys.executable, "-m", "lpl_plugin", "bench", "--worker", name, "--vae", args.vae, "--batch",
            str(args.batch), "--latent", str(args.latent), "--blocks", str(args.blocks), "--dtype", args.dtype,
            "--norm", args.norm, "--loss", args.loss, "--calls", str(args.calls), "--seed", str(args.seed),
            "--device", args.device, "--attention", args.attention, "--threads", str(args.threads)]
    argv += ["--no-pow-law"] * args.no_pow_law + ["--no-outliers"] * args.no_outliers
    argv += ["--reference-no-ckpt"] * args.reference_no_ckpt + ["--settings", args.settings]
    if args.reference:
        argv += ["--reference", str(Path(args.reference).resolve())]
    return argv


def spawn(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run one worker process and parse its JSON result."""
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if args.malloc == "pinned" else {}))
    done = subprocess.run(_worker_argv(args, name), capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"bench variant {name!r} failed (exit {done.returncode}): {tail}")
    return json.loads(lines[-1])
