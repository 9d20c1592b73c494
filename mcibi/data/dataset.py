"""One Dataset class over the prepared on-disk format of every dataset."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mcibi.data.specs import IGNORE_INDEX as IGNORE
from mcibi.data.transforms import Transform

_EXIF_ORIENTATION = 0x0112


class BadSampleError(ValueError):
    """An image/label pair that cannot be trained or scored as it is; the message names the file."""


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
        self.num_classes = len(self.manifest["classes"])
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
        """The raw RGB image and label map of one sample, checked cheaply: both readable, the same size, no EXIF
        rotation (the pixels as stored are what the label annotates) and label values in [0, K) or 255."""
        image_id = self.sample_id(index)
        image_file = self.root / "images" / f"{image_id}{self.manifest['image_ext']}"
        label_file = self.root / "labels" / f"{image_id}.png"
        image = cv2.imread(str(image_file), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        label = cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED)
        if image is None or label is None:
            raise FileNotFoundError(f"{image_file if image is None else label_file}: unreadable or missing.")
        if label.ndim != 2:
            raise BadSampleError(f"{label_file}: labels must be single-channel class-index PNGs.")
        if image.shape[:2] != label.shape:
            raise BadSampleError(f"{image_file}: size {image.shape[:2]} differs from its label's {label.shape} "
                                 f"({label_file}); the pair is misaligned. Prepare the dataset again or fix the pair.")
        if int(label.max()) >= self.num_classes:
            values = np.unique(label)
            bad = values[(values >= self.num_classes) & (values != IGNORE)]
            if bad.size:
                raise BadSampleError(f"{label_file}: label values {bad[:8].tolist()} outside [0, {self.num_classes}) "
                                     f"and not {IGNORE}. Prepare the dataset again (mcibi prepare, verify-data).")
        with Image.open(image_file) as im:  # reads the header only
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation != 1:
            raise BadSampleError(f"{image_file}: EXIF orientation {orientation}: viewers and other loaders turn it "
                                 "against its label. Prepare the dataset again (it drops the tag).")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), label

    def __getitem__(self, index: int) -> dict:
        image, label = self.read(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        tensor, target = self.transform(image, label, rng)
        return {"image": tensor, "label": target, "id": self.sample_id(index), "size": label.shape}
