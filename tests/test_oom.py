"""Out of memory inside LPL: halve the chunk and retry, recompute more (`auto`), else skip the step; never crash.

The first two tests make the CPU allocator really fail: a child process caps its address space
(RLIMIT_AS) between the memory one sample needs and the memory four need, with glibc's mmap threshold pinned so
that every feature map is its own mapping. The last test uses a stand-in for the CUDA allocator, which cannot run
here, to exercise the switch to recomputation.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from lpl_plugin import LatentPerceptualLoss, LPLConfig
from lpl_plugin.engine.frozen import LeanResnet

from .test_loss import latents

CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from lpl_plugin import LatentPerceptualLoss, LPLConfig
from lpl_plugin.engine.estimate import estimate_peak
from lpl_plugin.engine.tiny import tiny_vae

vae = tiny_vae()
g = torch.Generator().manual_seed(0)
target = torch.randn(4, 4, 32, 32, generator=g) * 0.8
pred = target + 0.3 * torch.randn(target.shape, generator=g)
config = LPLConfig(use_lpl=True, lpl_chunk_size=4, lpl_checkpointing="none")

def run(engine):
    leaf = pred.clone().requires_grad_(True)
    value = engine(leaf, target).per_sample
    value.sum().backward()
    return value.detach(), leaf.grad

def address_space():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

want_value, want_grad = run(LatentPerceptualLoss(vae, config))  # unconstrained; also loads every code path
for factor in map(float, sys.argv[1:]):
    engine = LatentPerceptualLoss(vae, config)
    one_sample = estimate_peak(engine.trunk, tuple(pred.shape), chunk=1,
                               masked_layers=[f is not None for f in engine.outlier_factors]).peak
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + int(factor * one_sample), hard))
    value, grad = run(engine)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    after_value, _ = run(engine)  # the next step, with memory back
    print(json.dumps({
        "factor": factor, "chunk": engine.state.chunk_size, "retries": engine.state.oom_retries,
        "skips": engine.state.oom_skips, "value_error": (value - want_value).abs().max().item(),
        "grad_error": ((grad - want_grad).abs().max() / want_grad.abs().max()).item(),
        "all_zero": bool((value == 0).all() and (grad == 0).all()),
        "after_error": (after_value - want_value).abs().max().item(),
    }), flush=True)
    print(f"--- end of factor {factor}", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def capped_runs() -> tuple[dict[float, dict], str]:
    """One child process, capped in turn at 1.5 and 0.4 times one sample's estimated peak."""
    if sys.platform != "linux":
        pytest.skip("RLIMIT_AS and glibc's malloc tunables are Linux features")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, "1.5", "0.4"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["factor"]: r for r in results}, done.stderr


def test_allocator_failure_halves_the_chunk_until_it_fits(capped_runs):
    results, log = capped_runs
    result = results[1.5]  # one sample fits; four and two do not
    assert result["retries"] >= 1 and result["chunk"] in (1, 2) and result["skips"] == 0
    assert "retrying with lpl_chunk_size" in log.split("--- end of factor 1.5")[0]
    assert result["value_error"] < 1e-6 and result["grad_error"] < 1e-3
    assert result["after_error"] < 1e-6


def test_no_room_for_one_sample_skips_the_step_and_training_goes_on(capped_runs):
    results, log = capped_runs
    result = results[0.4]
    assert result["chunk"] == 1 and result["skips"] == 1 and result["all_zero"]
    assert "LPL skipped for this step" in log and "Traceback" not in log
    assert result["after_error"] < 1e-6  # the next step, with memory back, computes LPL as usual


class CudaAllocatorStandIn:
    """Stand-in for the CUDA allocator (no GPU here): the full-resolution block runs out of memory whenever it
    keeps its activations for backward (called with gradients and without recomputation), as it would on a
    small card; with recomputation it fits."""

    def __init__(self, engine: LatentPerceptualLoss):
        self.failures = 0
        for resnet in engine.trunk.up_blocks[-1].resnets:
            assert isinstance(resnet, LeanResnet)
            resnet.register_forward_pre_hook(self.allocate, with_kwargs=True)

    def allocate(self, module, args, kwargs):
        """Raise the allocator's error for a block that would keep its activations."""
        if torch.is_grad_enabled() and args[0].requires_grad and not kwargs.get("recompute", False):
            self.failures += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")


@pytest.mark.parametrize("checkpointing", ["auto", "none"])
def test_auto_switches_to_recomputation_where_memory_runs_out(vae, caplog, checkpointing):
    engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_chunk_size=2, lpl_checkpointing=checkpointing))
    allocator = CudaAllocatorStandIn(engine)
    plain = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_grad_mode="autograd"))
    pred, target = latents()
    a, b = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="lpl_plugin"):
        got = engine(b, target).per_sample
    got.sum().backward()
    assert allocator.failures == 2 and engine.state.chunk_size == 1  # two samples, then one, then recompute
    if checkpointing == "none":  # recomputation was not allowed: the step goes without LPL
        assert engine.state.oom_skips == 1 and torch.equal(got, torch.zeros(2)) and not b.grad.any()
        assert "LPL skipped" in caplog.text
        return
    assert engine.state.checkpointing == "resnet" and engine.state.oom_retries == 2 and engine.state.oom_skips == 0
    assert "recomputing decoder activations" in caplog.text
    plain(a, target).per_sample.sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-9)
    engine(pred.clone().requires_grad_(True), target)  # later steps recompute from the start: no new failure
    assert allocator.failures == 2
