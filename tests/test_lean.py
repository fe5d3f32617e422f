"""The memory-lean engine: frozen decoder blocks, the sliced layer gradient, float16 loss scaling, host autocast."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
from torch import nn

from lpl_plugin import LatentPerceptualLoss, LPLConfig

from lpl_plugin.engine import tensors
from lpl_plugin.engine.frozen import FrozenConv2d, LeanResnet, LeanUpsample, freeze_layers
from lpl_plugin.engine.precision import LossScale
from lpl_plugin.engine.tiny import tiny_vae

from .test_loss import latents


@pytest.fixture()
def small_slices(monkeypatch):
    """Force many channel slices, so that slicing is exercised on tiny maps."""
    monkeypatch.setattr(tensors, "SLICE_ELEMENTS", 40)


@pytest.fixture(scope="module")
def small_vae():
    """A three-block VAE with 8 channels everywhere, for option sweeps."""
    return tiny_vae((8, 8, 8), layers_per_block=1, groups=4)


def graph_nodes(output: torch.Tensor) -> list:
    """Every autograd node behind a tensor."""
    seen, stack = [], [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or any(node is s for s in seen):
            continue
        seen.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return seen


def test_decoder_copy_runs_lean_blocks_with_unchanged_features(vae):
    trunk = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True)).trunk
    stages = [trunk.mid_block, *trunk.up_blocks]
    assert all(isinstance(r, LeanResnet) for s in stages for r in s.resnets)
    assert all(isinstance(u, LeanUpsample) for s in trunk.up_blocks for u in (s.upsamplers or []))
    assert isinstance(trunk.conv_in, FrozenConv2d) and isinstance(trunk.post_quant_conv, FrozenConv2d)
    assert {k for k, _ in trunk.named_parameters()} <= {"post_quant_conv." + k for k, _ in
                                                        vae.post_quant_conv.named_parameters()} | \
        {k for k, _ in vae.decoder.named_parameters()}  # parameter names are unchanged
    z = latents()[1]

    def diffusers_features(model, z):
        """The stage outputs of a diffusers decoder."""
        x = model.decoder.conv_in(model.post_quant_conv(z))
        features = [x := model.decoder.mid_block(x)]
        for block in model.decoder.up_blocks:
            features.append(x := block(x))
        return features

    with torch.no_grad():  # float32 rounding only: no further from the float64 features than diffusers' own
        exact = diffusers_features(copy.deepcopy(vae).double(), z.double())
        for got, want, truth in zip(trunk(z), diffusers_features(vae, z), exact, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
            assert (got - truth).abs().max() <= 4 * (want - truth).abs().max() + 1e-7


def test_block_recomputation_keeps_only_the_stage_input(vae):
    trunk = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True)).trunk
    x = torch.randn(1, 32, 8, 8, requires_grad=True)
    out = trunk.stage(2, x, "block")  # up block 1: three ResNet blocks and an upsampler, recomputed in backward
    nodes = graph_nodes(out)
    assert [type(n).__name__ for n in nodes] == ["_RecomputeBackward", "AccumulateGrad"]
    saved = nodes[0].saved_tensors
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()  # nothing else survives the forward pass
    assert not any(isinstance(v, torch.Tensor) for v in vars(nodes[0]).values())
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    (want,) = torch.autograd.grad(trunk.stage(2, x, "none"), x, torch.ones_like(out))
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", ["none", "resnet"])
def test_lean_blocks_keep_only_what_backward_needs(vae, checkpointing):
    trunk = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True)).trunk
    x = torch.randn(1, 32, 8, 8, requires_grad=True)
    out = trunk.stage(2, x, checkpointing)  # up block 1: three ResNet blocks and an upsampler
    nodes = {type(n).__name__: n for n in graph_nodes(out)}
    resnets = [n for n in graph_nodes(out) if type(n).__name__ == "_ResnetFunctionBackward"]
    assert len(resnets) == 3 and "_UpsampleFunctionBackward" in nodes
    assert nodes["_UpsampleFunctionBackward"].saved_tensors == ()  # an upsampler keeps nothing
    for node in resnets:  # the input, plus conv1's output unless it is recomputed in backward
        assert len(node.saved_tensors) == 1 and node.saved_tensors[0].shape[1:] == (32, 8, 8)
        assert (node.hidden is None) == (checkpointing == "resnet")
    assert not any("Convolution" in name or "NativeGroupNorm" in name for name in nodes)


def diffusers_blocks() -> nn.Module:
    """Real diffusers blocks in float64: a ResNet block with a shortcut convolution, one without, an upsampler."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    holder = nn.Module()
    holder.wide = ResnetBlock2D(in_channels=8, out_channels=4, temb_channels=None, groups=2,
                                time_embedding_norm="group")
    holder.same = ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=None, groups=2, output_scale_factor=2.0,
                                time_embedding_norm="group")
    holder.up = Upsample2D(4, use_conv=True, out_channels=4)
    return holder.double().eval().requires_grad_(False)


@pytest.mark.parametrize("recompute", [False, True])
def test_lean_blocks_have_the_gradients_of_the_diffusers_blocks(small_slices, recompute):
    plain = diffusers_blocks()
    lean_blocks = diffusers_blocks()
    assert freeze_layers(lean_blocks) == 3
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)  # not square: rows and columns differ

    def run(blocks, x):
        kwargs = {"recompute": recompute} if isinstance(blocks.wide, LeanResnet) else {}
        return blocks.up(blocks.same(blocks.wide(x, None, **kwargs), None, **kwargs))

    want = run(plain, x)
    weights = torch.randn(want.shape, dtype=torch.float64)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), x)
    got = run(lean_blocks, x)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: run(lean_blocks, t), (x[:1].detach().requires_grad_(True),))


# Every normalization in both modes with MSE and outlier masks, plus L1 and unmasked cases of the written-out paths.
OPTIONS = [(norm, "mse", True, compat) for norm, compat in itertools.product(["default", "shared", "batch"],
                                                                             ["none", "diffusers"])]
OPTIONS += [("shared", "l1", True, "none"), ("batch", "l1", False, "diffusers"), ("shared", "mse", False, "none")]


@pytest.mark.parametrize("norm, loss_type, outliers, compat", OPTIONS)
def test_sliced_lean_gradient_equals_autograd(small_slices, small_vae, norm, loss_type, outliers, compat):
    options = dict(use_lpl=True, lpl_norm_type=norm, lpl_loss_type=loss_type, lpl_remove_outliers=outliers,
                   lpl_compat=compat, lpl_num_blocks=3)
    plain = LatentPerceptualLoss(small_vae, LPLConfig(**options, lpl_grad_mode="autograd"))
    lean_loss = LatentPerceptualLoss(small_vae, LPLConfig(**options, lpl_chunk_size=2))
    pred, target = latents(batch=2, size=8)
    a, b = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    want_result, got_result = plain(a, target, with_layers=True), lean_loss(b, target, with_layers=True)
    want, want_layers = want_result.per_sample, want_result.layers
    got, got_layers = got_result.per_sample, got_result.layers
    (want * torch.tensor([1.0, -3.0])).sum().backward()
    (got * torch.tensor([1.0, -3.0])).sum().backward()
    torch.testing.assert_close(got_layers, want_layers.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6 * a.grad.abs().max().item())


def test_float16_loss_scale_keeps_small_gradients_from_flushing_to_zero(vae):
    # A prediction very close to its target on 16x16 latents: per-element gradients of about 1e-9 to 1e-8, below
    # float16's smallest subnormal (6e-8), so an unscaled float16 backward flushes most of them to zero.
    pred, target = latents(batch=1, size=16, noise=0.01)

    def grad(dtype: str, scale: float | None = None) -> torch.Tensor:
        engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_dtype=dtype))
        if scale is not None:
            engine.state.loss_scale = LossScale(torch.float16, engine.trunk.device, initial=scale)
        leaf = pred.clone().requires_grad_(True)
        engine(leaf, target).per_sample.sum().backward()
        return leaf.grad

    full, scaled, unscaled = grad("float32"), grad("float16"), grad("float16", scale=1.0)
    assert torch.isfinite(scaled).all() and (scaled != 0).float().mean() > 0.99
    assert torch.nn.functional.cosine_similarity(scaled.flatten(), full.flatten(), dim=0) > 0.99
    assert (scaled - full).norm() / full.norm() < 0.1
    assert (unscaled == 0).float().mean() > 0.5, "without the scale most gradients underflow to zero"
    assert (unscaled - full).norm() / full.norm() > 0.5


@pytest.mark.parametrize("grad_mode", ["lean", "autograd"])
def test_host_autocast_does_not_change_the_decoder_precision(vae, grad_mode):
    engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_dtype="float32", lpl_grad_mode=grad_mode))
    pred, target = latents(batch=1)
    a, b = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    want = engine(a, target).per_sample
    want.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the host's forward runs under autocast, its backward not
        got = engine(b, target).per_sample
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-10)


def test_float16_loss_scale_stops_at_its_floor_and_warns_once(vae, caplog):
    from lpl_plugin import LPLHook
    from lpl_plugin.engine.precision import SCALE_FLOOR

    hot = copy.deepcopy(vae)
    with torch.no_grad():
        hot.post_quant_conv.weight.mul_(30000.0)  # activations beyond float16's range: every evaluation overflows
    hook = LPLHook(hot, LPLConfig(use_lpl=True, lpl_dtype="float16", lpl_num_blocks=1, lpl_t_threshold=1000,
                                  lpl_max_bad_steps=0))
    scale = hook.loss.state.loss_scale
    z0 = latents(batch=1, size=4)[1]
    with caplog.at_level(logging.WARNING, logger="lpl_plugin"):
        for _ in range(20):  # 2**16 halves to the floor of 1 in 16 overflows; then it stays there
            pred = z0.clone().requires_grad_(True)
            hook(latents=z0, noisy_latents=z0, timesteps=torch.tensor([5]), model_pred=pred, prediction_type="sample",
                 alphas_cumprod=None, sigmas=None, noise_weights=None, snr_gamma=None, step=0, is_training=True,
                 log_stats=False).loss.sum().backward()
            assert float(scale.value) >= SCALE_FLOOR and torch.equal(pred.grad, torch.zeros_like(pred.grad))
    assert float(scale.value) == SCALE_FLOOR and int(scale.floor_hits) == 4
    assert caplog.text.count("loss scale overflowed at its floor") == 1
    assert int(hook.loss.state.nonfinite_samples) == 20
