"""`lpl-plugin bench` smoke test on the tiny VAE: the table's structure and matching lean/plain loss values."""

from __future__ import annotations

import json
import os

import pytest

from lpl_plugin.cli.main import main
from lpl_plugin.engine.tiny import tiny_vae

TINY = ["bench", "--vae", "tiny", "--latent", "8", "--batch", "2", "--rounds", "1", "--calls", "1",
        "--device", "cpu", "--threads", "1"]


def rows(out: str) -> dict[str, list[str]]:
    """The markdown table's data rows by variant."""
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_bench_prints_a_markdown_table_with_matching_losses(capsys):
    assert main([*TINY, "--variants", "lean", "autograd"]) == 0
    out = capsys.readouterr().out
    assert ("| variant | setting | time / call | time vs lean | CPU time / call | CPU time vs lean | peak extra "
            "| memory vs lean | loss |") in out
    table = rows(out)
    assert set(table) == {"lean", "autograd"}
    for cells in table.values():
        assert len(cells) == 9 and cells[2].endswith(" s") and cells[4].endswith(" s") and cells[6].endswith(" GB")
    assert table["lean"][3] == table["lean"][5] == "1.00×"
    assert float(table["lean"][8]) == pytest.approx(float(table["autograd"][8]), rel=1e-4)


@pytest.mark.skipif(not os.environ.get("LPL_REFERENCE_LOSS"),
                    reason="set LPL_REFERENCE_LOSS to a copy of diffusers' examples/research_projects/lpl/lpl_loss.py")
def test_bench_runs_the_reference_side_by_side(capsys):
    assert main([*TINY, "--variants", "compat", "--reference", os.environ["LPL_REFERENCE_LOSS"]]) == 0
    table = rows(capsys.readouterr().out)
    assert float(table["compat"][8]) == pytest.approx(float(table["reference"][8]), rel=1e-4)


def test_bench_takes_a_vae_config(capsys, tmp_path):
    tiny_vae((8, 16), groups=4).save_config(tmp_path)
    args = [a if a != "tiny" else str(tmp_path / "config.json") for a in TINY]
    assert main([*args, "--variants", "lean", "--blocks", "2"]) == 0
    out = capsys.readouterr().out
    assert f"vae={tmp_path / 'config.json'}" in out and set(rows(out)) == {"lean"}


def test_bench_rejects_unknown_variants_missing_reference_and_bad_vae(capsys, tmp_path):
    assert main([*TINY, "--variants", "fastest"]) == 2
    assert main([*TINY, "--reference", str(tmp_path / "lpl_loss.py")]) == 2
    assert main([*[a if a != "tiny" else str(tmp_path) for a in TINY], "--variants", "lean"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "valid:" in err[0] and "no such file" in err[1]
    assert err[2].endswith("is neither tiny, sdxl, a diffusers VAE folder nor its config.json (single-file SDXL VAEs "
                           "share the sdxl layout: pass --vae sdxl)")


def test_gpu_suite_runs_reduced_on_a_cpu_and_writes_both_reports(capsys, tmp_path):
    from lpl_plugin.settings.presets import preset_names

    out = tmp_path / "report"
    assert main(["bench", "--suite", "gpu", "--device", "cpu", "--vae", "tiny", "--resolution", "64",
                 "--demo-steps", "2", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert printed == (out / "report.md").read_text() + "\n" and printed.startswith("# lpl-plugin bench --suite gpu")
    rows = report["side_by_side"]
    assert [r["variant"] for r in rows] == ["lean", "speed", "lean-resnet"]
    assert all(r["attention"] == "sdpa" and r["time"] > 0 and r["peak"] > 0 for r in rows)
    assert rows[0]["time_ratio"] == 1.0 and len({round(r["loss"], 6) for r in rows}) == 1  # one loss, three engines
    presets = {r["preset"]: r for r in report["presets"]}
    assert set(presets) == set(preset_names())
    assert all(r["peak"] > 0 and r["estimate"] > 0 and r["lpl_dtype"] == "float32" for r in presets.values())
    assert report["demo"]["steps"] == 2 and set(report["demo"]["runs"]) == {"lpl", "baseline"}
    for title in ("side by side", "Presets: measured peak against `lpl-plugin estimate`", "## Demo"):
        assert title in printed


def test_gpu_suite_refuses_an_unwritable_folder_before_measuring(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "--suite", "gpu", "--device", "cpu", "--vae", "tiny", "--out", str(blocker / "x")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"--out {blocker / 'x'}: cannot write there")
