"""Whole / slide / flip / multi-scale prediction on toy models whose answers are known."""

from types import SimpleNamespace

import torch
from torch import nn

from mcibi.inference import predict_slide, predict_tta, predict_whole, slide_windows


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
