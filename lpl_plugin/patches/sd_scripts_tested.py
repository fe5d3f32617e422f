"""The sd-scripts commits whose real sources CI tests the adapter against, and which of them a checkout is.

A checkout is recognised by a digest of the files an SDXL run executes (the three trainers lpl-plugin knows and
every `library/*.py`), with line endings normalised, so a copy without a `.git` folder (a GUI's bundled copy) is
recognised as well as a clone. Local edits to those files, or a commit not listed here, give no match.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lpl_plugin.settings.files import is_dir, is_file, read_bytes

TRAINERS = ("sdxl_train_network.py", "sdxl_train.py", "train_network.py")
# Largest source file hashed (sd-scripts' train_util.py is about 300 kB).
MAX_HASHED_BYTES = 16 << 20


@dataclass(frozen=True)
class KnownCommit:
    """One sd-scripts commit in CI's real-source tests."""

    name: str         # how people name it: a tag or a short hash
    commit: str       # the full hash
    date: str         # commit date
    shipped_by: str   # who runs it
    layout: str       # the sd_scripts_seams layout it matches
    digest: str       # source_digest of its files

    @property
    def label(self) -> str:
        """`v0.10.1 (ae72efb, 2026-02-13, tag v0.10.1)` as written in reports."""
        short = self.commit[:7]
        hash_part = "" if self.name == short else f"{short}, "
        return f"{self.name} ({hash_part}{self.date}, {self.shipped_by})"


TESTED_COMMITS = (
    KnownCommit("v0.9.1", "8f4ee8fc343b047965cd8976fca65c3a35b7593a", "2025-03-21",
                 "tag v0.9.1; bundled by lora-scripts", "v0.9", "88544e324a8c4a2c"),
    KnownCommit("5a18a03", "5a18a03ffcc2a21c6e884a25d041076911a79a2a", "2025-04-07",
                 "pinned by LoRA_Easy_Training_Scripts", "v0.10", "1fe7082edb398734"),
    KnownCommit("2e0fcc5", "2e0fcc50cb347323b4374bfd05784587c5fa7f2d", "2025-07-10",
                 "pinned by kohya_ss v25.2.2, sd3 branch", "v0.10", "c1441cd62df5abba"),
    KnownCommit("v0.10.1", "ae72efb92babe89ff8e70f057e42db68440e8d61", "2026-02-13", "tag v0.10.1", "v0.10",
                 "c0a14441ade71a83"),
    KnownCommit("48d368f", "48d368fa557731ad0488c07304dfeba8c07910eb", "2026-02-16", "main after v0.10.1",
                 "v0.10", "218fc5d216fd0edb"),
)


def hashed_files(root: str | Path) -> list[Path]:
    """The files the digest covers that exist in a checkout, in a fixed order."""
    root = Path(root)
    found = [root / name for name in TRAINERS if is_file(root / name)]
    library = root / "library"
    if is_dir(library):
        found += sorted((p for p in library.iterdir() if p.suffix == ".py" and is_file(p)), key=lambda p: p.name)
    return found


def source_digest(root: str | Path) -> str:
    """A short hash of the checkout's trainer and `library/*.py` files (names and contents, LF line endings)."""
    root = Path(root)
    total = hashlib.sha256()
    for path in hashed_files(root):
        content = read_bytes(path, limit=MAX_HASHED_BYTES, what="a Python source file").replace(b"\r\n", b"\n")
        total.update(f"{path.relative_to(root).as_posix()}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return total.hexdigest()[:16]


def find_tested_commit(root: str | Path) -> KnownCommit | None:
    """The tested commit whose files the checkout has unchanged, or None."""
    digest = source_digest(root)
    return next((c for c in TESTED_COMMITS if c.digest == digest), None)


def all_tested_labels() -> str:
    """Every tested commit in one phrase, oldest first."""
    return ", ".join(c.label for c in TESTED_COMMITS)
