"""A few evaluated images kept for figures: the evaluation job writes them, the figures job draws them as overlays
without loading torch or the model. Plain numpy in one compressed ``.npz`` (``eval/<protocol>_samples.npz``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcibi.files import atomic_path


def write_samples(path: str | Path, ids: list[str], images: list[np.ndarray], labels: list[np.ndarray],
                  predictions: list[np.ndarray]) -> None:
    """A few evaluated images for figures, written atomically as one compressed ``.npz``: ``ids``, and per sample
    ``image_<i>`` (uint8 RGB at the label's size), ``label_<i>`` and ``prediction_<i>`` (class maps)."""
    arrays = {"ids": np.array(ids, dtype=str)}
    for i, (image, label, pred) in enumerate(zip(images, labels, predictions, strict=True)):
        arrays |= {f"image_{i}": image, f"label_{i}": label, f"prediction_{i}": np.asarray(pred, dtype=np.int32)}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def read_samples(path: str | Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(ids, images, labels, predictions) of a :func:`write_samples` file."""
    with np.load(path) as data:
        ids = [str(i) for i in data["ids"]]
        images, labels, predictions = ([data[f"{kind}_{i}"] for i in range(len(ids))]
                                       for kind in ("image", "label", "prediction"))
        return ids, images, labels, predictions
