"""Decoder attention: xformers only where it actually runs, else SDPA; never a failure; the choice logged once."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from lpl_plugin import LatentPerceptualLoss, LPLConfig

from lpl_plugin.engine import attention
XFORMERS = importlib.util.find_spec("xformers") is not None


@pytest.fixture()
def fresh_attention_log():
    """Forget which choices were announced and what the probes found."""
    attention._announced.clear()
    attention.xformers_usable.cache_clear()
    yield
    attention.xformers_usable.cache_clear()


def processors(engine: LatentPerceptualLoss) -> set[str]:
    """Class names of the attention processors in the decoder copy."""
    return {type(m.processor).__name__ for m in engine.trunk.modules() if hasattr(m, "set_processor")}


def test_cpu_decoder_uses_sdpa_and_says_why_once(vae, caplog, fresh_attention_log):
    with caplog.at_level(logging.INFO, logger="lpl_plugin"):
        first = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True))
        LatentPerceptualLoss(vae, LPLConfig(use_lpl=True))
    lines = [r.getMessage() for r in caplog.records if "decoder attention" in r.getMessage()]
    assert first.trunk.attention == "sdpa" and processors(first) == {"AttnProcessor2_0"}
    assert len(lines) == 1 and "needs a CUDA device" in lines[0]
    assert ("xformers installed but needs a CUDA device" in lines[0]) == XFORMERS
    assert ("xformers not installed" in lines[0]) != XFORMERS


@pytest.mark.skipif(not XFORMERS, reason="xformers is not installed")
def test_installed_but_unusable_xformers_is_detected_not_fatal():
    # The probe runs xformers' kernel for real: on this machine the installed build has no kernel for the device
    # (here: the CPU; on a GPU: a build for another PyTorch/CUDA) and raises, which must mean "use SDPA".
    usable, reason = attention.probe_xformers(torch.device("cpu"))
    assert not usable and reason.startswith("xformers installed but unusable here (")


def test_without_a_gpu_the_cuda_branch_falls_back(fresh_attention_log):
    usable, reason = attention.xformers_usable("cuda")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the probe decides")
    assert not usable and "needs a CUDA device" in reason


def test_sdpa_can_be_requested(vae, fresh_attention_log):
    engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True))
    assert attention.choose_attention(engine.trunk, engine.trunk.device, torch.float32, prefer="sdpa") == "sdpa"
    assert processors(engine) == {"AttnProcessor2_0"}
    pred = torch.randn(1, 4, 8, 8, requires_grad=True)
    assert torch.isfinite(engine(pred, torch.randn(1, 4, 8, 8)).per_sample).all()
