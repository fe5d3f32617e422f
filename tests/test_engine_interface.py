"""The hook and the engine meet at one interface: each call's LPLResult (and a few documented read-only names).

Gradients the non-finite filter zeroes in the host's backward of step N count in step N's streak entry, read at
step N+1's one host read, so `lpl_max_bad_steps = k` stops a run at the call after its k-th bad step whether the
bad values showed in the forward pass or only in the backward; and the filter runs once per call in either mode.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from lpl_plugin import LatentPerceptualLoss, LPLConfig, LPLHook
from lpl_plugin.engine.guard import NonFiniteLPLError

from .test_loss import latents

HOOK_SOURCE = Path(__file__).resolve().parent.parent / "lpl_plugin" / "training" / "hook.py"
ENGINE_SURFACE = {"layer_names", "decoder_dtype", "device", "uses_loss_scale", "run_state", "load_run_state"}


def make_hook(vae, grad_mode: str, max_bad_steps: int = 0) -> LPLHook:
    """The lpl hook on every timestep with one up block, in the given gradient mode."""
    return LPLHook(vae, LPLConfig(use_lpl=True, lpl_t_threshold=1000, lpl_num_blocks=1, lpl_grad_mode=grad_mode,
                                  lpl_checkpointing="none", lpl_max_bad_steps=max_bad_steps))


def poison_backward_of_sample_1(hook: LPLHook) -> None:
    """A real forward hook on the decoder copy's first layer: a finite forward whose backward turns sample 1's
    gradient into NaN, as a float16 overflow in the decoder's backward does (autograd mode runs that backward)."""

    def register(module, inputs, output):
        """Poison the gradient flowing back through this layer's output."""
        if output.requires_grad:
            output.register_hook(lambda grad: torch.cat([grad[:1], grad[1:2] * float("nan"), grad[2:]]))

    hook.loss.trunk.conv_in.register_forward_hook(register)


def step(hook: LPLHook, z0: torch.Tensor, target: torch.Tensor, host_weights: torch.Tensor) -> torch.Tensor:
    """One training step of the hook as a host runs it: the call, then the host's backward; returns the gradient."""
    pred = z0.clone().requires_grad_(True)
    term = hook(latents=target, noisy_latents=target, timesteps=torch.tensor([5, 10]), model_pred=pred,
                prediction_type="sample", alphas_cumprod=None, sigmas=None, noise_weights=None, snr_gamma=None,
                step=0, is_training=True, log_stats=False).loss
    (term * host_weights).sum().backward()
    return pred.grad


def bad_backward(vae, grad_mode: str, max_bad_steps: int = 0) -> tuple[LPLHook, torch.Tensor]:
    """A hook whose every step is finite in the forward pass and has sample 1's gradient non-finite in backward:
    in autograd mode through the decoder, in lean mode through the host's own weights (its NaN for sample 1
    reaches the stored gradient)."""
    hook = make_hook(vae, grad_mode, max_bad_steps)
    weights = torch.ones(2)
    if grad_mode == "autograd":
        poison_backward_of_sample_1(hook)
    else:
        weights[1] = float("nan")
    return hook, weights


@pytest.mark.parametrize("grad_mode", ["autograd", "lean"])
def test_gradients_zeroed_in_backward_stop_the_run_at_the_promised_call(vae, grad_mode):
    hook, weights = bad_backward(vae, grad_mode, max_bad_steps=2)
    pred, target = latents(batch=2)
    for _ in range(2):  # two bad steps are allowed ...
        grad = step(hook, pred, target, weights)
        assert torch.isfinite(grad).all() and grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0
    with pytest.raises(NonFiniteLPLError, match="2 evaluations in a row"):
        step(hook, pred, target, weights)  # ... and the call after the second one stops the run


@pytest.mark.parametrize("grad_mode", ["autograd", "lean"])
def test_a_step_counts_its_own_backward_at_the_next_read(vae, grad_mode):
    hook, weights = bad_backward(vae, grad_mode)
    pred, target = latents(batch=2)
    step(hook, pred, target, weights)
    hook.guard.settle()  # what the next step's one host read does first
    assert (int(hook.guard.streak), int(hook.guard.bad_steps)) == (1, 1)
    state = hook.state_dict()  # saving between steps settles too
    assert state["guard"] == {"streak": 1, "bad_steps": 1} and state["engine"]["counters"]["nonfinite_samples"] == 1
    clean = make_hook(vae, grad_mode)
    step(clean, pred, target, torch.ones(2))
    clean.guard.settle()
    assert (int(clean.guard.streak), int(clean.guard.bad_steps)) == (0, 0)


def finite_gradient_nodes(tensor: torch.Tensor) -> int:
    """How many non-finite filters stand in the autograd graph behind `tensor`."""
    seen, stack, count = set(), [tensor.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += "FiniteGradient" in type(node).__name__
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


@pytest.mark.parametrize("grad_mode", ["autograd", "lean"])
def test_the_filter_is_applied_once_and_counts_a_zeroed_gradient_once(vae, grad_mode):
    hook, weights = bad_backward(vae, grad_mode)
    pred, target = latents(batch=2)
    leaf = pred.clone().requires_grad_(True)
    term = hook(latents=target, noisy_latents=target, timesteps=torch.tensor([5, 10]), model_pred=leaf,
                prediction_type="sample", alphas_cumprod=None, sigmas=None, noise_weights=None, snr_gamma=None,
                step=0, is_training=True, log_stats=False).loss
    assert finite_gradient_nodes(term) == 1
    (term * weights).sum().backward()
    assert leaf.grad[1].abs().sum() == 0 and int(hook.loss.state.zeroed) == 1


@pytest.mark.parametrize("grad_mode", ["autograd", "lean"])
def test_the_result_carries_its_own_backward_count_and_the_running_counters(vae, grad_mode):
    engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_num_blocks=1, lpl_grad_mode=grad_mode))
    pred, target = latents(batch=2)
    leaf = pred.clone().requires_grad_(True)
    first = engine(leaf, target)
    assert int(first.nonfinite_in_backward) == 0  # the host's backward has not run yet
    (first.per_sample * torch.tensor([1.0, float("nan")])).sum().backward()
    assert int(first.nonfinite_in_backward) == 1 and int(first.nonfinite_in_call) == 0
    second = engine(leaf.detach().requires_grad_(True), target)
    assert int(first.nonfinite_in_backward) == 1 and int(second.nonfinite_in_backward) == 0
    assert int(second.nonfinite) == 1 and int(second.nonfinite_total) == 1  # reported once, by the next call
    assert (second.oom_retries, second.oom_skips, second.loss_scale) == (0, 0, None)
    assert int(second.scale_floor_hits) == 0 and not engine.uses_loss_scale
    assert engine.layer_names == ["mid", "up0"] and engine.decoder_dtype == torch.float32


def test_the_hook_reads_only_the_engines_documented_surface():
    """Every attribute the hook takes from its engine (`self.loss.X`) is one of the engine's read-only names."""
    used = {node.attr for node in ast.walk(ast.parse(HOOK_SOURCE.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "loss" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used and used <= ENGINE_SURFACE, used - ENGINE_SURFACE
