"""Reading extracted dataset archives, for the converters and :func:`mcibi.data.prepare.prepare`: extraction,
locating folders and list files, label files mapped through lookup tables, and the :class:`Plan` a converter
returns. A leaf module: it imports nothing else of mcibi's.
"""

from __future__ import annotations

import logging
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class PreparedDataError(ValueError):
    """A prepared dataset is incomplete or has invalid content; the message names the file."""


# ------------------------------------------------------------------------------------------------ label tables
def label_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A lookup table raw value -> train id; values not in ``mapping`` are invalid (-1)."""
    lut = np.full(size, -1, np.int16)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
    return lut


def apply_table(raw: np.ndarray, lut: np.ndarray, where: Path | str) -> np.ndarray:
    """Map raw label values through ``lut`` to a uint8 train-id map; invalid values raise naming the file."""
    if raw.ndim != 2:
        raise PreparedDataError(f"{where}: expected a single-channel label map, got shape {raw.shape}.")
    values = raw.astype(np.int64, copy=False)
    bad = (values < 0) | (values >= len(lut))
    if not bad.any():
        mapped = lut[values]
        bad = mapped < 0
        if not bad.any():
            return mapped.astype(np.uint8)
    raise PreparedDataError(f"{where}: raw label values {sorted(set(values[bad].tolist()))[:8]} are not part of the "
                            "dataset's label encoding.")


def read_index_png(path: Path) -> np.ndarray:
    """Class indices of a label PNG: palette ("P") images give their palette indices, not colour luminance."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise PreparedDataError(f"{path}: label PNG in mode {im.mode}; expected indices (P, L or 16-bit).")
        return np.asarray(im)


def read_mat(path: Path, *keys: str | int) -> np.ndarray:
    """One array of a MATLAB file, following ``keys`` (field names and indices) into structs."""
    from scipy.io import loadmat

    try:
        value = loadmat(str(path))
    except (ValueError, OSError, NotImplementedError) as exc:
        raise PreparedDataError(f"{path}: unreadable .mat file ({exc}).") from exc
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, ValueError) as exc:
            raise PreparedDataError(f"{path}: no '{key}' in the .mat file.") from exc
    return np.asarray(value)


# --------------------------------------------------------------------------------------------------- extraction
def extract(archive: Path, dest: Path) -> None:
    """Extract a zip or tar archive into ``dest``, refusing members that would land outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    log.info("extracting %s", archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            root = dest.resolve()
            for member in zf.namelist():
                if not (dest / member).resolve().is_relative_to(root):
                    raise PreparedDataError(f"{archive}: member {member} points outside the extraction folder.")
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    else:
        raise PreparedDataError(f"{archive}: neither a zip nor a tar archive.")


def locate(root: Path, marker: str, max_depth: int = 5) -> Path:
    """The shallowest folder D under ``root`` where ``D/marker`` exists; PreparedDataError if none does."""
    level = [root]
    for _ in range(max_depth + 1):
        for folder in sorted(level):
            if (folder / marker).exists():
                return folder
        level = [c for f in level for c in f.iterdir() if c.is_dir() and not c.name.startswith("__MACOSX")]
    top = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise PreparedDataError(f"{root}: no '{marker}' in the extracted archives (top level: {top[:10]}); "
                            "is this the right archive?")


def read_ids(path: Path) -> list[str]:
    """Non-empty stripped lines of a list file (first column)."""
    if not path.is_file():
        raise PreparedDataError(f"{path}: missing list file.")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ what converters find
@dataclass
class Plan:
    """What a converter found: for every sample id its image and how to read its train-id label."""

    splits: dict[str, list[str]] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, Callable[[], np.ndarray | Path]] = field(default_factory=dict)  # train ids, or a PNG of them

    def add(self, image_id: str, image: Path, label: Callable[[], np.ndarray | Path]) -> None:
        self.images[image_id] = image
        self.labels[image_id] = label
