"""The distribution ships every subpackage (`patches/` and `configs/` included), so all work after a plain install."""

from __future__ import annotations

import configparser
import importlib
import json
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest


def test_subpackages_import():
    assert importlib.import_module("lpl_plugin.patches").__doc__
    assert importlib.import_module("lpl_plugin.configs").__doc__


def test_installed_files_include_patches_and_configs():
    purelib = sysconfig.get_paths()["purelib"]
    found = [d for d in metadata.distributions(path=[purelib]) if d.metadata["Name"] == "lpl-plugin"]
    if not found:
        pytest.skip("lpl-plugin is not installed in this environment's site-packages")
    dist = found[0]
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("editable install: files are served from the checkout")
    names = {str(f) for f in dist.files or []}
    assert "lpl_plugin/patches/__init__.py" in names and "lpl_plugin/configs/__init__.py" in names
    assert "lpl_plugin/py.typed" in names
    assert "lpl_plugin_boot.py" in names  # the top-level start-up hook of `lpl-plugin enable`


def test_every_subpackage_is_packaged():
    """Each folder of the package with an `__init__.py` is listed in setup.cfg, so the wheel carries it."""
    checkout = Path(__file__).resolve().parent.parent
    config = configparser.ConfigParser()
    config.read(checkout / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    inits = (checkout / "lpl_plugin").rglob("__init__.py")
    found = {".".join(init.parent.relative_to(checkout).parts) for init in inits if "__pycache__" not in init.parts}
    assert found == listed
