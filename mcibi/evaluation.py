"""Evaluate a checkpoint under one named protocol with a streaming confusion matrix."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mcibi.checkpoint import checkpoint_params, load_checkpoint, load_weights
from mcibi.data.dataset import SegmentationDataset
from mcibi.data.specs import get_spec
from mcibi.data.transforms import build_test_transform
from mcibi.files import atomic_open, write_json
from mcibi.inference import predict_tta
from mcibi.metrics import ConfusionMatrix
from mcibi.models import build_segmentor
from mcibi.models.folding import fold_batchnorm
from mcibi.params import ExperimentParams, to_dict

log = logging.getLogger(__name__)


def evaluate(
    params: ExperimentParams,
    checkpoint: str | Path,
    protocol: str,
    data_root: str | Path,
    device: str | None = None,
    threads: int | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """mIoU, aAcc, mAcc and per-class IoU of ``checkpoint`` on the eval split under ``protocol``.

    Predictions are resized back to each image's original size before scoring, as the official test script
    does; the checkpoint's model params must equal ``params.model`` (a different file is an error).
    """
    if protocol not in params.evaluate.protocols:
        raise KeyError(f"{params.path}: no protocol '{protocol}' (defined: {', '.join(params.evaluate.protocols)}).")
    proto = params.evaluate.protocols[protocol]
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = load_checkpoint(checkpoint)
    trained = checkpoint_params(state, checkpoint)
    if trained.model != params.model:
        raise ValueError(f"{checkpoint}: trained with different model params than {params.path}. Retrain it.")
    model = build_segmentor(params.model)
    load_weights(model, state, checkpoint)
    model.to(dev).eval()
    if params.evaluate.fold_batchnorm:
        model = fold_batchnorm(model)
    layout = torch.channels_last if params.evaluate.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)

    spec = get_spec(params.data.name)
    dataset = SegmentationDataset(Path(data_root) / params.data.name, params.data.eval_split,
                                  build_test_transform(params.data), seed=0)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(count))
    loader = DataLoader(dataset, batch_size=1, sampler=indices, num_workers=params.train.num_workers)
    confusion = ConfusionMatrix(spec.num_classes, device=dev)
    start = time.time()
    with torch.inference_mode():
        for sample in tqdm(loader, total=count, desc=f"eval {params.name} [{protocol}]", mininterval=5.0):
            image = sample["image"].to(dev).contiguous(memory_format=layout)
            label = sample["label"].to(dev)
            scores = predict_tta(model, image, out_size=tuple(label.shape[-2:]), scales=proto.scales, flip=proto.flip,
                                 flip_permutation=spec.flip_permutation(), mode=proto.mode, crop=proto.crop,
                                 stride=proto.stride, probs_before_resize=proto.probs_before_resize,
                                 align_corners=params.model.align_corners)
            confusion.update(scores.argmax(dim=1), label)
    confusion.all_reduce()
    seconds = time.time() - start
    metrics = confusion.compute()
    result = {
        "experiment": params.name,
        "dataset": params.data.name,
        "split": params.data.eval_split,
        "protocol_name": protocol,
        "protocol": to_dict(proto),
        "checkpoint": str(checkpoint),
        "num_images": count,
        "seconds": round(seconds, 2),
        "mIoU": metrics["mIoU"],
        "aAcc": metrics["aAcc"],
        "mAcc": metrics["mAcc"],
        "IoU": dict(zip(spec.classes, metrics["IoU"], strict=True)),
        "Acc": dict(zip(spec.classes, metrics["Acc"], strict=True)),
        "confusion": confusion.matrix.cpu().tolist(),
    }
    log.info("%s [%s]: mIoU %.4f aAcc %.4f over %d images in %.1f s", params.name, protocol, result["mIoU"],
             result["aAcc"], count, seconds)
    return result


def write_result(result: dict[str, Any], metrics_json: str | Path, per_class_csv: str | Path) -> None:
    """Write the evaluation JSON and the per-class IoU/accuracy table (CSV) atomically."""
    write_json(metrics_json, result)
    with atomic_open(per_class_csv) as fh:
        writer = csv.writer(fh)
        writer.writerow(["class_id", "class", "IoU", "Acc"])
        for i, name in enumerate(result["IoU"]):
            writer.writerow([i, name, f"{result['IoU'][name]:.6f}", f"{result['Acc'][name]:.6f}"])
