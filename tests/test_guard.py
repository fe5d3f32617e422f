"""The non-finite guard: inf/NaN in latents or decoder activations add zero gradient, are counted, and stop a run."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler

from lpl_plugin import HookRegistry, LossContext, LPLConfig, LPLHook, UserError
from lpl_plugin.engine.guard import NonFiniteGuard, NonFiniteLPLError, stop_message
from lpl_plugin.engine.tiny import sdxl_conditioning, tiny_unet

SCHEDULER = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
BATCH, SIDE = 2, 8


def make_hook(vae, **options) -> LPLHook:
    """The lpl hook on every timestep, two up blocks (enough decoder, little CPU time)."""
    settings = dict(use_lpl=True, lpl_t_threshold=1000, lpl_num_blocks=2, lpl_checkpointing="none")
    settings.update(options)
    return LPLHook(vae, LPLConfig(**settings))


def batch(step: int):
    """Clean latents, noise and timesteps of one step, the same in every run."""
    g = torch.Generator().manual_seed(100 + step)
    z0 = torch.randn(BATCH, 4, SIDE, SIDE, generator=g)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    return z0, noise, t


def train_step(unet, optimizer, hook: LPLHook | None, step: int, *, poison_latents: bool = False):
    """One optimizer step of the tiny UNet: the host's MSE plus the hook's term; returns (host loss, LPL term)."""
    z0, noise, t = batch(step)
    x_t = SCHEDULER.add_noise(z0, noise, t)
    text, added = sdxl_conditioning(BATCH, SIDE * 8)
    pred = unet(x_t, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
    host = torch.nn.functional.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    extra = torch.zeros(BATCH)
    if hook is not None:  # a run "with LPL skipped for this step" passes no hook
        registry = HookRegistry()
        registry.register("lpl", hook)
        latents = torch.full_like(z0, float("nan")) if poison_latents else z0
        extra = registry.apply(LossContext(latents=latents, noisy_latents=x_t, timesteps=t, model_pred=pred,
                                           target=noise, alphas_cumprod=SCHEDULER.alphas_cumprod, step=step)).loss
    optimizer.zero_grad()
    (host + extra).mean().backward()
    optimizer.step()
    return host.detach(), extra.detach()


class InfActivations:
    """A real forward hook on a decoder stage of the LPL copy that turns its output into +inf while armed."""

    def __init__(self, module: torch.nn.Module):
        self.armed = False
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        return output + float("inf") if self.armed else output


@pytest.fixture(scope="module")
def after_first_step(vae):
    """UNet and optimizer state after one clean step with LPL, shared by every injection below."""
    unet = tiny_unet(seed=1)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    train_step(unet, optimizer, make_hook(vae), 0)
    return copy.deepcopy(unet.state_dict()), copy.deepcopy(optimizer.state_dict())


def resume(state):
    """A UNet and optimizer restored from a saved state."""
    unet = tiny_unet(seed=1)
    unet.load_state_dict(state[0])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    optimizer.load_state_dict(copy.deepcopy(state[1]))  # loading aliases the saved moment tensors
    return unet, optimizer


@pytest.fixture(scope="module")
def skipped(after_first_step):
    """The reference: the second step with LPL skipped."""
    unet, optimizer = resume(after_first_step)
    host, _ = train_step(unet, optimizer, None, 1)
    return unet, host


@pytest.mark.parametrize("inject, grad_mode", [
    ("latents", "lean"), ("activations", "lean"), ("activations", "autograd"),
])
def test_bad_step_equals_a_step_without_lpl(vae, after_first_step, skipped, inject, grad_mode):
    reference, reference_host = skipped
    unet, optimizer = resume(after_first_step)
    hook = make_hook(vae, lpl_grad_mode=grad_mode)
    spy = InfActivations(hook.loss.trunk.up_blocks[1])
    spy.armed = inject == "activations"
    host, extra = train_step(unet, optimizer, hook, 1, poison_latents=inject == "latents")
    assert torch.equal(extra, torch.zeros(BATCH)), "a non-finite sample must contribute exactly zero"
    assert torch.equal(host, reference_host), "the host's own loss is untouched"
    assert int(hook.loss.state.nonfinite_samples) == BATCH and int(hook.guard.bad_steps) == 1
    for (name, mine), theirs in zip(unet.named_parameters(), reference.parameters()):
        assert torch.isfinite(mine).all(), name
        assert torch.equal(mine, theirs), name
    spy.handle.remove()


def test_streak_stops_the_run_with_cause_and_fix(vae):
    hook = make_hook(vae, lpl_max_bad_steps=3, lpl_t_threshold=500)
    z0, noise, _ = batch(0)
    bad = torch.full_like(z0, float("nan"))
    low, high = torch.tensor([10, 20]), torch.tensor([900, 950])

    def call(step, latents, timesteps=low, log_stats=False):
        return hook(latents=latents, noisy_latents=noise, timesteps=timesteps, model_pred=noise,
                    prediction_type="epsilon", alphas_cumprod=SCHEDULER.alphas_cumprod, sigmas=None,
                    noise_weights=None, snr_gamma=None, step=step, is_training=True, log_stats=log_stats)

    call(0, bad)
    call(1, z0)  # a clean evaluation resets the streak
    call(2, bad)
    call(3, bad)
    call(4, bad, high)  # no sample gated: LPL did not run, the streak stays
    assert int(hook.guard.streak) == 2
    logged = call(5, bad, log_stats=True)
    assert float(logged.logs["lpl/nonfinite_steps"]) == 4 and float(logged.logs["lpl/nonfinite_samples"]) == 8
    with pytest.raises(NonFiniteLPLError) as info:
        call(6, z0)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "3 evaluations in a row" in message and "lpl_max_bad_steps = 3" in message
    assert 'lpl_dtype = "bfloat16"' in message and "madebyollin/sdxl-vae-fp16-fix" in message


def test_steps_without_lpl_leave_the_streak_and_zero_never_stops():
    guard = NonFiniteGuard(3, torch.float32, torch.device("cpu"))
    for bad in (1, 2, 0, 1, 1):
        guard.record(torch.tensor(bad))
    assert int(guard.streak) == 2 and int(guard.bad_steps) == 4
    guard.check(2)
    with pytest.raises(NonFiniteLPLError, match="no_half_vae"):
        guard.check(3)
    NonFiniteGuard(0, torch.float16, torch.device("cpu")).check(10 ** 6)
    assert "the SDXL VAE overflows in float16" in stop_message(5, 5, torch.float16)


@pytest.mark.parametrize("grad_mode", ["lean", "autograd"])
@pytest.mark.parametrize("where", ["target", "prediction", "both"])
def test_a_non_finite_value_hidden_by_the_outlier_mask_still_zeroes_its_sample(vae, grad_mode, where):
    from lpl_plugin import LatentPerceptualLoss

    engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_grad_mode=grad_mode, lpl_num_blocks=3))
    poisoned = {"value": None}
    calls = {True: 0, False: 0}  # per pass kind (prediction: with a graph); lean runs one sample per call

    def poison(module, inputs, output):
        """Sample 1 of a masked layer (up1) gets a NaN in one corner, in the chosen pass."""
        with_grad = output.requires_grad
        calls[with_grad] += 1
        sample = 1 if output.shape[0] == 2 else (0 if calls[with_grad] == 2 else None)
        if sample is not None and (where == "both" or (where == "prediction") == with_grad):
            output = output.clone()
            output[sample, 0, 0, 0] = float("nan")
            poisoned["value"] = True
        return output

    engine.trunk.up_blocks[1].register_forward_hook(poison)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=g)
    pred = (target + 0.3 * torch.randn(target.shape, generator=g)).requires_grad_(True)
    result = engine(pred, target, with_layers=True)
    result.per_sample.sum().backward()
    assert poisoned["value"] and result.per_sample[1] == 0 and result.per_sample[0] > 0
    assert torch.equal(pred.grad[1], torch.zeros_like(pred.grad[1])) and pred.grad[0].abs().sum() > 0
    assert int(result.nonfinite) == 1
