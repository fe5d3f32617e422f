"""`lpl-plugin demo` as a user runs it: artifacts, one-line errors, kill and resume, and two processes under accelerate."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lpl_plugin.cli.main import main
from lpl_plugin.demo.data import batch_noise

from .conftest import write

# Short runs: 32 px images (4x4 latents), two images per step, a nearly unfitted VAE. LPL starts at step 6 and the
# threshold is high, so most steps after it apply LPL; a checkpoint every 2 steps.
STEPS = 12
LPL_START = 6
T_THRESHOLD = 500
SHORT = ("--resolution", "32", "--batch-size", "2", "--vae-steps", "3", "--no-progress")
LPL_TOML = f"[lpl]\nuse_lpl = true\nlpl_start = {LPL_START}\nlpl_t_threshold = {T_THRESHOLD}\n"
# One thread per process: identical arithmetic in every process, and no oversubscription on shared CPUs.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def demo_command(out: Path, config: Path, *extra: str) -> list[str]:
    """`python -m lpl_plugin demo` with the short settings."""
    return [sys.executable, "-m", "lpl_plugin", "demo", "--out", str(out), "--config", str(config),
            "--steps", str(STEPS), "--save-every", "2", *SHORT, *extra]


def run(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command to completion and capture its output."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


def metrics(out: Path, name: str) -> list[dict]:
    """A run's per-step metrics, without the wall-clock column."""
    rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def scores(out: Path, name: str) -> list[dict]:
    """A run's checkpoint scores (PSNR and SSIM per unit)."""
    return [json.loads(line) for line in (out / "runs" / name / "scores.jsonl").read_text().splitlines()]


def result(out: Path, name: str) -> dict:
    """A finished run's result.json."""
    return json.loads((out / "runs" / name / "result.json").read_text())


def numbers(data, path="summary"):
    """Every number in nested JSON data, with where it sits."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        yield path, data


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The short runs' LPL settings."""
    return write(tmp_path_factory.mktemp("config"), LPL_TOML, "lpl.toml")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config) -> Path:
    """One uninterrupted short demo, the yardstick for the kill-and-resume tests."""
    out = tmp_path_factory.mktemp("reference") / "demo"
    done = run(demo_command(out, config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return out


def test_demo_writes_every_artifact(reference):
    from PIL import Image

    out = reference
    for name, least in (("losses.png", (500, 500)), ("samples.png", (500, 300)), ("samples/before.png", (64, 64)),
                        ("samples/lpl.png", (64, 64)), ("samples/baseline.png", (64, 64)),
                        ("samples/data.png", (64, 64))):
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and image.width >= least[0] and image.height >= least[1], name
            pixels = torch.tensor(list(image.convert("L").getdata()), dtype=torch.float32)
            assert pixels.std() > 5, f"{name} is blank"
    summary = json.loads((out / "summary.json").read_text())
    found = dict(numbers(summary))
    assert all(math.isfinite(v) for v in found.values()), found
    assert summary["interrupted"] is False and summary["steps"] == STEPS and summary["num_processes"] == 1
    assert summary["seconds"]["wall"] > 0 and summary["seconds"]["cpu"] > 0
    assert summary["lpl"]["lpl_start"] == LPL_START and summary["settings"]["resolution"] == 32
    lpl, baseline = summary["runs"]["lpl"], summary["runs"]["baseline"]
    for run_summary in (lpl, baseline):
        assert run_summary["steps"] == STEPS and run_summary["peak_memory"]["cpu_max_rss_bytes"] > 0
        assert run_summary["optimizer"] == "bitsandbytes.optim.AdamW8bit" and run_summary["ranks_identical"]
        assert run_summary["eval"]["lpl_distance"] > 0 and run_summary["eval"]["diffusion_loss"] > 0
        assert run_summary["losses"]["mean"]["diffusion"] > 0
    assert lpl["losses"]["mean"]["lpl_term"] > 0 and lpl["losses"]["mean"]["applied_fraction"] > 0
    assert baseline["losses"]["mean"]["lpl_term"] == 0 and baseline["losses"]["mean"]["applied_fraction"] == 0
    rows = metrics(out, "lpl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["lpl_term"] == 0 for r in rows[:LPL_START]) and any(r["lpl_term"] > 0 for r in rows[LPL_START:])
    assert all(r["lpl_term"] == 0 and r["applied_fraction"] == 0 for r in metrics(out, "baseline"))
    assert lpl["weights_sha256"] != baseline["weights_sha256"]
    assert "lpl_start = 6" in (out / "lpl.toml").read_text()
    share = summary["lpl_share"]
    assert 0 < share["mean"] < 1 and 0 < share["applied_steps"] <= STEPS - LPL_START and share["steps"] == STEPS


def test_demo_ends_with_the_compare_report(reference):
    """The two runs as the arms of a compare report: grids, curves, metric and cost tables, verdict, LPL's share."""
    from PIL import Image

    from lpl_plugin.demo.measure import NOISE_LEVELS, NOISE_SEEDS, checkpoint_steps
    from lpl_plugin.demo.pipeline import MEASURE_IMAGES, SAMPLE_COUNT

    out = reference
    report = json.loads((out / "report.json").read_text())
    found = dict(numbers(report, "report"))
    assert all(math.isfinite(v) for v in found.values()), found
    assert [a["name"] for a in report["arms"]] == ["off", "on"] and report["reference"] == "off"
    assert all(a["status"] == "trained" for a in report["arms"])
    assert report["settings"]["differs"] == {"off": {"use_lpl": False}, "on": {"use_lpl": True}}
    checkpoints = checkpoint_steps(STEPS)
    assert report["checkpoints"] == checkpoints and checkpoints[-1] == STEPS
    units = MEASURE_IMAGES * len(NOISE_LEVELS) * len(NOISE_SEEDS)
    for metric in report["metrics"]:
        assert metric["step"] == STEPS and set(metric["per_arm"]) == {"off", "on"}
        for interval in [*metric["per_arm"].values(), metric["difference"]["on"]]:
            assert interval["n"] == units and interval["low"] <= interval["mean"] <= interval["high"]
        assert set(metric["by_step"]["on"]) == {str(s) for s in checkpoints}
    assert {m["name"] for m in report["metrics"]} == {"psnr", "ssim"}
    psnr = report["metrics"][0]["per_arm"]["off"]["mean"]
    assert 5 < psnr < 60, psnr
    costs = {c["arm"]: c for c in report["costs"]}
    assert costs["off"]["seconds_per_step"] > 0 and costs["on"]["seconds_per_step"] > 0
    assert costs["off"]["applied_fraction"] is None and 0 < costs["on"]["applied_fraction"] < 1
    assert costs["on"]["peak_memory_bytes"] > 0 and costs["on"]["memory_kind"] == "peak RSS of this run"
    assert report["verdict"].startswith(("no measurable difference", "at step"))
    assert report["notes"][0].startswith("LPL's share of the loss where it applied:")
    assert len(report["grids"]) == SAMPLE_COUNT
    for grid in report["grids"]:
        assert grid["rows"] == ["off", "on"] and grid["columns"] == checkpoints
        with Image.open(out / grid["png"]) as image:
            pixels = torch.tensor(list(image.convert("L").getdata()), dtype=torch.float32)
            assert image.width > image.height > 2 * 64 and pixels.std() > 5, grid["png"]
    assert (out / report["curves"]["png"]).stat().st_size > 10_000
    assert set(report["curves"]["series"]["on"]) >= {"loss", "lpl/weighted", "lpl/applied_fraction"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    markdown = (out / "report.md").read_text()
    assert report["verdict"] in markdown and "| on |" in markdown


def test_demo_tensorboard_has_the_scalars(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("lpl", "baseline"):
        events = list((reference / "tensorboard" / name).glob("events.out.tfevents.*"))
        assert events, name
        accumulator = EventAccumulator(str(events[0].parent)).Reload()
        tags = accumulator.Tags()["scalars"]
        assert {"loss/diffusion", "lpl/term", "lpl/applied_fraction"} <= set(tags)
        terms = [e.value for e in accumulator.Scalars("lpl/term")]
        assert len(terms) == STEPS and (max(terms) > 0) == (name == "lpl")


def test_inspect_reads_the_demo_vae(reference, tmp_path, capsys):
    assert main(["inspect", "--vae", str(reference / "vae"), "--image", str(reference / "samples" / "data.png"),
                 "--out", str(tmp_path / "inspect.png")]) == 0
    assert (tmp_path / "inspect.png").stat().st_size > 10_000 and "up3" in capsys.readouterr().out


def start_and_kill(command: list[str], checkpoint: Path, signum: int) -> tuple[int, str]:
    """Start a demo, send it `signum` as soon as `checkpoint` exists; returns its exit status and stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 600
    while not checkpoint.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def latest_step(run_dir: Path) -> int:
    """The step of a run's newest complete checkpoint."""
    return max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-??????"))


def test_killed_runs_resume_to_the_same_weights(reference, config, tmp_path):
    """SIGTERM during the LPL run (before lpl_start), resume; SIGKILL during the baseline run, resume: the same
    per-step logs, LPL gating and final weights as the uninterrupted run."""
    out = tmp_path / "demo"
    resume = [sys.executable, "-m", "lpl_plugin", "demo", "--resume", str(out), "--no-progress"]
    lpl_dir, baseline_dir = out / "runs" / "lpl", out / "runs" / "baseline"

    status, stderr = start_and_kill(demo_command(out, config), lpl_dir / "checkpoints" / "step-000002", signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "Traceback" not in stderr and f"--resume {out}" in stderr
    stopped_at = latest_step(lpl_dir)
    assert stopped_at < LPL_START, "the stop came too late to test the gating across the resume"
    assert metrics(out, "lpl")[-1]["step"] == stopped_at  # saved at the very step it stopped after
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["stopped_by"] == "SIGTERM" and (out / "losses.png").is_file()
    assert summary["verdict"] is None and not (out / "report.json").exists()  # the report comes with the last step

    status, stderr = start_and_kill(resume, baseline_dir / "checkpoints" / "step-000002", signal.SIGKILL)
    assert status == -signal.SIGKILL, stderr[-3000:]
    assert (lpl_dir / "result.json").is_file() and not (baseline_dir / "result.json").exists()
    assert result(out, "lpl")["resumed_from"].endswith(f"step-{stopped_at:06d}")
    killed_at = latest_step(baseline_dir)

    done = run(resume)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lpl: finished before the interruption; kept" in done.stdout
    assert f"baseline: resuming from {baseline_dir / 'checkpoints' / f'step-{killed_at:06d}'}" in done.stdout
    for name in ("lpl", "baseline"):
        assert metrics(out, name) == metrics(reference, name), name
        assert result(out, name)["weights_sha256"] == result(reference, name)["weights_sha256"], name
        assert scores(out, name) == scores(reference, name), name
    assert json.loads((out / "summary.json").read_text())["interrupted"] is False
    report = json.loads((out / "report.json").read_text())
    assert [a["status"] for a in report["arms"]] == [
        f"resumed from step-{killed_at:06d}", f"resumed from step-{stopped_at:06d}; kept from before the interruption"]
    assert report["metrics"] == json.loads((reference / "report.json").read_text())["metrics"]


def test_two_processes_share_the_work(tmp_path):
    out = tmp_path / "demo"
    config = write(tmp_path, f"[lpl]\nuse_lpl = true\nlpl_t_threshold = {T_THRESHOLD}\n")
    # The issue's command: accelerate's --cpu launcher starts one process (no MPI here), which the demo turns into
    # two gloo processes through torchrun.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "-m", "lpl_plugin", "demo", "--steps", "4", "--out", str(out), "--config", str(config), *SHORT]
    done = run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    for name in ("lpl", "baseline"):
        assert summary["runs"][name]["ranks_identical"] is True
    # Each process drew its own noise and timesteps; the logged fraction is that of both shards together.
    rows = metrics(out, "lpl")
    for row in rows:
        gated = sum(int((batch_noise((2, 4, 4, 4), row["step"] - 1, 0, rank, 1000)[1] < T_THRESHOLD).sum())
                    for rank in (0, 1))
        assert row["applied_fraction"] == pytest.approx(gated / 4)
    assert rows[-1]["step"] == 4 and any(row["lpl_term"] > 0 for row in rows)
    assert done.stdout.count("done:") == 1


def test_cpu_launch_with_unknown_process_count_is_refused(monkeypatch, tmp_path, capsys):
    """Under accelerate's --cpu launcher with N unreadable (here the parent is pytest), say how to get N processes."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--multi_gpu --num_processes N" in err[0] and not (tmp_path / "demo").exists()


def test_demo_mistakes_are_one_line(tmp_path, capsys):
    assert main(["demo", "--resolution", "50", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "--resolution must be a multiple of 32 (the VAE downsamples 8x and the UNet 4x more), got 50"]
    assert main(["demo", "--config", str(write(tmp_path, "[lpl]\nlpl_wieght = 2\n")), "--out", str(tmp_path / "b")]) == 2
    assert "did you mean `lpl_weight`" in capsys.readouterr().err
    assert main(["demo", "--config", str(write(tmp_path, "use_lpl = false\n", "off.toml"))]) == 2
    assert "LPL is off" in capsys.readouterr().err
    assert main(["demo", "--resume", str(tmp_path)]) == 2
    assert "no earlier demo to resume" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "c"), *SHORT]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "c" / "notes.txt").is_file()


def test_ctrl_c_asks_to_stop_and_a_second_one_aborts():
    from lpl_plugin.demo.stopping import graceful_stop

    previous = signal.getsignal(signal.SIGINT)
    with graceful_stop() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGINT)
        assert stop and stop.name == "SIGINT" and stop.exit_status == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_optimizer_falls_back_to_torch_adamw_with_one_line(monkeypatch):
    from lpl_plugin.demo.settings import DemoSettings
    from lpl_plugin.demo.train import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(8))]
    said = []
    optimizer, name = make_optimizer(params, DemoSettings(), torch.device("cpu"), said.append)
    assert name == "bitsandbytes.optim.AdamW8bit" and not said
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    optimizer, name = make_optimizer(params, DemoSettings(), torch.device("cpu"), said.append)
    assert isinstance(optimizer, torch.optim.AdamW) and name == "torch.optim.AdamW"
    assert len(said) == 1 and "cannot run here" in said[0] and "\n" not in said[0]
