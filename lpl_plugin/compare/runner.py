"""Running one arm: sd-scripts' script through lpl-plugin's launcher in its own process, a progress line per step,
resuming from the arm's last saved state, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from lpl_plugin.training.measure import PLAN_ENV

POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 30


class ArmFailed(Exception):
    """An arm's training process ended with an error; the message names its log."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def last_state(out: Path) -> Path | None:
    """The newest state folder sd-scripts saved under the arm's output folder (`*-state`), if any."""
    states = [p for p in out.glob("*state") if p.is_dir() and any(p.iterdir())] if out.is_dir() else []
    return max(states, key=lambda p: p.stat().st_mtime) if states else None


def state_step(state: Path) -> int | None:
    """The optimizer step a saved state was taken at: sd-scripts' train_state.json, lpl-plugin's state file, or the
    folder's name (`...-step00000002-state`)."""
    for name, key in (("train_state.json", "current_step"), ("lpl_plugin_state.json", "optimizer_steps")):
        try:
            return int(json.loads((state / name).read_text(encoding="utf-8"))[key])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    match = re.search(r"step(\d+)", state.name)
    return int(match.group(1)) if match else None


def read_steps(path: Path) -> list[dict]:
    """The step records the in-process hook wrote so far (a half-written last line is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def command(python: str, script: Path, config: Path, resume: Path | None) -> list[str]:
    """The arm's command line: the launcher, the script, its config, and --resume when continuing."""
    argv = [python, "-m", "lpl_plugin.launch", str(script), "--config_file", str(config)]
    return argv + (["--resume", str(resume)] if resume is not None else [])


def run_arm(argv: list[str], folder: Path, plan_file: Path, total: int, label: str,
            say: Callable[[str], None]) -> None:
    """Run the arm's process to the end, printing "<label>: step k/N" as the hook records steps; on Ctrl-C stop the
    process (SIGINT, then terminate) and re-raise KeyboardInterrupt; ArmFailed when it exits with an error."""
    env = {**os.environ, PLAN_ENV: str(plan_file), "PYTHONUNBUFFERED": "1"}
    log_path = folder / "train.log"
    steps_file = folder / "measure" / "steps.jsonl"
    seen = len(read_steps(steps_file))
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(folder),
                                   start_new_session=True, preexec_fn=default_sigint)
        previous = signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the arm too, not only Ctrl-C
        try:
            while process.poll() is None:
                time.sleep(POLL_SECONDS)
                seen = report_progress(steps_file, seen, total, label, say)
        except KeyboardInterrupt:
            stop(process)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    report_progress(steps_file, seen, total, label, say)
    if process.returncode != 0:
        tail = [line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        last = tail[-1] if tail else "(no output)"
        code = process.returncode
        ended = f"was stopped by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        raise ArmFailed(f"{label}: training {ended}; last line: {last[:300]} (full log: {log_path})", code)


def report_progress(steps_file: Path, seen: int, total: int, label: str, say: Callable[[str], None]) -> int:
    """Print one line per newly recorded step; returns how many steps are recorded now."""
    records = read_steps(steps_file)
    for record in records[seen:]:
        seconds = record.get("seconds")
        timing = f", {seconds:.2f} s/step" if isinstance(seconds, (int, float)) else ""
        say(f"{label}: step {record['step']}/{total}{timing}")
    return max(seen, len(records))


def default_sigint() -> None:
    """In the arm's process before it starts: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt there even when compare itself was started with SIGINT ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: stop like Ctrl-C."""
    raise KeyboardInterrupt


def stop(process: subprocess.Popen) -> None:
    """Stop the arm's process group: SIGINT (sd-scripts' own Ctrl-C), then terminate after a grace period."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
    except ProcessLookupError:
        pass


def python_executable() -> str:
    """The interpreter to train with: this one (compare runs in sd-scripts' environment)."""
    return sys.executable
