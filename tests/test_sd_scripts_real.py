"""The adapter inside real sd-scripts code: a checkout, or every snapshot of the commits users run.

    LPL_SD_SCRIPTS_DIR=/path/to/sd-scripts /path/to/venv/bin/python -m pytest tests/test_sd_scripts_real.py
    LPL_SD_SCRIPTS_SOURCES=/path/to/shared/sd_scripts_sources python -m pytest tests/test_sd_scripts_real.py

Either way the python must have sd-scripts' packages (torchvision, transformers, opencv, ...) and lpl-plugin.

Imports the real `library` modules and drives the real get_noise_noisy_latents_and_timesteps, conditional_loss,
custom_train_functions weights, read_config_from_file, prepare_accelerator, get_sai_model_spec and NetworkTrainer
methods (process_batch where the release has it) through the adapter. Only the models are tiny: a tiny
SDXL-layout VAE is handed to the adapter instead of loading a 7 GB checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lpl_plugin.training.diffusion import min_snr_weight, predict_z0, snr
from lpl_plugin.engine.perceptual_loss import LatentPerceptualLoss
from lpl_plugin.engine.tiny import tiny_vae

from .sd_sources import Source, real_sources
from .standin_fixtures import hooks_off, on_path

SOURCES, NOT_GIVEN = real_sources()
pytestmark = pytest.mark.skipif(not SOURCES, reason=NOT_GIVEN)
LPL_ON = "[lpl]\nuse_lpl = true\nlpl_t_threshold = 1000\nlpl_num_blocks = 2\n"


@pytest.fixture(scope="module", params=SOURCES, ids=[s.name for s in SOURCES])
def source(request) -> Source:
    """One real sd-scripts tree (pytest runs every test of the module against one before the next)."""
    return request.param


@pytest.fixture(scope="module")
def sd(source):
    """The real sd-scripts modules, imported from the checkout."""
    import importlib

    from lpl_plugin.patches import sd_scripts

    with on_path(source.root):  # afterwards the real modules are forgotten, as after a stand-in
        sd_scripts.install("lora")  # imports the modules it checks
        yield {name: importlib.import_module(name) for name in ("library.train_util", "library.custom_train_functions",
                                                                "sdxl_train_network", "train_network")}


class Run:
    """A session with the real parser, TOML reader and accelerator, and a tiny VAE attached."""

    def __init__(self, sd: dict, tmp_path: Path, lpl: str = LPL_ON, cli: tuple = (),
                 weight_dtype: torch.dtype = torch.float32):
        from lpl_plugin.patches import sd_scripts

        self.sd = sd
        self.session = sd_scripts.install("lora")
        parser = sd["sdxl_train_network"].setup_parser()
        config = tmp_path / "cfg.toml"
        config.write_text(f"output_dir = \"{tmp_path.as_posix()}\"\n{lpl}", encoding="utf-8")
        sys.argv = ["sdxl_train_network.py", "--config_file", str(config), *cli]
        args = sd["library.train_util"].read_config_from_file(parser.parse_args(), parser)
        self.args = args
        self.accelerator = sd["library.train_util"].prepare_accelerator(args)
        self.vae = tiny_vae()
        if self.session.active:
            self.session.attach(self.vae, self.accelerator, weight_dtype)
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, clip_sample=False)
        sd["library.custom_train_functions"].prepare_scheduler_for_custom_training(self.scheduler, "cpu")

    @property
    def legacy(self) -> bool:
        """Whether this is the v0.9 API (4-value noise helper, keyword conditional_loss)."""
        return self.session.layout.noise_values == 4

    def step(self, latents: torch.Tensor, weight: torch.Tensor):
        """Per-sample loss of one step, calling the real functions the way this release's trainer does."""
        tu, ctf, a = self.sd["library.train_util"], self.sd["library.custom_train_functions"], self.args
        if self.legacy:
            noise, noisy, t, huber_c = tu.get_noise_noisy_latents_and_timesteps(a, self.scheduler, latents)
        else:
            noise, noisy, t = tu.get_noise_noisy_latents_and_timesteps(a, self.scheduler, latents)
            huber_c = tu.get_huber_threshold_if_needed(a, t, self.scheduler)
        pred = noise * 0.5 + noisy * 0.1 + weight
        if self.legacy:
            loss = tu.conditional_loss(pred.float(), noise.float(), reduction="none", loss_type=a.loss_type,
                                       huber_c=huber_c)
        else:
            loss = tu.conditional_loss(pred.float(), noise.float(), a.loss_type, "none", huber_c)
        loss = loss.mean([1, 2, 3])
        if a.min_snr_gamma:
            loss = ctf.apply_snr_weight(loss, t, self.scheduler, a.min_snr_gamma, a.v_parameterization)
        return loss, noisy, t, pred


class TinySdxlUNet(torch.nn.Module):
    """Called like sd-scripts' SdxlUNet2DConditionModel: (x, timesteps, context, y); computes in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.vector = torch.nn.Linear(2816, 4)

    def forward(self, x, timesteps, context, y):
        self.input = x.detach()
        return self.conv(x.float()) + self.vector(y.float())[:, :, None, None] + context.float().mean() * 0


def sdxl_batch() -> dict:
    """A cached-latents batch of two, as sd-scripts' SDXL dataset yields it."""
    return {"latents": torch.randn(2, 4, 8, 8), "loss_weights": torch.ones(2),
            "text_encoder_outputs_list": [torch.randn(2, 77, 768), torch.randn(2, 77, 1280), torch.randn(2, 1280)],
            "original_sizes_hw": torch.tensor([[64, 64]] * 2), "crop_top_lefts": torch.tensor([[0, 0]] * 2),
            "target_sizes_hw": torch.tensor([[64, 64]] * 2)}


def test_checkout_is_a_supported_release(sd, source):
    from lpl_plugin.patches.sd_scripts_seams import (KNOWN_FINGERPRINTS, ModuleReader, SourceReader, detect,
                                                     fingerprint)
    from lpl_plugin.patches.sd_scripts_tested import find_tested_commit

    for kind in ("lora", "full"):
        live, problems = detect(ModuleReader(), kind)
        assert problems == [] and detect(SourceReader(source.root), kind)[0] == live
    known = find_tested_commit(source.root)
    if source.archive is not None:  # a snapshot of a tested commit: recognised, with the layout it is listed with
        assert known is not None and known.name == source.name and known.layout == live.name
        assert known.commit == (source.root / "COMMIT").read_text().strip()
    print(f"\n{source.root}: layout {live.name}, fingerprint {fingerprint(SourceReader(source.root))} = "
          f"{KNOWN_FINGERPRINTS.get(fingerprint(SourceReader(source.root)))}; tested commit: "
          f"{known.label if known else None}")


def test_real_parser_shows_the_options_and_reads_toml_with_command_line_overrides(sd, tmp_path, capsys):
    run = Run(sd, tmp_path, LPL_ON + "lpl_weight = 2\n", cli=("--lpl_start", "5", "--lpl_scale", "false"))
    config = run.session.config
    assert (config.lpl_weight, config.lpl_start, config.lpl_scale, config.lpl_num_blocks) == (2.0, 5, False, 2)
    with pytest.raises(SystemExit):
        sd["sdxl_train_network"].setup_parser().parse_args(["--help"])
    assert "--lpl_weight LPL_WEIGHT" in capsys.readouterr().out


def test_real_noise_helper_and_conditional_loss_add_the_specified_lpl(sd, tmp_path):
    run = Run(sd, tmp_path, cli=("--min_snr_gamma", "5"))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for off in (False, True):
        with hooks_off(run.session, off):
            torch.manual_seed(1)
            weight = torch.zeros((), requires_grad=True)
            loss, noisy, t, pred = run.step(latents, weight)
            loss.sum().backward()
            results.append((loss.detach(), weight.grad))
    (on, grad_on), (off, grad_off) = results
    z0_hat = predict_z0(pred.detach(), noisy, "epsilon", timesteps=t, alphas_cumprod=run.scheduler.alphas_cumprod)
    raw = LatentPerceptualLoss(run.vae, run.session.config, 0.13025)(z0_hat, latents).per_sample
    snr_weights = sd["library.custom_train_functions"].apply_snr_weight(torch.ones(2), t, run.scheduler, 5.0)
    torch.testing.assert_close(on - off, raw * snr_weights, rtol=1e-4, atol=1e-6)
    assert not torch.equal(grad_on, grad_off)
    print(f"\nt={t.tolist()} host loss={off.tolist()} +LPL={(on - off).tolist()} (min-SNR weights "
          f"{snr_weights.tolist()})")


def test_real_process_batch_trains_with_lpl_and_validates_without(sd, tmp_path):
    trainer_class = getattr(sd["sdxl_train_network"], "SdxlNetworkTrainer")
    if not hasattr(trainer_class, "process_batch"):
        pytest.skip("this release has no NetworkTrainer.process_batch (v0.9: the loss code is inline in train)")
    run = Run(sd, tmp_path)
    unet, trainer, batch = TinySdxlUNet(), trainer_class(), sdxl_batch()
    losses = {}
    for is_train in (True, False):
        for on in (True, False):
            with hooks_off(run.session, not on):
                torch.manual_seed(0)
                losses[is_train, on] = trainer.process_batch(
                    batch, [None, None], unet, None, run.vae, run.scheduler, torch.float32, torch.float32,
                    run.accelerator, run.args, None, None, is_train=is_train, train_text_encoder=False).detach()
    assert losses[True, True] > losses[True, False]  # training: LPL added
    assert torch.equal(losses[False, True], losses[False, False])  # validation: untouched
    assert run.session.steps == 1
    print(f"\nprocess_batch: train {losses[True, False].item():.6f} -> {losses[True, True].item():.6f} with LPL; "
          f"validation {losses[False, False].item():.6f} both ways")


def test_real_step_logs_metadata_and_state(sd, tmp_path):
    run = Run(sd, tmp_path)
    run.step(torch.randn(2, 4, 8, 8), torch.zeros((), requires_grad=True))
    trainer = sd["sdxl_train_network"].SdxlNetworkTrainer()
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    logs = trainer.generate_step_logs(run.args, 1.0, 1.0, scheduler, None)
    assert logs["loss/current"] == 1.0 and type(logs["lpl/loss"]) is float and "lpl/layer/up1" not in logs
    metadata = sd["library.train_util"].get_sai_model_spec(None, run.args, True, True, False)
    assert metadata["ss_lpl_enabled"] == "True" and metadata["ss_lpl_num_blocks"] == "2"
    state = tmp_path / "state"
    run.accelerator.save_state(str(state))
    assert json.loads((state / "lpl_plugin_state.json").read_text())["optimizer_steps"] == 1
    (state / "lpl_plugin_state.json").unlink()  # as if saved without the plugin
    run.session.steps = 5
    run.accelerator.load_state(str(state))
    assert run.session.steps == 0


def test_real_gradient_accumulation_gates_lpl_start_by_optimizer_step(sd, tmp_path):
    run = Run(sd, tmp_path, LPL_ON + "lpl_start = 1\n", cli=("--gradient_accumulation_steps", "2"))
    model = run.accelerator.prepare(torch.nn.Linear(1, 1))
    applied = []
    for _ in range(4):
        with run.accelerator.accumulate(model):
            run.step(torch.randn(2, 4, 8, 8), torch.zeros((), requires_grad=True))
        applied.append("lpl/loss" in run.session.take_logs())
    assert applied == [False, False, True, True]


def test_real_functions_are_untouched_with_lpl_off(sd, tmp_path):
    run = Run(sd, tmp_path, lpl="")
    assert not run.session.active and run.args.lpl_weight is None
    tu = sd["library.train_util"]
    latents = torch.randn(2, 4, 8, 8)
    torch.manual_seed(2)
    wrapped = run.step(latents, torch.zeros((), requires_grad=True))[0]
    from lpl_plugin.patches import sd_scripts

    sd_scripts.uninstall()
    assert not hasattr(tu.conditional_loss, "__wrapped__")  # the host's own function again
    torch.manual_seed(2)
    plain = run.step(latents, torch.zeros((), requires_grad=True))[0]
    assert torch.equal(wrapped, plain)
    assert "ss_lpl_enabled" not in tu.get_sai_model_spec(None, run.args, True, True, False)


def test_real_process_batch_gives_lpl_the_float16_input_the_unet_saw(sd, tmp_path):
    trainer_class = getattr(sd["sdxl_train_network"], "SdxlNetworkTrainer")
    if not hasattr(trainer_class, "process_batch"):
        pytest.skip("this release has no NetworkTrainer.process_batch (v0.9: the loss code is inline in train)")
    run = Run(sd, tmp_path, weight_dtype=torch.float16)
    seen = {}

    def spy(latents, noisy_latents, timesteps, model_pred):
        """A second hook that records what the hooks are handed (and adds nothing)."""
        seen.update(latents=latents, noisy=noisy_latents, t=timesteps, pred=model_pred.detach())

    run.session.registry.register("spy", spy)
    unet, trainer, batch = TinySdxlUNet(), trainer_class(), sdxl_batch()
    losses = []
    for off in (False, True):
        with hooks_off(run.session, off):
            torch.manual_seed(0)
            losses.append(trainer.process_batch(
                batch, [None, None], unet, None, run.vae, run.scheduler, torch.float32, torch.float16,
                run.accelerator, run.args, None, None, is_train=True, train_text_encoder=False).detach())
    assert seen["noisy"].dtype == torch.float16 and torch.equal(seen["noisy"], unet.input)  # what the UNet saw
    z0_hat = predict_z0(seen["pred"], seen["noisy"], "epsilon", timesteps=seen["t"],
                        alphas_cumprod=run.scheduler.alphas_cumprod)
    raw = LatentPerceptualLoss(run.vae, run.session.config, 0.13025)(z0_hat, seen["latents"]).per_sample
    weights = min_snr_weight(snr(timesteps=seen["t"], alphas_cumprod=run.scheduler.alphas_cumprod), 5.0, "epsilon")
    torch.testing.assert_close(losses[0] - losses[1], (raw * weights).mean(), rtol=1e-4, atol=1e-7)


WEIGHTED = [("--min_snr_gamma", "5"), ("--min_snr_gamma", "2", "--v_parameterization"),
            ("--debiased_estimation_loss",), ("--scale_v_pred_loss_like_noise_pred", "--v_parameterization",
                                             "--v_pred_like_loss", "0.3", "--min_snr_gamma", "3")]


@pytest.mark.parametrize("cli", WEIGHTED, ids=[" ".join(c) for c in WEIGHTED])
def test_weight_table_gives_what_the_real_functions_give(sd, tmp_path, cli):
    from lpl_plugin.patches.sd_scripts_weights import WeightTable, host_weights

    run = Run(sd, tmp_path, cli=cli)
    table = WeightTable()
    timesteps = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(3))
    real = host_weights(run.args, timesteps, run.scheduler)  # sd-scripts' own functions on this batch
    torch.testing.assert_close(table(run.args, timesteps, run.scheduler), real.float(), rtol=0, atol=0)
    print(f"\n{' '.join(cli)}: t={timesteps.tolist()} weights={real.tolist()}")
