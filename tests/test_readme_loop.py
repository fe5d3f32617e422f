"""The README's "Using it from your own training loop" example, extracted from README.md and run with tiny models."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lpl_plugin.engine.tiny import SDXL_SCALING_FACTOR, sdxl_conditioning

README = Path(__file__).resolve().parent.parent / "README.md"


def example() -> str:
    """The first python code block of the README section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Using it from your own training loop", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_trains_a_tiny_unet_with_lpl(vae, unet):
    from diffusers import DDPMScheduler

    namespace: dict = {}
    exec(compile(example(), "README.md (own training loop)", "exec"), namespace)
    registry = namespace["make_registry"](vae, "cpu")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    latents = vae.encode(torch.rand(4, 3, 64, 64) * 2 - 1).latent_dist.mean.detach() * SDXL_SCALING_FACTOR
    text, added = sdxl_conditioning(4, 64)
    for seed in range(20):  # a step where some sample falls below lpl_t_threshold = 200
        torch.manual_seed(seed)
        loss, logs = namespace["training_loss"](registry, unet, scheduler, latents, text, added, global_step=0)
        if float(logs["lpl/applied_fraction"]) > 0:
            break
    assert float(logs["lpl/weighted"]) > 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters() if p.requires_grad)


def test_readme_engine_example_runs_and_its_result_is_as_described(vae):
    import json

    import lpl_plugin

    section = README.read_text(encoding="utf-8").split("### The engine on its own", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    namespace = {"lpl_plugin": lpl_plugin, "vae": vae, "z0": z0,
                 "z0_hat": (z0 + 0.3 * torch.randn(z0.shape, generator=g)).requires_grad_(True)}
    exec(compile(code, "README.md (engine)", "exec"), namespace)
    result = namespace["result"]
    assert result.per_sample.shape == (2,) and result.layers.shape == (2, 5) and not result.skipped
    assert int(result.nonfinite) == 0 and namespace["z0_hat"].grad.abs().sum() > 0
    saved = json.loads(json.dumps(namespace["engine"].state.state_dict()))
    assert saved["counters"]["calls"] == 1 and saved["learned"]["chunk_size"] == 1
