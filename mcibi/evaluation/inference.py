"""Pure prediction functions: whole image, sliding window, multi-scale + flip test-time augmentation.

They follow the official toolbox's protocol (``datasets.md`` §0.4): every scale is a bilinear resize of the
normalised input; whole mode returns the model's feature-resolution scores, slide mode averages window scores
at the input resolution; flipped passes have their left/right class channels swapped before being flipped
back; every pass is resized to the requested output size and the passes are averaged. Flips and windows are
batched into one forward (eval-mode BatchNorm and per-image attention make this exact).

:func:`predict_tta_classes` gives the argmax of :func:`predict_tta` for outputs too large to hold the scores of
every class at full size: the passes stay at the model's scale and are resized, averaged and reduced to class
indices one output tile at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
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


def _check_mode(mode: str, crop: tuple[int, int] | None, stride: tuple[int, int] | None) -> None:
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide mode needs crop and stride")


def tta_passes(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    flip_permutation: Sequence[int] | None = None,
    mode: str = "whole",
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    probs_before_resize: bool = False,
    align_corners: bool = False,
    max_batch: int = 16,
) -> Iterator[torch.Tensor]:
    """The scores of each scale at the model's scale, (B, K, h, w), or (2B, K, h, w) with ``flip``: the flipped
    passes have their class channels swapped and are flipped back. Not yet resized to any output size."""
    _check_mode(mode, crop, stride)
    b = images.shape[0]
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
        yield scores


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
    _check_mode(mode, crop, stride)
    b = images.shape[0]
    total = None
    passes = 0
    for scores in tta_passes(model, images, scales, flip, flip_permutation, mode, crop, stride,
                             probs_before_resize, align_corners, max_batch):
        scores = resize_bilinear(scores, out_size, align_corners)
        summed = scores[:b] + scores[b:] if flip else scores
        total = summed if total is None else total + summed
        passes += 2 if flip else 1
    return total / passes


# ------------------------------------------------------------------------------------ class maps in tiles
def _source_taps(in_size: int, out_size: int, start: int, stop: int, align_corners: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For output positions [start, stop) of a bilinear resize ``in_size`` -> ``out_size``: the two source
    indices and their weights, by PyTorch's rule (``upsample_bilinear2d``: float32 scale, source position
    ``scale * (dst + 0.5) - 0.5`` rounded once, as its kernels' fused multiply-add does; measured equal to the
    weights its CPU kernel applies)."""
    dst = torch.arange(start, stop, device=device, dtype=torch.float32)
    if in_size == out_size:
        index = dst.long()
        return index, index, torch.ones_like(dst), torch.zeros_like(dst)
    if align_corners:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
        src = dst * float(scale)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
        # float32 x float32 is exact in float64, and so is subtracting 0.5: one rounding, to float32
        src = ((dst + 0.5).double() * float(scale) - 0.5).float().clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    w1 = (src - i0).clamp(0, 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, 1 - w1, w1


def resize_bilinear_box(x: torch.Tensor, out_size: tuple[int, int], box: tuple[int, int, int, int],
                        align_corners: bool = False) -> torch.Tensor:
    """The part ``box`` = (y1, y2, x1, x2) of ``F.interpolate(x, out_size, mode="bilinear")`` without computing
    the rest: (N, C, y2 - y1, x2 - x1). Same taps and weights as PyTorch, interpolated along the width first;
    agrees with it to float rounding (the kernels may fuse multiply-adds)."""
    y1, y2, x1, x2 = box
    h, w = x.shape[-2:]
    r0, r1, rw0, rw1 = _source_taps(h, out_size[0], y1, y2, align_corners, x.device)
    c0, c1, cw0, cw1 = _source_taps(w, out_size[1], x1, x2, align_corners, x.device)
    top, bottom = int(r0.min()), int(r1.max()) + 1  # the source rows the box reads
    left, right = int(c0.min()), int(c1.max()) + 1
    src = x[..., top:bottom, left:right]
    cols = src[..., c0 - left].mul_(cw0).add_(src[..., c1 - left].mul_(cw1))  # (N, C, rows read, box width)
    return cols[..., r0 - top, :].mul_(rw0[:, None]).add_(cols[..., r1 - top, :].mul_(rw1[:, None]))


def tiles(height: int, width: int, tile: tuple[int, int]) -> Iterator[tuple[int, int, int, int]]:
    """Boxes (y1, y2, x1, x2) of at most ``tile`` = (h, w) covering an image, row by row."""
    th, tw = max(1, tile[0]), max(1, tile[1])
    for y in range(0, height, th):
        for x in range(0, width, tw):
            yield y, min(y + th, height), x, min(x + tw, width)


def predict_tta_classes(
    model: nn.Module,
    images: torch.Tensor,
    out_size: tuple[int, int],
    tile: tuple[int, int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    flip_permutation: Sequence[int] | None = None,
    mode: str = "whole",
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    probs_before_resize: bool = False,
    align_corners: bool = False,
    max_batch: int = 16,
    num_classes: int | None = None,
) -> np.ndarray:
    """``predict_tta(...).argmax(1)`` in bounded memory: (B, *out_size) class indices, uint8 (up to 256 classes)
    or uint16, on the host.

    The passes run as in :func:`predict_tta` and are kept at the model's scale; then, one ``tile`` of the
    output at a time, each pass is resized to that box (:func:`resize_bilinear_box`), the passes are summed
    and averaged in :func:`predict_tta`'s order and the argmax is written. Memory: the passes at the model's
    scale, the class map, and about ``8 x K x tile`` floats per image, whatever ``out_size``. The scores agree
    with :func:`predict_tta`'s to float rounding, so the class maps are equal except where two classes' scores
    are that close.
    """
    _check_mode(mode, crop, stride)
    b = images.shape[0]
    passes = list(tta_passes(model, images, scales, flip, flip_permutation, mode, crop, stride,
                             probs_before_resize, align_corners, max_batch))
    count = len(passes) * (2 if flip else 1)
    k = num_classes or passes[0].shape[1]
    dtype, host = (torch.uint8, np.uint8) if k <= 256 else (torch.int16, np.uint16)
    out = np.empty((b, *out_size), host)
    for box in tiles(*out_size, tile):
        total = None
        for scores in passes:
            resized = resize_bilinear_box(scores, out_size, box, align_corners)
            summed = resized[:b] + resized[b:] if flip else resized
            total = summed if total is None else total + summed
            del resized, summed
        classes = (total / count).argmax(dim=1).to(dtype).cpu().numpy()
        out[:, box[0]:box[1], box[2]:box[3]] = classes.view(host)
    return out
