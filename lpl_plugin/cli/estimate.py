"""`lpl-plugin estimate`: the expected peak memory of LPL for the settings of a run, before any model is loaded."""

from __future__ import annotations

import argparse

from lpl_plugin.engine.estimate import GIB, MAX_BATCH, MAX_RESOLUTION, Estimate, estimate_for


def render(estimate: Estimate, settings: str) -> str:
    """The estimate as text: the peak, its phase and what is live then."""
    lines = [f"LPL peak extra memory per call ({settings}): {estimate.peak / GIB:.2f} GiB",
             f"  peak during: {estimate.phase}"]
    for name, size in estimate.breakdown.items():
        lines.append(f"  {name:<18} {size / GIB:8.2f} GiB")
    lines.append(f"plus the decoder copy LPL keeps on the device: {estimate.weights / GIB:.2f} GiB")
    return "\n".join(lines)


def _estimate(args: argparse.Namespace) -> int:
    """Print the estimate for the given settings (the argument types bound every number)."""
    if args.vae not in ("tiny", "sdxl"):
        from lpl_plugin.settings.vae_io import vae_config

        vae_config(args.vae)  # a missing or hostile config.json fails here, before torch is imported
    result = estimate_for(args.vae, resolution=args.resolution, batch=args.batch, blocks=args.blocks,
                          dtype=args.dtype, chunk=args.chunk, checkpointing=args.checkpointing, device=args.device,
                          outliers=not args.no_outliers)
    settings = (f"vae={args.vae}, {args.resolution} px, batch {args.batch}, chunk {min(args.chunk, args.batch)}, "
                f"{args.blocks} blocks, {args.dtype}, checkpointing {args.checkpointing}, {args.device}")
    print(render(result, settings))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `lpl-plugin estimate`."""
    from lpl_plugin.settings.values import bounded_int
    from lpl_plugin.settings.config import MAX_CHUNK

    p = subparsers.add_parser("estimate", help="expected peak memory of LPL on top of the trainer's")
    p.add_argument("--resolution", type=bounded_int(8, MAX_RESOLUTION, multiple_of=8), default=1024,
                   help=f"image side in pixels, a multiple of 8 up to {MAX_RESOLUTION} (latents are 1/8)")
    p.add_argument("--batch", type=bounded_int(1, MAX_BATCH), default=1,
                   help=f"samples per LPL call (1 to {MAX_BATCH})")
    p.add_argument("--blocks", type=bounded_int(0, 4), default=4, help="lpl_num_blocks (0 to 4)")
    p.add_argument("--dtype", default="bfloat16", choices=("auto", "float32", "bfloat16", "bf16", "float16",
                                                           "fp16", "fp32"), help="lpl_dtype")
    p.add_argument("--chunk", type=bounded_int(1, MAX_CHUNK), default=1, help=f"lpl_chunk_size (1 to {MAX_CHUNK})")
    p.add_argument("--checkpointing", default="auto", choices=("auto", "none", "resnet", "block"),
                   help="lpl_checkpointing ('auto' is estimated as 'none', its setting until memory runs out)")
    p.add_argument("--vae", default="sdxl", help="tiny, sdxl, or a diffusers VAE folder / config.json")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where LPL runs")
    p.add_argument("--no-outliers", action="store_true", help="lpl_remove_outliers = false")
    p.set_defaults(func=_estimate)
