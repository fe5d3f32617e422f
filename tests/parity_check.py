"""The parity check: one fixture case through one engine, compared with the reference's numbers made on another CPU.

What is compared and how closely (each bound argued where it is set):
- loss per sample and per layer: relative error below 1e-5, every case (float32 rounding of a sum of positive terms;
  the losses are continuous in the features, so another kernel moves them by rounding only). For L1 the error is
  taken relative to the loss recomputed on |x| + |y| where that is larger (`TieBound.loss_magnitude`): rounding moves
  each term |x - y| by a fraction of |x| + |y|, not of |x - y|, which near-ties make arbitrarily small (measured:
  `ties_007`, built with elements tied, 1.23e-5 of its loss under oneDNN's SSE4.1 kernels);
- the gradient: relative error below 1e-4 (GRADIENT_TOLERANCE) outside L1's near-ties, and for L1 up to that plus the
  most the near-tie elements can change it (`parity_ties.tie_bound`), per latent coordinate.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from lpl_plugin import LatentPerceptualLoss, LPLConfig

from .conftest import GOLDEN
from .parity_ties import GRADIENT_TOLERANCE, TieBound, float64_vae, gradient_excess, tie_bound

EXTRA = GOLDEN.parent / "lpl_reference_extra"
LOSS_TOLERANCE = 1e-5


@lru_cache(maxsize=None)
def fixtures(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    """cases.json and cases.safetensors of one fixture folder, read once."""
    return json.loads((folder / "cases.json").read_text()), load_file(folder / "cases.safetensors")


# Every engine reproduces the reference: the whole batch in one pass, one sample per pass (the loss side on the whole
# batch, as the reference computes it, and the decoder's backward per sample), plain autograd, and recomputation.
ENGINES = {
    "autograd": dict(lpl_grad_mode="autograd", lpl_checkpointing="none"),
    "autograd+block-checkpointing": dict(lpl_grad_mode="autograd", lpl_checkpointing="block"),
    "lean-whole-batch": dict(lpl_grad_mode="lean", lpl_chunk_size=8, lpl_checkpointing="resnet"),
    "lean-per-sample": dict(lpl_grad_mode="lean", lpl_chunk_size=1, lpl_checkpointing="auto"),
    "lean-per-sample+block-checkpointing": dict(lpl_grad_mode="lean", lpl_chunk_size=1, lpl_checkpointing="block"),
}


def relative_error(actual: Tensor, expected: Tensor, magnitude: Tensor | None = None) -> float:
    """Largest absolute difference relative to the largest expected magnitude (or `magnitude`'s, if larger)."""
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)  # exact ties: all zeros expected
    if magnitude is not None:
        scale = torch.maximum(scale, magnitude.max().to(scale.dtype))
    return ((actual - expected).abs().max() / scale).item()


def compat_config(case: dict, **engine: object) -> LPLConfig:
    """The compat-mode config of one fixture case."""
    return LPLConfig(use_lpl=True, lpl_compat="diffusers", lpl_norm_type=case["norm_type"],
                     lpl_loss_type=case["loss_type"], lpl_pow_law=case["pow_law"],
                     lpl_remove_outliers=case["remove_outliers"], lpl_num_blocks=case["num_blocks"],
                     lpl_dtype="float32", **engine)


def run_engine(vae: nn.Module, case: dict, tensors: dict, engine: str,
               scaling_factor: float) -> tuple[Tensor, Tensor, Tensor]:
    """Loss per sample, per layer and the latent gradient of one case through one engine."""
    key = case["key"]
    loss = LatentPerceptualLoss(vae, compat_config(case, **ENGINES[engine]), scaling_factor=scaling_factor)
    z0_hat = tensors[f"{key}.z0_hat"].clone().requires_grad_(True)
    result = loss(z0_hat, tensors[f"{key}.z0"], with_layers=True)
    result.per_sample.sum().backward()
    assert z0_hat.grad is not None and result.layers is not None
    return result.per_sample.detach(), result.layers, z0_hat.grad


_VAES64: dict[int, tuple[nn.Module, nn.Module]] = {}
_BOUNDS: dict[tuple[str, str, bool], TieBound] = {}


def case_tie_bound(vae: nn.Module, case: dict, tensors: dict, scaling_factor: float,
                   jacobians: bool = True) -> TieBound:
    """The near-tie bound of one case (zero for MSE), computed once per case and VAE (`jacobians=False`: the
    near-tie counts only)."""
    if id(vae) not in _VAES64:
        _VAES64[id(vae)] = (vae, float64_vae(vae))  # keeps `vae` alive so its id stays its own
    key = (case.get("vae", "tiny_vae"), case["key"], jacobians)
    if key not in _BOUNDS:
        _BOUNDS[key] = tie_bound(_VAES64[id(vae)][1], case, tensors, scaling_factor, vae32=vae, jacobians=jacobians)
    return _BOUNDS[key]


def parity_failures(case: dict, tensors: dict, per_sample: Tensor, layers: Tensor, grad: Tensor,
                    bound: TieBound) -> list[str]:
    """What differs from the fixture beyond its bound, one line per quantity (empty: parity holds)."""
    key = case["key"]
    failures = []
    magnitudes = (None, None) if bound.loss_magnitude is None else (bound.loss_magnitude.mean(dim=1),
                                                                     bound.loss_magnitude)
    for (name, actual), magnitude in zip((("loss_per_sample", per_sample), ("loss_per_layer", layers)), magnitudes):
        error = relative_error(actual, tensors[f"{key}.{name}"], magnitude)
        if not error < LOSS_TOLERANCE:
            failures.append(f"{name}: relative error {error:.2e} >= {LOSS_TOLERANCE:.0e}")
    excess = gradient_excess(grad, tensors[f"{key}.grad_z0_hat"], bound.bound)
    if not excess < GRADIENT_TOLERANCE:
        failures.append(f"grad_z0_hat: relative error beyond the near-tie bound {excess:.2e} >= "
                        f"{GRADIENT_TOLERANCE:.0e} ({bound.exempt} near-tie elements of {bound.compared})")
    return failures


def check_case(vae: nn.Module, case: dict, tensors: dict, engine: str, scaling_factor: float) -> None:
    """One fixture case through one engine: losses and gradient within their bounds."""
    outputs = run_engine(vae, case, tensors, engine, scaling_factor)
    # The near-tie bound only ever widens the gradient's tolerance, so it is computed (one decoder pass per 64
    # near-tie elements: the expensive part) only for an L1 case that misses the plain bound on this CPU.
    failures = parity_failures(case, tensors, *outputs, case_tie_bound(vae, case, tensors, scaling_factor, False))
    if failures and case["loss_type"] == "l1":
        failures = parity_failures(case, tensors, *outputs, case_tie_bound(vae, case, tensors, scaling_factor))
    assert not failures, "; ".join(failures)
