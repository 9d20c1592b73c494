"""Streaming confusion matrix and the segmentation metrics derived from it."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """K×K counts (rows = ground truth, columns = prediction), accumulated batch by batch.

    Memory is O(K²) whatever the dataset size; under DDP :meth:`all_reduce` sums the counts of all ranks.
    Ground-truth values outside [0, K) (the ignore index) are skipped.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of predicted and ground-truth class maps of equal shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        k = self.num_classes
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        target = target.reshape(-1).to(self.matrix.device, torch.int64)
        valid = (target >= 0) & (target < k)
        idx = target[valid] * k + pred[valid]
        self.matrix += torch.bincount(idx, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        """Sum the counts over all DDP ranks (no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, float | list[float]]:
        """Metrics of the accumulated counts; see :func:`metrics_from_confusion`."""
        return metrics_from_confusion(self.matrix.cpu().numpy())


def metrics_from_confusion(matrix: np.ndarray) -> dict[str, float | list[float]]:
    """IoU per class, mIoU, aAcc, mAcc from a confusion matrix.

    Classes whose union is zero (absent from both ground truth and prediction) get NaN IoU and are left out
    of the means, as in the official evaluation (chainercv's nanmean).
    """
    m = matrix.astype(np.float64)
    tp = np.diag(m)
    gt = m.sum(axis=1)
    pred = m.sum(axis=0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = m.sum()
    return {
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "IoU": [float(x) for x in iou],
        "Acc": [float(x) for x in acc],
    }
