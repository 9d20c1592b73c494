"""Converters from a dataset's archives to the prepared on-disk format (see :mod:`mcibi.data.specs`), and
the check of a prepared dataset."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mcibi.data.specs import IGNORE_INDEX, DatasetSpec, get_spec
from mcibi.files import write_json

log = logging.getLogger(__name__)


class PreparedDataError(ValueError):
    """A prepared dataset is incomplete or has invalid content; the message names the file."""


def _prepare_demo(spec: DatasetSpec, archive_dir: Path, out: Path) -> None:
    """The demo archive already holds index PNGs: extract them into the prepared layout."""
    archive = archive_dir / "demo.tar"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            parts = Path(member.name).parts
            if parts[0] != "demo":
                raise PreparedDataError(f"{archive}: unexpected member {member.name}")
            data = tar.extractfile(member).read()
            rel = Path(*parts[1:])
            if rel.name == "classes.txt":
                names = tuple(data.decode().split())
                if names != spec.classes:
                    raise PreparedDataError(f"{archive}: classes.txt {names} differ from the spec {spec.classes}")
                continue
            if rel.parent == Path(".") and rel.suffix == ".txt":
                rel = Path("splits") / rel.name
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


PREPARERS: dict[str, Callable[[DatasetSpec, Path, Path], None]] = {"demo": _prepare_demo}


def _split_ids(data_dir: Path, split: str) -> list[str]:
    return [line.strip() for line in (data_dir / "splits" / f"{split}.txt").read_text().splitlines() if line.strip()]


def prepare(dataset: str, archive_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert the archives into ``out_dir`` (written beside it, then renamed into place) with its manifest."""
    spec = get_spec(dataset)
    if dataset not in PREPARERS:
        raise PreparedDataError(f"preparing dataset '{dataset}' is not supported yet (supported: {sorted(PREPARERS)}).")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        PREPARERS[dataset](spec, Path(archive_dir), tmp)
        counts = {split: len(_split_ids(tmp, split)) for split in spec.splits}
        write_json(tmp / "manifest.json", {
            "name": spec.name,
            "classes": list(spec.classes),
            "num_classes": spec.num_classes,
            "ignore_index": IGNORE_INDEX,
            "flip_pairs": [list(p) for p in spec.flip_pairs],
            "image_ext": spec.image_ext,
            "splits": counts,
        })
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("prepared %s in %s", dataset, out)
    return out


def verify_prepared(dataset: str, data_dir: str | Path) -> dict:
    """Check counts per split, that every file exists, label values are in [0, K) or 255, sizes match.

    Returns a summary (counts and per-class pixel frequencies per split) for the workflow's record.
    """
    spec = get_spec(dataset)
    root = Path(data_dir)
    manifest_file = root / "manifest.json"
    if not manifest_file.is_file():
        raise PreparedDataError(f"{manifest_file}: missing. Run `mcibi prepare {dataset}` first.")
    manifest = json.loads(manifest_file.read_text())
    if manifest["classes"] != list(spec.classes) or manifest["ignore_index"] != IGNORE_INDEX:
        raise PreparedDataError(f"{manifest_file}: classes or ignore index differ from the spec; prepare again.")
    summary: dict = {"dataset": dataset, "splits": {}}
    for split, expected in spec.splits.items():
        list_file = root / "splits" / f"{split}.txt"
        if not list_file.is_file():
            raise PreparedDataError(f"{list_file}: missing split list.")
        ids = _split_ids(root, split)
        if len(ids) != expected:
            raise PreparedDataError(f"{list_file}: {len(ids)} images, the dataset documents {expected}.")
        pixels = np.zeros(spec.num_classes + 1, np.int64)
        for image_id in tqdm(ids, desc=f"verify {dataset}/{split}", mininterval=5.0):
            image_file = root / "images" / f"{image_id}{spec.image_ext}"
            label_file = root / "labels" / f"{image_id}.png"
            for f in (image_file, label_file):
                if not f.is_file():
                    raise PreparedDataError(f"{f}: missing (listed in {list_file}).")
            label = cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED)
            if label is None or label.ndim != 2 or label.dtype != np.uint8:
                raise PreparedDataError(f"{label_file}: not a single-channel 8-bit PNG.")
            bad = (label >= spec.num_classes) & (label != IGNORE_INDEX)
            if bad.any():
                raise PreparedDataError(
                    f"{label_file}: label values {sorted(set(label[bad].tolist()))[:5]} outside [0, "
                    f"{spec.num_classes}) and not {IGNORE_INDEX}."
                )
            header = cv2.imread(str(image_file), cv2.IMREAD_COLOR)
            if header is None or header.shape[:2] != label.shape:
                got = None if header is None else header.shape[:2]
                raise PreparedDataError(f"{image_file}: size {got} differs from its label's {label.shape}.")
            values = np.where(label == IGNORE_INDEX, spec.num_classes, label)
            pixels += np.bincount(values.ravel(), minlength=spec.num_classes + 1)
        total = max(int(pixels.sum()), 1)
        summary["splits"][split] = {
            "images": len(ids),
            "class_pixel_share": {n: round(int(c) / total, 6) for n, c in zip(spec.classes, pixels, strict=False)},
            "ignored_pixel_share": round(int(pixels[-1]) / total, 6),
        }
    return summary
