"""The extra parity fixtures' second VAE (`sdxl_layout_vae`), rebuilt bit for bit on any CPU.

Its weights (7 MB) are not stored. They were made by `torch.manual_seed(4242)`, `AutoencoderKL(**config)` (torch's
default initialization of each convolution and linear layer, in diffusers' construction order), then every
GroupNorm's weight and bias drawn with `torch.randn` from a generator seeded 4243. Neither draw is CPU-independent:
`uniform_` computes `from + u * (to - from)` in float32, fused into one rounding (FMA) under ATen's AVX2 capability
and rounded twice under `ATEN_CPU_CAPABILITY=default` (1 ulp apart on about half the values), and `randn` fills
tensors of 16 or more values with a vectorized Box-Muller whose bits depend on the capability too (so until now
these cases skipped under another capability). The rebuild replays only what is exact everywhere and reads the rest:
- the convolution and linear weights: each layer's own `reset_parameters()` after `torch.manual_seed(4242)`, in the
  construction order recorded in `sdxl_layout_vae.json` (independent of how a diffusers version initializes), with
  `uniform_` replaced by `exact_uniform_`: the same 32-bit draws of the same generator (integer `random_`, serial
  on every CPU) and the fused rounding computed in float64 (u * (to - from) is exact there), then rounded once;
- the GroupNorm weights and biases (5952 values): `sdxl_layout_vae_norms.safetensors` (34 kB).
The result's sha256 must equal the one recorded with the fixtures (the tests assert it): `python -m
tests.reference_vaes` rewrites both files from the original recipe, and refuses unless that reproduces the hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

EXTRA = Path(__file__).parent / "golden" / "lpl_reference_extra"
RECIPE = EXTRA / "sdxl_layout_vae.json"
NORMS = EXTRA / "sdxl_layout_vae_norms.safetensors"


def recorded_sha256() -> str:
    """The weights' sha256 recorded with the extra fixtures."""
    return json.loads((EXTRA / "cases.json").read_text())["vaes"]["sdxl_layout_vae"]["weights_sha256"]


def weights_sha256(vae: nn.Module) -> str:
    """sha256 over the state dict (names and float32 bytes, in sorted name order), as recorded with the fixtures."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def exact_uniform_(tensor: torch.Tensor, low: float = 0.0, high: float = 1.0, *,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """`tensor.uniform_(low, high)` as ATen's AVX2 kernel computes it, with the same bits on every CPU.

    One 32-bit draw per value (`random_` on int32 keeps the low 31 bits; the kernel uses the low 24), u = draw / 2^24,
    then from + u * (to - from) with one rounding to float32: the product of two 24-bit values is exact in float64.
    """
    draws = torch.empty(tensor.shape, dtype=torch.int32).random_(generator=generator)
    low32, high32 = torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)
    unit = (draws & 0xFFFFFF).double() * 2.0 ** -24
    with torch.no_grad():
        return tensor.copy_((unit * (high32 - low32).double() + low32.double()).float())


@contextlib.contextmanager
def exact_uniform() -> Iterator[None]:
    """Within the block, `Tensor.uniform_` (which torch's default layer initializations call) is `exact_uniform_`."""
    saved = torch.Tensor.uniform_
    torch.Tensor.uniform_ = exact_uniform_  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.Tensor.uniform_ = saved  # type: ignore[method-assign]


def rebuild_sdxl_layout_vae() -> nn.Module:
    """The fixtures' `sdxl_layout_vae` from its recorded recipe and norms (check `weights_sha256` before use)."""
    from diffusers import AutoencoderKL

    recipe = json.loads(RECIPE.read_text())
    vae = AutoencoderKL(**recipe["config"])
    torch.manual_seed(recipe["seed"])
    with exact_uniform():
        for name in recipe["init_order"]:
            vae.get_submodule(name).reset_parameters()
    with torch.no_grad():
        for name, value in load_file(NORMS).items():
            vae.get_parameter(name).copy_(value)
    return vae.eval().requires_grad_(False)


def _original_recipe(config: dict) -> tuple[nn.Module, list[str]]:
    """The VAE as the fixtures were made (diffusers' construction, seeded GroupNorm draws) and its init order."""
    from diffusers import AutoencoderKL

    order: list[nn.Module] = []
    saved = {cls: cls.reset_parameters for cls in (nn.Conv2d, nn.Linear)}

    def recording(cls: type) -> object:
        def reset(self: nn.Module) -> None:
            order.append(self)
            saved[cls](self)
        return reset

    try:
        for cls in saved:
            cls.reset_parameters = recording(cls)  # type: ignore[method-assign]
        torch.manual_seed(4242)
        vae = AutoencoderKL(**config)
    finally:
        for cls, method in saved.items():
            cls.reset_parameters = method  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(4243)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(1.0 + 0.05 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=generator))
    names = {id(module): name for name, module in vae.named_modules()}
    return vae, [names[id(module)] for module in order]


def write_recipe() -> None:
    """Rewrite the recipe and norms files from the original recipe, if it reproduces the recorded weights here."""
    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 64, 64, 64], layers_per_block=2,
                  act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.13025,
                  force_upcast=True)
    vae, order = _original_recipe(config)
    if weights_sha256(vae) != recorded_sha256():
        raise SystemExit("the original recipe does not reproduce the recorded weights on this CPU/ATen capability "
                         "(torch.randn's vectorized path differs): run it where it does (e.g. an AVX2 capability)")
    norms = {f"{name}.{part}": getattr(module, part).detach().clone() for name, module in vae.named_modules()
             if isinstance(module, nn.GroupNorm) for part in ("weight", "bias")}
    RECIPE.write_text(json.dumps({"config": config, "seed": 4242, "init_order": order}, indent=1) + "\n")
    save_file(norms, NORMS)
    print(f"wrote {RECIPE.name} ({len(order)} layers) and {NORMS.name} ({sum(v.numel() for v in norms.values())} "
          f"values); rebuilt sha256 matches: {weights_sha256(rebuild_sdxl_layout_vae()) == recorded_sha256()}")


if __name__ == "__main__":
    write_recipe()
