"""Real sd-scripts sources for tests: a checkout named by LPL_SD_SCRIPTS_DIR, or the snapshot archives.

The archives (`sd-scripts-<name>.tar.gz`, one per tested commit, see `lpl_plugin.patches.sd_scripts_tested`) are
found in LPL_SD_SCRIPTS_SOURCES, else in `shared/sd_scripts_sources` beside the repository (where CI has it).
Each archive is unpacked once per test process into a temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lpl_plugin.patches.sd_scripts_tested import TESTED_COMMITS

CHECKOUT_ENV = "LPL_SD_SCRIPTS_DIR"
SOURCES_ENV = "LPL_SD_SCRIPTS_SOURCES"
BESIDE_REPO = Path(__file__).resolve().parent.parent.parent / "shared" / "sd_scripts_sources"
ORDER = [c.name for c in TESTED_COMMITS]


@dataclass(frozen=True)
class Source:
    """One real sd-scripts tree to test against: a checkout folder, or an archive unpacked on first use."""

    name: str
    checkout: Path | None = None
    archive: Path | None = None

    @property
    def root(self) -> Path:
        """The folder holding `library/` (an archive is unpacked now, once per process)."""
        return self.checkout if self.checkout is not None else unpacked(self.archive)


def sources_folder(*, beside_repo: bool) -> Path | None:
    """LPL_SD_SCRIPTS_SOURCES, else (when beside_repo) the shared folder beside the repository if it exists."""
    named = os.environ.get(SOURCES_ENV)
    if named:
        return Path(named)
    return BESIDE_REPO if beside_repo and BESIDE_REPO.is_dir() else None


def archives(folder: Path) -> list[Source]:
    """The snapshot archives in a folder, the tested commits in their order first (oldest first)."""
    found = {p.name[len("sd-scripts-"):-len(".tar.gz")]: p for p in folder.glob("sd-scripts-*.tar.gz")}
    ranked = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return [Source(name, archive=found[name]) for name in ranked]


def real_sources(*, beside_repo: bool = False) -> tuple[list[Source], str]:
    """The sources to test and, when there are none, why (a skip reason)."""
    checkout = os.environ.get(CHECKOUT_ENV)
    if checkout:
        return [Source(Path(checkout).name or "checkout", checkout=Path(checkout).resolve())], ""
    folder = sources_folder(beside_repo=beside_repo)
    if folder is None:
        where = f" or put them in {BESIDE_REPO}" if beside_repo else ""
        return [], (f"real sd-scripts sources not given: set {CHECKOUT_ENV} to a checkout or {SOURCES_ENV} to the "
                    f"folder of sd-scripts-*.tar.gz snapshots{where}, in an environment with sd-scripts' packages")
    found = archives(folder)
    if not found:
        raise FileNotFoundError(f"{SOURCES_ENV}={folder}: no sd-scripts-*.tar.gz archive there")
    return found, ""


@functools.lru_cache(maxsize=None)
def unpacked(archive: Path) -> Path:
    """An archive unpacked (its `sd-scripts/` folder) into a temporary folder removed when the process exits."""
    temp = Path(tempfile.mkdtemp(prefix="lpl-sd-scripts-"))
    atexit.register(shutil.rmtree, temp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(temp, filter="data")
    return temp / "sd-scripts"
