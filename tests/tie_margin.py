"""Measure how far float32 kernels move the compared L1 differences: the figure behind parity_ties.TIE_MARGIN.

`python -m tests.tie_margin [--every N]` computes, for every L1 fixture case (every N-th with --every), the compared
differences x - y of each layer in float64, then in float32 in one subprocess per kernel family (oneDNN's ISA cap,
ATen's CPU capability, the thread count), and prints per family the largest |float32 - float64| relative to the
largest compared magnitude of the sample's map (the scale `near_ties` uses), plus the elements whose outlier mask
differs between float32 and float64 (a flipped mask would move MSE cases too: it must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FAMILIES = {
    "default (2 threads)": {},
    "ONEDNN_MAX_CPU_ISA=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "ONEDNN_MAX_CPU_ISA=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "1 thread": {"LPL_TEST_THREADS": "1"},
}


def l1_cases(every: int) -> list[tuple[str, dict, dict, float]]:
    """(fixture set, case, tensors, scaling factor) of every `every`-th L1 case of both fixture sets."""
    from .conftest import GOLDEN

    picked = []
    for folder in (GOLDEN, GOLDEN.parent / "lpl_reference_extra"):
        cases = json.loads((folder / "cases.json").read_text())
        tensors = load_file(folder / "cases.safetensors")
        l1 = [case for case in cases["cases"] if case["loss_type"] == "l1"]
        picked += [(folder.name, case, tensors, cases["scaling_factor"]) for case in l1[::every]]
    return picked


def differences(dtype: torch.dtype, every: int) -> dict[str, torch.Tensor]:
    """Compared differences, scales and masks of every picked case and layer, computed in `dtype`."""
    from diffusers import AutoencoderKL

    from .conftest import GOLDEN
    from .parity_ties import compared_maps
    from .reference_vaes import rebuild_sdxl_layout_vae

    vaes = {"tiny_vae": AutoencoderKL.from_pretrained(GOLDEN / "tiny_vae"),
            "sdxl_layout_vae": rebuild_sdxl_layout_vae()}
    vaes = {name: vae.to(dtype).eval().requires_grad_(False) for name, vae in vaes.items()}
    out = {}
    for folder, case, tensors, scaling_factor in l1_cases(every):
        key = case["key"]
        pred, target = tensors[f"{key}.z0_hat"].to(dtype), tensors[f"{key}.z0"].to(dtype)
        for layer, compared in enumerate(compared_maps(vaes[case.get("vae", "tiny_vae")], case, pred, target,
                                                       scaling_factor)):
            name = f"{folder}/{key}/{layer}"
            out[f"{name}.difference"] = (compared.pred - compared.target).contiguous()
            out[f"{name}.scale"] = torch.maximum(compared.pred.abs().amax(dim=(1, 2, 3)),
                                                 compared.target.abs().amax(dim=(1, 2, 3)))
            if compared.mask is not None:
                out[f"{name}.mask"] = compared.mask.contiguous()
    return out


def compare(exact: dict[str, torch.Tensor], measured: dict[str, torch.Tensor]) -> tuple[float, int, str]:
    """Largest relative deviation of the float32 differences, mask disagreements, and the worst map's name."""
    worst, flips, where = 0.0, 0, ""
    for name in (n[:-len(".difference")] for n in exact if n.endswith(".difference")):
        d64, d32 = exact[f"{name}.difference"], measured[f"{name}.difference"].double()
        kept = torch.ones_like(d64, dtype=torch.bool)
        if f"{name}.mask" in exact:
            kept = exact[f"{name}.mask"] & measured[f"{name}.mask"]
            flips += int((exact[f"{name}.mask"] != measured[f"{name}.mask"]).sum())
        deviation = ((d32 - d64).abs() * kept / exact[f"{name}.scale"].reshape(-1, 1, 1, 1)).max().item()
        if deviation > worst:
            worst, where = deviation, name
    return worst, flips, where


def main() -> None:
    """Parent: float64 here, float32 in one child per family; or a child writing its float32 differences."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--child", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("LPL_TEST_THREADS", "2")))
    if args.child:
        save_file(differences(torch.float32, args.every), args.child)
        return
    exact = differences(torch.float64, args.every)
    overall = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for family, env in FAMILIES.items():
            path = Path(folder) / "measured.safetensors"
            subprocess.run([sys.executable, "-m", "tests.tie_margin", "--every", str(args.every), "--child", str(path)],
                           env={**os.environ, **env}, check=True, stderr=subprocess.DEVNULL)
            worst, flips, where = compare(exact, load_file(path))
            overall = max(overall, worst)
            print(f"{family:30s} max relative deviation {worst:.2e} (at {where}), mask flips {flips}", flush=True)
    cases = len({name.rsplit("/", 1)[0] for name in exact})
    print(f"over {cases} L1 cases and {len(FAMILIES)} kernel families: {overall:.2e}")


if __name__ == "__main__":
    main()
