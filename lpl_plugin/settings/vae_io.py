"""Loading a VAE from a local path: diffusers folders with safetensors weights only, never pickle.

Before diffusers sees a folder, everything it would open is checked through the safe reader: `config.json`
(regular, bounded, not too deep), the weights file, and a sharded checkpoint's index, whose every shard must be a
`.safetensors` file directly inside that folder (no `.bin`, no `../`, no absolute path).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from lpl_plugin.settings.errors import FileError, UserError
from lpl_plugin.settings.files import is_file, path_stat, read_json_object
from lpl_plugin.settings.messages import show_path, show_value, shown

SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFE_VARIANTS = (None, "fp16")
# Files that hold pickled weights, which can run code while they are read.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# Most shards a VAE index may name (the SDXL VAE is a single 335 MB file).
MAX_SHARDS = 64


# Bounds on an AutoencoderKL config.json's sizes, far beyond any real VAE (SDXL: 4 blocks of at most 512 channels,
# 2 layers each, 4 latent channels): a config asking for more would allocate or build for minutes, never train.
_INT_BOUNDS = {"layers_per_block": (1, 16), "latent_channels": (1, 256), "in_channels": (1, 64),
               "out_channels": (1, 64), "norm_num_groups": (1, 1024)}
_MAX_BLOCKS, _MAX_CHANNELS = 8, 8192


def check_vae_config(data: dict[str, Any], source: str) -> None:
    """Refuse in one line a VAE config.json whose sizes no AutoencoderKL has (before a model is built from it)."""
    def bad(key: str, rule: str) -> FileError:
        return FileError(source, f"`{key}` must be {rule}, got {show_value(data[key])}")

    for key, (low, high) in _INT_BOUNDS.items():
        value = data.get(key)
        if key in data and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise bad(key, f"an integer between {low} and {high}")
    channels = data.get("block_out_channels")
    if "block_out_channels" in data and (not isinstance(channels, list) or not 1 <= len(channels) <= _MAX_BLOCKS or
                                         any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <=
                                             _MAX_CHANNELS for c in channels)):
        raise bad("block_out_channels", f"a list of 1 to {_MAX_BLOCKS} integers between 1 and {_MAX_CHANNELS}")
    for key in ("down_block_types", "up_block_types"):
        value = data.get(key)
        if key in data and (not isinstance(value, list) or len(value) > _MAX_BLOCKS or
                            not all(isinstance(v, str) for v in value)):
            raise bad(key, f"a list of at most {_MAX_BLOCKS} block names")


def vae_config(spec: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The config.json a `--vae` folder or file names and its checked contents (no torch, no weights)."""
    path = Path(spec)
    config = path if path.suffix == ".json" and os.path.lexists(path) else None
    for folder in (path, path / "vae"):
        if config is None and os.path.lexists(folder / "config.json"):
            config = folder / "config.json"
    if config is None:
        raise UserError(f"--vae: {show_path(spec)} is neither tiny, sdxl, a diffusers VAE folder nor its config.json "
                        "(single-file SDXL VAEs share the sdxl layout: pass --vae sdxl)")
    data = read_json_object(config, what="a VAE config.json")  # regular, bounded, not too deep
    check_vae_config(data, show_path(config))
    return config, data


def _weights_name(variant: str | None) -> str:
    """The safetensors weights file of a variant (`diffusion_pytorch_model.fp16.safetensors`)."""
    return SAFE_WEIGHTS if variant is None else SAFE_WEIGHTS.replace(".safetensors", f".{variant}.safetensors")


def _index_names(variant: str | None) -> tuple[str, ...]:
    """Names diffusers reads a variant's safetensors index from (current and legacy layouts)."""
    if variant is None:
        return (f"{SAFE_WEIGHTS}.index.json",)
    return (f"{SAFE_WEIGHTS}.index.{variant}.json", f"{SAFE_WEIGHTS}.{variant}.index.json",
            f"{_weights_name(variant)}.index.json")


def _indexes(folder: Path) -> list[Path]:
    """Every safetensors index in a folder, whatever its variant: diffusers prefers an index to the weights file."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [folder / n for n in sorted(names) if n.startswith("diffusion_pytorch_model") and ".index" in n
            and n.endswith(".json")]


def _present(path: Path) -> bool:
    """Whether anything is at a path (a dangling or looping link counts, so reading it can say why)."""
    return os.path.lexists(path)


def _regular(path: Path, what: str) -> None:
    """Refuse in one line a weights file that is not a regular file (a FIFO would block, a device never end)."""
    mode = path_stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise FileError(show_path(path), f"is not a regular file; expected {what}")


def _shard_problem(folder: Path, name: Any) -> str | None:
    """Why one shard an index names may not be loaded, or None when it is a safetensors file in `folder`."""
    if not isinstance(name, str) or not name:
        return f"names the shard {show_value(name)}, which is not a file name"
    if any(sep in name for sep in ("/", "\\")) or name in (".", "..") or PurePosixPath(name).is_absolute() \
            or PureWindowsPath(name).drive or "\x00" in name:
        return f"names the shard {show_value(name)} outside this folder; shards must be files directly inside it"
    if not name.endswith(".safetensors"):
        return f"names the shard {show_value(name)}, which is not a .safetensors file; only safetensors weights " \
               "are loaded (pickle files can run code when read)"
    if not is_file(folder / name):
        return f"names the shard {show_value(name)}, which is not a regular file in this folder"
    return None


def check_index(index: Path) -> None:
    """Refuse a safetensors index whose weight_map names anything but .safetensors files inside its folder."""
    data = read_json_object(index, what="a safetensors index")
    weight_map = data.get("weight_map")
    shown = show_path(index)
    if not isinstance(weight_map, dict) or not weight_map:
        raise FileError(shown, "has no weight_map of tensor names to shard files; not a safetensors index")
    shards = set()
    for shard in weight_map.values():
        problem = _shard_problem(index.parent, shard)
        if problem:
            raise FileError(shown, problem)
        shards.add(shard)
        if len(shards) > MAX_SHARDS:
            raise FileError(shown, f"names more than {MAX_SHARDS} shards; a VAE needs one or a few")


def vae_folder(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """The diffusers folder holding the VAE (the path itself or its `vae/`) and the safetensors variant to load.

    Raises UserError, in one line, for a missing path, a single weights file, a folder without safetensors, or one
    whose config or index could make diffusers read anything else.
    """
    root = Path(path)
    shown = show_path(path)
    try:
        mode = path_stat(root).st_mode  # one line for a missing path, a loop, a name too long, ...
    except FileError as error:
        if error.errno != errno.ENOENT:
            raise
        raise UserError(f"{shown}: VAE folder not found; pass a local diffusers folder (config.json and "
                        f"{SAFE_WEIGHTS})") from None
    if stat.S_ISREG(mode):
        if root.suffix.lower() in PICKLE_SUFFIXES:
            raise UserError(f"{shown}: refusing to load pickle weights ({show_path(root.suffix)}), which can run "
                            f"code when read; convert them to safetensors or pass a diffusers folder with "
                            f"{SAFE_WEIGHTS}")
        raise UserError(f"{shown}: a single weights file; pass a diffusers VAE folder (config.json and "
                        f"{SAFE_WEIGHTS})")
    if not stat.S_ISDIR(mode):
        raise UserError(f"{shown}: not a folder (a FIFO, device or socket); pass a local diffusers VAE folder "
                        f"(config.json and {SAFE_WEIGHTS})")
    for folder in (root, root / "vae"):
        if not _present(folder / "config.json"):
            continue
        config = read_json_object(folder / "config.json", what="a VAE config.json")  # regular, bounded, shallow
        check_vae_config(config, show_path(folder / "config.json"))
        for index in _indexes(folder):
            check_index(index)
        for variant in SAFE_VARIANTS:
            name = _weights_name(variant)
            if any(_present(folder / index) for index in _index_names(variant)):
                return folder, variant
            if _present(folder / name):
                _regular(folder / name, "safetensors weights")
                return folder, variant
        raise UserError(f"{show_path(folder)}: no {SAFE_WEIGHTS} beside config.json; only safetensors weights are "
                        "loaded (pickle .bin files can run code when read), so convert the weights to safetensors")
    raise UserError(f"{shown}: not a diffusers VAE folder (no config.json in it or in its vae/ folder)")


def load_vae(path: str | os.PathLike[str], *, dtype: Any = None, device: Any = None):
    """An AutoencoderKL from a local diffusers folder, read through safetensors only (no pickle, no network)."""
    folder, variant = vae_folder(path)
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True, variant=variant,
                                            torch_dtype=dtype)
    except Exception as error:  # a corrupt or mismatched folder is the user's to fix: one line, not a traceback
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        raise UserError(f"{show_path(folder)}: could not load the VAE ({type(error).__name__}: "
                        f"{shown(reason, 200)})") from error
    if device is not None:
        vae = vae.to(device)
    return vae.eval()

