"""`lpl-plugin doctor`: the checkout's revision and support (read from source), the environment, a config."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lpl_plugin.cli.main import main
from lpl_plugin.patches.sd_scripts_tested import TESTED_COMMITS, all_tested_labels
from tests.sd_sources import BESIDE_REPO, SOURCES_ENV, archives, sources_folder
from tests.standin_fixtures import root, write_config

SNAPSHOTS_FOLDER = sources_folder(beside_repo=True)
SNAPSHOTS = archives(SNAPSHOTS_FOLDER) if SNAPSHOTS_FOLDER else []
NOT_TESTED = f"  tested in CI: not this commit (its trainer and library/*.py files match none of the tested commits: " \
             f"{all_tested_labels()})"


def doctor(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run the subcommand; its status and output lines."""
    status = main(["doctor", *argv])
    captured = capsys.readouterr()
    return status, (captured.out + captured.err).splitlines()


def test_supported_checkout_and_config(tmp_path, capsys):
    config = write_config(tmp_path, "[lpl]\nuse_lpl = true\nlpl_weight = 1.5\n")
    status, lines = doctor(capsys, "--sd-scripts", str(root("v0_10_1")), "--config", str(config))
    assert status == 0 and lines[-1] == "ready"
    assert "  revision: no .git folder; seam fingerprint 44791a5e30a7 = sd-scripts v0.10.1 (ae72efb) or main/dev " \
           "up to 48d368f" in lines
    assert NOT_TESTED in lines  # a stand-in has the release's signatures, not its files
    assert any(line.startswith("  sdxl_train_network.py (LoRA): supported, v0.10.x and main layout: 3-value")
               for line in lines)
    assert any(line.startswith("  sdxl_train.py (full fine-tune): supported") for line in lines)
    assert any(line.startswith("xformers: ") for line in lines)
    assert any(line.startswith("bitsandbytes") and "8-bit AdamW" in line for line in lines)
    assert "  lpl_weight = 1.5" in lines and any(line.startswith("python ") and "torch" in line for line in lines)


def test_v0_11_layout_and_git_revision(tmp_path, capsys):
    copy = tmp_path / "sd-scripts"
    shutil.copytree(root("v0_11"), copy)
    git = ["git", "-C", str(copy), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"], ["tag", "v0.11.0"]):
        subprocess.run(git + command, check=True, capture_output=True)
    status, lines = doctor(capsys, "--sd-scripts", str(copy))
    assert status == 0
    assert any(line.startswith("  revision: v0.11.0 (git describe); seam fingerprint") for line in lines)
    assert any("supported, v0.11 (library/loss.py, library/args.py) layout" in line for line in lines)


def test_unsupported_checkout_and_bad_config(tmp_path, capsys):
    config = write_config(tmp_path, "[lpl]\nuse_lpl = true\nlpl_num_blocks = 9\n")
    status, lines = doctor(capsys, "--sd-scripts", str(root("unsupported")), "--config", str(config))
    assert status == 1 and lines[-1].startswith("NOT ready")
    assert any("sdxl_train_network.py (LoRA): NOT supported: `library.train_util.conditional_loss` has signature"
               in line for line in lines)
    assert "not a release lpl-plugin was tested with" in "\n".join(lines)
    assert f"  {config}: [lpl] `lpl_num_blocks` must be between 0 and 4, got 9" in lines


def test_not_a_checkout_is_one_line(tmp_path, capsys):
    status, lines = doctor(capsys, "--sd-scripts", str(tmp_path))
    assert status == 2 and lines == [f"--sd-scripts {tmp_path}: not an sd-scripts checkout (no library/train_util.py)"]


@pytest.mark.skipif(not SNAPSHOTS, reason=f"no sd-scripts snapshots: set {SOURCES_ENV} or put them in {BESIDE_REPO}")
@pytest.mark.parametrize("source", SNAPSHOTS, ids=[s.name for s in SNAPSHOTS])
def test_each_tested_snapshot_is_named_as_tested(source, capsys):
    commit = next(c for c in TESTED_COMMITS if c.name == source.name)
    assert commit.commit == (source.root / "COMMIT").read_text().strip()
    status, lines = doctor(capsys, "--sd-scripts", str(source.root))
    assert status == 0 and lines[-1] == "ready"
    assert f"  tested in CI: {commit.label}: lpl-plugin's real-source tests run against exactly these files" in lines
    layout = "v0.9.x" if commit.layout == "v0.9" else "v0.10.x and main"
    for script in ("sdxl_train_network.py (LoRA)", "sdxl_train.py (full fine-tune)"):
        assert any(line.startswith(f"  {script}: supported, {layout} layout") for line in lines)


@pytest.mark.skipif(not SNAPSHOTS, reason=f"no sd-scripts snapshots: set {SOURCES_ENV} or put them in {BESIDE_REPO}")
def test_windows_line_endings_still_match_and_an_edit_does_not(tmp_path, capsys):
    source = SNAPSHOTS[-1]
    copy = shutil.copytree(source.root, tmp_path / "sd-scripts")
    train_util = copy / "library" / "train_util.py"
    train_util.write_bytes(train_util.read_bytes().replace(b"\n", b"\r\n"))  # as a Windows checkout has it
    assert any(line.startswith(f"  tested in CI: {source.name} (") for line in doctor(capsys, "--sd-scripts",
                                                                                        str(copy))[1])
    train_util.write_bytes(train_util.read_bytes() + b"# a local edit\r\n")
    assert NOT_TESTED in doctor(capsys, "--sd-scripts", str(copy))[1]
