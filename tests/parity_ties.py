"""L1 parity where its ties live: the compared features recomputed in float64, their near-ties, and a bound.

L1's gradient is sign(x - y) per compared feature element. Where a prediction feature nearly ties its target, the
float32 kernel a CPU picks (oneDNN's ISA, ATen's vector width, the thread count) decides the sign, and one flipped
element moves the latent gradient by about 1e-4 of its largest value: as much as a real bug. So the fixtures'
gradients (made with the reference on another CPU) are compared with the engine's within today's 1e-4 plus, per
latent coordinate, the most the near-tie elements could change it:

    bound[i] = sum over near-tie elements e of 2 |s_e| |d feature_e / d latent_i|

where s_e = weight / (kept pixels of its channel * channels * layers) is the element's coefficient in the summed
per-sample loss (a flip turns +s_e into -s_e, or 0 into +-s_e: at most 2 |s_e|), and the Jacobian row of the
normalized prediction feature is taken exactly by one vector-Jacobian product per element (batched, float32).
Summing absolute values bounds every combination of flips at once. A near-tie is a compared (kept) element whose
float64 difference is nonzero and below TIE_MARGIN times the largest compared magnitude of its sample's map; exact
zeros (a sample whose prediction equals its target) are computed by the same kernel on equal inputs in any
float32 run, so their gradient is exactly zero everywhere and they are not exempted.

The features are computed here independently of the engine: the diffusers decoder's own modules and the
reference's rules (pow-law weight 2^-min(i, 3); outlier masks on maps 2, 3, 4 with factors 2, 1, 1; the target
masked, the prediction not; 'default' divides each map by its own channel norm, 'shared' both by the target's,
'batch' leaves them raw), with the engine's pure outlier-mask function for the mask.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lpl_plugin.engine.outliers import outlier_mask

# Largest float32-vs-float64 deviation of a compared difference (x - y), relative to the largest compared magnitude
# of its sample's map, over every third L1 fixture case and five kernel families on an AVX2-only AMD EPYC:
# 7.5e-6 (`python -m tests.tie_margin --every 3`: 38 cases; the per-family figures are in
# golden/lpl_reference_extra/README.md).
# Two float32 runs (the reference's and the engine's) can disagree on a sign only where |x - y| in float64 is below
# the sum of their deviations; the margin is four times the measured figure, covering that sum and a CPU family
# not measured here with room to spare.
TIE_MARGIN = 3e-5
# Gradient tolerance of the parity tests outside near-ties (relative to the fixture gradient's largest value).
GRADIENT_TOLERANCE = 1e-4
OWN_NORM_EPS, SHARED_NORM_EPS = 1e-10, 1e-6
MASKED_MAPS = {2: 2, 3: 1, 4: 1}  # the reference's fixed outlier-masked map indices and their downsampling factors
CHUNK = 64  # Jacobian rows per batched vector-Jacobian product
JACOBIAN_SLACK = 1.001


@dataclass
class ComparedMap:
    """One compared layer of a batch: normalized prediction and target, the target's keep mask, the layer weight."""

    pred: Tensor
    target: Tensor
    mask: Tensor | None
    weight: float
    target_norm: Tensor | None  # 'shared': the target's channel norm plus epsilon, which also divides the prediction


@dataclass
class TieBound:
    """Near-tie elements of one case and the per-coordinate bound on how far they can move the latent gradient."""

    bound: Tensor
    exempt: int
    compared: int
    # L1: each per-layer loss (B, L) recomputed on |x| + |y| instead of |x - y|: the size of the summands before the
    # subtraction float32 rounds, so the scale against which another kernel's rounding of the loss is measured.
    loss_magnitude: Tensor | None = None

    @property
    def fraction(self) -> float:
        """Share of the compared elements exempted as near-ties."""
        return self.exempt / max(1, self.compared)


def decoder_maps(decoder: nn.Module, z: Tensor, num_blocks: int) -> list[Tensor]:
    """The maps the reference compares: mid block output, then each of the first `num_blocks` up blocks'."""
    h = decoder.mid_block(decoder.conv_in(z), None)
    maps = [h]
    for block in decoder.up_blocks[:num_blocks]:
        h = block(h, None)
        maps.append(h)
    return maps


def own_normalized(x: Tensor) -> Tensor:
    """Each pixel's channel vector divided by its L2 norm (the reference's 'default' normalization)."""
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + OWN_NORM_EPS)


def compared_maps(vae: nn.Module, case: dict, pred: Tensor, target: Tensor, scaling_factor: float) -> list[ComparedMap]:
    """The normalized, masked maps the reference's L1/MSE compares, in the VAE's dtype."""
    decoder = vae.decoder
    with torch.no_grad():
        preds = decoder_maps(decoder, pred / scaling_factor, case["num_blocks"])
        targets = decoder_maps(decoder, target / scaling_factor, case["num_blocks"])
    out = []
    for index, (x, y) in enumerate(zip(preds, targets)):
        factor = MASKED_MAPS.get(index) if case["remove_outliers"] else None
        mask = outlier_mask(y, factor) if factor is not None else None
        y = y * mask if mask is not None else y
        weight = 2.0 ** -min(index, 3) if case["pow_law"] else 1.0
        norm = None
        if case["norm_type"] == "default":
            x, y = own_normalized(x), own_normalized(y)
        elif case["norm_type"] == "shared":
            norm = torch.linalg.vector_norm(y, dim=1, keepdim=True) + SHARED_NORM_EPS
            x, y = x / norm, y / norm
        out.append(ComparedMap(x, y, mask, weight, norm))
    return out


def near_ties(compared: ComparedMap, margin: float) -> Tensor:
    """Boolean map of the kept elements whose difference is nonzero and below `margin` of the sample's scale."""
    difference = compared.pred - compared.target
    scale = torch.maximum(compared.pred.abs().amax(dim=(1, 2, 3), keepdim=True),
                          compared.target.abs().amax(dim=(1, 2, 3), keepdim=True))
    near = (difference != 0) & (difference.abs() < margin * scale)
    return near if compared.mask is None else near & compared.mask


def coefficients(compared: ComparedMap, num_layers: int) -> Tensor:
    """|s_e| per sample and channel (B, C): the weight of one element's |x - y| in the summed per-sample loss."""
    batch, channels, height, width = compared.pred.shape
    kept = (compared.mask.sum(dim=(2, 3)).to(compared.pred.dtype) if compared.mask is not None
            else torch.full((batch, channels), float(height * width), dtype=compared.pred.dtype))
    return compared.weight / (kept * channels * num_layers)


def layer_loss(compared: ComparedMap, num_layers: int, terms: Tensor) -> Tensor:
    """One layer's L1 loss per sample (B,) from its per-element terms (|x - y| gives the loss itself), kept only."""
    kept = terms if compared.mask is None else terms * compared.mask
    return (coefficients(compared, num_layers)[:, :, None, None] * kept).sum(dim=(1, 2, 3)) * num_layers


def normalized_prediction(case: dict, x: Tensor, target_norm: Tensor | None) -> Tensor:
    """A prediction map normalized as the reference compares it ('shared' divides by the target's norm)."""
    if case["norm_type"] == "default":
        return own_normalized(x)
    return x / target_norm if case["norm_type"] == "shared" else x


def jacobian_sum(vae: nn.Module, case: dict, latent: Tensor, scaling_factor: float, elements: list[tuple],
                 weights: list[float], target_norms: dict[int, Tensor], absolute: bool = True) -> Tensor:
    """sum over elements of weight * |d(normalized prediction feature)/d(scaled latent)| for one sample (1, 4, H, W)
    (without the absolute value when `absolute` is False: the gradient change of those loss coefficients).

    `elements` are (layer, channel, row, column). Each chunk of elements runs the decoder once over that many copies
    of the latent, with a one-hot output gradient per copy: one batched vector-Jacobian product gives every row.
    """
    total = torch.zeros_like(latent[0])
    order = sorted(range(len(elements)), key=lambda i: elements[i])  # shallow layers first: shorter decoder runs
    for start in range(0, len(order), CHUNK):
        chunk = [elements[i] for i in order[start:start + CHUNK]]
        factors = torch.tensor([weights[i] for i in order[start:start + CHUNK]], dtype=latent.dtype)
        z = latent.expand(len(chunk), *latent.shape[1:]).clone().requires_grad_(True)
        with torch.enable_grad():
            maps = decoder_maps(vae.decoder, z / scaling_factor, chunk[-1][0])
            outputs, one_hots = [], []
            for layer in sorted({element[0] for element in chunk}):
                picked = [(k, *element[1:]) for k, element in enumerate(chunk) if element[0] == layer]
                output = normalized_prediction(case, maps[layer], target_norms.get(layer))
                one_hot = torch.zeros_like(output)
                one_hot[tuple(torch.tensor(picked).T)] = 1.0
                outputs.append(output)
                one_hots.append(one_hot)
            (rows,) = torch.autograd.grad(outputs, z, one_hots)
        total += (factors.reshape(-1, 1, 1, 1) * (rows.abs() if absolute else rows)).sum(dim=0)
    return total


def float64_vae(vae: nn.Module) -> nn.Module:
    """A float64 copy of a VAE, frozen."""
    return copy.deepcopy(vae).to(torch.float64).eval().requires_grad_(False)


def tie_bound(vae64: nn.Module, case: dict, tensors: dict, scaling_factor: float, margin: float = TIE_MARGIN,
              vae32: nn.Module | None = None, jacobians: bool = True) -> TieBound:
    """The near-ties of one fixture case and the bound (like the latent) on the gradient change they can make;
    with `jacobians=False` only the counts (the bound stays zero: the expensive part is skipped)."""
    key = case["key"]
    pred, target = tensors[f"{key}.z0_hat"].double(), tensors[f"{key}.z0"].double()
    bound = torch.zeros_like(pred)
    if case["loss_type"] != "l1":
        return TieBound(bound, 0, 0)
    maps = compared_maps(vae64, case, pred, target, scaling_factor)
    magnitude = torch.stack([layer_loss(m, len(maps), m.pred.abs() + m.target.abs()) for m in maps], dim=1)
    exempt = compared = 0
    per_sample: dict[int, list[tuple]] = {}
    weights: dict[int, list[float]] = {}
    for layer, compared_map in enumerate(maps):
        near = near_ties(compared_map, margin)
        compared += int(compared_map.mask.sum()) if compared_map.mask is not None else compared_map.pred.numel()
        exempt += int(near.sum())
        coefficient = coefficients(compared_map, len(maps))
        for b, c, h, w in near.nonzero().tolist():
            per_sample.setdefault(b, []).append((layer, c, h, w))
            weights.setdefault(b, []).append(2.0 * float(coefficient[b, c]))
    if not jacobians:
        return TieBound(bound, exempt, compared, magnitude)
    # The Jacobian rows are taken in float32 (float64 convolutions are many times slower on CPUs): rounding moves
    # them by about 1e-6 of their size, which JACOBIAN_SLACK covers a thousand times over.
    vae32 = vae32 if vae32 is not None else copy.deepcopy(vae64).float()
    for b, elements in per_sample.items():
        norms = {layer: m.target_norm[b:b + 1].float() for layer, m in enumerate(maps) if m.target_norm is not None}
        rows = jacobian_sum(vae32, case, pred[b:b + 1].float(), scaling_factor, elements, weights[b], norms)
        bound[b] = rows.double() * JACOBIAN_SLACK
    return TieBound(bound, exempt, compared, magnitude)


def gradient_excess(actual: Tensor, expected: Tensor, bound: Tensor) -> float:
    """Largest |actual - expected| beyond the per-coordinate bound, relative to the largest expected magnitude.

    With a zero bound this is the plain relative error; parity holds when it is below GRADIENT_TOLERANCE.
    """
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)  # exact ties: all zeros expected
    excess = (actual.double() - expected.double()).abs() - bound
    return (excess.max() / scale).item()
