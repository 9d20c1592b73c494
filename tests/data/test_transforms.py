"""Paired transforms: flips swap left/right classes, sizes follow the official rules, padding and fills."""

import cv2
import numpy as np
import pytest
import torch

from mcibi.data.transforms import (
    MEAN,
    STD,
    flip_label_pairs,
    normalize,
    pad_to,
    photometric_distortion,
    random_crop,
    random_flip,
    random_rotation,
    rescale_size,
)


def test_flip_mirrors_and_swaps_pairs():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    label = np.array([[2, 0, 3], [1, 2, 255]], np.uint8)
    out_img, out_lab = random_flip(image, label, prob=1.0, flip_pairs=[(2, 3)], rng=np.random.default_rng(0))
    assert (out_img == image[:, ::-1]).all()
    assert out_lab.tolist() == [[2, 0, 3], [255, 3, 1]]  # mirrored, then 2 <-> 3
    same_img, same_lab = random_flip(image, label, prob=0.0, flip_pairs=[(2, 3)], rng=np.random.default_rng(0))
    assert same_img is image and same_lab is label


def test_flip_pairs_is_an_involution():
    label = np.random.default_rng(0).integers(0, 20, (8, 8)).astype(np.uint8)
    pairs = [(15, 14), (17, 16), (19, 18)]  # LIP's
    assert (flip_label_pairs(flip_label_pairs(label, pairs), pairs) == label).all()


def test_rescale_rule():
    assert rescale_size(1024, 2048, (1024, 2048), keep_ratio=True) == (1024, 2048)
    assert rescale_size(375, 500, (512, 2048), keep_ratio=True) == (512, 683)  # short side bound: 512/375
    assert rescale_size(300, 1000, (512, 1024), keep_ratio=True) == (307, 1024)  # long side bound
    assert rescale_size(300, 1000, (520, 520), keep_ratio=False) == (520, 520)


def test_crop_respects_cat_max_ratio():
    label = np.zeros((64, 64), np.uint8)
    label[:, 48:] = 1  # only crops touching the right quarter hold two classes
    image = np.zeros((64, 64, 3), np.uint8)
    hits = 0
    for seed in range(20):
        _, lab = random_crop(image, label, (16, 16), 0.75, np.random.default_rng(seed))
        assert lab.shape == (16, 16)
        hits += len(np.unique(lab)) > 1
    assert hits >= 15  # retries favour mixed crops; without the rule ~25% would be
    _, small = random_crop(image[:8], label[:8], (16, 16), 0.75, np.random.default_rng(0))
    assert small.shape == (8, 16)  # crop never exceeds the image


def test_pad_values_and_centering():
    img, lab = normalize(np.full((4, 6, 3), 200, np.uint8)), torch.ones(4, 6, dtype=torch.long)
    pimg, plab = pad_to(img, lab, (8, 8))
    assert pimg.shape == (3, 8, 8) and plab.shape == (8, 8)
    assert (plab[:2] == 255).all() and (plab[2:6, 1:7] == 1).all() and (pimg[:, 0, 0] == 0).all()


def test_normalize_uses_imagenet_rgb_statistics():
    x = normalize(np.array([[MEAN]], np.float32).astype(np.uint8))
    expected = (np.floor(MEAN) - MEAN) / STD
    assert torch.allclose(x[:, 0, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_photometric_keeps_dtype_and_shape_and_is_seeded():
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    a = photometric_distortion(image, np.random.default_rng(5))
    b = photometric_distortion(image, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == image.shape and (a == b).all()
    assert any((photometric_distortion(image, np.random.default_rng(s)) != image).any() for s in range(5))


def test_rotation_fills_ignore():
    image = np.full((32, 32, 3), 100, np.uint8)
    label = np.ones((32, 32), np.uint8)
    rotated = [random_rotation(image, label, 1.0, 30, np.random.default_rng(s)) for s in range(10)]
    assert any((lab == 255).any() for _, lab in rotated)
    assert set(np.unique(np.concatenate([lab.ravel() for _, lab in rotated]))) <= {1, 255}


@pytest.mark.parametrize("shape", [(2, 5), (7, 5), (61, 45), (97, 130)])
def test_normalize_lookup_equals_the_opencv_operations(shape):
    """The uint8 lookup table gives what the official Normalize's OpenCV calls give on the whole image, under the
    installed OpenCV (whose float32 x float64-scalar rounding changed between 5.0 and 5.1). Not for images 1 or 3
    pixels wide: there OpenCV 5.1 broadcasts the official (1, 3) mean over columns instead of channels."""
    image = np.random.default_rng(shape[1]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    direct = normalize(image.astype(np.float32))
    assert torch.equal(normalize(image), direct)
    mean, stdinv = np.array([[123.675, 116.28, 103.53]]), 1 / np.array([[58.395, 57.12, 57.375]])
    official = image.astype(np.float32)
    cv2.subtract(official, mean, official)
    cv2.multiply(official, stdinv, official)
    assert torch.equal(direct, torch.from_numpy(official.transpose(2, 0, 1)))
