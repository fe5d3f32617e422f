"""Inputs are data: a config cannot import or run code, and VAE weights load through safetensors only."""

from __future__ import annotations

import json
import pickle
import sys

import pytest
import torch

from lpl_plugin import UserError, options
from lpl_plugin.cli.main import main
from lpl_plugin.settings.preflight import check_training_config
from lpl_plugin.settings.vae_io import load_vae

PROBE = "lpl_security_probe"


class Boom:
    """Unpickling this creates the sentinel file: proof that pickle ran code."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return open, (self.sentinel, "w")


@pytest.fixture()
def trap(tmp_path, monkeypatch):
    """A sentinel path, an importable module that creates it, and a VAE folder whose only weights are a pickle."""
    sentinel = tmp_path / "sentinel"
    (tmp_path / f"{PROBE}.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    vae_dir = tmp_path / "pickled_vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text('{"_class_name": "AutoencoderKL", "up_block_types": ["UpDecoderBlock2D"]}')
    (vae_dir / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"weight": Boom(sentinel)}))
    yield sentinel, vae_dir
    sys.modules.pop(PROBE, None)


def hostile_config(tmp_path, vae_dir) -> str:
    """A trainer TOML whose every string option and path-like key holds code, module paths or YAML tags."""
    payloads = [f"__import__('{PROBE}')", f"{PROBE}:main", PROBE, f"!!python/object/apply:{PROBE}.run []",
                f"$(python -c 'import {PROBE}')", "os.system", "{{ config.__class__.__init__.__globals__ }}"]
    strings = [o["name"] for o in options() if o["type"] == "string"]
    lines = ["use_lpl = true", f'vae = "{vae_dir}"', f'dataset_config = "{tmp_path / (PROBE + ".py")}"',
             f'pretrained_model_name_or_path = "{PROBE}"', f'lpl_hook = "{PROBE}:main"']
    lines += [f"{name} = '''{payloads[i % len(payloads)]}'''" for i, name in enumerate(strings)]
    lines += ["[lpl]"] + [f"lpl_x{i} = '''{p}'''" for i, p in enumerate(payloads)]
    path = tmp_path / "hostile.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_a_config_cannot_import_or_run_code(tmp_path, trap, capsys):
    sentinel, vae_dir = trap
    path = hostile_config(tmp_path, vae_dir)
    check_training_config(path), main(["validate", path])  # a first pass lets the CLI's own lazy imports happen
    capsys.readouterr()
    before = set(sys.modules)
    result = check_training_config(path)
    assert main(["validate", path]) == 2
    errors = capsys.readouterr().err
    assert set(sys.modules) == before and PROBE not in sys.modules
    assert not sentinel.exists()
    strings = [o["name"] for o in options() if o["type"] == "string"]
    assert {p.key for p in result.problems} >= set(strings) | {"lpl_hook"}
    assert "Traceback" not in errors and all(line.startswith(path) for line in errors.strip().splitlines())


def test_pickle_weights_are_refused_without_being_read(trap):
    sentinel, vae_dir = trap
    with pytest.raises(UserError, match="only safetensors weights are loaded") as info:
        load_vae(vae_dir)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="refusing to load pickle weights"):
        load_vae(vae_dir / "diffusion_pytorch_model.bin")
    assert not sentinel.exists()


def test_safetensors_folder_loads_and_ignores_a_pickle_beside_it(vae, tmp_path, trap):
    sentinel, _ = trap
    folder = tmp_path / "model" / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"weight": Boom(sentinel)}))
    loaded = load_vae(folder.parent)  # a model folder: its vae/ is used
    assert not sentinel.exists()
    for (name, mine), theirs in zip(loaded.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(mine, theirs), name
    with pytest.raises(UserError, match="VAE folder not found"):
        load_vae(tmp_path / "nowhere")


@pytest.mark.parametrize("index_name, shard", [
    ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin"),
    ("diffusion_pytorch_model.safetensors.index.json", "../pickled_vae/diffusion_pytorch_model.bin"),
    ("diffusion_pytorch_model.safetensors.index.fp16.json", "diffusion_pytorch_model.bin"),
    ("diffusion_pytorch_model.safetensors.fp16.index.json", "diffusion_pytorch_model.bin"),
])
def test_an_index_naming_a_pickle_is_refused_before_diffusers_reads_it(vae, tmp_path, trap, index_name, shard):
    sentinel, pickled = trap
    folder = tmp_path / "indexed"
    vae.save_pretrained(folder, safe_serialization=True)  # real weights too: diffusers would prefer the index
    (folder / "diffusion_pytorch_model.bin").write_bytes((pickled / "diffusion_pytorch_model.bin").read_bytes())
    weights = {name: shard for name in vae.state_dict()}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weights}), encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_vae(folder)
    assert "names the shard" in str(info.value) and "\n" not in str(info.value)
    assert not sentinel.exists()


def test_a_sharded_safetensors_folder_still_loads(vae, tmp_path):
    folder = tmp_path / "sharded"
    vae.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_vae(folder)
    for (name, mine), theirs in zip(loaded.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(mine, theirs), name
