"""A small user-style folder dataset (images + colour masks + palette) for the custom-dataset tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

PALETTE = [[0, 0, 0], [220, 40, 40], [40, 200, 60]]
CLASSES = ["background", "square", "disk"]


def folder_dataset(root: Path, count: int = 24, size: int = 64, name: str = "shapes", seed: int = 0) -> Path:
    """Write ``root/<name>/{images,masks}`` (JPEG images, RGB colour masks) and ``root/<name>.yaml``; returns it."""
    rng = np.random.default_rng(seed)
    (root / name / "images").mkdir(parents=True, exist_ok=True)
    (root / name / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        label = np.zeros((size, size), np.uint8)
        x0, y0, s = rng.integers(4, size // 2, 3)
        label[y0:y0 + s // 2 + 8, x0:x0 + s // 2 + 8] = 1
        cx, cy, r = rng.integers(size // 3, size - 8), rng.integers(size // 3, size - 8), rng.integers(5, 12)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 2
        image = (np.array([[90, 110, 130], [200, 80, 60], [70, 180, 90]])[label]
                 + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / name / "images" / f"img{i:03d}.jpg", quality=95)
        Image.fromarray(np.array(PALETTE, np.uint8)[label]).save(root / name / "masks" / f"img{i:03d}.png")
    desc = root / f"{name}.yaml"
    desc.write_text(yaml.safe_dump({"name": name, "classes": CLASSES, "images": f"{name}/images",
                                    "masks": f"{name}/masks", "mask_format": "color", "palette": PALETTE,
                                    "split": {"val_fraction": 0.25, "seed": 0}}, sort_keys=False))
    return desc
