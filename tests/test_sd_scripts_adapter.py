"""The sd-scripts adapter against stand-ins of sd-scripts v0.9.1, v0.10.1, v0.11 and an unsupported release.

The stand-ins (tests/standins) have the real signatures (their seam fingerprints equal those of the real
checkouts); each test calls them in the order the real host does: noise helper, UNet, conditional_loss, masking,
per-sample mean, loss_weights, noise-level weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lpl_plugin.settings.config import ConfigError, LPLConfig
from lpl_plugin.training.diffusion import min_snr_weight, predict_z0, snr
from lpl_plugin.engine.perceptual_loss import LatentPerceptualLoss
from lpl_plugin.patches import sd_scripts
from lpl_plugin.patches.sd_scripts_seams import (KNOWN_FINGERPRINTS, V0_9, V0_10, V0_11, ModuleReader, SourceReader,
                                                 UnsupportedHost, detect, fingerprint)
from tests.standin_fixtures import hooks_off, module, root, standin, write_config

LPL_ON = "[lpl]\nuse_lpl = true\nlpl_t_threshold = 1000\nlpl_num_blocks = 2\n"
LAYOUTS = {"v0_9_1": V0_9, "v0_10_1": V0_10, "v0_11": V0_11}


@dataclass
class Host:
    """A stand-in host set up the way sd-scripts starts a run (parser, TOML, accelerator, models, scheduler)."""

    version: str
    session: sd_scripts.Session
    args: Any
    accelerator: Any
    vae: Any
    scheduler: Any


def start(tmp_path: Path, version: str = "v0_10_1", lpl: str = LPL_ON, host: str = "", cli: tuple = (),
          kind: str = "lora", enabled: bool = False) -> Host:
    """Install the adapter, parse a TOML through the host's parser and load the (tiny) models.

    `enabled`: as `lpl-plugin enable` does, from the layout read in the source, patching each module as it is
    imported; else as the launcher does, importing and patching everything first.
    """
    if enabled:
        assert not any(name.startswith("library") for name in sys.modules)
        layout, _ = detect(SourceReader(root(version)), kind)
        session = sd_scripts.install(kind, layout=layout)
    else:
        session = sd_scripts.install(kind)
    parser = module("sdxl_train_network" if kind == "lora" else "sdxl_train").setup_parser()
    sys.argv = ["sdxl_train_network.py", "--config_file", str(write_config(tmp_path, lpl, host)), *cli]
    args = parser.parse_args()  # read_config_from_file parses sys.argv again, as sd-scripts does
    args = module("library.args" if version == "v0_11" else "library.train_util").read_config_from_file(args, parser)
    train_util = module("library.train_util")
    accelerator = train_util.prepare_accelerator(args)
    weight_dtype, _ = train_util.prepare_dtype(args)
    models = module("library.sdxl_train_util").load_target_model(args, accelerator, "sdxl", weight_dtype)
    return Host(version, session, args, accelerator, models[3], module("standin_host").make_scheduler("cpu"))


def host_weights(h: Host, timesteps: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """The host's noise-level weighting, in its order."""
    ctf, a, s = module("library.custom_train_functions"), h.args, h.scheduler
    if a.min_snr_gamma:
        loss = ctf.apply_snr_weight(loss, timesteps, s, a.min_snr_gamma, a.v_parameterization)
    if a.scale_v_pred_loss_like_noise_pred:
        loss = ctf.scale_v_prediction_loss_like_noise_prediction(loss, timesteps, s)
    if a.v_pred_like_loss:
        loss = ctf.add_v_prediction_like_loss(loss, timesteps, s, a.v_pred_like_loss)
    if a.debiased_estimation_loss:
        loss = ctf.apply_debiased_estimation(loss, timesteps, s, a.v_parameterization)
    return loss


def host_step(h: Host, latents: torch.Tensor, batch: dict, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One LoRA training step's per-sample loss, calling the stand-in as its release calls sd-scripts."""
    helpers = module("library.loss" if h.version == "v0_11" else "library.train_util")
    a = h.args
    if h.version == "v0_9_1":
        noise, noisy, timesteps, huber_c = helpers.get_noise_noisy_latents_and_timesteps(a, h.scheduler, latents)
    else:
        noise, noisy, timesteps = helpers.get_noise_noisy_latents_and_timesteps(a, h.scheduler, latents)
        huber_c = helpers.get_huber_threshold_if_needed(a, timesteps, h.scheduler)
    pred = noise * 0.5 + noisy * 0.1 + weight  # a "UNet" whose output depends on a trainable weight
    target = h.scheduler.get_velocity(latents, noise, timesteps) if a.v_parameterization else noise
    if h.version == "v0_9_1":
        loss = helpers.conditional_loss(pred.float(), target.float(), reduction="none", loss_type=a.loss_type,
                                        huber_c=huber_c)
    else:
        loss = helpers.conditional_loss(pred.float(), target.float(), a.loss_type, "none", huber_c)
    if a.masked_loss:
        loss = module("library.custom_train_functions").apply_masked_loss(loss, batch)
    loss = loss.mean(dim=(1, 2, 3)) * batch["loss_weights"]
    return host_weights(h, timesteps, loss), {"noisy": noisy, "timesteps": timesteps, "pred": pred}


def on_and_off(h: Host, batch: dict | None = None, seed: int = 3):
    """Per-sample losses of the same step with LPL on and off, what the step saw, and the weight's gradients."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    batch = batch or {"loss_weights": torch.ones(2)}
    results = []
    for off in (False, True):
        with hooks_off(h.session, off):
            weight = torch.zeros((), requires_grad=True)
            torch.manual_seed(seed)
            loss, seen = host_step(h, latents, batch, weight)
            loss.mean().backward()
            results.append((loss.detach(), seen, weight.grad))
    (on, seen, grad_on), (off, _, grad_off) = results
    return on, off, seen, latents, grad_on, grad_off


def expected_lpl(h: Host, seen: dict, latents: torch.Tensor, batch: dict) -> torch.Tensor:
    """The specified per-sample LPL after the host's processing, from first principles."""
    config: LPLConfig = h.session.config
    kind = "v_prediction" if h.args.v_parameterization else "epsilon"
    t = seen["timesteps"]
    z0_hat = predict_z0(seen["pred"].detach(), seen["noisy"], kind, timesteps=t,
                        alphas_cumprod=h.scheduler.alphas_cumprod)
    raw = LatentPerceptualLoss(h.vae, config, 0.13025)(z0_hat, latents).per_sample
    weights = torch.ones(2)
    if config.lpl_scale:
        own = host_weights(h, t, torch.ones(2))
        has_own = any(getattr(h.args, k) for k in ("min_snr_gamma", "scale_v_pred_loss_like_noise_pred",
                                                   "v_pred_like_loss", "debiased_estimation_loss"))
        weights = own if has_own else min_snr_weight(snr(timesteps=t, alphas_cumprod=h.scheduler.alphas_cumprod),
                                                     config.lpl_snr_gamma, kind)
    kept = torch.ones(2)
    if h.args.masked_loss:
        kept = batch["alpha_masks"].float().mean(dim=(1, 2))
    gated = (t < config.lpl_t_threshold).float()
    return config.lpl_weight * raw * weights * gated * batch["loss_weights"] * kept


# -- layouts and refusal ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", list(LAYOUTS))
def test_each_release_is_recognised_live_and_from_source(version):
    with standin(version):
        for kind in ("lora", "full"):
            assert detect(ModuleReader(), kind) == (LAYOUTS[version], [])
            assert detect(SourceReader(root(version)), kind) == (LAYOUTS[version], [])


def test_stand_ins_have_the_real_signatures():
    # The fingerprints in KNOWN_FINGERPRINTS were computed from the real v0.10.1 and v0.9.1 checkouts.
    found = {KNOWN_FINGERPRINTS.get(fingerprint(SourceReader(root(v))), "?")[:18] for v in ("v0_10_1", "v0_9_1")}
    assert found == {"sd-scripts v0.10.1", "sd-scripts v0.9.1 "}


def test_unknown_release_is_refused_naming_function_expected_and_found():
    with standin("unsupported"):
        with pytest.raises(UnsupportedHost) as caught:
            sd_scripts.install("lora")
        assert module("library.train_util").conditional_loss.__module__ == "library.train_util"  # nothing patched
    (line,) = caught.value.lines()
    assert "`library.train_util.conditional_loss` has signature (model_pred, target, loss_type, reduction, " \
           "huber_c=…, weighting=…)" in line
    assert "expected (model_pred, target, loss_type, reduction, huber_c) (sd-scripts v0.10.x and main) or " \
           "(model_pred, target, reduction, loss_type, huber_c) (sd-scripts v0.9.x)" in line
    assert "refused" in line


@pytest.mark.parametrize("signature, supported", [
    ("args, accelerator, model_version, weight_dtype, lowram=False", True),
    ("args, accelerator, model_version, weight_dtype, lowram", False),
    ("args, accelerator, weight_dtype", False),
])
def test_optional_extra_parameters_are_accepted_required_ones_refused(tmp_path, signature, supported):
    copy = tmp_path / "sd-scripts"
    shutil.copytree(root("v0_10_1"), copy)
    path = copy / "library" / "sdxl_train_util.py"
    path.write_text(path.read_text().replace("args, accelerator, model_version: str, weight_dtype", signature))
    layout, problems = detect(SourceReader(copy), "full")
    assert (layout is not None) == supported
    if not supported:
        assert problems == [f"`library.sdxl_train_util.load_target_model` has signature ({signature}), expected "
                            "(args, accelerator, model_version, weight_dtype) (further parameters must be optional)"]


# -- arguments and settings ---------------------------------------------------------------------------------------

def test_host_parser_gets_the_lpl_options_and_the_command_line_beats_the_toml(tmp_path, capsys):
    with standin("v0_10_1"):
        h = start(tmp_path, lpl=LPL_ON + "lpl_weight = 1.5\n", cli=("--lpl_weight", "2", "--lpl_scale", "false"))
        assert (h.session.config.lpl_weight, h.session.config.lpl_scale, h.session.config.lpl_num_blocks) == \
            (2.0, False, 2)
        with pytest.raises(SystemExit):
            module("sdxl_train_network").setup_parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--lpl_weight" in help_text and "--use_lpl" in help_text


def test_bad_command_line_value_is_a_config_error(tmp_path):
    with standin("v0_10_1"), pytest.raises(ConfigError, match="`lpl_weight` must be between 0 and 100, got -1.0"):
        start(tmp_path, cli=("--lpl_weight", "-1"))


def test_decoder_copy_uses_the_sdxl_factor_and_leaves_the_vae_alone(tmp_path):
    with standin("v0_10_1"):
        h = start(tmp_path)
        engine = h.session.registry.get("lpl").loss
        assert h.vae.config.scaling_factor == 0.18215 and engine.scaling_factor == 0.13025
        assert engine.trunk.device == h.accelerator.device and engine.trunk.dtype == torch.float32
        assert engine.trunk.mid_block is not h.vae.decoder.mid_block
        assert all(p.requires_grad for p in h.vae.decoder.parameters())  # the host's VAE is not frozen by LPL


def test_decoder_copy_takes_the_block_calls_of_diffusers_0_25(vae):
    # sd-scripts v0.9.1 pins diffusers 0.25.0, whose UpDecoderBlock2D calls resnet(h, temb=temb, scale=scale)
    engine = LatentPerceptualLoss(vae, LPLConfig(use_lpl=True), 0.13025)
    resnet = engine.trunk.up_blocks[0].resnets[0]
    x = torch.randn(1, resnet.in_channels, 4, 4)
    torch.testing.assert_close(resnet(x, temb=None, scale=1.0), resnet(x))


# -- the loss and its weights -------------------------------------------------------------------------------------

CASES = {
    "no host weights: min-SNR(lpl_snr_gamma)": ("", ()),
    "min-SNR, lpl_scale on": ("min_snr_gamma = 5.0", ()),
    "min-SNR, lpl_scale off": ("min_snr_gamma = 5.0", ("--lpl_scale", "false")),
    "v-pred, debiased, scale_v, v_pred_like": ("v_parameterization = true\ndebiased_estimation_loss = true\n"
                                               "scale_v_pred_loss_like_noise_pred = true\nv_pred_like_loss = 0.3", ()),
    "the same with lpl_scale off": ("v_parameterization = true\ndebiased_estimation_loss = true\n"
                                    "scale_v_pred_loss_like_noise_pred = true\nv_pred_like_loss = 0.3",
                                    ("--lpl_scale", "false")),
    "masked huber loss with loss_weights": ("masked_loss = true\nloss_type = \"huber\"", ("--lpl_weight", "2")),
    "some samples above the threshold": ("", ("--lpl_t_threshold", "500")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lpl_enters_the_host_loss_as_specified(tmp_path, case):
    host, cli = CASES[case]
    batch = {"loss_weights": torch.tensor([1.0, 0.5])}
    if "masked" in case:
        masks = torch.ones(2, 16, 16)
        masks[0, :, :8] = 0
        batch["alpha_masks"] = masks
    with standin("v0_10_1"):
        h = start(tmp_path, host=host, cli=cli)
        for seed in range(3, 40):  # with a threshold of 500, find a step with one sample on each side
            on, off, seen, latents, grad_on, grad_off = on_and_off(h, batch, seed)
            if "threshold" not in case or (seen["timesteps"] < 500).sum() == 1:
                break
        torch.testing.assert_close(on - off, expected_lpl(h, seen, latents, batch), rtol=1e-4, atol=1e-6)
        assert not torch.equal(grad_on, grad_off)


@pytest.mark.parametrize("enabled", [False, True], ids=["launcher", "enabled"])
@pytest.mark.parametrize("version", list(LAYOUTS))
def test_every_release_gets_the_same_lpl(tmp_path, version, enabled):
    with standin(version):
        h = start(tmp_path, version, host="min_snr_gamma = 5.0", enabled=enabled)
        on, off, seen, latents, _, _ = on_and_off(h)
        batch = {"loss_weights": torch.ones(2)}
        torch.testing.assert_close(on - off, expected_lpl(h, seen, latents, batch), rtol=1e-4, atol=1e-6)


def test_full_fine_tune_mean_path_adds_the_batch_mean(tmp_path):
    with standin("v0_10_1"):
        h = start(tmp_path, kind="full")
        train_util = module("library.train_util")
        latents = torch.randn(2, 4, 8, 8)
        noise, noisy, timesteps = train_util.get_noise_noisy_latents_and_timesteps(h.args, h.scheduler, latents)
        pred = (noise * 0.5).requires_grad_()
        loss = train_util.conditional_loss(pred.float(), noise.float(), "l2", "mean", None)
        seen = {"noisy": noisy, "timesteps": timesteps, "pred": pred}
        extra = expected_lpl(h, seen, latents, {"loss_weights": torch.ones(2)}).mean()
        torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, noise) + extra, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("enabled", [False, True], ids=["launcher", "enabled"])
def test_v0_11_shims_share_one_wrapper_and_add_lpl_once(tmp_path, enabled):
    with standin("v0_11"):
        h = start(tmp_path, "v0_11", enabled=enabled)
        loss_util, train_util = module("library.loss"), module("library.train_util")
        assert train_util.conditional_loss is loss_util.conditional_loss
        assert not hasattr(train_util.conditional_loss.__wrapped__, "__lpl_patcher__")  # one wrapper, not two
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        for helpers in (train_util, loss_util):
            torch.manual_seed(0)
            noise, noisy, timesteps = helpers.get_noise_noisy_latents_and_timesteps(h.args, h.scheduler, latents)
            pred = (noise * 0.5).requires_grad_()
            with_lpl = helpers.conditional_loss(pred, noise, "l2", "none").mean(dim=(1, 2, 3))
            plain = torch.nn.functional.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            seen = {"noisy": noisy, "timesteps": timesteps, "pred": pred}
            once = expected_lpl(h, seen, latents, {"loss_weights": torch.ones(2)})
            assert (once > 0).all()
            torch.testing.assert_close(with_lpl.detach() - plain.detach(), once, rtol=1e-4, atol=1e-6)


# -- when LPL must not run ----------------------------------------------------------------------------------------

def test_validation_and_no_grad_calls_are_untouched(tmp_path):
    with standin("v0_10_1"):
        h = start(tmp_path)
        train_util = module("library.train_util")
        latents = torch.randn(2, 4, 8, 8)
        for pred_grad, grad_enabled in ((False, True), (True, False)):
            noise, _, _ = train_util.get_noise_noisy_latents_and_timesteps(h.args, h.scheduler, latents)
            pred = (noise * 0.5).requires_grad_(pred_grad)
            with torch.set_grad_enabled(grad_enabled):
                loss = train_util.conditional_loss(pred, noise, "l2", "none", None)
            assert torch.equal(loss, torch.nn.functional.mse_loss(pred, noise, reduction="none"))
        assert h.session.logs == {} and h.session.steps == 0


def test_lpl_start_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    with standin("v0_10_1"):
        h = start(tmp_path, lpl=LPL_ON + "lpl_start = 1\n", host="gradient_accumulation_steps = 2")
        model = h.accelerator.prepare(torch.nn.Linear(1, 1))
        applied = []
        for _ in range(4):
            with h.accelerator.accumulate(model):
                weight = torch.zeros((), requires_grad=True)
                host_step(h, torch.randn(2, 4, 8, 8), {"loss_weights": torch.ones(2)}, weight)
            applied.append("lpl/loss" in h.session.take_logs())
        assert applied == [False, False, True, True] and h.session.steps == 2


def test_training_step_without_the_noise_helper_is_refused(tmp_path):
    with standin("v0_10_1"):
        start(tmp_path)
        pred = torch.zeros(2, 4, 8, 8, requires_grad=True)
        with pytest.raises(UnsupportedHost, match="without a matching get_noise_noisy_latents_and_timesteps"):
            module("library.train_util").conditional_loss(pred, torch.ones(2, 4, 8, 8), "l2", "none")


def test_lpl_off_leaves_every_seam_bit_identical(tmp_path):
    with standin("v0_10_1"):
        h = start(tmp_path, lpl="")
        assert h.session.config == LPLConfig() and "lpl" not in h.session.registry
        assert h.args.lpl_weight is None  # the options exist on the parser, unset
        train_util = module("library.train_util")
        torch.manual_seed(0)
        noise, noisy, t = train_util.get_noise_noisy_latents_and_timesteps(h.args, h.scheduler, torch.ones(2, 4, 8, 8))
        torch.manual_seed(0)
        plain = module("standin_host").noise_and_timesteps(h.args, h.scheduler, torch.ones(2, 4, 8, 8))
        assert all(torch.equal(a, b) for a, b in zip((noise, noisy, t), plain))
        pred = (noise * 0.5).requires_grad_()
        assert torch.equal(train_util.conditional_loss(pred, noise, "l2", "none"),
                           torch.nn.functional.mse_loss(pred, noise, reduction="none"))
        metadata = train_util.get_sai_model_spec(None, h.args, True, True, False)
        assert metadata == {"modelspec.architecture": "stand-in/sdxl"}


# -- logs, metadata, state ----------------------------------------------------------------------------------------

def test_lpl_scalars_reach_the_lora_step_logs_as_floats_once(tmp_path):
    with standin("v0_10_1"):
        h = start(tmp_path)
        on_and_off(h)
        trainer = module("sdxl_train_network").SdxlNetworkTrainer()
        optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        logs = trainer.generate_step_logs(h.args, 1.0, 1.0, scheduler, None)
        assert {"loss/current", "lpl/loss", "lpl/weighted", "lpl/applied_fraction"} <= logs.keys()
        assert all(type(v) is float for v in logs.values())
        assert "lpl/loss" not in trainer.generate_step_logs(h.args, 1.0, 1.0, scheduler, None)


def test_lpl_scalars_reach_accelerator_log_in_the_full_fine_tune(tmp_path):
    with standin("v0_10_1"):
        h = start(tmp_path, kind="full", host=f"logging_dir = \"{(tmp_path / 'logs').as_posix()}\"")
        h.accelerator.init_trackers("standin")
        on_and_off(h)
        h.accelerator.log({"loss": 1.0}, step=1)
        logged = json.loads((tmp_path / "logs" / "logs.jsonl").read_text())
        assert logged["loss"] == 1.0 and logged["lpl/loss"] > 0 and "lpl/layer/up1" in logged


def test_settings_are_saved_as_ss_lpl_metadata(tmp_path):
    with standin("v0_9_1"):
        h = start(tmp_path, "v0_9_1", lpl=LPL_ON + "lpl_weight = 1.5\n")
        spec = module("library.train_util").get_sai_model_spec
        assert "ss_lpl_enabled" not in spec(None, h.args, True, True, False)  # LPL has not run in a step yet
        on_and_off(h)
        metadata = spec(None, h.args, True, True, False)
        assert metadata["ss_lpl_enabled"] == "True" and metadata["ss_lpl_weight"] == "1.5"
        assert metadata["ss_lpl_t_threshold"] == "1000" and "ss_lpl_version" in metadata
        h.args.no_metadata = True
        assert "ss_lpl_weight" not in spec(None, h.args, True, True, False)


def test_resume_restores_the_optimizer_step_count_and_tolerates_states_without_it(tmp_path):
    with standin("v0_10_1"):
        h = start(tmp_path)
        state, hook = tmp_path / "state", h.session.registry.get("lpl")
        h.session.steps, hook.loss.state.oom_skips = 7, 2
        h.accelerator.save_state(str(state))
        assert json.loads((state / sd_scripts.STATE_FILE).read_text())["optimizer_steps"] == 7
        for expected in (7, 3, 0):
            h.session.steps, hook.loss.state.oom_skips = 99, 0
            h.accelerator.load_state(str(state))
            assert h.session.steps == expected
            assert hook.loss.state.oom_skips == (2 if expected == 7 else 0)  # the hook's counters ride along
            if expected == 7:  # a state saved without the plugin: sd-scripts' own record of the step
                (state / sd_scripts.STATE_FILE).unlink()
                (state / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 3}))
            else:
                (state / "train_state.json").unlink(missing_ok=True)


# -- the host's noise-level weights as one table ------------------------------------------------------------------

WEIGHTED = {
    "min-SNR": "min_snr_gamma = 5.0",
    "min-SNR v-pred": "min_snr_gamma = 5.0\nv_parameterization = true",
    "all four, v-pred": "v_parameterization = true\ndebiased_estimation_loss = true\nmin_snr_gamma = 2.0\n"
                        "scale_v_pred_loss_like_noise_pred = true\nv_pred_like_loss = 0.3",
    "debiased": "debiased_estimation_loss = true",
}


@pytest.mark.parametrize("case", list(WEIGHTED))
def test_weight_table_gives_what_the_host_functions_give(tmp_path, case):
    from lpl_plugin.patches.sd_scripts_weights import WeightTable

    with standin("v0_10_1"):
        h = start(tmp_path, host=WEIGHTED[case])
        table, builds = WeightTable(), []
        build = table.build
        table.build = lambda *a: builds.append(1) or build(*a)  # a spy: counts the builds
        for seed in range(3):
            timesteps = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(seed))
            got = table(h.args, timesteps, h.scheduler)
            torch.testing.assert_close(got, host_weights(h, timesteps, torch.ones(6)).float(), rtol=0, atol=0)
        assert builds == [1] and table.table.shape == (1000,)
        h.args.min_snr_gamma = 1.0  # other settings: a new table
        table(h.args, timesteps, h.scheduler)
        assert builds == [1, 1]


def test_no_host_weights_no_table(tmp_path):
    from lpl_plugin.patches.sd_scripts_weights import WeightTable

    with standin("v0_9_1"):
        h = start(tmp_path, "v0_9_1")
        assert WeightTable()(h.args, torch.tensor([1, 2]), h.scheduler) is None


# -- where the host starts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cli, loader, first", [(("--initial_step", "3"), None, 3), (("--initial_epoch", "2"), 2, 2)],
                         ids=["initial_step 3", "initial_epoch 2 of 2 steps"])
def test_lpl_start_counts_from_the_step_the_host_starts_at(tmp_path, cli, loader, first):
    with standin("v0_10_1"):
        h = start(tmp_path, lpl=LPL_ON + "lpl_start = 4\n", host="max_train_steps = 10", cli=cli)
        if loader:  # sd-scripts prepares its train loader; the adapter reads its length from accelerate's prepare
            h.accelerator.prepare(torch.utils.data.DataLoader(list(range(4)), batch_size=loader))
        applied = []
        for _ in range(3):
            host_step(h, torch.randn(2, 4, 8, 8), {"loss_weights": torch.ones(2)}, torch.zeros((), requires_grad=True))
            applied.append("lpl/loss" in h.session.take_logs())
        assert applied == [first + i >= 4 for i in range(3)] and h.session.steps == first + 3
