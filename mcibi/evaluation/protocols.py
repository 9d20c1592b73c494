"""Evaluate a checkpoint under one named protocol with a streaming confusion matrix; export test-set predictions.

Under ``torchrun`` every rank scores its share of the images (rank r takes images r, r + N, ...) and the
confusion matrices are summed, so memory stays O(K²) whatever the dataset size and the result does not depend
on the number of processes.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mcibi.data.dataset import SegmentationDataset
from mcibi.data.lookup import get_spec
from mcibi.data.transforms import build_test_transform
from mcibi.distributed import DistEnv, setup, teardown
from mcibi.evaluation.inference import predict_tta
from mcibi.evaluation.metrics import ConfusionMatrix
from mcibi.evaluation.samples import write_samples
from mcibi.files import atomic_open, atomic_path, write_json
from mcibi.models import build_for_weights
from mcibi.models.build import checkpoint_params
from mcibi.models.checkpoint import load_checkpoint, load_weights
from mcibi.models.folding import fold_batchnorm
from mcibi.spec.params import PROTOCOL_TITLES, ExperimentParams, ProtocolParams, to_dict

log = logging.getLogger(__name__)


def load_model(params: ExperimentParams, checkpoint: str | Path, dev: torch.device,
               state: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """The checkpoint's model in eval mode, folded / channels-last as ``params.evaluate`` says, and its layout
    (``state``: the checkpoint already read, to avoid reading it twice)."""
    state = load_checkpoint(checkpoint) if state is None else state
    trained = checkpoint_params(state, checkpoint)
    if trained.model != params.model:
        raise ValueError(f"{checkpoint}: trained with different model params than {params.path}. Retrain it.")
    model = build_for_weights(params.model)
    load_weights(model, state, checkpoint)
    model.to(dev).eval()
    if params.evaluate.fold_batchnorm:
        model = fold_batchnorm(model)
    layout = torch.channels_last if params.evaluate.channels_last else torch.contiguous_format
    return model.to(memory_format=layout), layout


def protocol_params(params: ExperimentParams, protocol: str) -> ProtocolParams:
    """The settings of one named protocol of ``params`` (KeyError naming the file and the defined ones)."""
    if protocol not in params.evaluate.protocols:
        raise KeyError(f"{params.path}: no protocol '{protocol}' (defined: {', '.join(params.evaluate.protocols)}).")
    return params.evaluate.protocols[protocol]


def predictions(params: ExperimentParams, model: nn.Module, layout, proto: ProtocolParams, loader: DataLoader,
                 dev: torch.device, desc: str, total: int, show: bool) -> Iterator[tuple[dict, torch.Tensor]]:
    """(sample, class map at the label's size) for every image of ``loader``, under ``proto``."""
    spec = get_spec(params.data.name)
    with torch.inference_mode():
        for sample in tqdm(loader, total=total, desc=desc, mininterval=5.0, disable=not show):
            image = sample["image"].to(dev).contiguous(memory_format=layout)
            size = tuple(sample["label"].shape[-2:])
            scores = protocol_scores(params, model, image, proto, spec.flip_permutation(), size)
            yield sample, scores.argmax(dim=1)


def protocol_scores(params: ExperimentParams, model: nn.Module, images: torch.Tensor, proto: ProtocolParams,
                    flip_permutation: list[int], out_size: tuple[int, int]) -> torch.Tensor:
    """Class scores (B, K, *out_size) of normalised ``images`` under ``proto``: the one place that turns a
    protocol's settings into a :func:`mcibi.inference.predict_tta` call (evaluation, export, figures, predict).
    Windows reach inference as (h, w) whichever order the protocol's slide mode states them in."""
    windows = proto.windows_hw()
    crop, stride = windows if windows is not None else (None, None)
    return predict_tta(model, images, out_size=out_size, scales=proto.scales, flip=proto.flip,
                       flip_permutation=flip_permutation, mode="whole" if windows is None else "slide", crop=crop,
                       stride=stride, probs_before_resize=proto.probs_before_resize,
                       align_corners=params.model.align_corners, max_batch=params.evaluate.window_batch)


def protocol_record(name: str, proto: ProtocolParams) -> dict[str, Any]:
    """What a metric record says about how it was measured (the model-zoo page's column and the exact settings)."""
    return {"protocol_name": name, "protocol_title": PROTOCOL_TITLES.get(name, name), "protocol": to_dict(proto)}


def evaluate(
    params: ExperimentParams,
    checkpoint: str | Path,
    protocol: str,
    data_root: str | Path,
    device: str | None = None,
    threads: int | None = None,
    limit: int | None = None,
    samples: int = 0,
    samples_out: str | Path | None = None,
) -> dict[str, Any]:
    """mIoU, aAcc, mAcc and per-class IoU of ``checkpoint`` on the eval split under ``protocol``.

    Predictions are resized back to each image's original size before scoring, as the official test script
    does; the checkpoint's model params must equal ``params.model`` (a different file is an error). Every rank
    returns the same (all-reduced) record; only rank 0 should write it. With ``samples_out``, the main process
    also writes its first ``samples`` (image, label, prediction) triples there (:mod:`mcibi.evaluation.samples`),
    which the figures job draws as overlays without loading the model again.
    """
    proto = protocol_params(params, protocol)
    if threads:
        torch.set_num_threads(threads)
    env = setup(device)
    try:
        return _evaluate(params, checkpoint, protocol, proto, data_root, env, limit, samples, samples_out)
    finally:
        teardown(env)


def _evaluate(params: ExperimentParams, checkpoint: str | Path, protocol: str, proto: ProtocolParams,
              data_root: str | Path, env: DistEnv, limit: int | None, samples: int,
              samples_out: str | Path | None) -> dict[str, Any]:
    dev = env.device
    model, layout = load_model(params, checkpoint, dev)
    spec = get_spec(params.data.name)
    dataset = SegmentationDataset(Path(data_root) / params.data.name, params.data.eval_split,
                                  build_test_transform(params.data, proto.test_resize), seed=0)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(count))[env.rank :: env.world_size]
    loader = DataLoader(dataset, batch_size=1, sampler=indices, num_workers=params.train.num_workers)
    confusion = ConfusionMatrix(spec.num_classes, device=dev)
    keep = samples if samples_out is not None and env.is_main else 0
    ids, images, labels, preds = [], [], [], []  # the kept samples (the label is at the image's size)
    start = time.time()
    for index, (sample, pred) in zip(indices, predictions(params, model, layout, proto, loader, dev,
                                                          f"eval {params.name} [{protocol}]", len(indices),
                                                          env.is_main), strict=True):
        confusion.update(pred, sample["label"].to(dev))
        if len(ids) < keep:
            image, label = dataset.read(index)
            ids.append(dataset.sample_id(index))
            images.append(image)
            labels.append(label)
            preds.append(pred[0].cpu().numpy())
    confusion.all_reduce()
    seconds = time.time() - start
    if samples_out is not None and env.is_main:
        write_samples(samples_out, ids, images, labels, preds)
    metrics = confusion.compute()
    result = {
        "experiment": params.name,
        "dataset": params.data.name,
        "split": params.data.eval_split,
        **protocol_record(protocol, proto),
        "checkpoint": str(checkpoint),
        "num_images": count,
        "processes": env.world_size,
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


# ------------------------------------------------------------------------------------------------ test-set export
def cityscapes_train_to_label_ids() -> np.ndarray:
    """Lookup table trainId -> labelId (uint8, 256 entries) from cityscapesScripts' label table.

    As ``trainId2label`` in cityscapesScripts, the first label of each trainId wins; values without a trainId
    map to 0 ('unlabeled'), which the server ignores.
    """
    from mcibi.data.labelsets import cityscapes_train_ids

    table = np.zeros(256, dtype=np.uint8)
    for label_id, train_id in reversed(cityscapes_train_ids().items()):  # written last: the first label wins
        if train_id is not None:
            table[train_id] = label_id
    return table


def export_predictions(
    params: ExperimentParams,
    checkpoint: str | Path,
    protocol: str,
    data_root: str | Path,
    out_dir: str | Path,
    split: str = "test",
    device: str | None = None,
    threads: int | None = None,
    limit: int | None = None,
) -> int:
    """Write one PNG per image of ``split`` (``<out_dir>/<image id>.png``) for a benchmark's evaluation server.

    CityScapes predictions are written as labelIds (trainIds mapped back with the official table, what its
    server expects); other datasets as class indices. Each PNG is written atomically and existing ones are
    skipped, so an interrupted export continues. Returns the number of PNGs written by this process.
    """
    proto = protocol_params(params, protocol)
    if threads:
        torch.set_num_threads(threads)
    env = setup(device)
    try:
        dev = env.device
        model, layout = load_model(params, checkpoint, dev)
        dataset = SegmentationDataset(Path(data_root) / params.data.name, split,
                                      build_test_transform(params.data, proto.test_resize),
                                      seed=0)
        table = cityscapes_train_to_label_ids() if params.data.name == "cityscapes" else None
        out = Path(out_dir)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        todo = [i for i in range(count)[env.rank :: env.world_size] if not (out / f"{dataset.ids[i]}.png").exists()]
        loader = DataLoader(dataset, batch_size=1, sampler=todo, num_workers=params.train.num_workers)
        written = 0
        for sample, pred in predictions(params, model, layout, proto, loader, dev,
                                         f"export {params.name} [{protocol}] {split}", len(todo), env.is_main):
            classes = pred[0].to(torch.uint8).cpu().numpy()
            png = table[classes] if table is not None else classes
            target = out / f"{sample['id'][0]}.png"
            ok, encoded = cv2.imencode(".png", png)
            if not ok:
                raise OSError(f"{target}: OpenCV could not encode the prediction as PNG.")
            with atomic_path(target) as tmp:
                tmp.write_bytes(encoded.tobytes())
            written += 1
        log.info("exported %d predictions of %s [%s] to %s", written, params.name, protocol, out)
        return written
    finally:
        teardown(env)
