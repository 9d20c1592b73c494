"""Whole / slide / flip / multi-scale prediction on toy models whose answers are known."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mcibi.evaluation.inference import predict_slide, predict_tta, predict_whole, slide_windows


class Pointwise(nn.Module):
    """A 1x1 conv: every pixel's scores depend on that pixel only, at the input resolution."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return SimpleNamespace(logits=self.conv(x))


class Strided(nn.Module):
    """Downsamples by 4 like a backbone, so outputs live at feature resolution."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, k, 5, stride=4, padding=2)

    def forward(self, x):
        return SimpleNamespace(logits=self.conv(x))


def test_windows_cover_and_clamp():
    boxes = slide_windows(10, 13, crop=(6, 6), stride=(4, 4))
    cover = torch.zeros(10, 13)
    for y1, y2, x1, x2 in boxes:
        assert y2 - y1 == 6 and x2 - x1 == 6 and y2 <= 10 and x2 <= 13
        cover[y1:y2, x1:x2] += 1
    assert (cover > 0).all()
    assert slide_windows(4, 4, crop=(6, 6), stride=(4, 4)) == [(0, 4, 0, 4)]  # crop >= image: one window


@pytest.mark.parametrize("crop", [(32, 16), (16, 32)], ids=["tall", "wide"])
@pytest.mark.parametrize("size", [(32, 64), (20, 64), (32, 12), (10, 12), (50, 19)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_non_square_windows_cover_and_clamp(size, crop):
    """Tall and wide windows (CityScapes' two readings, /32) on images they exceed on one side, on both or on none:
    every window is min(window, image) on each side, inside the image, and together they cover it."""
    h, w = size
    boxes = slide_windows(h, w, crop=crop, stride=(11, 11))
    cover = torch.zeros(h, w)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 and y2 <= h and 0 <= x1 and x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop[0], h), min(crop[1], w))
        cover[y1:y2, x1:x2] += 1
    assert (cover > 0).all()
    rows, cols = {b[:2] for b in boxes}, {b[2:] for b in boxes}
    assert len(boxes) == len(rows) * len(cols)  # a grid, each window once
    if crop[0] >= h:  # a window taller than the image: one row, the image's full height
        assert rows == {(0, h)}
    if crop[1] >= w:
        assert cols == {(0, w)}


def test_slide_equals_whole_for_pointwise_model():
    model = Pointwise().eval()
    x = torch.randn(2, 3, 11, 17)
    whole = predict_whole(model, x, probs=False)
    slide = predict_slide(model, x, crop=(6, 8), stride=(4, 5), probs=False)
    assert torch.allclose(whole, slide, atol=1e-5)


def test_slide_with_crop_larger_than_image_equals_upsampled_whole():
    model = Strided().eval()
    x = torch.randn(1, 3, 16, 20)
    slide = predict_slide(model, x, crop=(32, 32), stride=(16, 16), probs=False)
    whole = torch.nn.functional.interpolate(predict_whole(model, x, probs=False), size=(16, 20), mode="bilinear")
    assert torch.allclose(slide, whole, atol=1e-6)


def test_batched_windows_equal_one_by_one():
    model = Strided().eval()
    x = torch.randn(2, 3, 24, 30)
    a = predict_slide(model, x, crop=(16, 16), stride=(8, 10), probs=True, max_batch=1)
    b = predict_slide(model, x, crop=(16, 16), stride=(8, 10), probs=True, max_batch=64)
    assert torch.allclose(a, b, atol=1e-6)


def test_flip_swaps_pair_channels():
    model = Pointwise(k=4).eval()
    x = torch.randn(1, 3, 6, 6)
    plain = predict_tta(model, x, out_size=(6, 6))
    perm = [0, 2, 1, 3]
    flipped = predict_tta(model, x, out_size=(6, 6), flip=True, flip_permutation=perm)
    # A pointwise model gives the same scores on the mirrored image, so the flipped pass differs from the plain
    # one only by the swapped left/right channels 1 <-> 2.
    assert torch.allclose(flipped, (plain + plain[:, perm]) / 2, atol=1e-6)
    assert torch.allclose(predict_tta(model, x, out_size=(6, 6), flip=True), plain, atol=1e-6)


def test_probs_before_resize_averages_probabilities():
    model = Pointwise().eval()
    x = torch.randn(1, 3, 8, 8)
    out = predict_tta(model, x, out_size=(8, 8), scales=(0.5, 1.0), probs_before_resize=True)
    assert torch.allclose(out.sum(dim=1), torch.ones(1, 8, 8), atol=1e-5)


def test_multiscale_output_size_and_mean():
    model = Strided().eval()
    x = torch.randn(1, 3, 32, 32)
    one = predict_tta(model, x, out_size=(40, 36), scales=(1.0,))
    two = predict_tta(model, x, out_size=(40, 36), scales=(1.0, 1.0))
    assert one.shape == (1, 4, 40, 36) and torch.allclose(one, two, atol=1e-6)


# ------------------------------------------------------------------------ evaluation of a checkpoint on real data
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A briefly trained tiny MCIBI++ model and the data it was trained on (test images at their own 128 px)."""
    from tiny_training import tiny_dataset, tiny_params

    from mcibi.engine.train import train
    from mcibi.spec.params import load_params

    root = tmp_path_factory.mktemp("eval")
    data_root = tiny_dataset(root / "data")
    params = load_params(tiny_params(root / "params", epochs=1))
    params = dataclasses.replace(params, data=dataclasses.replace(
        params.data, test_resize=dataclasses.replace(params.data.test_resize, size=(128, 128))))
    result = train(params, data_root, root / "run", threads=1)
    return params, result.checkpoint, data_root


def _with_protocol(params, **changes):
    proto = dataclasses.replace(params.evaluate.protocols["ss"], **changes)
    return dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, protocols={"ss": proto}))


def test_whole_slide_and_batched_windows_give_the_same_confusion_matrix(tiny_checkpoint):
    from mcibi.evaluation.protocols import evaluate

    params, ckpt, data_root = tiny_checkpoint
    whole = evaluate(params, ckpt, "ss", data_root, threads=1)
    one_window = evaluate(_with_protocol(params, mode="slide", crop=(160, 160), stride=(96, 96)), ckpt, "ss",
                          data_root, threads=1)  # crop >= image: a single window
    assert whole["confusion"] == one_window["confusion"]
    assert sum(map(sum, whole["confusion"])) == 4 * 128 * 128 and whole["mIoU"] > 0
    windows = _with_protocol(params, mode="slide", crop=(64, 64), stride=(40, 40), flip=True)
    batched = evaluate(windows, ckpt, "ss", data_root, threads=1)
    single = dataclasses.replace(windows, evaluate=dataclasses.replace(windows.evaluate, window_batch=1))
    assert evaluate(single, ckpt, "ss", data_root, threads=1)["confusion"] == batched["confusion"]
    # every record says how it was measured
    assert batched["protocol"] == {"test_resize": None, "scales": [1.0], "flip": True, "mode": "slide",
                                   "crop": [64, 64], "stride": [40, 40], "probs_before_resize": False}
    assert batched["protocol_title"] == "mIoU" and batched["checkpoint"] == str(ckpt)


def test_cityscapes_export_table_and_demo_export(tiny_checkpoint, tmp_path):
    import cv2
    import numpy as np

    from mcibi.evaluation.protocols import cityscapes_train_to_label_ids, export_predictions

    table = cityscapes_train_to_label_ids()
    assert table[0] == 7 and table[1] == 8 and table[10] == 23 and table[13] == 26 and table[18] == 33
    assert table[19] == 0 and table[255] == 0 and len(set(table[:19].tolist())) == 19

    params, ckpt, data_root = tiny_checkpoint
    assert export_predictions(params, ckpt, "ss", data_root, tmp_path / "png", split="val", threads=1) == 4
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert len(pngs) == 4
    image = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (128, 128) and image.dtype == np.uint8 and image.max() < 8
    # an interrupted export continues: existing PNGs are kept
    assert export_predictions(params, ckpt, "ss", data_root, tmp_path / "png", split="val", threads=1) == 0
