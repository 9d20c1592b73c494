"""The colour of each class in overlays and figures."""

from __future__ import annotations

import numpy as np


def palette(num_classes: int) -> np.ndarray:
    """A deterministic RGB colour per class (the PASCAL VOC bit-interleaving scheme), shape (K, 3) uint8."""
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        c, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[k] = (r, g, b)
    return out
