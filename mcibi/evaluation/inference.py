"""Pure prediction functions: whole image, sliding window, multi-scale + flip test-time augmentation.

They follow the official toolbox's protocol (``datasets.md`` §0.4): every scale is a bilinear resize of the
normalised input; whole mode returns the model's feature-resolution scores, slide mode averages window scores
at the input resolution; flipped passes have their left/right class channels swapped before being flipped
back; every pass is resized to the requested output size and the passes are averaged. Flips and windows are
batched into one forward (eval-mode BatchNorm and per-image attention make this exact).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mcibi.models.blocks import resize_bilinear


def _forward_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).logits


def predict_whole(model: nn.Module, images: torch.Tensor, probs: bool) -> torch.Tensor:
    """Scores of whole images at the model's output resolution (softmax first if ``probs``)."""
    logits = _forward_logits(model, images)
    return logits.softmax(dim=1) if probs else logits


def slide_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) covering the image, clamped to its border as the official code does."""
    ch, cw = crop
    sh, sw = stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def predict_slide(
    model: nn.Module,
    images: torch.Tensor,
    crop: tuple[int, int],
    stride: tuple[int, int],
    probs: bool,
    align_corners: bool = False,
    max_batch: int = 16,
) -> torch.Tensor:
    """Scores at the input resolution from overlapping windows, averaged where they overlap.

    All windows have the same size (clamped to the border), so they run as batches of up to ``max_batch``.
    """
    # Speed/memory (bench/tta.py): each batch of windows is resized, soft-maxed and added into the sum as soon as
    # it is computed, so memory holds one batch's scores whatever the image size (the same arithmetic, in the same
    # order, as resizing all windows at once).
    b, _, h, w = images.shape
    boxes = slide_windows(h, w, crop, stride)
    total = count = None
    for start in range(0, len(boxes), max_batch):
        chunk = boxes[start : start + max_batch]
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in chunk], dim=0)
        scores = _forward_logits(model, crops)
        scores = resize_bilinear(scores, crops.shape[2:], align_corners)
        if probs:
            scores = scores.softmax(dim=1)
        if total is None:
            total = images.new_zeros((b, scores.shape[1], h, w))
            count = images.new_zeros((1, 1, h, w))
        for i, (y1, y2, x1, x2) in enumerate(chunk):
            total[:, :, y1:y2, x1:x2] += scores[i * b : (i + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def predict_tta(
    model: nn.Module,
    images: torch.Tensor,
    out_size: tuple[int, int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    flip_permutation: Sequence[int] | None = None,
    mode: str = "whole",
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    probs_before_resize: bool = False,
    align_corners: bool = False,
    max_batch: int = 16,
) -> torch.Tensor:
    """Average of the scores of every (scale, flip) pass, each resized to ``out_size``; shape (B, K, *out_size).

    Args:
        flip_permutation: class permutation of a horizontal flip (left/right pairs swapped); identity if None.
        mode: "whole" or "slide" (then ``crop`` and ``stride`` as (h, w)).
        probs_before_resize: softmax each pass before resizing and averaging (official use_probs_before_resize).
        max_batch: slide windows per forward (times the batch, flips included); bounds memory, not the result.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide mode needs crop and stride")
    b = images.shape[0]
    total = None
    passes = 0
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                      align_corners=align_corners)
        if flip:
            x = torch.cat([x, x.flip(dims=[3])], dim=0)
        if mode == "whole":
            scores = predict_whole(model, x, probs_before_resize)
        else:
            scores = predict_slide(model, x, crop, stride, probs_before_resize, align_corners, max_batch=max_batch)
        if flip:
            flipped = scores[b:]
            if flip_permutation is not None:
                flipped = flipped[:, list(flip_permutation)]
            scores = torch.cat([scores[:b], flipped.flip(dims=[3])], dim=0)
        scores = resize_bilinear(scores, out_size, align_corners)
        summed = scores[:b] + scores[b:] if flip else scores
        total = summed if total is None else total + summed
        passes += 2 if flip else 1
    return total / passes
