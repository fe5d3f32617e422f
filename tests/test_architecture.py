"""The package's architecture, checked by import-linter (the contracts live in setup.cfg): layers look down only,
no import cycles, and the lazy public names of `import lpl_plugin` come from the layers they may come from."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lpl_plugin

CHECKOUT = Path(__file__).resolve().parent.parent
SETUP_CFG = CHECKOUT / "setup.cfg"
PACKAGE = Path(lpl_plugin.__file__).resolve().parent


def layers() -> list[list[str]]:
    """The layer contract's layers, top first, each a list of sibling subpackages."""
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    lines = config["importlinter:contract:layers"]["layers"].strip().splitlines()
    return [line.replace("|", " ").replace(":", " ").split() for line in lines]


def lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess:
    """import-linter on the package found under `root`, with the contracts of `config`."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root), "PATH": ""},
                          capture_output=True, text=True, timeout=300)


def test_contracts_hold():
    """Every import in the package looks down the layers, and no module or subpackage imports in a cycle."""
    result = lint_imports(PACKAGE.parent, SETUP_CFG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("importer,imported", [
    ("settings/messages.py", "lpl_plugin.cli.main"),  # the bottom layer reaching the top
    ("engine/guard.py", "lpl_plugin.training.registry"),  # one layer up
    ("training/hook.py", "lpl_plugin.patches.sd_scripts"),  # the training loop reaching into a host adapter
    ("patches/asked.py", "lpl_plugin.compare.report"),  # a host adapter reaching into a tool
])
def test_a_wrong_way_import_breaks_the_layer_contract(tmp_path, importer, imported):
    """A copy of the package with one import added against the layers fails the contract, naming that import."""
    copy = tmp_path / "lpl_plugin"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / importer).open("a") as module:
        module.write(f"\nimport {imported}  # noqa: E402\n")
    result = lint_imports(tmp_path, SETUP_CFG)
    importer_name = "lpl_plugin." + importer.removesuffix(".py").replace("/", ".")
    assert result.returncode == 1
    assert f"{importer_name} -> {imported}" in result.stdout


def test_an_import_cycle_breaks_the_acyclic_contract(tmp_path):
    """Two engine modules importing each other fail the acyclic contract."""
    copy = tmp_path / "lpl_plugin"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "engine" / "tensors.py").open("a") as module:  # perceptual_loss already imports tensors
        module.write("\nimport lpl_plugin.engine.perceptual_loss  # noqa: E402\n")
    result = lint_imports(tmp_path, SETUP_CFG)
    report = " ".join(result.stdout.split())
    assert result.returncode == 1
    assert "No import cycles between sibling modules or subpackages, at any depth BROKEN" in report


def test_every_lazy_export_resolves_within_the_layers():
    """Each name `import lpl_plugin` offers is defined in the module its table names, and that module sits in the
    settings, engine, training or patches layer: `import lpl_plugin` never reaches the command line or the tools."""
    below_tools = {name for group in layers()[2:] for name in group}
    assert below_tools == {"patches", "training", "engine", "settings"}
    for name, module in lpl_plugin._EXPORTS.items():
        value = getattr(lpl_plugin, name)
        assert module.split(".")[0] in below_tools, (name, module)
        defined_in = sys.modules[f"lpl_plugin.{module}"]
        assert getattr(defined_in, name) is value
        if hasattr(value, "__module__") and not isinstance(value, (str, lpl_plugin.HookRegistry)):
            assert value.__module__ == f"lpl_plugin.{module}", (name, value.__module__)
    assert sorted(lpl_plugin._EXPORTS) == sorted(set(lpl_plugin.__all__))


def test_registry_is_the_default_registry_object():
    """`lpl_plugin.registry` is the process-wide HookRegistry; its module lives in `training` and replaces nothing."""
    from lpl_plugin.training import registry as registry_module

    assert isinstance(lpl_plugin.registry, lpl_plugin.HookRegistry)
    assert lpl_plugin.registry is registry_module.registry
    assert type(lpl_plugin) is type(sys)  # a plain module: no module-class swap


def test_no_path_tricks():
    """`lpl_plugin.patches` and `lpl_plugin.configs` are real subpackages: the package's search path is its folder."""
    import lpl_plugin.configs
    import lpl_plugin.patches

    assert list(lpl_plugin.__path__) == [str(PACKAGE)]
    assert Path(lpl_plugin.patches.__file__).resolve().parent == PACKAGE / "patches"
    assert Path(lpl_plugin.configs.__file__).resolve().parent == PACKAGE / "configs"


def test_modules_stay_small():
    """No module of the package is over 400 lines."""
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 400}
    assert not long
