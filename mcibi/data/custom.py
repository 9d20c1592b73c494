"""A user's own folder of images and masks as a dataset of the pipeline.

A dataset description file (YAML, registered as ``datasets/<name>.yaml``; relative paths are relative to it)::

    name: leaves                 # lower-case letters and digits: data/<name>, params/<name>/, results/<name>
    classes: [background, leaf, lesion]
    images: leaves/images        # <id>.<jpg|png|...>, sub-folders allowed (the id keeps them: a/b/0001)
    masks: leaves/masks          # <id>.png with the same id
    mask_format: index           # index: pixel value = class id; color: RGB colours of `palette`
    ignore_value: 255            # index masks: the value meaning "not labelled" (optional)
    palette: [[0, 0, 0], [0, 200, 0], [200, 0, 0]]   # required for color masks; else the overlay colours
    ignore_color: [255, 255, 255]                     # color masks: the "not labelled" colour (optional)
    flip_pairs: []               # [[left_id, right_id], ...] swapped by horizontal flips
    splits: {train: train.txt, val: val.txt}          # id lists, or instead:
    split: {val_fraction: 0.2, seed: 0}               # a seeded random split

:func:`load_description` checks the file strictly (unknown keys are errors), :func:`scan` pairs images with
masks, :func:`validate` reads every pair (unreadable files, sizes that disagree, label values outside the
classes; errors name the files); :func:`mcibi.data.prepare.prepare_custom` writes the prepared format of
:mod:`mcibi.data.specs` and :func:`mcibi.catalogue.custom.new_dataset` registers the description and generates
``params/<name>/`` from a model-zoo row. The module imports neither torch, pandas nor OpenCV (the import contract in
pyproject.toml): the workflow's parse step reads custom specs through it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from mcibi.data.specs import DATASETS, IGNORE_INDEX, DatasetSpec

DATASETS_DIR = "datasets"  # registered descriptions: datasets/<name>.yaml (relative to the working directory)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
NAME = re.compile(r"^[a-z0-9]+$")
KEYS = {"name", "classes", "images", "masks", "mask_format", "ignore_value", "palette", "ignore_color",
        "flip_pairs", "splits", "split", "description"}
MAX_ERRORS = 10


class CustomDatasetError(ValueError):
    """A description file or the files it points to are not a usable dataset; the message names the files."""


@dataclass(frozen=True)
class CustomDatasetSpec(DatasetSpec):
    """A :class:`DatasetSpec` read from a description file, with its palette and where its files are."""

    palette: tuple[tuple[int, int, int], ...] = ()
    description_file: str = ""


@dataclass(frozen=True)
class Description:
    """A checked description file (paths resolved)."""

    file: Path
    name: str
    classes: tuple[str, ...]
    images: Path
    masks: Path
    mask_format: str
    ignore_value: int | None
    palette: tuple[tuple[int, int, int], ...]
    ignore_color: tuple[int, int, int] | None
    flip_pairs: tuple[tuple[int, int], ...]
    splits: dict[str, Path] = field(default_factory=dict)
    val_fraction: float = 0.2
    seed: int = 0
    text: str = ""


def _fail(file: Path, message: str) -> CustomDatasetError:
    return CustomDatasetError(f"{file}: {message}")


def _colour(file: Path, key: str, value: Any) -> tuple[int, int, int]:
    if not (isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                                                         for c in value)):
        raise _fail(file, f"key '{key}': {value!r} is not an [R, G, B] colour of integers 0..255.")
    return tuple(value)


def load_description(path: str | Path) -> Description:
    """Read and strictly check a description file (not the files it points to)."""
    file = Path(path)
    if not file.is_file():
        raise CustomDatasetError(f"{file}: no such description file.")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise _fail(file, f"not valid YAML ({exc}).") from None
    if not isinstance(data, dict):
        raise _fail(file, "the top level must be a mapping (name, classes, images, masks, ...).")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise _fail(file, f"unknown key(s) {unknown} (valid: {', '.join(sorted(KEYS))}).")
    for key in ("name", "classes", "images", "masks"):
        if key not in data:
            raise _fail(file, f"missing key '{key}'.")
    name = data["name"]
    if not isinstance(name, str) or not NAME.match(name):
        raise _fail(file, f"key 'name': {name!r} must be lower-case letters and digits only (it names "
                          "data/<name>, params/<name>/ and results/<name>).")

    if name in DATASETS:
        raise _fail(file, f"key 'name': '{name}' is a built-in dataset; choose another name.")
    classes = data["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise _fail(file, "key 'classes': a non-empty list of class names.")
    if len(set(classes)) != len(classes) or len(classes) > 255:
        raise _fail(file, "key 'classes': names must be unique and at most 255 (255 is the ignore value).")
    fmt = data.get("mask_format", "index")
    if fmt not in ("index", "color"):
        raise _fail(file, f"key 'mask_format': {fmt!r}; use index or color.")
    palette = tuple(_colour(file, f"palette[{i}]", c) for i, c in enumerate(data.get("palette") or []))
    if (fmt == "color" or palette) and len(palette) != len(classes):
        raise _fail(file, f"key 'palette': {len(palette)} colours for {len(classes)} classes"
                          + (" (color masks need one colour per class)." if fmt == "color" else "."))
    if fmt == "color" and len(set(palette)) != len(palette):
        raise _fail(file, "key 'palette': colours must differ (they decode the masks).")
    ignore_value = data.get("ignore_value")
    if ignore_value is not None and not (isinstance(ignore_value, int) and 0 <= ignore_value <= 65535):
        raise _fail(file, f"key 'ignore_value': {ignore_value!r} must be an integer pixel value.")
    if ignore_value is not None and ignore_value < len(classes):
        raise _fail(file, f"key 'ignore_value': {ignore_value} is the id of class '{classes[ignore_value]}'.")
    ignore_color = _colour(file, "ignore_color", data["ignore_color"]) if data.get("ignore_color") else None
    pairs = []
    for pair in data.get("flip_pairs") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(i, int) and 0 <= i < len(classes)
                                                                 for i in pair) and pair[0] != pair[1]):
            raise _fail(file, f"key 'flip_pairs': {pair!r} is not a pair of two different class ids.")
        pairs.append(tuple(pair))
    if "splits" in data and "split" in data:
        raise _fail(file, "give either 'splits' (id lists) or 'split' (val_fraction, seed), not both.")
    base = file.parent
    splits: dict[str, Path] = {}
    val_fraction, seed = 0.2, 0
    if "splits" in data:
        s = data["splits"]
        if not (isinstance(s, dict) and set(s) == {"train", "val"} and all(isinstance(v, str) for v in s.values())):
            raise _fail(file, "key 'splits': a mapping {train: <list file>, val: <list file>}.")
        splits = {k: (base / v) for k, v in s.items()}
    else:
        s = data.get("split") or {}
        if not isinstance(s, dict) or set(s) - {"val_fraction", "seed"}:
            raise _fail(file, "key 'split': a mapping {val_fraction: 0.2, seed: 0}.")
        val_fraction, seed = s.get("val_fraction", 0.2), s.get("seed", 0)
        if not (isinstance(val_fraction, int | float) and 0 < val_fraction < 1 and isinstance(seed, int)):
            raise _fail(file, "key 'split': val_fraction must be in (0, 1) and seed an integer.")
    return Description(file, name, tuple(classes), base / data["images"], base / data["masks"], fmt, ignore_value,
                       palette, ignore_color, tuple(pairs), splits, float(val_fraction), seed, file.read_text())


def scan(desc: Description) -> tuple[dict[str, Path], dict[str, Path], dict[str, list[str]]]:
    """(id -> image, id -> mask, split -> ids): pairs by id; an image without a mask (or the reverse) is an error."""
    for key, folder in (("images", desc.images), ("masks", desc.masks)):
        if not folder.is_dir():
            raise _fail(desc.file, f"key '{key}': {folder} is not a folder.")

    def files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() in suffixes:
                key = p.relative_to(folder).with_suffix("").as_posix()
                if key in out:
                    raise CustomDatasetError(f"{p}: a second file for id '{key}' (also {out[key]}).")
                out[key] = p
        return out

    images, masks = files(desc.images, IMAGE_SUFFIXES), files(desc.masks, (".png",))
    if not images:
        raise CustomDatasetError(f"{desc.images}: no images ({', '.join(IMAGE_SUFFIXES)}).")
    problems = [f"{images[i]}: no mask {desc.masks / (i + '.png')}" for i in sorted(set(images) - set(masks))]
    problems += [f"{masks[i]}: no image with id '{i}' in {desc.images}" for i in sorted(set(masks) - set(images))]
    if problems:
        raise _fail(desc.file, "images and masks do not pair up:\n  " + "\n  ".join(problems[:MAX_ERRORS]))
    ids = sorted(images)
    if desc.splits:
        splits = {}
        for split, list_file in desc.splits.items():
            if not list_file.is_file():
                raise _fail(desc.file, f"split list {list_file} does not exist.")
            listed = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
            missing = [i for i in listed if i not in images]
            if missing:
                raise CustomDatasetError(f"{list_file}: ids without an image/mask pair: {missing[:MAX_ERRORS]}.")
            splits[split] = listed
    else:
        import numpy as np

        order = np.random.default_rng(desc.seed).permutation(len(ids))
        n_val = max(1, round(desc.val_fraction * len(ids)))
        val = set(order[:n_val].tolist())
        splits = {"train": [ids[k] for k in range(len(ids)) if k not in val],
                  "val": [ids[k] for k in range(len(ids)) if k in val]}
    for split, listed in splits.items():
        if not listed:
            raise _fail(desc.file, f"split '{split}' is empty.")
    return images, masks, splits


def to_train_ids(desc: Description, mask_file: Path) -> Any:
    """A mask as uint8 class ids with 255 ignored; values or colours outside the classes raise naming the file."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(mask_file) as im:
            mode = im.mode
            raw = np.asarray(im.convert("RGB") if desc.mask_format == "color" and mode != "RGB" else im)
    except OSError as exc:
        raise CustomDatasetError(f"{mask_file}: unreadable mask ({exc}).") from None
    k = len(desc.classes)
    if desc.mask_format == "index":
        if raw.ndim != 2:
            raise CustomDatasetError(f"{mask_file}: an index mask must be single-channel (mode {mode}); for colour "
                                     "masks set mask_format: color and a palette.")
        values = raw.astype(np.int64)
        out = np.full(values.shape, IGNORE_INDEX, np.uint8)
        valid = values < k
        out[valid] = values[valid]
        bad = ~valid & (values != desc.ignore_value if desc.ignore_value is not None else True)
        if bad.any():
            raise CustomDatasetError(f"{mask_file}: label values {sorted(set(values[bad].tolist()))[:8]} are not class "
                                     f"ids 0..{k - 1}" + (f" nor ignore_value {desc.ignore_value}"
                                                          if desc.ignore_value is not None else "") + ".")
        return out
    if raw.ndim != 3 or raw.shape[2] < 3:
        raise CustomDatasetError(f"{mask_file}: a colour mask must be RGB (mode {mode}).")
    code = (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
    out = np.full(code.shape, IGNORE_INDEX, np.uint8)
    known = np.zeros(code.shape, bool)
    for cls, (r, g, b) in enumerate(desc.palette):
        hit = code == ((r << 16) | (g << 8) | b)
        out[hit] = cls
        known |= hit
    if desc.ignore_color is not None:
        r, g, b = desc.ignore_color
        known |= code == ((r << 16) | (g << 8) | b)
    if not known.all():
        colours = sorted({(int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255) for c in np.unique(code[~known])[:8]})
        raise CustomDatasetError(f"{mask_file}: colours {colours} are not in the palette"
                                 + (" nor the ignore_color." if desc.ignore_color else "."))
    return out


def _image_size(file: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(file) as im:
            im.verify()
        with Image.open(file) as im:
            return im.size[1], im.size[0]
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise CustomDatasetError(f"{file}: unreadable image ({exc}).") from None


def validate(desc: Description, show_progress: bool = True) -> dict[str, Any]:
    """Read every image and mask; one error listing up to 10 bad files (each named) if any is unusable.
    Returns the split ids and the median image size (h, w)."""
    from tqdm import tqdm

    images, masks, splits = scan(desc)
    problems, heights, widths = [], [], []
    for image_id in tqdm(sorted(images), desc=f"validate {desc.name}", unit="img", disable=not show_progress,
                         mininterval=2.0):
        try:
            size = _image_size(images[image_id])
            label = to_train_ids(desc, masks[image_id])
            if label.shape != size:
                raise CustomDatasetError(f"{images[image_id]}: size {size} differs from its mask's {label.shape} "
                                         f"({masks[image_id]}).")
            heights.append(size[0])
            widths.append(size[1])
        except CustomDatasetError as exc:
            problems.append(str(exc))
            if len(problems) >= MAX_ERRORS:
                break
    if problems:
        raise _fail(desc.file, f"{len(problems)}{'+' if len(problems) >= MAX_ERRORS else ''} unusable file(s), "
                               "nothing was written:\n  " + "\n  ".join(problems))
    med = (sorted(heights)[len(heights) // 2], sorted(widths)[len(widths) // 2])
    return {"splits": splits, "median_size": med, "images": len(images)}


def image_ext(images: dict[str, Path]) -> str:
    suffixes = {p.suffix.lower() for p in images.values()}
    if suffixes <= {".jpg", ".jpeg"}:
        return ".jpg"
    return ".png"


# ------------------------------------------------------------------------------------------------- registry
def description_path(name: str, root: str | Path | None = None) -> Path:
    """Where a custom dataset's description is registered: ``$MCIBI_DATASETS`` or ``datasets/``."""
    return Path(root or os.environ.get("MCIBI_DATASETS", DATASETS_DIR)) / f"{name}.yaml"


def registered_datasets(root: str | Path | None = None) -> list[str]:
    """Names of the registered custom datasets (``datasets/*.yaml``)."""
    folder = Path(root or os.environ.get("MCIBI_DATASETS", DATASETS_DIR))
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


@cache
def _spec(path: str, mtime: float) -> CustomDatasetSpec:
    desc = load_description(path)
    if desc.name != Path(path).stem:
        raise _fail(desc.file, f"key 'name' is '{desc.name}' but the registered file is named {Path(path).name}.")
    images, _, splits = scan(desc)
    from mcibi.data.specs import Source

    return CustomDatasetSpec(
        name=desc.name, classes=desc.classes, flip_pairs=desc.flip_pairs,
        splits={k: len(v) for k, v in splits.items()}, image_ext=image_ext(images),
        sources=(Source("local", "generated", (), note=f"images {desc.images}, masks {desc.masks}"),),
        label_conversion=(f"{desc.mask_format} masks -> class ids" + (f", {desc.ignore_value} -> 255"
                                                                       if desc.ignore_value is not None else "")),
        citation_counts=f"description {desc.file}", palette=desc.palette, description_file=str(desc.file))


def custom_spec(name: str, root: str | Path | None = None) -> CustomDatasetSpec | None:
    """The spec of a registered custom dataset, None if ``datasets/<name>.yaml`` does not exist."""
    path = description_path(name, root)
    if not path.is_file():
        return None
    return _spec(str(path.resolve()), path.stat().st_mtime)


def source_files(name: str) -> list[str]:
    """The registered description of a custom dataset and every image and mask it pairs (the workflow's inputs:
    editing any of them prepares the dataset again)."""
    desc = load_description(description_path(name))
    images, masks, _ = scan(desc)
    return [str(description_path(name))] + [str(p) for p in (*images.values(), *masks.values())]
