"""The parity check still catches real bugs on L1 cases, where near-ties widen its gradient bound.

Each mutation runs the real engine (or changes its real gradient by exactly what the bug would) on L1 fixture
cases with outlier masking, pow-law weights and four up blocks, one of them with many near-ties ('near': the
prediction 1 % away from its target). A sign flip leaves the loss alone, so the gradient check alone must catch it
(the unmutated result passing first, so the failure is the mutation's); a wrong weight or a skipped mask moves the
losses, which keep their 1e-5 bound.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lpl_plugin.engine import perceptual_loss as engine_module
from .parity_check import EXTRA, case_tie_bound, fixtures, parity_failures, run_engine
from .parity_ties import TIE_MARGIN, coefficients, compared_maps, float64_vae, jacobian_sum

CASES, TENSORS = fixtures(EXTRA)
# L1 with outlier masks and 4 blocks (pow-law on one, off on the other), 'default' and 'shared' normalization, z0_hat noisy around z0
# (on a case built with z0_hat a hair from z0 no element is 1000x the margin from a tie: nothing far to flip).
MUTATED_CASES = [case for case in CASES["cases"] if case["key"] in ("grid_069", "seeds_001")]
SCALING = CASES["scaling_factor"]
FLIPPED = 3  # elements whose L1 sign the first mutation flips


def failures_of(vae, case, per_sample, layers, grad):
    """The parity check's complaints about one (possibly mutated) engine result."""
    return parity_failures(case, TENSORS, per_sample, layers, grad, case_tie_bound(vae, case, TENSORS, SCALING))


def sign_flip_change(vae, case):
    """The gradient change of flipping L1's sign on the FLIPPED mid-block elements of sample 0 farthest from a tie."""
    key = case["key"]
    pred, target = TENSORS[f"{key}.z0_hat"], TENSORS[f"{key}.z0"]
    maps = compared_maps(float64_vae(vae), case, pred.double(), target.double(), SCALING)
    mid = maps[0]
    difference = (mid.pred - mid.target)[0]
    if mid.mask is not None:
        difference = difference * mid.mask[0]
    far = difference.abs().flatten().topk(FLIPPED).indices
    elements = [(0, *torch.unravel_index(index, difference.shape)) for index in far]
    elements = [tuple(int(i) for i in element) for element in elements]
    scale = max(mid.pred[0].abs().max(), mid.target[0].abs().max())
    assert all(difference[e[1:]].abs() > 1000 * TIE_MARGIN * scale for e in elements), "not far from a tie"
    coefficient = coefficients(mid, len(maps))[0]
    # sign(d) * s_e becomes -sign(d) * s_e: the loss coefficient of each element changes by -2 sign(d) s_e
    weights = [float(-2 * torch.sign(difference[e[1:]]) * coefficient[e[1]]) for e in elements]
    norms = {0: mid.target_norm[0:1].float()} if mid.target_norm is not None else {}
    change = jacobian_sum(vae, case, pred[0:1], SCALING, elements, weights, norms, absolute=False)
    return change


@pytest.mark.parametrize("case", MUTATED_CASES, ids=lambda c: c["key"])
def test_sign_flipped_far_from_ties_is_caught(golden_vae, case):
    per_sample, layers, grad = run_engine(golden_vae, case, TENSORS, "lean-per-sample", SCALING)
    assert not failures_of(golden_vae, case, per_sample, layers, grad)
    mutated = grad.clone()
    mutated[0] += sign_flip_change(golden_vae, case)
    failures = failures_of(golden_vae, case, per_sample, layers, mutated)
    assert [line.split(":")[0] for line in failures] == ["grad_z0_hat"], failures


def mutated_rules(monkeypatch, change):
    """Make the engine build its layer rules through `change(rules)` (the real engine, one rule altered)."""
    original = engine_module.layer_rules
    monkeypatch.setattr(engine_module, "layer_rules", lambda *args: change(original(*args)))


@pytest.mark.parametrize("case", MUTATED_CASES, ids=lambda c: c["key"])
def test_one_layer_weight_off_by_one_percent_is_caught(golden_vae, case, monkeypatch):
    def heavier_last_layer(rules):
        return rules[:-1] + [dataclasses.replace(rules[-1], weight=rules[-1].weight * 1.01)]

    mutated_rules(monkeypatch, heavier_last_layer)
    failures = failures_of(golden_vae, case, *run_engine(golden_vae, case, TENSORS, "autograd", SCALING))
    assert {"loss_per_sample", "loss_per_layer"} <= {line.split(":")[0] for line in failures}, failures


@pytest.mark.parametrize("case", MUTATED_CASES, ids=lambda c: c["key"])
def test_outlier_masking_skipped_on_one_layer_is_caught(golden_vae, case, monkeypatch):
    key = case["key"]
    pred, target = TENSORS[f"{key}.z0_hat"].double(), TENSORS[f"{key}.z0"].double()
    maps = compared_maps(float64_vae(golden_vae), case, pred, target, SCALING)
    # the last masked layer whose mask drops something here (on a map without outliers, skipping it changes nothing)
    layer = max(index for index, m in enumerate(maps) if m.mask is not None and not bool(m.mask.all()))

    def unmasked_layer(rules):
        assert rules[layer].masked
        return rules[:layer] + [dataclasses.replace(rules[layer], outlier_factor=None)] + rules[layer + 1:]

    mutated_rules(monkeypatch, unmasked_layer)
    failures = failures_of(golden_vae, case, *run_engine(golden_vae, case, TENSORS, "lean-whole-batch", SCALING))
    assert {"loss_per_sample", "loss_per_layer"} <= {line.split(":")[0] for line in failures}, failures
