"""`lpl-plugin estimate`: LPL's peak memory from the decoder's layout, checked against measured peaks on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lpl_plugin.cli.main import main
from lpl_plugin.engine.estimate import estimate_for

# Measures the peak resident memory of an LPL call (after one call that loads code and kernels) above the memory
# held just before it. glibc's mmap threshold is pinned so that freed maps go back to the system and RSS follows
# the tensors alive, as torch.cuda.max_memory_allocated does on a GPU; the peak (VmHWM) is reset through
# /proc/self/clear_refs before each measurement, so one process can measure several cases.
MEASURE = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from lpl_plugin import LatentPerceptualLoss, LPLConfig
from lpl_plugin.bench.worker import make_latents
from lpl_plugin.engine.memory import current_rss, peak_rss, reset_peak_rss
from lpl_plugin.engine.tiny import tiny_vae

vae = tiny_vae()
for case in json.loads(sys.argv[1]):
    latent, batch, chunk, blocks, dtype, checkpointing = case
    engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_num_blocks=blocks, lpl_dtype=dtype,
                                                 lpl_chunk_size=chunk, lpl_checkpointing=checkpointing))
    pred, target = make_latents(batch, latent)
    engine(pred[:chunk].clone().requires_grad_(True), target[:chunk]).per_sample.sum().backward()
    leaf = pred.clone().requires_grad_(True)
    reset_peak_rss()
    base = current_rss()
    engine(leaf, target).per_sample.sum().backward()
    print(json.dumps({"case": case, "peak": peak_rss() - base}), flush=True)
"""

CASES = [  # latent side, batch, chunk, blocks, dtype, checkpointing
    (48, 2, 1, 4, "float32", "none"),
    (48, 2, 2, 3, "bfloat16", "resnet"),
    (48, 2, 1, 4, "float32", "block"),  # each stage keeps only its input (nothing a lean block stores survives)
]


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    """Measured peaks of every case, in one child process."""
    if sys.platform != "linux" or not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("measures through /proc (VmHWM, reset by clear_refs) and glibc's malloc tunables")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_estimate_is_within_a_quarter_of_the_measured_peak(measured, index):
    latent, batch, chunk, blocks, dtype, checkpointing = CASES[index]
    peak = measured[index]["peak"]
    estimate = estimate_for("tiny", resolution=8 * latent, batch=batch, blocks=blocks, dtype=dtype, chunk=chunk,
                            checkpointing=checkpointing, device="cpu").peak
    assert peak > 20e6, "the measured peak should be well above allocator noise"
    assert abs(estimate - peak) <= 0.25 * peak, f"estimate {estimate / 1e6:.0f} MB, measured {peak / 1e6:.0f} MB"


def test_estimate_command_prints_the_peak_and_its_breakdown(capsys):
    assert main(["estimate", "--resolution", "1024", "--batch", "1", "--blocks", "4", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    for part in ("LPL peak extra memory per call", "GiB", "peak during", "kept activations", "layer gradients",
                 "scratch", "decoder copy"):
        assert part in out


def test_estimate_follows_the_settings():
    def peak(**changes) -> int:
        settings = dict(resolution=1024, batch=2, blocks=4, dtype="bfloat16", chunk=1, checkpointing="none")
        return estimate_for("sdxl", **{**settings, **changes}).peak

    assert peak(blocks=2) < peak(blocks=3) < peak()
    assert peak(checkpointing="resnet") < peak() < peak(chunk=2) and peak(dtype="float32") > peak()
    assert peak(resolution=512) < peak() / 3


def test_estimate_rejects_bad_input_in_one_line(capsys, tmp_path):
    assert main(["estimate", "--vae", str(tmp_path / "missing")]) == 2
    assert main(["estimate", "--resolution", "1001"]) == 2
    assert main(["estimate", "--blocks", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("Traceback" not in line for line in err)
