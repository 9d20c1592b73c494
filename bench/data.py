"""Training data pipeline throughput per worker, ours against the official (sssegmentation 1.7.0), on the same
image files; prints one JSON object.

Each setting writes ``--images`` synthetic images (JPEG, the dataset's typical raw size) with label maps (PNG,
piecewise-constant regions of several classes, so that the crop's cat-max-ratio retries happen as on real
data), then times one pass of a ``DataLoader`` (batch ``--batch``, ``num_workers=0``: the work one worker does)
per side, interleaved, ``--repeats`` rounds, medians. Both sides decode the files, resize by a random ratio, crop
with cat_max_ratio 0.75, flip (with the left/right pairs for LIP), rotate (LIP), distort photometrically,
normalise, pad and collate; each side runs its own pipeline of the setting's model-zoo row (the official
config's ``data_pipelines``; ours from the params file). OpenCV and torch run single-threaded, as in a loader worker.

Workers per GPU = ceil(assumed GPU images/s at that crop / our images per CPU second of one worker (a worker
with a core of its own; on a shared machine the wall-clock rate is lower)), with the GPU rate the
README's budgets assume (``mcibi.catalogue.ASSUMED_IMAGES_PER_GPU_S``, R-50-D8 at 512x512 scaled by pixels).

    python bench/data.py --images 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from benchlib import ROOT, interleaved, machine, official_available, official_config
from torch.utils.data import DataLoader

from mcibi.catalogue.budget import ASSUMED_IMAGES_PER_GPU_S
from mcibi.data.dataset import SegmentationDataset
from mcibi.data.lookup import get_spec
from mcibi.data.transforms import build_train_transform
from mcibi.spec.params import load_params

# setting -> (our params file, official config, raw image (h, w)); the labels use the dataset's classes
SETTINGS = {
    "lip_473": ("params/lip/upernet_r50_mcibipp.yaml", "mcibiplusplus_upernet_resnet50os8_lip", (320, 240)),
    "ade20k_512": ("params/ade20k/upernet_r50_mcibipp.yaml", "mcibiplusplus_upernet_resnet50os8_ade20k",
                   (512, 683)),
    "cityscapes_512x1024": ("params/cityscapes/upernet_r50_mcibipp.yaml",
                            "mcibiplusplus_upernet_resnet50os8_cityscapes", (1024, 2048)),
    "ade20k_640": ("params/ade20k/upernet_swinl_mcibipp.yaml", "mcibiplusplus_upernet_swinlarge_ade20k",
                   (512, 683)),
}


def write_images(folder: Path, count: int, size: tuple[int, int], class_names: list[str], seed: int = 0) -> list[str]:
    """``count`` JPEG images and PNG label maps in our prepared layout (images/, labels/, splits/, manifest)."""
    classes = len(class_names)
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    (folder / "splits").mkdir()
    ids = []
    h, w = size
    for i in range(count):
        smooth = cv2.resize(rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8), (w, h))
        noise = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
        image = cv2.add(smooth, noise)
        grid = rng.integers(0, classes, (6, 8), dtype=np.uint8)
        label = cv2.resize(grid, (w, h), interpolation=cv2.INTER_NEAREST)
        ids.append(f"img{i:04d}")
        cv2.imwrite(str(folder / "images" / f"{ids[-1]}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(folder / "labels" / f"{ids[-1]}.png"), label)
    (folder / "splits" / "train.txt").write_text("\n".join(ids) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"image_ext": ".jpg", "splits": {"train": count},
                                                              "classes": list(class_names)}))
    return ids


def official_dataset(folder: Path, ids: list[str], pipelines: list):
    """The official BaseDataset (its file reading, transforms and sample dict) over the same files."""
    from ssseg.modules.datasets.base import BaseDataset

    class Files(BaseDataset):
        def __init__(self) -> None:
            super().__init__(mode="TRAIN", logger_handle=None,
                             dataset_cfg={"type": "Files", "data_pipelines": pipelines, "ignore_index": 255})
            self.image_dir, self.ann_dir, self.imageids = str(folder / "images"), str(folder / "labels"), ids

    return Files()


def bench_setting(name: str, args, work: Path) -> dict:
    params_file, config, raw = SETTINGS[name]
    params = load_params(ROOT / params_file)
    folder = work / name
    spec = get_spec(params.data.name)
    ids = write_images(folder, args.images, raw, spec.classes)
    ours = SegmentationDataset(folder, "train", build_train_transform(params.data, spec.flip_pairs), seed=0)
    loaders = {"ours": DataLoader(ours, batch_size=args.batch, num_workers=0)}
    if args.official:
        cfg = official_config(config)
        loaders["official"] = DataLoader(official_dataset(folder, ids, cfg["dataset"]["train"]["data_pipelines"]),
                                         batch_size=args.batch, num_workers=0)
    epoch = {"n": 0}

    def one_pass(loader) -> None:
        epoch["n"] += 1
        ours.set_epoch(epoch["n"])  # fresh draws every pass (the official draws from numpy's global RNG)
        for batch in loader:
            assert batch["image"].shape[0] > 0

    timers = {side: (lambda loader=loader: one_pass(loader)) for side, loader in loaders.items()}
    times = interleaved(timers, args.repeats, args.warmup)
    crop = tuple(params.data.crop_size)
    out = {"crop": list(crop), "raw_image": list(raw), "images": args.images, "batch": args.batch,
           "ours_pipeline": params_file, "official_pipeline": config}
    for side, t in times.items():  # wall clock, and per CPU second (what one worker with its own core gives)
        out[f"{side}_images_per_s"] = round(args.images / t["median"], 2)
        out[f"{side}_images_per_cpu_s"] = round(args.images / t["cpu_median"], 2)
    if "official" in times:
        out["speedup"] = round(times["official"]["median"] / times["ours"]["median"], 3)
        out["speedup_cpu_time"] = round(times["official"]["cpu_median"] / times["ours"]["cpu_median"], 3)
    gpu_rate = ASSUMED_IMAGES_PER_GPU_S["swinl" if "swin" in params_file else "r50"] * 512 * 512 / (crop[0] * crop[1])
    out["assumed_gpu_images_per_s"] = round(gpu_rate, 2)
    out["workers_per_gpu"] = math.ceil(gpu_rate / out["ours_images_per_cpu_s"])
    out["seconds"] = times
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-official", dest="official", action="store_false")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)  # one loader worker's resources
    torch.set_num_threads(1)
    why = official_available() if args.official else "--no-official"
    args.official = why is None
    report = {"bench": "data", "machine": machine(1),
              "official": "sssegmentation 1.7.0" if why is None else f"not timed: {why}", "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            report["settings"][name] = bench_setting(name, args, Path(tmp))
            print(f"{name}: {report['settings'][name].get('speedup')}", file=sys.stderr)
    report["machine"]["load_average_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
