"""The LPL engine in its default mode: every option, gradients proven in float64, and the VAE left untouched."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from lpl_plugin import LatentPerceptualLoss, LPLConfig, UserError
from lpl_plugin.engine.tiny import tiny_vae


def latents(batch=2, size=8, seed=0, noise=0.3):
    """A target and a nearby prediction, as scaled latents."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, 4, size, size, generator=g) * 0.8
    return z0 + noise * torch.randn(z0.shape, generator=g), z0


def state(module):
    """A deep snapshot of a module's tensors, devices, dtypes and grad flags."""
    return {k: (v.clone(), v.dtype, v.device, v.requires_grad) for k, v in module.state_dict(keep_vars=True).items()}


OPTIONS = list(itertools.product(["default", "shared", "batch"], ["mse", "l1"], [True, False], [True, False]))


@pytest.mark.parametrize("norm, loss_type, pow_law, outliers", OPTIONS)
def test_every_option_gives_finite_positive_differentiable_loss(vae, norm, loss_type, pow_law, outliers):
    config = LPLConfig(use_lpl=True, lpl_norm_type=norm, lpl_loss_type=loss_type, lpl_pow_law=pow_law,
                       lpl_remove_outliers=outliers, lpl_num_blocks=3)
    loss = LatentPerceptualLoss(vae, config)
    pred, target = latents()
    pred.requires_grad_(True)
    result = loss(pred, target, with_layers=True)
    per_sample, layers = result.per_sample, result.layers
    assert per_sample.shape == (2,) and layers.shape == (2, 4)
    assert torch.isfinite(per_sample).all() and (per_sample > 0).all()
    torch.testing.assert_close(per_sample.detach(), layers.sum(1) / 4)
    per_sample.sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    zero = loss(target.clone().requires_grad_(True), target).per_sample
    assert zero.abs().max() < 1e-5 * per_sample.min()  # identical latents: no distance beyond rounding


@pytest.mark.parametrize("blocks", [0, 1, 2, 3, 4])
def test_num_blocks_sets_layer_count(vae, blocks):
    loss = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_num_blocks=blocks))
    pred, target = latents(batch=1)
    layers = loss(pred.requires_grad_(True), target, with_layers=True).layers
    assert layers.shape == (1, blocks + 1)
    assert loss.trunk.stage_names == ["mid"] + [f"up{i}" for i in range(blocks)]


def test_pow_law_weights_follow_resolution(vae):
    loss = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True))
    assert loss.layer_weights == [1.0, 0.5, 0.25, 0.125, 0.125]
    assert loss.outlier_factors == [None, None, 2, 1, 1]
    two_block_vae = tiny_vae((8, 16))  # one upsampler: the mid map is already 2x below the output
    small = LatentPerceptualLoss(two_block_vae, LPLConfig(use_lpl=True, lpl_num_blocks=2))
    assert small.layer_weights == [1.0, 0.5, 0.5] and small.outlier_factors == [2, 1, 1]
    compat = LatentPerceptualLoss(two_block_vae, LPLConfig(use_lpl=True, lpl_num_blocks=2, lpl_compat="diffusers"))
    assert compat.outlier_factors == [None, None, 2]  # the reference's fixed indices


def test_vae_is_never_mutated(vae):
    before = state(vae)
    training = vae.training
    loss = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_dtype="bfloat16"))
    pred, target = latents()
    loss(pred.requires_grad_(True), target).per_sample.sum().backward()
    after = state(vae)
    assert before.keys() == after.keys() and vae.training == training
    for key, (value, dtype, device, grad) in before.items():
        assert torch.equal(value, after[key][0]) and (dtype, device, grad) == after[key][1:], key
    assert all(p.grad is None for p in vae.parameters())
    assert all(not p.requires_grad for p in loss.trunk.parameters())


def test_target_features_stay_out_of_the_graph(vae):
    loss = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_grad_mode="autograd"))
    pred, target = latents()
    target.requires_grad_(True)
    loss(pred.requires_grad_(True), target).per_sample.sum().backward()
    assert target.grad is None and pred.grad is not None


def stage_outputs_of_decode(vae, z: torch.Tensor, through_post_quant_conv: bool) -> list[torch.Tensor]:
    """Mid-block and up-block outputs captured from diffusers' own decoding of unscaled latents."""
    captured = []
    modules = [vae.decoder.mid_block, *vae.decoder.up_blocks]
    handles = [m.register_forward_hook(lambda module, args, out: captured.append(out)) for m in modules]
    try:
        with torch.no_grad():
            vae.decode(z).sample if through_post_quant_conv else vae.decoder(z)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.mark.parametrize("compat", ["none", "diffusers"])
def test_features_are_those_of_diffusers_decode_path(vae, compat):
    # The default mode decodes as diffusers does (post_quant_conv first); compat mode, like the reference, skips it.
    _, target = latents()
    engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_compat=compat))
    want = stage_outputs_of_decode(vae, target / 0.13025, through_post_quant_conv=compat == "none")
    got = engine.target_features(target)
    assert len(got) == len(want) == 5
    for mine, theirs in zip(got, want):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def test_vae_without_post_quant_conv():
    import inspect

    from diffusers import AutoencoderKL

    if "use_post_quant_conv" not in inspect.signature(AutoencoderKL.__init__).parameters:
        pytest.skip("this diffusers has no use_post_quant_conv option")
    loss = LatentPerceptualLoss(tiny_vae(use_post_quant_conv=False), LPLConfig(use_lpl=True))
    assert loss.trunk.post_quant_conv is None
    pred, target = latents()
    assert torch.isfinite(loss(pred, target).per_sample).all()


def test_batch_norm_is_real_and_independent_of_chunking(vae):
    pred, target = latents(batch=4)
    raw = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_norm_type="batch", lpl_compat="diffusers"))
    real = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_norm_type="batch", lpl_chunk_size=1))
    whole = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_norm_type="batch", lpl_chunk_size=4))
    # The reference leaves 'batch' features raw; the real normalization divides by each channel's std over the batch
    # (values against an independent implementation: tests/test_layer_math.py).
    assert not torch.allclose(raw(pred, target).per_sample, real(pred, target).per_sample)
    p1, p4 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    real(p1, target).per_sample.sum().backward()
    whole(p4, target).per_sample.sum().backward()
    torch.testing.assert_close(p1.grad, p4.grad, rtol=1e-4, atol=1e-7)


def test_scaling_and_shift_factors(vae):
    pred, target = latents()
    from_config = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True))
    assert from_config.scaling_factor == pytest.approx(0.13025) and from_config.shift_factor == 0.0
    explicit = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True), scaling_factor=0.5, shift_factor=0.1)
    torch.testing.assert_close(explicit.unscale(pred), pred / 0.5 + 0.1)


def test_rejects_mismatched_shapes_and_too_many_blocks(vae):
    loss = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True))
    with pytest.raises(ValueError, match="must have the same shape"):
        loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 6))
    with pytest.raises(UserError, match="lpl_num_blocks must be at most 2 .* got 3"):
        LatentPerceptualLoss(tiny_vae((8, 16)), LPLConfig(use_lpl=True, lpl_num_blocks=3))
    with pytest.raises(UserError, match="AutoencoderKL"):
        LatentPerceptualLoss(torch.nn.Linear(2, 2), LPLConfig(use_lpl=True))


@pytest.mark.parametrize("grad_mode", ["lean", "autograd"])
def test_a_nan_sample_gets_zero_loss_and_gradient_the_others_are_untouched(vae, grad_mode):
    config = LPLConfig(use_lpl=True, lpl_num_blocks=2, lpl_grad_mode=grad_mode, lpl_checkpointing="none")
    loss = LatentPerceptualLoss(vae, config)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(2, 4, 8, 8, generator=g)
    clean = torch.randn(2, 4, 8, 8, generator=g)
    poisoned = clean.clone()
    poisoned[1, 0, 0, 0] = float("nan")
    grads = []
    for pred in (clean, poisoned):
        pred = pred.clone().requires_grad_(True)
        values = loss(pred, target).per_sample
        values.sum().backward()
        grads.append((values.detach(), pred.grad))
    (clean_values, clean_grad), (values, grad) = grads
    assert values[1] == 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    torch.testing.assert_close(values[0], clean_values[0])
    torch.testing.assert_close(grad[0], clean_grad[0])
    assert int(loss.state.nonfinite_samples) == 1


GRADCHECK_CASES = [("shared", "mse", "autograd", 2), ("default", "mse", "autograd", 2), ("batch", "mse", "autograd", 2),
                   ("shared", "l1", "autograd", 2), ("shared", "mse", "lean", 1)]


@pytest.mark.parametrize("norm, loss_type, grad_mode, batch", GRADCHECK_CASES)
def test_gradcheck_float64(norm, loss_type, grad_mode, batch):
    vae64 = tiny_vae((8, 8, 8), layers_per_block=1, groups=4).double()
    config = LPLConfig(use_lpl=True, lpl_norm_type=norm, lpl_loss_type=loss_type, lpl_num_blocks=2,
                       lpl_grad_mode=grad_mode, lpl_checkpointing="resnet" if grad_mode == "lean" else "none")
    loss = LatentPerceptualLoss(vae64, config, dtype=torch.float64)
    pred, target = (t.double() for t in latents(batch=batch, size=4))
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: loss(p, target).per_sample, (pred,), eps=1e-6, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("checkpointing", ["none", "block", "resnet", "auto"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_lean_gradient_equals_plain_autograd(vae, checkpointing, chunk):
    pred, target = latents(batch=3)
    weights = torch.tensor([0.5, 2.0, -1.0])  # the host's per-sample weights, applied after the call
    plain = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_grad_mode="autograd"))
    lean = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_chunk_size=chunk, lpl_checkpointing=checkpointing))
    a, b = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    (plain(a, target).per_sample * weights).sum().backward()
    lean_value = lean(b, target).per_sample
    (lean_value * weights).sum().backward()
    torch.testing.assert_close(lean_value.detach(), plain(pred, target).per_sample.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-8)


def test_bfloat16_decoder_is_close_to_float32(vae):
    pred, target = latents()
    full = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_dtype="float32"))(pred, target).per_sample
    half = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_dtype="bfloat16"))(pred, target).per_sample
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.1, atol=1e-4)


def test_works_with_sd15_layout():
    sd15_like = tiny_vae((8, 16, 32, 32))
    sd15_like.register_to_config(scaling_factor=0.18215)
    loss = LatentPerceptualLoss(sd15_like, LPLConfig(use_lpl=True))
    assert loss.scaling_factor == pytest.approx(0.18215)
    pred, target = latents(batch=1)
    assert torch.isfinite(loss(pred, target).per_sample).all()


def test_no_grad_call_builds_no_graph(vae):
    loss = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True))
    pred, target = latents()
    with torch.no_grad():
        value = loss(pred.requires_grad_(True), target).per_sample
    assert value.grad_fn is None
    copy.deepcopy(loss)  # an engine can be copied (e.g. by EMA or checkpoint helpers)


def test_autograd_mode_counts_the_gradients_it_zeroes(vae):
    loss = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True, lpl_num_blocks=1, lpl_grad_mode="autograd"))

    def poison_sample_1(module, inputs, output):
        """A finite forward whose backward turns sample 1's gradient into NaN (as an overflow in backward does)."""
        if output.requires_grad:
            output.register_hook(lambda grad: torch.cat([grad[:1], grad[1:2] * float("nan"), grad[2:]]))

    handle = loss.trunk.conv_in.register_forward_hook(poison_sample_1)
    pred, target = latents(batch=3)
    leaf = pred.clone().requires_grad_(True)
    first = loss(leaf, target)
    assert int(first.nonfinite) == 0 and torch.isfinite(first.per_sample).all()
    first.per_sample.sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad[1].abs().sum() == 0 and leaf.grad[0].abs().sum() > 0
    handle.remove()
    second = loss(pred, target)  # the next call reports what the previous backward zeroed
    assert int(second.nonfinite) == 1 and int(loss.state.nonfinite_samples) == 1
