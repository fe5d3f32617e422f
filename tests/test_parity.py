"""`lpl_compat = "diffusers"` reproduces the published reference on every fixture case, in every engine.

Two fixture sets, both computed with the reference on another CPU (see golden/*/README.md): the 48 cases shipped
with the project and 173 more (other seeds, shapes, batch sizes, block counts, near and exact ties, a second VAE
layout). What is matched and how closely: tests/parity_check.py; L1's near-ties: tests/parity_ties.py.
"""

from __future__ import annotations

import pytest
import torch

from lpl_plugin import LatentPerceptualLoss, LPLConfig

from .parity_check import ENGINES, EXTRA, case_tie_bound, check_case, compat_config, fixtures
from .parity_ties import compared_maps, float64_vae, layer_loss
from .conftest import GOLDEN
from .reference_vaes import rebuild_sdxl_layout_vae, recorded_sha256, weights_sha256

CASES, TENSORS = fixtures(GOLDEN)
EXTRA_CASES, EXTRA_TENSORS = fixtures(EXTRA)
# A near-tie share above this means the case (or the margin) is wrong, not the engine: the bound would then be wide.
# Measured (`pytest tests/test_parity.py -rA -k near_ties`; float64 counts, the same on any CPU): at most 0.09 % on
# cases whose z0_hat is independent of or noisy around z0, 0.44 % to 2.17 % on the cases built with z0_hat a hair
# from z0 (`z0_hat_mode` "near" / "tie_partial": near-ties are what they test), so those get their own limit.
MAX_NEAR_TIE_SHARE = 0.01
MAX_NEAR_TIE_SHARE_BUILT_NEAR = 0.03
BUILT_NEAR = ("near", "tie_partial")


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: c["key"])
def test_matches_reference(golden_vae, case, engine):
    check_case(golden_vae, case, TENSORS, engine, CASES["scaling_factor"])


@pytest.fixture(scope="module")
def sdxl_layout_vae():
    """The extra fixtures' second VAE, rebuilt bit for bit (tests/reference_vaes.py) and checked by its hash."""
    vae = rebuild_sdxl_layout_vae()
    assert weights_sha256(vae) == recorded_sha256(), "the rebuilt sdxl_layout_vae differs from the fixtures' VAE"
    return vae


@pytest.mark.parametrize("engine", [name for name in ENGINES if name != "lean-per-sample+block-checkpointing"])
@pytest.mark.parametrize("case", EXTRA_CASES["cases"], ids=lambda c: c["key"])
def test_matches_reference_on_more_cases(request, golden_vae, case, engine):
    vae = golden_vae if case["vae"] == "tiny_vae" else request.getfixturevalue("sdxl_layout_vae")
    check_case(vae, case, EXTRA_TENSORS, engine, EXTRA_CASES["scaling_factor"])


L1_CASES = [("lpl_reference", case) for case in CASES["cases"] if case["loss_type"] == "l1"] + [
    ("lpl_reference_extra", case) for case in EXTRA_CASES["cases"] if case["loss_type"] == "l1"]


@pytest.mark.parametrize("folder,case", L1_CASES, ids=lambda value: value["key"] if isinstance(value, dict) else value)
def test_near_ties_are_rare(request, golden_vae, folder, case):
    """The L1 elements exempted as near-ties, per case (printed: `pytest -rA -k near_ties`), stay under 1 %."""
    cases, tensors = fixtures(GOLDEN.parent / folder)
    vae = golden_vae if case.get("vae", "tiny_vae") == "tiny_vae" else request.getfixturevalue("sdxl_layout_vae")
    counts = case_tie_bound(vae, case, tensors, cases["scaling_factor"], jacobians=False)
    print(f"{folder}/{case['key']}: {counts.exempt} near-tie elements of {counts.compared} ({counts.fraction:.3%})")
    built_near = case.get("z0_hat_mode") in BUILT_NEAR
    assert counts.fraction < (MAX_NEAR_TIE_SHARE_BUILT_NEAR if built_near else MAX_NEAR_TIE_SHARE)


@pytest.mark.parametrize("folder,case", L1_CASES[::7],
                         ids=lambda value: value["key"] if isinstance(value, dict) else value)
def test_loss_magnitude_uses_the_loss_own_coefficients(request, golden_vae, folder, case):
    """The L1 loss scale (|x| + |y| in place of |x - y|) is taken with the loss's own coefficients: with |x - y| they
    give the reference's per-layer losses, and the scale is never below the loss."""
    cases, tensors = fixtures(GOLDEN.parent / folder)
    vae = golden_vae if case.get("vae", "tiny_vae") == "tiny_vae" else request.getfixturevalue("sdxl_layout_vae")
    vae64 = float64_vae(vae)
    z0_hat, z0 = (tensors[f"{case['key']}.{name}"].double() for name in ("z0_hat", "z0"))
    maps = compared_maps(vae64, case, z0_hat, z0, cases["scaling_factor"])
    recomputed = torch.stack([layer_loss(m, len(maps), (m.pred - m.target).abs()) for m in maps], dim=1)
    expected = tensors[f"{case['key']}.loss_per_layer"].double()
    assert torch.allclose(recomputed, expected, rtol=1e-4, atol=1e-7)
    magnitude = case_tie_bound(vae, case, tensors, cases["scaling_factor"], jacobians=False).loss_magnitude
    assert magnitude is not None and (magnitude >= recomputed * (1 - 1e-12)).all()


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
