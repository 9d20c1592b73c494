"""One Dataset class over the prepared on-disk format of every dataset."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import Dataset

from mcibi.data.transforms import Transform


class SegmentationDataset(Dataset):
    """Images and label maps of one split; sample i in epoch e is augmented with ``default_rng([seed, e, i])``.

    With ``frame_per_video`` (ids ``<video>/<frame>``) sample i is one frame of video i, drawn anew every epoch
    from ``default_rng([seed, e, i, 1])``: the official VSPW training loader, whose epoch is one pass over videos.
    """

    def __init__(self, root: str | Path, split: str, transform: Transform, seed: int = 0,
                 frame_per_video: bool = False) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: missing. Prepare the dataset first (snakemake or mcibi prepare).")
        self.manifest = json.loads(manifest.read_text())
        list_file = self.root / "splits" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file}: no such split (have {sorted(self.manifest['splits'])}).")
        self.ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        self.videos: list[list[str]] | None = None
        if frame_per_video:
            if any("/" not in i for i in self.ids):
                raise ValueError(f"{list_file}: frame_per_video sampling needs '<video>/<frame>' ids.")
            by_video: dict[str, list[str]] = {}
            for image_id in self.ids:
                by_video.setdefault(image_id.split("/", 1)[0], []).append(image_id)
            self.videos = list(by_video.values())
        self.split = split
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws are used (reproducible, worker-independent)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids) if self.videos is None else len(self.videos)

    def sample_id(self, index: int) -> str:
        """The image id of sample ``index`` in the current epoch."""
        if self.videos is None:
            return self.ids[index]
        frames = self.videos[index]
        return frames[int(np.random.default_rng([self.seed, self.epoch, index, 1]).integers(len(frames)))]

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw RGB image and label map of one sample."""
        image_id = self.sample_id(index)
        image_file = self.root / "images" / f"{image_id}{self.manifest['image_ext']}"
        label_file = self.root / "labels" / f"{image_id}.png"
        image = cv2.imread(str(image_file), cv2.IMREAD_COLOR)
        label = cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED)
        if image is None or label is None:
            raise FileNotFoundError(f"{image_file if image is None else label_file}: unreadable or missing.")
        if label.ndim != 2:
            raise ValueError(f"{label_file}: labels must be single-channel class-index PNGs.")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), label

    def __getitem__(self, index: int) -> dict:
        image, label = self.read(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        tensor, target = self.transform(image, label, rng)
        return {"image": tensor, "label": target, "id": self.sample_id(index), "size": label.shape}
