"""The SDXL-VAE float16 overflow, reproduced on a tiny VAE: float16 overflows and is guarded; the default avoids it."""

from __future__ import annotations

import copy

import pytest
import torch

from lpl_plugin import LPLConfig, LPLHook
from lpl_plugin.engine.precision import resolve_dtype

FP16_MAX = torch.finfo(torch.float16).max  # 65504


@pytest.fixture(scope="module")
def hot_vae(vae):
    """The tiny VAE with post_quant_conv scaled up, so decoder activations pass float16's range (as SDXL's do)."""
    hot = copy.deepcopy(vae)
    with torch.no_grad():
        hot.post_quant_conv.weight.mul_(30000.0)
    return hot


def run(hot_vae, dtype: str):
    """The hook's decoder features and one LPL evaluation on the same latents, with the given lpl_dtype."""
    hook = LPLHook(hot_vae, LPLConfig(use_lpl=True, lpl_dtype=dtype, lpl_num_blocks=1, lpl_checkpointing="none",
                                      lpl_t_threshold=1000))
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 4, 4, generator=g)
    pred = (z0 + 0.3 * torch.randn(z0.shape, generator=g)).requires_grad_(True)
    features = hook.loss.trunk(hook.loss.unscale(z0))
    result = hook(latents=z0, noisy_latents=z0, timesteps=torch.tensor([5, 10]), model_pred=pred,
                  prediction_type="sample", alphas_cumprod=None, sigmas=None, noise_weights=None, snr_gamma=None,
                  step=0, is_training=True, log_stats=False)
    result.loss.sum().backward()
    return hook, features, result.loss.detach(), pred.grad


def test_float16_overflows_and_the_guard_catches_it(hot_vae):
    hook, features, loss, grad = run(hot_vae, "float16")
    assert features[0].dtype == torch.float16
    assert not all(torch.isfinite(f).all() for f in features), "the raw float16 features overflow"
    assert torch.equal(loss, torch.zeros(2)) and torch.equal(grad, torch.zeros_like(grad))
    assert int(hook.loss.state.nonfinite_samples) == 2 and int(hook.guard.streak) == 1


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_default_and_bfloat16_stay_finite(hot_vae, dtype):
    hook, features, loss, grad = run(hot_vae, dtype)
    expected = resolve_dtype(dtype, torch.device("cpu"))
    assert features[0].dtype == expected and (dtype != "auto" or expected == torch.float32)
    assert max(float(f.float().abs().max()) for f in features) > FP16_MAX, "the activations exceed float16's range"
    assert all(torch.isfinite(f).all() for f in features)  # bfloat16 has float32's exponent range
    assert (loss > 0).all() and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert int(hook.loss.state.nonfinite_samples) == 0 and int(hook.guard.bad_steps) == 0
