"""The training images and captions a trainer TOML names (train_data_dir or a dataset config), held-out copies of
the dataset, and sample prompts made from captions."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpl_plugin.settings.errors import UserError
from lpl_plugin.settings.files import parse_toml, read_text
from lpl_plugin.settings.messages import show_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Subset:
    """One image folder of the dataset and the caption extension its captions use."""

    folder: Path
    caption_extension: str


@dataclass
class Image:
    """One training image and its caption ("" when it has none)."""

    path: Path
    caption: str


def subsets(host: dict[str, Any], source: str) -> tuple[list[Subset], dict[str, Any] | None]:
    """The image folders of the run, and the dataset config's parsed data when the TOML names one."""
    extension = str(host.get("caption_extension") or host.get("caption_extention") or ".caption")
    if host.get("dataset_config"):
        path = Path(str(host["dataset_config"]))
        data = parse_toml(read_text(path, what="a dataset config"), show_path(path))
        general = data.get("general", {}) if isinstance(data.get("general"), dict) else {}
        found = []
        for dataset in data.get("datasets", []):
            for subset in dataset.get("subsets", []) if isinstance(dataset, dict) else []:
                if isinstance(subset, dict) and subset.get("image_dir"):
                    ext = subset.get("caption_extension", dataset.get("caption_extension",
                                                                      general.get("caption_extension", extension)))
                    found.append(Subset(Path(str(subset["image_dir"])), str(ext)))
        return found, data
    if host.get("train_data_dir"):
        root = Path(str(host["train_data_dir"]))
        if not root.is_dir():
            raise UserError(f"{source}: train_data_dir: no such folder: {show_path(root)}")
        return [Subset(f, extension) for f in sorted(root.iterdir()) if f.is_dir() and "_" in f.name], None
    raise UserError(f"{source}: neither `dataset_config` nor `train_data_dir` is set, so compare cannot find the "
                    "training images to measure on")


def images_of(subset: Subset) -> list[Image]:
    """The images of one folder, sorted by name, with their captions."""
    found = []
    for path in sorted(subset.folder.iterdir()) if subset.folder.is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            caption = path.with_suffix(subset.caption_extension)
            text = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
            found.append(Image(path, text))
    return found


def pick(images: list[Image], count: int) -> list[Image]:
    """`count` images spread evenly over the list (all of them when there are fewer)."""
    if count >= len(images):
        return list(images)
    return [images[round(i * (len(images) - 1) / max(1, count - 1))] for i in range(count)] if count > 1 \
        else images[:1]


def hold_out(parts: list[Subset], held: list[Image], folder: Path) -> dict[Path, Path]:
    """Mirror each image folder under `folder` without the held-out images (links to the files); old → new."""
    moved: dict[Path, Path] = {}
    skip = {image.path.resolve() for image in held}
    for index, subset in enumerate(parts):
        target = folder / f"{index:02d}_{subset.folder.name}"
        target.mkdir(parents=True, exist_ok=True)
        stems = {p.stem for p in subset.folder.iterdir() if p.resolve() in skip}
        for path in subset.folder.iterdir():
            link = target / path.name
            if path.stem not in stems and path.is_file() and not link.exists():
                os.symlink(path.resolve(), link)
        moved[subset.folder] = target
    return moved


def held_out_dataset(host: dict[str, Any], data: dict[str, Any] | None, moved: dict[Path, Path],
                     folder: Path) -> dict[str, Any]:
    """The TOML keys that point the run at the mirrored folders: a rewritten dataset config, or train_data_dir."""
    if data is None:
        root = folder / "train"
        root.mkdir(parents=True, exist_ok=True)
        for old, new in moved.items():
            link = root / old.name
            if not link.exists():
                os.symlink(new.resolve(), link)
        return {"train_data_dir": str(root)}
    rewritten = json.loads(json.dumps(data))
    for dataset in rewritten.get("datasets", []):
        for subset in dataset.get("subsets", []):
            if subset.get("image_dir"):
                subset["image_dir"] = str(moved[Path(str(subset["image_dir"]))])
    from lpl_plugin.compare.toml_write import dumps

    path = folder / "dataset.toml"
    path.write_text(dumps(rewritten), encoding="utf-8")
    return {"dataset_config": str(path)}


def training_images(host: dict[str, Any], source: str) -> tuple[list[Subset], dict[str, Any] | None, list[Image]]:
    """The dataset's folders, its config data, and every image in it (UserError when there are none)."""
    parts, data = subsets(host, source)
    images = [image for subset in parts for image in images_of(subset)]
    if not images:
        raise UserError(f"{source}: the dataset it names holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return parts, data, images
