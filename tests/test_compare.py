"""`lpl-plugin compare` end to end against the sd-scripts stand-ins (real subprocesses, real TOML files, tiny models),
and the report layer's numbers (SSIM, PSNR, bootstrap intervals, verdict) on known inputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lpl_plugin.cli import main as cli
from lpl_plugin.training.image_metrics import psnr, ssim
from lpl_plugin.compare.stats import bootstrap_mean, median_step_seconds, paired_bootstrap, verdict_line
from lpl_plugin.compare.toml_write import dumps
from lpl_plugin.settings.toml_io import tomllib
from tests.standin_fixtures import root

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def make_dataset(folder: Path, count: int = 6, size: int = 64) -> Path:
    """DreamBooth-style `1_shapes` folder: coloured shapes on a gradient, a .txt caption each."""
    from PIL import Image, ImageDraw

    images = folder / "data" / "1_shapes"
    images.mkdir(parents=True)
    for i in range(count):
        gradient = np.linspace(40, 200, size, dtype=np.uint8)[None, :, None].repeat(size, 0).repeat(3, 2)
        image = Image.fromarray(gradient)
        draw = ImageDraw.Draw(image)
        box = (8 + i * 3, 10, 40 + i * 3, 46)
        draw.ellipse(box, fill=(200, 30 * i, 60)) if i % 2 else draw.rectangle(box, fill=(30, 200, 40 * i))
        image.save(images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(f"a {SHAPES[i]} on a gradient background")
    return folder / "data"


def write_toml(folder: Path, data: Path, lpl: str = "use_lpl = true\nlpl_t_threshold = 1000\nlpl_num_blocks = 2\n",
               steps: int = 4) -> Path:
    """A LoRA trainer TOML for the stand-in: its data folder, state saved every 2 steps, an [lpl] table."""
    path = folder / "lora.toml"
    path.write_text(f'network_module = "networks.lora"\ntrain_data_dir = "{data.as_posix()}"\n'
                    f'caption_extension = ".txt"\nresolution = 64\nmax_train_steps = {steps}\nseed = 3\n'
                    f'learning_rate = 0.01\nsave_state = true\nsave_every_n_steps = 2\n\n[lpl]\n{lpl}',
                    encoding="utf-8")
    return path


def compare(config: Path, out: Path, *more: str) -> int:
    """Run `lpl-plugin compare` on the v0.10.1 stand-in with small measure settings."""
    return cli.main(["compare", "--sd-scripts", str(root("v0_10_1")), "--config", str(config), "--out", str(out),
                     "--checkpoints", "2", "--sample-steps", "3", "--measure-images", "4", "--noise-seeds", "2",
                     "--noise-levels", "100",
                     *more])


def finite_numbers(value) -> bool:
    """Whether every number inside a JSON value is finite."""
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(finite_numbers(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_compare_trains_both_arms_and_writes_the_report(tmp_path, capsys):
    config = write_toml(tmp_path, make_dataset(tmp_path))
    out = tmp_path / "cmp"
    assert compare(config, out) == 0
    printed = capsys.readouterr().out
    assert "off: training (4 steps, use_lpl = false" in printed and "off: step 4/4" in printed
    assert "on: step 4/4" in printed and "verdict:" in printed
    report = json.loads((out / "report.json").read_text())
    assert finite_numbers(report) and [a["name"] for a in report["arms"]] == ["off", "on"]
    assert report["checkpoints"] == [0, 2, 4] and report["measured_on"].startswith("4 training images")
    for metric in report["metrics"]:
        assert set(metric["per_arm"]) == {"off", "on"} and set(metric["difference"]) == {"on"}
        for interval in [*metric["per_arm"].values(), *metric["difference"].values()]:
            # units: 4 images x 2 noise seeds at one noise level
            assert interval["low"] <= interval["mean"] <= interval["high"] and interval["n"] == 4 * 2
    ssim_off = report["metrics"][1]["by_step"]["off"]
    assert ssim_off["0"] == report["metrics"][1]["by_step"]["on"]["0"]  # before any step both arms are one model
    costs = {c["arm"]: c for c in report["costs"]}
    assert costs["off"]["seconds_per_step"] > 0 and costs["on"]["seconds_per_step"] > 0
    # 4 steps, the first 2 left out, step 1 untimed: one step time per arm is too few for an extra over "off"
    assert costs["on"]["steps_timed"] == 1 and costs["on"]["extra_vs_reference"] is None
    assert costs["on"]["applied_fraction"] == 1.0 and costs["off"]["applied_fraction"] is None
    assert costs["off"]["peak_memory_bytes"] > 10 * 2 ** 20 and costs["off"]["memory_kind"] == "peak RSS"
    assert report["settings"]["differs"]["on"]["use_lpl"] is True and report["settings"]["shared"]["seed"] == 3
    series = report["curves"]["series"]
    assert "loss/current" in series["off"] and "lpl/applied_fraction" in series["on"]
    assert not any(k.startswith("lpl/") for k in series["off"])
    assert (out / report["curves"]["png"]).stat().st_size > 5000
    assert len(report["grids"]) == 2
    for grid in report["grids"]:
        assert grid["rows"] == ["off", "on"] and grid["columns"] == [0, 2, 4]
        from PIL import Image
        with Image.open(out / grid["png"]) as image:
            assert image.height > 2 * 192 and image.width > 3 * 192
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "http" not in html and "src='report/" not in html
    assert "no measurable difference" in html or "on this measure" in html
    markdown = (out / "report.md").read_text()
    assert "| arm | median s/step |" in markdown and "PSNR (dB) at step 4" in markdown
    # the same command again reuses both arms: nothing trains a second time
    assert compare(config, out) == 0
    assert capsys.readouterr().out.count("finished earlier with these settings; reused") == 2
    assert len((out / "on" / "out" / "runs.txt").read_text().split()) == 1
    statuses = [a["status"] for a in json.loads((out / "report.json").read_text())["arms"]]
    assert statuses == ["trained; reused by a later run of the same compare"] * 2


def test_interrupted_arm_resumes_from_its_state_and_other_settings_are_refused(tmp_path, capsys, monkeypatch):
    config = write_toml(tmp_path, make_dataset(tmp_path))
    out = tmp_path / "cmp"
    monkeypatch.setenv("LPL_STANDIN_INTERRUPT_AT", "3")  # the first arm stops after step 3 (state saved at 2)
    assert compare(config, out, "--holdout", "2") == 1
    assert "off: training was stopped by SIGINT; last line: KeyboardInterrupt" in capsys.readouterr().err
    monkeypatch.delenv("LPL_STANDIN_INTERRUPT_AT")
    assert compare(config, out, "--holdout", "2") == 0
    printed = capsys.readouterr().out
    assert "off: resuming from its saved state compare-step00000002-state" in printed
    report = json.loads((out / "report.json").read_text())
    # the stand-in, like sd-scripts without skip_until_initial_step, counts from 1 again: the hook adds the state's step
    assert [p[0] for p in report["curves"]["series"]["off"]["loss/current"]] == [1, 2, 3, 4]
    assert [a["status"] for a in report["arms"]] == ["resumed from its saved state compare-step00000002-state",
                                                     "trained"]
    assert report["measured_on"] == "2 held-out images (kept out of training)"
    trained = sorted(p.name for p in (out / "data" / "train" / "1_shapes").iterdir())
    assert len(trained) == 8 and "00.png" not in trained  # 4 of 6 images and their captions
    # another compare's settings in the same folder: refused before anything runs
    assert compare(config, out, "--holdout", "2", "--steps", "2") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "holds another compare's arms" in line and str(out.name) in line


def test_bad_toml_is_refused_before_anything_trains(tmp_path, capsys):
    config = write_toml(tmp_path, make_dataset(tmp_path), lpl="use_lpl = true\nlpl_weight = -1\n")
    assert compare(config, tmp_path / "cmp") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "lpl_weight" in line and "-1" in line and not (tmp_path / "cmp").exists()


def test_compare_needs_images_and_a_fitting_holdout(tmp_path, capsys):
    data = make_dataset(tmp_path, count=2)
    config = write_toml(tmp_path, data)
    assert compare(config, tmp_path / "cmp", "--holdout", "2") == 2
    assert capsys.readouterr().err.strip() == ("--holdout 2: the dataset has 2 images; keep at least one for "
                                               "training")
    config.write_text(config.read_text().replace(f'train_data_dir = "{data.as_posix()}"\n', ""))
    assert compare(config, tmp_path / "cmp") == 2
    assert "neither `dataset_config` nor `train_data_dir` is set" in capsys.readouterr().err


# -- the report layer's numbers ------------------------------------------------------------------------------------

def test_psnr_and_ssim_on_known_images():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 32, 32, generator=generator)
    assert torch.allclose(ssim(real, real), torch.ones(2))
    assert (psnr(real, real) == 100).all()  # no error: capped at the 1e-10 floor
    gray = torch.full((1, 3, 16, 16), 0.5)
    assert psnr(gray, gray + 0.1).item() == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 -> 20 dB
    noisy = (real + 0.2 * torch.randn(real.shape, generator=generator)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(real, 3, 1, 1)
    assert (ssim(real, noisy) < 0.9).all() and (ssim(real, blurred) < 1).all()
    flat = torch.full_like(real, real.mean().item())
    assert (ssim(real, flat) < 0.05).all()  # no structure in common


def test_intervals_and_verdict():
    values = [1.0, 2.0, 3.0, 4.0] * 2
    interval = bootstrap_mean(values)
    assert interval.mean == 2.5 and 1.0 <= interval.low < 2.5 < interval.high <= 4.0 and interval.n == 8
    same = paired_bootstrap(values, values)
    assert same.mean == same.low == same.high == 0.0
    shifted = paired_bootstrap(values, [v + 0.5 for v in values])
    assert shifted.low == shifted.high == 0.5
    noisy = paired_bootstrap(values, [4.0, 1.0, 3.0, 2.0] * 2)
    assert noisy.low < 0 < noisy.high
    metric = {"label": "PSNR", "unit": "dB", "higher_is_better": True, "step": 10}
    assert verdict_line([{**metric, "difference": {"on": noisy.as_dict()}}], "off").startswith(
        "no measurable difference from off at step 10")
    line = verdict_line([{**metric, "difference": {"on": shifted.as_dict()}}], "off")
    assert "PSNR +0.5 dB" in line and line.endswith("better")
    few = paired_bootstrap(values[:4], [v + 0.5 for v in values[:4]])
    assert verdict_line([{**metric, "difference": {"on": few.as_dict()}}], "off").startswith(
        "no verdict: 4 measured units")
    assert median_step_seconds([9.0, 9.0, 1.0, 2.0, 3.0]) == 2.0 and median_step_seconds([1.0, 2.0]) is None


def test_arm_toml_reads_back_as_written():
    data = {"a": "quote \" and \\ and é", "b": [1, 2.5, True], "c": {"d": 1},
            "datasets": [{"resolution": 64, "subsets": [{"image_dir": "/x y", "num_repeats": 2}]}]}
    assert tomllib.loads(dumps(data)) == data


def test_ctrl_c_stops_the_arm_and_the_compare_cleanly(tmp_path):
    import signal
    import subprocess
    import sys

    config = write_toml(tmp_path, make_dataset(tmp_path), steps=40)
    out = tmp_path / "cmp"
    argv = [sys.executable, "-m", "lpl_plugin", "compare", "--sd-scripts", str(root("v0_10_1")), "--config",
            str(config), "--out", str(out), "--checkpoints", "1", "--sample-steps", "1", "--measure-images", "1",
            "--noise-seeds", "1", "--noise-levels", "100"]
    # a stand-in step takes milliseconds: without a pace the arm could finish before the Ctrl-C reaches it
    env = {**os.environ, "LPL_STANDIN_STEP_SECONDS": "0.5"}
    # the compare runs as in a terminal's foreground, where Ctrl-C is not ignored, also when the test suite itself
    # runs as a background job (which starts with SIGINT ignored, and its children inherit that)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("off: step 1/40"):
            break
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends to the compare's process group
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "stopped; run the same command again to continue" in err
    (pid,) = (out / "off" / "out" / "runs.txt").read_text().split()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not (out / "off" / "done.json").exists() and not (out / "on").exists()


def test_report_pools_seeds_and_shows_missing_samples(tmp_path):
    from PIL import Image

    from lpl_plugin.compare.report import ArmResult, Prompt, write_report

    sample = tmp_path / "s.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(sample)
    arms = [ArmResult(name, {"use_lpl": name == "on", "seed": seed}, seed=seed,
                      scores={"psnr": {0: [10.0] * 4, 5: [10.0 + shift + 0.01 * i for i in range(4)]}},
                      step_times=[5.0, 5.0, 1.0, 1.0 + shift], curves={"loss": [(1, 0.5), (5, 0.4)]},
                      applied_fraction=0.5 if name == "on" else None, peak_memory=2 ** 30, memory_kind="peak RSS",
                      samples={"p0": {0: sample, 5: sample}} if name == "off" else {"p0": {5: sample}})
            for seed in (0, 1) for name, shift in (("off", 0.0), ("on", 0.2 + 0.1 * seed))]
    report = write_report(tmp_path / "r", arms, prompts=[Prompt("p0", "a red square", 7)], reference="off",
                          measured_on="4 training images", title="t")
    (psnr_entry,) = report["metrics"]
    assert psnr_entry["difference"]["on"]["n"] == 8 and psnr_entry["difference"]["on"]["low"] > 0.19
    assert psnr_entry["seed_spread"]["on"] == pytest.approx(0.0707, abs=1e-3) and psnr_entry["seed_spread"]["off"] == 0
    assert report["verdict"].startswith("at step 5, on this measure: PSNR +0.25 dB") and "better" in report["verdict"]
    costs = {c["arm"]: c for c in report["costs"]}
    # medians per seed (first 2 steps left out) 1.1 and 1.15, their median 1.125 against 1.0
    assert costs["on"]["extra_vs_reference"] == pytest.approx(0.125) and costs["on"]["steps_timed"] == 4
    assert report["settings"]["differs"]["on seed 1"] == {"use_lpl": True, "seed": 1}
    (grid,) = report["grids"]
    assert grid["columns"] == [0, 5] and grid["rows"] == ["off", "on"]
    with Image.open(tmp_path / "r" / grid["png"]) as image:  # the missing step-0 sample of "on" is a grey tile
        assert image.getpixel((110 + 96, 22 + 192 + 4 + 20)) == (225, 225, 225)


def test_too_few_timed_steps_give_no_extra_time(tmp_path):
    """Two-step arms time one step each: their medians are shown, the extra over the reference is not."""
    from lpl_plugin.compare.report import ArmResult, write_report

    arms = [ArmResult(name, {"use_lpl": name == "on"}, step_times=times)
            for name, times in (("off", [9.0, 300.0]), ("on", [9.0, 40.0]))]
    report = write_report(tmp_path / "r", arms, prompts=[], reference="off", measured_on="no images", title="t")
    costs = {c["arm"]: c for c in report["costs"]}
    assert costs["on"]["seconds_per_step"] == 40.0 and costs["on"]["steps_timed"] == 1
    assert costs["on"]["extra_vs_reference"] is None and not costs["on"]["enough_steps_timed"]
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "| on | 40 | 1 (first 1 left out) | – (under 2 steps timed) |" in markdown
