"""Paired image/label transforms on numpy arrays (OpenCV), mirroring the official toolbox's semantics.

Every random decision draws from a ``numpy.random.Generator`` passed in, so augmentation is reproducible
per sample whatever the number of data-loader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import cv2
import numpy as np
import torch

from mcibi.data.specs import IGNORE_INDEX


# What the transforms read of an experiment's ``data`` section: mcibi.spec.params' DataParams, ResizeParams and
# RotationParams have these fields. The spec sits above mcibi.data in the import layers (it checks params against the
# dataset facts), so the fields are described here instead of imported.
class ResizeSettings(Protocol):
    """A resize of the whole image: to ``size`` (h, w), inside it with ``keep_ratio``, randomly scaled by a factor
    in ``ratio_range`` (training)."""

    @property
    def size(self) -> tuple[int, int]: ...
    @property
    def keep_ratio(self) -> bool: ...
    @property
    def ratio_range(self) -> tuple[float, float] | None: ...


class RotationSettings(Protocol):
    """The random rotation: its probability and largest angle."""

    @property
    def prob(self) -> float: ...
    @property
    def max_degrees(self) -> float: ...


class PipelineSettings(Protocol):
    """The training and test pipelines' settings."""

    @property
    def crop_size(self) -> tuple[int, int]: ...
    @property
    def train_resize(self) -> ResizeSettings: ...
    @property
    def cat_max_ratio(self) -> float: ...
    @property
    def flip_prob(self) -> float: ...
    @property
    def rotation(self) -> RotationSettings: ...
    @property
    def photometric(self) -> bool: ...
    @property
    def test_resize(self) -> ResizeSettings: ...


MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # ImageNet RGB statistics, as every official config
STD = np.array([58.395, 57.12, 57.375], np.float32)
# the official Normalize hands OpenCV these float64 values (mean, 1/std); OpenCV decides the arithmetic
_MEAN64 = np.array([[123.675, 116.28, 103.53]], np.float64)
_STDINV64 = 1 / np.array([[58.395, 57.12, 57.375]], np.float64)


def _official_normalize(x: np.ndarray) -> np.ndarray:
    """The official Normalize's operations on an (h, w, 3) RGB float32 image, in place: ``cv2.subtract`` of the
    float64 mean, then ``cv2.multiply`` by the float64 1/std.

    Run through OpenCV rather than written out in numpy because OpenCV chooses the rounding: 5.0 multiplies a
    float32 image by a float64 scalar in float64, 5.1 in float32 (1 ulp apart on about 40% of values), and the
    official tensors follow the installed OpenCV.
    """
    cv2.subtract(x, _MEAN64, x)
    cv2.multiply(x, _STDINV64, x)
    return x


def _normalize_table() -> np.ndarray:
    """(3, 256): every uint8 value per channel, normalised by :func:`_official_normalize` (what :func:`normalize`
    looks up). The values are laid out as a 16x16 image: OpenCV treats the (1, 3) mean as a per-channel scalar for
    such an image as for a photo (5.1 does not for an image one pixel wide), and its result does not depend on a
    value's position (tests/data/test_transforms.py checks the lookup against the direct call)."""
    levels = np.repeat(np.arange(256, dtype=np.float32).reshape(16, 16, 1), 3, axis=2)
    return _official_normalize(levels).reshape(256, 3).T.copy()


_NORMALIZED = _normalize_table()

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


def rescale_size(h: int, w: int, target: tuple[int, int], keep_ratio: bool) -> tuple[int, int]:
    """Output (h, w): with ``keep_ratio`` the mmcv 'rescale' rule (fit the long side to max(target) and the short
    side to min(target), whichever is smaller, rounded), otherwise ``target`` turned to the image's orientation
    (the official Resize: a portrait image gets the long side as its height)."""
    if not keep_ratio:
        return (max(target), min(target)) if h > w else (min(target), max(target))
    scale = min(max(target) / max(h, w), min(target) / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Image bilinear, label nearest, to (h, w)."""
    h, w = size
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, label


def random_resize(image, label, params: ResizeSettings, rng: np.random.Generator):
    """Resize with a random factor from ``ratio_range`` applied to the target size."""
    th, tw = params.size
    if params.ratio_range is not None:
        s = rng.uniform(*params.ratio_range)
        th, tw = int(th * s), int(tw * s)
    return resize(image, label, rescale_size(*image.shape[:2], (th, tw), params.keep_ratio))


def random_crop(image, label, crop: tuple[int, int], cat_max_ratio: float, rng: np.random.Generator):
    """Random crop of at most ``crop``; retried (up to 10 times) while one class covers ≥ cat_max_ratio of the
    labelled pixels or only one class is present, keeping the last try (as the official RandomCrop, which also
    retries a single-class crop when the ratio is 1; it keeps the uncropped image when the last try has no
    labelled pixel, where we keep that crop)."""
    h, w = label.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    for _ in range(10):
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        lab = label[y : y + ch, x : x + cw]
        # per-class pixel counts without the ignore label (bincount: same counts as np.unique, no sort)
        counts = np.bincount(lab.ravel(), minlength=IGNORE_INDEX + 1)
        counts[IGNORE_INDEX] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return image[y : y + ch, x : x + cw], lab


def flip_label_pairs(label: np.ndarray, flip_pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Exchange the values of each left/right class pair (after a horizontal flip)."""
    if not flip_pairs:
        return label.copy()
    size = 256 if label.dtype == np.uint8 else max(int(label.max()), *(max(p) for p in flip_pairs)) + 1
    table = np.arange(size, dtype=label.dtype)  # one lookup instead of two masked writes per pair
    for a, b in flip_pairs:
        table[a], table[b] = b, a
    return table[label]


def random_flip(image, label, prob: float, flip_pairs, rng: np.random.Generator):
    """Horizontal flip with probability ``prob``; left/right class pairs are swapped in the label."""
    if rng.random() <= prob:  # the official: no flip when the draw exceeds prob
        image = image[:, ::-1]
        label = flip_label_pairs(label[:, ::-1], flip_pairs)
    return image, label


def random_rotation(image, label, prob: float, max_degrees: float, rng: np.random.Generator):
    """Rotation about the centre by an integer angle in [-max, max): image bicubic (fill 0), label nearest
    (fill ignore)."""
    if max_degrees <= 0 or rng.random() > prob:  # the official: no rotation when the draw exceeds prob
        return image, label
    angle = float(rng.integers(-int(max_degrees), int(max_degrees)))
    h, w = label.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    image = cv2.warpAffine(np.ascontiguousarray(image), m, (w, h), flags=cv2.INTER_CUBIC, borderValue=0)
    label = cv2.warpAffine(np.ascontiguousarray(label), m, (w, h), flags=cv2.INTER_NEAREST,
                           borderValue=IGNORE_INDEX)
    return image, label


_LEVELS = np.arange(256, dtype=np.uint8)


def _convert(image: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
    """image * alpha + beta in float32, clipped and truncated to uint8 (each photometric step rounds).

    Speed (bench/data.py): a uint8 image has 256 values, so the float32 arithmetic runs on a 256-entry table and
    the image is looked up in it (``cv2.LUT``): the same values as computing it per pixel, several times faster.
    """
    table = np.clip(_LEVELS.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
    return cv2.LUT(np.ascontiguousarray(image), table)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The official PhotoMetricDistortion on an RGB uint8 image, step by step with its rounding and draw order:
    brightness ±32, then contrast 0.5–1.5 either first (mode 1) or last (mode 0), saturation 0.5–1.5 and hue ±18
    each in its own RGB→HSV→RGB round trip, every step with probability 0.5.

    The official pipeline applies it to the BGR image as read by OpenCV (its Normalize converts to RGB later), so
    its hue step turns the other way round the hue circle; we apply it to RGB, as intended (documented in the
    README's parity section; tests/parity/test_parity_training.py checks both).
    """
    img = image
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((_LEVELS.astype(int) + rng.integers(-18, 18)) % 180).astype(np.uint8)[hsv[..., 0]]
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(0.5, 1.5))
    return img


def normalize(image: np.ndarray) -> torch.Tensor:
    """(x - mean) / std on RGB, HWC uint8 → CHW float32, with the official Normalize's OpenCV operations
    (bit-identical under the installed OpenCV; tests/parity/test_parity_training.py)."""
    if image.dtype != np.uint8:
        return torch.from_numpy(np.ascontiguousarray(_official_normalize(image.astype(np.float32)).transpose(2, 0, 1)))
    # speed: per channel, the 256 possible results in a table; each channel plane looked up into CHW directly
    out = np.empty((3, *image.shape[:2]), np.float32)
    for c in range(3):
        np.take(_NORMALIZED[c], image[:, :, c], out=out[c])
    return torch.from_numpy(out)


def pad_to(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to ``size`` centred (as the official Padding): image with 0 (the mean colour), label with ignore."""
    h, w = label.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == 0 and pw == 0:
        return image, label
    top, left = ph // 2, pw // 2
    pads = (left, pw - left, top, ph - top)
    image = torch.nn.functional.pad(image, pads, value=0.0)
    label = torch.nn.functional.pad(label, pads, value=IGNORE_INDEX)
    return image, label


def build_train_transform(params: PipelineSettings, flip_pairs: Sequence[tuple[int, int]]) -> Transform:
    """Resize (random ratio) → crop (cat-max-ratio) → flip (pairs) → rotation → photometric → normalise → pad."""

    def apply(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        image, label = random_resize(image, label, params.train_resize, rng)
        image, label = random_crop(image, label, params.crop_size, params.cat_max_ratio, rng)
        image, label = random_flip(image, label, params.flip_prob, flip_pairs, rng)
        image, label = random_rotation(image, label, params.rotation.prob, params.rotation.max_degrees, rng)
        if params.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        tensor = normalize(image)
        target = torch.from_numpy(np.ascontiguousarray(label)).long()
        return pad_to(tensor, target, params.crop_size)

    return apply


def test_image(image: np.ndarray, params: PipelineSettings, test_resize: ResizeSettings | None = None) -> torch.Tensor:
    """The test-time input of an RGB image: resized as ``test_resize`` says (by default ``params.test_resize``: a
    protocol may have its own), normalised (CHW float32)."""
    test_resize = test_resize or params.test_resize
    image, _ = resize(image, None, rescale_size(*image.shape[:2], test_resize.size, test_resize.keep_ratio))
    return normalize(image)


def build_test_transform(params: PipelineSettings, test_resize: ResizeSettings | None = None) -> Transform:
    """:func:`test_image` on the image only; the label stays at its original size, where predictions are scored."""

    def apply(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        del rng
        return test_image(image, params, test_resize), torch.from_numpy(np.ascontiguousarray(label)).long()

    return apply
