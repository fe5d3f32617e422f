"""The hostile-input catalogue (tests/data/hostile): every case ends in exit 2 or the package's own exception, with a
few short, escaped lines, within a timeout and a memory limit, never a traceback, a hang or a pickle load.

Every command runs in a real subprocess from a copy of the catalogue folder, where the special files (FIFOs, sockets,
symbolic link loops, /dev links, sparse files, hostile names) are made first. The subprocesses run concurrently and
once per module; each test then checks one (case, runner) outcome. The API cases share one worker process.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.standin_fixtures import root

HERE = Path(__file__).parent
CATALOG = json.loads((HERE / "data" / "hostile" / "catalog.json").read_text(encoding="utf-8"))["entries"]
API_RUNNERS = ("api", "api-config", "api-vae", "api-image")
# Limits on each process: light commands never import torch; the others may (inspect, estimate, the API worker).
LIGHT_MEMORY, HEAVY_MEMORY = 512 << 20, 4 << 30
TIMEOUT = 180
# What may appear in output: printable text. Control characters (C0, DEL, C1), bidi controls and line separators
# would let a file forge lines or drive the terminal.
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_LINE = 700
DEFAULT_LINES = 3
CLASSES = {"format-string", "special-path", "shape-size", "forged-output", "accepted-bad-input", "trusting-config",
           "pickle-index", "image-output", "api-arguments", "gui-helper"}


@dataclass
class Outcome:
    """What one runner did with one case: exit status (None for the API), output, and the API's exception."""

    status: int | None
    out: str
    err: str
    raised: dict | None = None


def make(work: Path, spec: dict) -> None:
    """Create one special file of the catalogue in the working copy."""
    path = work / spec["at"]
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = spec["kind"]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(spec["to"])
    elif kind == "symlink_loop":
        other = path.with_name(path.name + ".other")
        path.symlink_to(other.name)
        other.symlink_to(path.name)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))  # the socket file stays after close
    elif kind == "directory":
        path.mkdir()
    elif kind == "sparse":
        with open(path, "wb") as handle:
            handle.truncate(spec["size"])
    elif kind == "big":
        line = b"# " + b"x" * 97 + b"\n"
        path.write_bytes((line * (spec["size"] // len(line) + 1))[:spec["size"]])
    elif kind == "text":
        path.write_text(spec["text"], encoding="utf-8")
    elif kind == "numbered":  # `line` repeated `count` times, <i> replaced by the line's number
        path.write_text("".join(spec["line"].replace("<i>", str(i)) for i in range(spec["count"])), encoding="utf-8")
    else:
        raise ValueError(kind)


def limits(memory: int, file_size: int | None = None):
    """A preexec_fn: cap the address space (and the size of written files, with SIGXFSZ ignored so write fails)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    return apply


def run(argv: list[str], work: Path, memory: int, file_size: int | None = None) -> Outcome:
    """One real subprocess from the working copy, stdin closed."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *argv], cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=TIMEOUT, preexec_fn=limits(memory, file_size))
    decode = lambda data: data.decode("utf-8", errors="backslashreplace")  # noqa: E731
    return Outcome(done.returncode, decode(done.stdout), decode(done.stderr))


def command(entry: dict, runner: str, index: int) -> tuple[list[str], int, int | None]:
    """argv, memory limit and file-size limit of one runner on one case."""
    file = entry.get("file")
    out = f"special/out-{index}.png"
    if runner == "validate":
        return ["-m", "lpl_plugin", "validate", file], LIGHT_MEMORY, None
    if runner == "launch":
        script = str(root("v0_10_1") / "sdxl_train_network.py")
        return ["-m", "lpl_plugin.launch", script, "--config_file", file], LIGHT_MEMORY, None
    if runner == "doctor":
        return ["-m", "lpl_plugin", "doctor", "--config", file], HEAVY_MEMORY, None
    if runner == "demo":
        return ["-m", "lpl_plugin", "demo", "--config", file, "--out", f"special/demo-{index}"], LIGHT_MEMORY, None
    if runner in ("cli", "cli-fsize"):
        return ["-m", "lpl_plugin", *entry["argv"]], HEAVY_MEMORY, (16 << 10 if runner == "cli-fsize" else None)
    if runner == "inspect-vae":
        return ["-m", "lpl_plugin", "inspect", "--vae", file, "--image", "images/small.png", "--out", out], \
            HEAVY_MEMORY, None
    if runner == "inspect-image":
        return ["-m", "lpl_plugin", "inspect", "--vae", "tiny", "--image", file, "--out", out], HEAVY_MEMORY, None
    raise ValueError(runner)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[tuple[str, str], Outcome]:
    """Every (case, runner) of the catalogue, run once: commands concurrently, API cases in one worker."""
    work = tmp_path_factory.mktemp("hostile")
    shutil.copytree(HERE / "data" / "hostile", work, dirs_exist_ok=True)
    for entry in CATALOG:
        for spec in entry.get("make", []):
            make(work, spec)
    jobs, api = {}, []
    for index, entry in enumerate(CATALOG):
        for runner in entry["run"]:
            if runner in API_RUNNERS:
                api.append({"name": entry["name"], "runner": runner, "file": entry.get("file"),
                            "api": entry.get("api")})
            else:
                jobs[(entry["name"], runner)] = command(entry, runner, index)
    cases = work / "api_cases.json"
    cases.write_text(json.dumps(api), encoding="utf-8")
    with ThreadPoolExecutor(max_workers=4) as pool:
        worker = pool.submit(run, [str(HERE / "hostile_api.py"), str(cases)], work, HEAVY_MEMORY)
        futures = {key: pool.submit(run, argv, work, memory, size) for key, (argv, memory, size) in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}
        done = worker.result()
    assert done.status == 0, done.err[-3000:]
    for line in done.out.splitlines():
        raised = json.loads(line)
        results[(raised["name"], raised["runner"])] = Outcome(None, "", "", raised)
    return results


def test_catalogue_covers_every_class_with_several_cases():
    names = [entry["name"] for entry in CATALOG]
    assert len(names) == len(set(names))
    counts = {cls: sum(entry["class"] == cls for entry in CATALOG) for cls in CLASSES}
    assert set(entry["class"] for entry in CATALOG) == CLASSES and min(counts.values()) >= 4, counts
    listed = {entry["file"] for entry in CATALOG if entry.get("file") and "make" not in entry}
    on_disk = {str(p.relative_to(HERE / "data" / "hostile")) for p in (HERE / "data" / "hostile").rglob("*")}
    assert listed <= on_disk, listed - on_disk
    assert all(entry["expect"] for entry in CATALOG)


PAIRS = [(entry, runner) for entry in CATALOG for runner in entry["run"]]


@pytest.mark.parametrize("entry, runner", PAIRS, ids=[f"{e['name']}-{r}" for e, r in PAIRS])
def test_hostile_case(outcomes, entry, runner):
    outcome = outcomes[(entry["name"], runner)]
    if outcome.raised is not None:  # the Python API: the package's own exception, one short line per problem
        raised = outcome.raised
        assert raised["raised"], f"{entry['name']}: returned normally"
        assert "UserError" in raised["mro"] and entry["error"] in raised["mro"], raised.get("traceback")
        text, shown = raised["message"], raised["message"]
    else:  # a command: exit status, no traceback, the message on stderr (doctor reports on stdout, status 1)
        expected = 1 if runner == "doctor" else entry["status"]
        assert outcome.status == expected, (outcome.status, outcome.err[-2000:])
        shown = outcome.out if runner == "doctor" else outcome.err
        text = outcome.out + outcome.err
        assert "Traceback" not in text and (runner == "doctor" or outcome.out.strip() == ""), text[-2000:]
    assert entry["expect"] in shown, shown[-2000:]
    lines = shown.strip().splitlines()
    assert len(lines) <= entry.get("lines", DEFAULT_LINES) or runner == "doctor", lines
    for line in text.splitlines():
        assert len(line) <= MAX_LINE and not UNSAFE.search(line), line[:MAX_LINE]
