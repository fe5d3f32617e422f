"""The adapter's resume state file survives a writer killed while saving it.

A real writer process saves a large state (a hook whose counters take tens of MB as JSON, so that writing and
fsyncing take a while) over a complete one; the test watches the state folder and sends SIGKILL as soon as new
bytes land on disk, then resumes from the folder the way the adapter does on `--resume`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lpl_plugin.patches.saved_state import STATE_FILE, save_state
from lpl_plugin.patches.sd_scripts_state import resumed_state
from lpl_plugin.training.registry import HookRegistry

WRITER = r'''
import sys

from lpl_plugin.patches.saved_state import save_state
from lpl_plugin.training.registry import HookRegistry


class Counters:
    """A hook with a large state."""

    def __call__(self, model_pred):
        raise AssertionError("not called")

    def state_dict(self):
        return {"calls": 4, "history": "x" * int(sys.argv[2])}


registry = HookRegistry()
registry.register("counters", Counters())
save_state(sys.argv[1], 4, None, registry)
'''


class Counters:
    """The same hook with a small state, for the complete file written before."""

    def __init__(self, calls: int):
        self.calls = calls

    def __call__(self, model_pred):
        raise AssertionError("not called")

    def state_dict(self):
        return {"calls": self.calls}


def write_complete(folder: Path, steps: int) -> None:
    registry = HookRegistry()
    registry.register("counters", Counters(steps))
    save_state(folder, steps, None, registry)


def started_writing(folder: Path, before: os.stat_result) -> bool:
    """Whether new bytes of a state file reached the folder: a new or changed file with something in it."""
    for entry in os.scandir(folder):
        info = entry.stat(follow_symlinks=False)
        if entry.name == STATE_FILE:
            changed = (info.st_ino, info.st_size, info.st_mtime_ns) != (before.st_ino, before.st_size,
                                                                          before.st_mtime_ns)
            if changed:
                return True
        elif info.st_size > 0:
            return True
    return False


def kill_while_writing(folder: Path, size: int) -> int:
    """Run the writer and SIGKILL it once it writes; its exit status (0 if it finished first)."""
    before = os.stat(folder / STATE_FILE)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(size)])
    try:
        deadline = time.monotonic() + 120
        while writer.poll() is None and time.monotonic() < deadline:
            if started_writing(folder, before):
                writer.send_signal(signal.SIGKILL)
                break
            time.sleep(0.0005)
        return writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_writer_killed_mid_save_leaves_the_previous_state_to_resume_from(tmp_path):
    write_complete(tmp_path, 2)
    size = 32 * 2**20
    for _ in range(4):  # the writer may finish before the kill lands: then again with a larger state
        status = kill_while_writing(tmp_path, size)
        if status == -signal.SIGKILL:
            break
        assert status == 0
        write_complete(tmp_path, 2)
        size *= 2
    assert status == -signal.SIGKILL, "the writer always finished before it could be killed"
    assert resumed_state(tmp_path) == (2, {"counters": {"calls": 2}})  # the complete file from before the crash
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != STATE_FILE]  # the killed writer's temporary file
    assert leftovers and all(name.startswith(f".{STATE_FILE}.") for name in leftovers), leftovers
    write_complete(tmp_path, 6)  # and the next save replaces it whole
    assert resumed_state(tmp_path) == (6, {"counters": {"calls": 6}})


def test_the_saved_state_is_host_neutral_and_the_host_adds_its_own_step_record(tmp_path):
    """Another host adapter reuses the plugin's state file and supplies its own fallback count."""
    from lpl_plugin.patches import saved_state
    from lpl_plugin.settings.errors import UserError

    def host_steps(folder: Path):
        path = folder / "host.json"
        return ("host.json", saved_state.read_step_count(path, "step")) if path.exists() else None

    assert saved_state.resumed_state(tmp_path, host_steps) == (0, {})
    assert saved_state.resumed_state(tmp_path) == (0, {})
    (tmp_path / "host.json").write_text('{"step": 9}', encoding="utf-8")
    assert saved_state.resumed_state(tmp_path, host_steps) == (9, {})
    assert saved_state.resumed_state(tmp_path) == (0, {})  # no host record asked for
    save_state(tmp_path, 4, None, HookRegistry())
    assert saved_state.resumed_state(tmp_path, host_steps) == (4, {})  # the plugin's own file comes first
    (tmp_path / STATE_FILE).unlink()
    (tmp_path / "host.json").write_text('{"stpe": 9}', encoding="utf-8")
    with pytest.raises(UserError) as info:
        saved_state.resumed_state(tmp_path, host_steps)
    (line,) = info.value.lines()
    assert "host.json is unreadable (KeyError" in line and line.endswith("count optimizer steps from 0 for lpl_start")
