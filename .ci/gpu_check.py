#!/usr/bin/env python3
"""The GPU check in one command: `python .ci/gpu_check.py --out gpu-check` from the repository root.

On a CUDA machine it runs the two-process tests over NCCL (two GPUs; gloo on CUDA tensors with one GPU), the
host-read / host-copy counter on CUDA, and `lpl-plugin bench --suite gpu`, and writes `report.md` and
`report.json` into --out (under 10 minutes on one H100-class GPU; the bench suite takes most of it). On a machine
without CUDA the same command runs end to end with the CUDA parts skipped, and the report says which and why.
Exit status 0 when nothing that ran failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_ranks_device.py", "tests/test_sync_count.py"]


def environment() -> dict[str, Any]:
    """Python, torch and the GPUs this check ran on."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpus": gpus}


def pytest_part(out: Path) -> dict[str, Any]:
    """The two-process and sync-count tests (CUDA variants skip themselves without CUDA); one row per test."""
    xml = out / "pytest.xml"
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", *TESTS, "-q", "-rs", "-p", "no:cacheprovider",
                           f"--junitxml={xml}"], cwd=ROOT, capture_output=True, text=True, timeout=480)
    (out / "pytest.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    rows = []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = "failed" if kind != "skipped" else "skipped"
                detail = (found.get("message") or "").splitlines()[0][:200] if found.get("message") else kind
        rows.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                     "detail": detail})
    return {"status": done.returncode, "seconds": time.perf_counter() - began, "tests": rows}


def counts_part() -> list[dict[str, Any]]:
    """Reads and copies of each adapter step, measured here on every device present (the sync-count test's run)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.test_sync_count import counted_steps

    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for prediction in ("epsilon", "v_prediction"):
            with tempfile.TemporaryDirectory() as folder:
                steps = counted_steps(Path(folder), device, prediction)
            rows.append({"device": device, "prediction": prediction,
                         "reads": [s["reads"] for s in steps], "copies": [s["copies"] for s in steps],
                         "events": [s["events"] for s in steps]})
    return rows


def bench_part(out: Path, reference: str | None) -> dict[str, Any]:
    """`lpl-plugin bench --suite gpu` on CUDA; skipped, with the reason, elsewhere."""
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device: the GPU suite was not run (on a CPU, `lpl-plugin "
                                               "bench --suite gpu` runs a reduced version by itself)"}
    argv = [sys.executable, "-m", "lpl_plugin", "bench", "--suite", "gpu", "--out", str(out / "bench")]
    argv += ["--reference", reference] if reference else []
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=540)
    (out / "bench.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    report = out / "bench" / "report.md"
    return {"status": "passed" if done.returncode == 0 else "failed", "exit": done.returncode,
            "seconds": time.perf_counter() - began,
            "report": report.read_text(encoding="utf-8") if report.is_file() else None}


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    env = report["environment"]
    lines = ["# lpl-plugin GPU check", "",
             f"python {env['python']}, torch {env['torch']}, CUDA {env['cuda'] or '–'}, GPUs: "
             f"{', '.join(env['gpus']) or 'none (the CUDA parts were skipped)'}", "",
             "## Tests (two processes per backend; host reads and copies per step)", "",
             "| test | outcome | seconds | detail |", "|---|---|---|---|"]
    tests = report["tests"]["tests"]
    lines += [f"| {r['test']} | {r['outcome']} | {r['seconds']:.1f} | {r['detail']} |" for r in tests]
    lines += ["", "## Host reads and host-to-device copies of 4 adapter steps (steps 2 and 4 log)", "",
              "| device | prediction | reads per step | copies per step |", "|---|---|---|---|"]
    lines += [f"| {r['device']} | {r['prediction']} | {r['reads']} | {r['copies']} |" for r in report["counts"]]
    bench = report["bench"]
    lines += ["", "## lpl-plugin bench --suite gpu", ""]
    if bench["status"] == "skipped":
        lines.append(f"Skipped: {bench['reason']}.")
    else:
        lines.append(f"{bench['status']} (exit {bench['exit']}) in {bench['seconds']:.0f} s; its report:")
        lines += ["", (bench["report"] or "(no report.md written: see bench.log)").replace("\n# ", "\n### ")]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for report.md, report.json and the logs")
    parser.add_argument("--reference", help="the diffusers reference's lpl_loss.py, for the bench's side-by-side")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    report: dict[str, Any] = {"environment": environment()}
    print("# tests", file=sys.stderr, flush=True)
    report["tests"] = pytest_part(out)
    print("# host reads and copies", file=sys.stderr, flush=True)
    report["counts"] = counts_part()
    print("# bench --suite gpu", file=sys.stderr, flush=True)
    report["bench"] = bench_part(out, args.reference)
    report["seconds"] = time.perf_counter() - began
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report) + f"\nWhole check: {report['seconds']:.0f} s.\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    print(text)
    failed = report["tests"]["status"] != 0 or report["bench"]["status"] == "failed"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
