"""z0_hat and SNR weights against closed forms: a perfect prediction recovers z0 for every prediction type."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lpl_plugin import min_snr_weight, predict_z0, snr


@pytest.fixture(scope="module")
def scheduler():
    """SDXL's training noise schedule."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def batch():
    """Clean latents, noise and timesteps spanning the schedule."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 10, 199, 999])


def test_perfect_epsilon_and_v_predictions_recover_z0(scheduler, batch):
    z0, eps, t = batch
    x_t = scheduler.add_noise(z0, eps, t)
    ac = scheduler.alphas_cumprod
    got = predict_z0(eps, x_t, "epsilon", timesteps=t, alphas_cumprod=ac)
    torch.testing.assert_close(got, z0, rtol=0, atol=2e-3)  # t=999: z0 = (x_t - 0.998 eps) / 0.068 amplifies rounding
    torch.testing.assert_close(got[:3], z0[:3], rtol=1e-5, atol=1e-5)
    v = scheduler.get_velocity(z0, eps, t)
    torch.testing.assert_close(predict_z0(v, x_t, "v_prediction", timesteps=t, alphas_cumprod=ac), z0,
                               rtol=1e-5, atol=1e-5)


def test_sample_and_flow_matching(batch):
    z0, eps, _ = batch
    assert torch.equal(predict_z0(z0, torch.zeros_like(z0), "sample"), z0)
    s = torch.tensor([0.01, 0.3, 0.7, 0.99])
    x_t = (1 - s.view(-1, 1, 1, 1)) * z0 + s.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(predict_z0(eps - z0, x_t, "flow_matching", sigmas=s), z0, rtol=1e-5, atol=1e-5)


def test_half_precision_inputs_are_computed_in_float32(scheduler, batch):
    z0, eps, t = batch
    x_t = scheduler.add_noise(z0, eps, t)
    got = predict_z0(eps.half(), x_t.half(), "epsilon", timesteps=t, alphas_cumprod=scheduler.alphas_cumprod)
    assert got.dtype == torch.float32


def test_snr_and_min_snr_closed_forms(scheduler):
    t = torch.tensor([0, 199, 999])
    ac = scheduler.alphas_cumprod.double()[t]
    expected = ac / (1 - ac)
    values = snr(timesteps=t, alphas_cumprod=scheduler.alphas_cumprod)
    torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=0)
    gamma = 5.0
    clipped = torch.clamp(values, max=gamma)
    torch.testing.assert_close(min_snr_weight(values, gamma, "epsilon"), clipped / values)
    torch.testing.assert_close(min_snr_weight(values, gamma, "v_prediction"), clipped / (values + 1))
    torch.testing.assert_close(min_snr_weight(values, gamma, "sample"), clipped)
    s = torch.tensor([0.5])
    assert snr(sigmas=s).item() == pytest.approx(1.0)


def test_bad_prediction_type_and_missing_schedule(batch):
    z0, _, t = batch
    with pytest.raises(ValueError, match="prediction type must be one of"):
        predict_z0(z0, z0, "x0", timesteps=t, alphas_cumprod=torch.ones(1000))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        predict_z0(z0, z0, "epsilon")
    with pytest.raises(ValueError, match="sigmas"):
        predict_z0(z0, z0, "flow_matching")
