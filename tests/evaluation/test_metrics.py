"""Confusion-matrix metrics against hand-computed values."""

import math

import numpy as np
import torch

from mcibi.evaluation.metrics import ConfusionMatrix, metrics_from_confusion


def test_confusion_counts_and_ignore():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm.update(pred, target)
    expected = np.array([[1, 1, 0],   # gt 0: one right, one as 1
                         [1, 2, 0],   # gt 1: two right, one as 0
                         [1, 0, 1]])  # gt 2: one right, one as 0; the 255 pixel is skipped
    assert (cm.matrix.numpy() == expected).all()


def test_streaming_equals_one_shot():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (6, 8, 8), generator=gen)
    pred = torch.randint(0, 4, (6, 8, 8), generator=gen)
    one, many = ConfusionMatrix(4), ConfusionMatrix(4)
    one.update(pred, target)
    for i in range(6):
        many.update(pred[i], target[i])
    assert torch.equal(one.matrix, many.matrix)


def test_metrics_by_hand():
    m = np.array([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    r = metrics_from_confusion(m)
    iou = [1 / (2 + 3 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)]  # tp / (gt + pred - tp)
    assert np.allclose(r["IoU"], iou)
    assert math.isclose(r["mIoU"], sum(iou) / 3)
    assert math.isclose(r["aAcc"], 4 / 7)
    assert math.isclose(r["mAcc"], (1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    m = np.array([[2, 0, 0], [0, 1, 1], [0, 0, 0]])  # class 2 never in gt; predicted once
    r = metrics_from_confusion(m)
    assert r["IoU"][2] == 0.0  # predicted but absent: IoU 0 (union 1)
    m2 = np.array([[2, 0, 0], [0, 2, 0], [0, 0, 0]])  # class 2 neither in gt nor predicted
    r2 = metrics_from_confusion(m2)
    assert math.isnan(r2["IoU"][2]) and r2["mIoU"] == 1.0
