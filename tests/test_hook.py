"""The built-in `lpl` hook: gating, start step, weights, reduction, logging, and a real tiny training loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lpl_plugin import HookRegistry, LossContext, LPLConfig, LPLHook, predict_z0
from lpl_plugin.engine.tiny import sdxl_conditioning, tiny_unet


@pytest.fixture(scope="module")
def scheduler():
    """SDXL's training noise schedule."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def step_context(scheduler, timesteps, *, step=0, prediction_type="epsilon", seed=0, **changes):
    """A LossContext for a batch with the given timesteps and an imperfect prediction."""
    g = torch.Generator().manual_seed(seed)
    batch = len(timesteps)
    z0 = torch.randn(batch, 4, 8, 8, generator=g)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.tensor(timesteps)
    x_t = scheduler.add_noise(z0, noise, t)
    pred = (noise + 0.2 * torch.randn(z0.shape, generator=g)).requires_grad_(True)
    fields = dict(latents=z0, noisy_latents=x_t, timesteps=t, model_pred=pred, target=noise,
                  prediction_type=prediction_type, alphas_cumprod=scheduler.alphas_cumprod, step=step)
    fields.update(changes)
    return LossContext(**fields)


def hook_registry(vae, **options):
    """A registry holding only the lpl hook built with the given options."""
    registry = HookRegistry()
    hook = LPLHook(vae, LPLConfig(use_lpl=True, **options))
    registry.register("lpl", hook)
    return registry, hook


def test_gate_zeroes_samples_above_threshold(vae, scheduler):
    registry, hook = hook_registry(vae, lpl_scale=False)
    ctx = step_context(scheduler, [10, 500, 150, 999])
    applied = registry.apply(ctx)
    assert (applied.loss[[1, 3]] == 0).all() and (applied.loss[[0, 2]] > 0).all()
    assert applied.logs["lpl/applied_fraction"] == 0.5
    z0_hat = predict_z0(ctx.model_pred[[0, 2]], ctx.noisy_latents[[0, 2]], "epsilon", timesteps=ctx.timesteps[[0, 2]],
                        alphas_cumprod=scheduler.alphas_cumprod)
    torch.testing.assert_close(applied.loss[[0, 2]], hook.loss(z0_hat, ctx.latents[[0, 2]]).per_sample)


def test_epsilon_at_zero_terminal_snr_gets_no_lpl_and_stays_finite(vae):
    zero_snr = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012, rescale_betas_zero_snr=True)
    assert zero_snr.alphas_cumprod[999] == 0
    registry, hook = hook_registry(vae, lpl_t_threshold=1000)
    ctx = step_context(zero_snr, [10, 999])
    applied = registry.apply(ctx)
    assert applied.loss[1] == 0 and applied.loss[0] > 0 and applied.logs["lpl/applied_fraction"] == 0.5
    applied.loss.sum().backward()
    grad = ctx.model_pred.grad
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_no_gated_sample_skips_the_decoder(vae, scheduler):
    registry, hook = hook_registry(vae)
    applied = registry.apply(step_context(scheduler, [400, 900]))
    assert torch.equal(applied.loss, torch.zeros(2)) and hook.loss.state.calls == 0
    assert applied.logs == {"lpl/applied_fraction": 0.0, "lpl/loss": 0.0}


def test_start_step_validation_and_off(vae, scheduler):
    registry, hook = hook_registry(vae, lpl_start=5)
    assert registry.apply(step_context(scheduler, [10, 20], step=4)).loss.abs().sum() == 0
    assert registry.apply(step_context(scheduler, [10, 20], step=5)).loss.abs().sum() > 0
    assert registry.apply(step_context(scheduler, [10, 20], step=9, is_training=False)).loss.abs().sum() == 0
    off = HookRegistry()
    off.register("lpl", LPLHook(vae, LPLConfig(use_lpl=False)))
    assert off.apply(step_context(scheduler, [10, 20])).loss.abs().sum() == 0


def test_weight_and_whole_batch_reduction(vae, scheduler):
    ctx = step_context(scheduler, [10, 20, 800, 900])
    one = hook_registry(vae, lpl_scale=False)[0].apply(ctx).loss
    two = hook_registry(vae, lpl_scale=False, lpl_weight=2.0)[0].apply(ctx).loss
    torch.testing.assert_close(two, 2 * one)
    compat = hook_registry(vae, lpl_scale=False, lpl_compat="diffusers")[0]
    compat_value = compat.apply(ctx).loss
    reference_style = compat.get("lpl").loss(  # the reference: mean over the gated samples only
        predict_z0(ctx.model_pred[:2], ctx.noisy_latents[:2], "epsilon", timesteps=ctx.timesteps[:2],
                   alphas_cumprod=scheduler.alphas_cumprod), ctx.latents[:2]).per_sample.mean()
    torch.testing.assert_close(compat_value.mean(), reference_style)


def test_scale_uses_host_weights_or_min_snr(vae, scheduler):
    ctx = step_context(scheduler, [10, 150])
    plain = hook_registry(vae, lpl_scale=False)[0].apply(ctx).loss
    host = torch.tensor([0.25, 4.0])
    with_host = hook_registry(vae)[0].apply(step_context(scheduler, [10, 150], noise_weights=host)).loss
    torch.testing.assert_close(with_host, plain * host)
    snr = scheduler.alphas_cumprod[[10, 150]] / (1 - scheduler.alphas_cumprod[[10, 150]])
    own = hook_registry(vae, lpl_snr_gamma=5.0)[0].apply(ctx).loss
    torch.testing.assert_close(own, plain * torch.clamp(snr, max=5.0) / snr)
    compat = hook_registry(vae, lpl_compat="diffusers")[0].apply(ctx).loss  # reference: no gamma, no scaling
    torch.testing.assert_close(compat, hook_registry(vae, lpl_compat="diffusers", lpl_scale=False)[0].apply(ctx).loss)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow_matching"])
def test_every_prediction_type(vae, scheduler, prediction_type):
    registry, _ = hook_registry(vae)
    sigmas = torch.tensor([0.05, 0.1]) if prediction_type == "flow_matching" else None
    ctx = step_context(scheduler, [10, 100], prediction_type=prediction_type, sigmas=sigmas)
    applied = registry.apply(ctx)
    assert torch.isfinite(applied.loss).all() and (applied.loss > 0).all()
    applied.loss.sum().backward()
    assert ctx.model_pred.grad.abs().sum() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow_matching"])
def test_z0_hat_of_every_prediction_type_is_the_closed_form(vae, scheduler, prediction_type):
    g = torch.Generator().manual_seed(5)
    z0, eps, output = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([10, 150])
    if prediction_type == "flow_matching":
        s = torch.tensor([0.05, 0.2], dtype=torch.float64).reshape(2, 1, 1, 1)
        x_t = (1 - s) * z0 + s * eps
        want = x_t - s * output  # x_t = (1 - s) z0 + s eps, v = eps - z0
    else:
        a = scheduler.alphas_cumprod.double()[t].reshape(2, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        want = {"epsilon": (x_t - (1 - a).sqrt() * output) / a.sqrt(),
                "v_prediction": a.sqrt() * x_t - (1 - a).sqrt() * output, "sample": output}[prediction_type]
    registry, hook = hook_registry(vae, lpl_scale=False)
    ctx = LossContext(latents=z0.float(), noisy_latents=x_t.float(), timesteps=t, model_pred=output.float(),
                      target=eps.float(), prediction_type=prediction_type, alphas_cumprod=scheduler.alphas_cumprod,
                      sigmas=torch.tensor([0.05, 0.2]) if prediction_type == "flow_matching" else None)
    expected = hook.loss(want.float(), z0.float()).per_sample
    torch.testing.assert_close(registry.apply(ctx).loss, expected, rtol=2e-4, atol=1e-8)


def test_logging_only_on_log_steps(vae, scheduler):
    registry, _ = hook_registry(vae)
    quiet = registry.apply(step_context(scheduler, [10, 20]))
    assert not any(k.startswith("lpl/layer/") for k in quiet.logs)
    assert all(not isinstance(v, torch.Tensor) or v.grad_fn is None for v in quiet.logs.values())
    loud = registry.apply(step_context(scheduler, [10, 20], log_stats=True))
    assert {f"lpl/layer/{n}" for n in ["mid", "up0", "up1", "up2", "up3"]} <= set(loud.logs)


def train(vae, scheduler, use_lpl: bool, steps: int = 3):
    """A few optimizer steps of a tiny SDXL-shaped UNet with the registry at the loss; returns the UNet."""
    unet = tiny_unet(seed=1)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    registry = HookRegistry()
    registry.register("lpl", LPLHook(vae, LPLConfig(use_lpl=use_lpl, lpl_t_threshold=1000)))
    text, added = sdxl_conditioning(2, 64)
    g = torch.Generator().manual_seed(0)
    grads = []
    for step in range(steps):
        z0 = torch.randn(2, 4, 8, 8, generator=g)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        x_t = scheduler.add_noise(z0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        per_sample = torch.nn.functional.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        ctx = LossContext(latents=z0, noisy_latents=x_t, timesteps=t, model_pred=pred, target=noise,
                          alphas_cumprod=scheduler.alphas_cumprod, step=step)
        loss = (per_sample + registry.apply(ctx).loss).mean()
        optimizer.zero_grad()
        loss.backward()
        grads.append(unet.conv_in.weight.grad.clone())
        optimizer.step()
    return unet, grads


def test_lpl_gradient_reaches_the_unet(vae, scheduler):
    with_lpl, grads_on = train(vae, scheduler, True)
    without, grads_off = train(vae, scheduler, False)
    assert not torch.allclose(grads_on[0], grads_off[0])
    assert all(torch.isfinite(p).all() for p in with_lpl.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(with_lpl.parameters(), without.parameters()))


def test_state_round_trips_through_json(vae):
    import json

    hook = LPLHook(vae, LPLConfig(use_lpl=True, lpl_dtype="float16", lpl_chunk_size=4))
    hook.guard.record(torch.tensor(3))
    hook.guard.record(torch.tensor(1))
    state = hook.loss.state
    state.chunk_size, state.checkpointing, state.oom_skips = 1, "resnet", 2  # learned after running out of memory
    state.loss_scale.update(torch.tensor(True))
    saved = json.loads(json.dumps(hook.state_dict()))
    fresh = LPLHook(vae, LPLConfig(use_lpl=True, lpl_dtype="float16", lpl_chunk_size=4))
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved
    learned = fresh.loss.state
    assert (learned.chunk_size, learned.checkpointing, learned.oom_skips) == (1, "resnet", 2)
    assert float(learned.loss_scale.value) == 2.0 ** 15 and int(fresh.guard.streak) == 2


def test_resume_keeps_the_runs_own_settings_and_says_what_differed(vae, caplog):
    import logging

    hook = LPLHook(vae, LPLConfig(use_lpl=True, lpl_dtype="float16", lpl_chunk_size=4))
    state = hook.loss.state
    state.chunk_size, state.checkpointing, state.oom_skips = 1, "resnet", 2
    state.loss_scale.update(torch.tensor(True))
    saved = hook.state_dict()
    changed = LPLHook(vae, LPLConfig(use_lpl=True, lpl_chunk_size=2, lpl_checkpointing="none"))
    with caplog.at_level(logging.WARNING, logger="lpl_plugin"):
        changed.load_state_dict(saved)
    learned = changed.loss.state
    assert (learned.chunk_size, learned.checkpointing) == (2, "none")  # the user's new settings win
    assert float(learned.loss_scale.value) == 1.0 and learned.oom_skips == 2  # float32 now: no scale; counters stay
    assert "saved with other settings" in caplog.text
    for text in ("lpl_chunk_size = 4 then, 2 now", "lpl_checkpointing = 'auto' then, 'none' now",
                 "lpl_dtype = 'float16' then, 'float32' now"):
        assert text in caplog.text
    caplog.clear()
    same = LPLHook(vae, LPLConfig(use_lpl=True, lpl_dtype="float16", lpl_chunk_size=4))
    with caplog.at_level(logging.WARNING, logger="lpl_plugin"):
        same.load_state_dict(saved)
    assert same.loss.state.chunk_size == 1 and same.loss.state.checkpointing == "resnet" and not caplog.text


def test_state_saved_by_version_0_1_restores_its_counters_only(vae):
    hook = LPLHook(vae, LPLConfig(use_lpl=True, lpl_chunk_size=4))
    hook.load_state_dict({"streak": 2, "bad_steps": 3, "nonfinite_samples": 5, "oom_skips": 1, "chunk_size": 1,
                          "loss_scale": 8.0})
    state = hook.loss.state
    assert (int(hook.guard.streak), int(hook.guard.bad_steps), int(state.nonfinite_samples)) == (2, 3, 5)
    assert state.oom_skips == 1 and state.chunk_size == 4  # 0.1 overrode the user's chunk size; no longer


@pytest.mark.parametrize("grad_mode", ["lean", "autograd"])
def test_a_step_draws_nothing_from_the_global_random_generators(vae, scheduler, grad_mode):
    """Hosts order their data with Python's `random`, numpy and torch's global generators (sd-scripts reseeds and
    shuffles its buckets with `random`): a step with LPL, forward and backward, leaves all three as it found them."""
    import random

    import numpy as np

    registry = hook_registry(vae, lpl_grad_mode=grad_mode, lpl_t_threshold=1000)[0]
    ctx = step_context(scheduler, [10, 500, 900])
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    applied = registry.apply(ctx)
    applied.loss.sum().backward()
    assert ctx.model_pred.grad is not None and ctx.model_pred.grad.abs().sum() > 0
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
