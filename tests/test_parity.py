"""`lpl_compat = "diffusers"` reproduces the published reference on every fixture case, in every engine.

Two fixture sets, both computed with the reference (see golden/*/README.md): the 48 cases shipped with the project
and 173 more (other seeds, shapes, batch sizes, block counts, near and exact ties, a second VAE layout).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from lpl_plugin import LatentPerceptualLoss, LPLConfig

from .conftest import GOLDEN

CASES = json.loads((GOLDEN / "cases.json").read_text())
TENSORS = load_file(GOLDEN / "cases.safetensors")
EXTRA = GOLDEN.parent / "lpl_reference_extra"
EXTRA_CASES = json.loads((EXTRA / "cases.json").read_text())
EXTRA_TENSORS = load_file(EXTRA / "cases.safetensors")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest expected magnitude."""
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)  # exact ties: all zeros expected
    return ((actual - expected).abs().max() / scale).item()


def compat_config(case: dict, **engine) -> LPLConfig:
    """The compat-mode config of one fixture case."""
    return LPLConfig(use_lpl=True, lpl_compat="diffusers", lpl_norm_type=case["norm_type"],
                     lpl_loss_type=case["loss_type"], lpl_pow_law=case["pow_law"],
                     lpl_remove_outliers=case["remove_outliers"], lpl_num_blocks=case["num_blocks"],
                     lpl_dtype="float32", **engine)


# Every engine reproduces the reference, L1 included (its gradient is a sign, which one flipped element changes far
# beyond the tolerance): the whole batch in one pass, one sample per pass (the loss side on the whole batch, as the
# reference computes it, and the decoder's backward per sample), plain autograd, and recomputation.
ENGINES = {
    "autograd": dict(lpl_grad_mode="autograd", lpl_checkpointing="none"),
    "autograd+block-checkpointing": dict(lpl_grad_mode="autograd", lpl_checkpointing="block"),
    "lean-whole-batch": dict(lpl_grad_mode="lean", lpl_chunk_size=8, lpl_checkpointing="resnet"),
    "lean-per-sample": dict(lpl_grad_mode="lean", lpl_chunk_size=1, lpl_checkpointing="auto"),
    "lean-per-sample+block-checkpointing": dict(lpl_grad_mode="lean", lpl_chunk_size=1, lpl_checkpointing="block"),
}


def check_case(vae, case: dict, tensors: dict, engine: str, scaling_factor: float) -> None:
    """One fixture case through one engine: loss per sample and per layer, and the gradient, within tolerance."""
    key = case["key"]
    loss = LatentPerceptualLoss(vae, compat_config(case, **ENGINES[engine]), scaling_factor=scaling_factor)
    z0_hat = tensors[f"{key}.z0_hat"].clone().requires_grad_(True)
    result = loss(z0_hat, tensors[f"{key}.z0"], with_layers=True)
    result.per_sample.sum().backward()
    assert relative_error(result.per_sample.detach(), tensors[f"{key}.loss_per_sample"]) < 1e-5
    assert relative_error(result.layers, tensors[f"{key}.loss_per_layer"]) < 1e-5
    assert relative_error(z0_hat.grad, tensors[f"{key}.grad_z0_hat"]) < 1e-4


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: c["key"])
def test_matches_reference(golden_vae, case, engine):
    check_case(golden_vae, case, TENSORS, engine, CASES["scaling_factor"])


@pytest.fixture(scope="module")
def sdxl_layout_vae():
    """The extra fixtures' second VAE, rebuilt from its recipe and checked against the recorded weights' hash."""
    from diffusers import AutoencoderKL

    torch.manual_seed(4242)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 64, 64, 64],
                        layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=64,
                        scaling_factor=0.13025, force_upcast=True)
    g = torch.Generator().manual_seed(4243)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1.0 + 0.05 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=g))
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    if digest.hexdigest() != EXTRA_CASES["vaes"]["sdxl_layout_vae"]["weights_sha256"]:
        pytest.skip("this diffusers initializes AutoencoderKL differently: the fixtures' second VAE cannot be rebuilt")
    return vae.eval().requires_grad_(False)


@pytest.mark.parametrize("engine", [name for name in ENGINES if name != "lean-per-sample+block-checkpointing"])
@pytest.mark.parametrize("case", EXTRA_CASES["cases"], ids=lambda c: c["key"])
def test_matches_reference_on_more_cases(request, golden_vae, case, engine):
    vae = golden_vae if case["vae"] == "tiny_vae" else request.getfixturevalue("sdxl_layout_vae")
    check_case(vae, case, EXTRA_TENSORS, engine, EXTRA_CASES["scaling_factor"])


def test_compat_computes_where_the_reference_raises(golden_vae):
    refused = [r["what"] for r in EXTRA_CASES["refused"]]
    assert "latent 1x1, remove_outliers=True, num_mid_blocks=2" in refused  # 2 % quantile rank 0 on a 16-pixel map
    case = {"norm_type": "shared", "loss_type": "l1", "pow_law": True, "remove_outliers": True, "num_blocks": 2}
    loss = LatentPerceptualLoss(golden_vae, compat_config(case), scaling_factor=0.13025)
    z0 = torch.randn(2, 4, 1, 1)
    result = loss((z0 + 0.3).requires_grad_(True), z0, with_layers=True)
    assert torch.isfinite(result.layers).all() and (result.per_sample > 0).all()


def test_compat_skips_post_quant_conv_and_default_applies_it(golden_vae):
    compat = LatentPerceptualLoss(golden_vae, compat_config(CASES["cases"][0]))
    default = LatentPerceptualLoss(golden_vae, LPLConfig(use_lpl=True))
    assert compat.trunk.post_quant_conv is None and default.trunk.post_quant_conv is not None
