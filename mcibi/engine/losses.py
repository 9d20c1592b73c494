"""The training losses: the decoder's and the memory's upsampled cross-entropies, weighted."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from mcibi.data.specs import IGNORE_INDEX
from mcibi.engine.layout import class_rows_are_fast
from mcibi.spec.params import (
    ExperimentParams,
)

log = logging.getLogger(__name__)

def upsampled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` bilinearly upsampled to the label size, ignoring 255.

    The value of ``F.cross_entropy(F.interpolate(logits, ...), labels)``. With enough classes it is computed
    class-innermost: the upsampling runs channels-last and the softmax over contiguous rows, faster on CPU at 150
    classes than over the strided class axis of NCHW. Rows shorter than a SIMD register (the demo's 8 classes under
    AVX-512) are slower than NCHW instead, so those stay NCHW.
    """
    k = logits.shape[1]
    if not class_rows_are_fast(k, logits.device):
        up = F.interpolate(logits.contiguous(), size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
        return F.cross_entropy(up.float(), labels, ignore_index=IGNORE_INDEX)
    up = F.interpolate(logits.contiguous(memory_format=torch.channels_last), size=labels.shape[-2:],
                       mode="bilinear", align_corners=align_corners)
    rows = up.float().permute(0, 2, 3, 1).reshape(-1, k)  # a view: channels-last is (B, H, W, K) in memory
    return F.cross_entropy(rows, labels.reshape(-1), ignore_index=IGNORE_INDEX)


def compute_losses(out, labels: torch.Tensor, params: ExperimentParams) -> dict[str, torch.Tensor]:
    """Weighted cross-entropy terms on logits upsampled to the label size; ``total`` is their sum."""
    w = params.train.loss_weights
    align = params.model.align_corners
    terms = {"cls": (out.logits, w.cls), "cwi": (out.logits_cwi, w.cwi), "pr": (out.logits_pr, w.pr),
             "aux": (out.logits_aux, w.aux)}
    losses: dict[str, torch.Tensor] = {}
    for name, (logits, weight) in terms.items():
        if logits is None or weight == 0:
            continue
        losses[name] = weight * upsampled_cross_entropy(logits, labels, align)
    if out.logits_memory is not None and w.memory != 0:  # MCIBI v1: stored vector k must classify as k
        targets = torch.arange(out.logits_memory.shape[0], device=out.logits_memory.device)
        losses["memory"] = w.memory * F.cross_entropy(out.logits_memory.float(), targets)
    losses["total"] = sum(losses.values())
    return losses

