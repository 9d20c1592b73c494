"""Segment a user's own images, folders, globs or videos with a trained model (``mcibi predict``, ``Segmenter``).

A :class:`Segmenter` holds a checkpoint's model in eval mode and the facts a prediction needs (class names,
left/right flip pairs, palette); :meth:`Segmenter.predict` runs one of the params' evaluation protocols
(``ss`` by default) through :func:`mcibi.evaluation.protocol_scores`, exactly as ``mcibi evaluate`` scores
images: resized as the test pipeline says, predicted at the original size. :func:`predict_inputs` writes a
class-index PNG and a colour overlay with a legend per image (per frame for videos).
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from mcibi.spec.params import ExperimentParams, load_params

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg")
DATASET_INFO = "segmenter.json"  # what a Segmenter needs besides the checkpoint (classes, flip pairs, palette)


def dataset_info(name: str) -> dict[str, Any]:
    """Classes, flip pairs and palette of a dataset (a custom dataset's own palette when it defines one)."""
    from mcibi.data.lookup import get_spec
    from mcibi.data.palette import palette as default_palette

    spec = get_spec(name)
    palette = getattr(spec, "palette", None) or default_palette(spec.num_classes).tolist()
    return {"dataset": name, "classes": list(spec.classes), "flip_pairs": [list(p) for p in spec.flip_pairs],
            "palette": [list(map(int, c)) for c in palette]}


@dataclass
class Prediction:
    """A class map (H, W) at the image's size, and the class probabilities (K, H, W) when asked for."""

    classes: np.ndarray
    probabilities: np.ndarray | None = None


class Segmenter:
    """A trained model ready to segment RGB images under one of its params' evaluation protocols."""

    def __init__(self, model: torch.nn.Module, params: ExperimentParams, info: dict[str, Any], protocol: str = "ss",
                 device: torch.device | None = None, layout: Any = torch.contiguous_format) -> None:
        from mcibi.evaluation.protocols import protocol_params

        self.model, self.params, self.info = model, params, info
        self.protocol_name = protocol
        self.protocol = protocol_params(params, protocol)
        self.device = device or torch.device("cpu")
        self.layout = layout
        self.classes: list[str] = list(info["classes"])
        self.palette = np.asarray(info["palette"], dtype=np.uint8)
        perm = list(range(len(self.classes)))
        for a, b in info["flip_pairs"]:
            perm[a], perm[b] = b, a
        self.flip_permutation = perm

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, params: str | Path | ExperimentParams | None = None,
                        protocol: str = "ss", device: str | None = None,
                        info: dict[str, Any] | None = None) -> Segmenter:
        """Load ``checkpoint`` (a ``model.pt``); ``params`` defaults to the params stored in it (a given file must
        describe the same model), ``info`` (classes, flip pairs, palette) to the dataset's."""
        from mcibi.evaluation.protocols import load_model
        from mcibi.models.build import checkpoint_params
        from mcibi.models.checkpoint import load_checkpoint

        state = load_checkpoint(checkpoint)
        if params is None:
            params = checkpoint_params(state, checkpoint)
        elif not isinstance(params, ExperimentParams):
            params = load_params(params)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, layout = load_model(params, checkpoint, dev, state=state)
        return cls(model, params, info or dataset_info(params.data.name), protocol, dev, layout)

    @classmethod
    def from_run(cls, run: str | Path, protocol: str = "ss", device: str | None = None,
                 tracking_uri: str | None = None) -> Segmenter:
        """Load a run: its folder (``runs/<dataset>/<experiment>``, with ``model.pt``), an MLflow run id (its logged
        model), or an MLflow model URI (``models:/<name>/<version>``, ``runs:/<id>/model``)."""
        folder = Path(run)
        if folder.is_dir() and (folder / "model.pt").is_file():
            return cls.from_checkpoint(folder / "model.pt", protocol=protocol, device=device)
        if folder.is_dir() and (folder / "MLmodel").is_file():
            return cls.from_mlflow_model_dir(folder, protocol, device)
        from mcibi.tracking.runs import download_model

        return cls.from_mlflow_model_dir(download_model(str(run), tracking_uri), protocol, device)

    @classmethod
    def from_mlflow_model_dir(cls, model_dir: str | Path, protocol: str = "ss", device: str | None = None
                              ) -> Segmenter:
        """Load a local copy of a logged MLflow model (see :mod:`mcibi.evaluation.serving`)."""
        artifacts = Path(model_dir) / "artifacts"
        info = json.loads((artifacts / DATASET_INFO).read_text())
        return cls.from_checkpoint(artifacts / "model.pt", protocol=protocol, device=device, info=info)

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        from mcibi.data.transforms import test_image

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}.")
        return test_image(image, self.params.data, self.protocol.test_resize)

    def predict_batch(self, images: list[np.ndarray], probs: bool = False) -> list[Prediction]:
        """Predictions for RGB uint8 images of one size (H, W, 3), in one forward per protocol pass."""
        from mcibi.evaluation.protocols import protocol_scores

        if not images:
            return []
        size = images[0].shape[:2]
        if any(im.shape[:2] != size for im in images):
            raise ValueError("predict_batch needs images of one size; use predict() per image otherwise.")
        batch = torch.stack([self._tensor(im) for im in images]).to(self.device)
        batch = batch.contiguous(memory_format=self.layout)
        with torch.inference_mode():
            scores = protocol_scores(self.params, self.model, batch, self.protocol, self.flip_permutation, size)
            maps = scores.argmax(dim=1).to(torch.int32).cpu().numpy()
            if probs:
                p = scores if self.protocol.probs_before_resize else scores.softmax(dim=1)
                p = p.float().cpu().numpy()
        return [Prediction(maps[i], p[i] if probs else None) for i in range(len(images))]

    def predict(self, image: np.ndarray, probs: bool = False) -> np.ndarray | Prediction:
        """The class map (H, W) of one RGB uint8 image; with ``probs`` a :class:`Prediction` with probabilities."""
        out = self.predict_batch([image], probs=probs)[0]
        return out if probs else out.classes

    def overlay(self, image: np.ndarray, classes: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The image blended with the class colours, with a legend of the classes present on the right (RGB)."""
        blend = (1 - alpha) * image.astype(np.float32) + alpha * self.palette[classes].astype(np.float32)
        blend = blend.clip(0, 255).astype(np.uint8)
        present = [int(k) for k in np.unique(classes)]
        row = 18
        height = max(image.shape[0], row * len(present) + 8)
        width = 14 + 10 + max(len(self.classes[k]) for k in present) * 8 + 8
        legend = np.full((height, width, 3), 255, np.uint8)
        for i, k in enumerate(present):
            y = 4 + i * row
            cv2.rectangle(legend, (4, y), (16, y + 12), tuple(int(c) for c in self.palette[k]), thickness=-1)
            cv2.putText(legend, self.classes[k], (22, y + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                        cv2.LINE_AA)
        canvas = np.full((height, image.shape[1] + width, 3), 255, np.uint8)
        canvas[: image.shape[0], : image.shape[1]] = blend
        canvas[:, image.shape[1]:] = legend
        return canvas


# ------------------------------------------------------------------------------------------------- inputs
@dataclass
class Frame:
    """One image to segment: its RGB pixels (None when unreadable) and where its outputs go."""

    name: str  # output stem, relative to the output folder (``<video>/<frame>`` for videos)
    source: str
    image: np.ndarray | None
    error: str = ""


def expand_inputs(inputs: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Files from paths, folders (their images and videos, sorted) and globs; plus the inputs that match nothing."""
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        elif path.exists():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if found:
            files += found
        else:
            missing.append(item)
    return files, missing


def read_frames(files: list[Path]) -> Iterator[Frame]:
    """The RGB frames of every file: one per image, every frame of a video (OpenCV); unreadable ones flagged."""
    for file in files:
        if file.suffix.lower() in VIDEO_SUFFIXES:
            cap = cv2.VideoCapture(str(file))
            if not cap.isOpened():
                yield Frame(file.stem, str(file), None, "OpenCV cannot open this video")
                continue
            index = 0
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                yield Frame(f"{file.stem}/{index:06d}", f"{file}#{index}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                index += 1
            cap.release()
            if index == 0:
                yield Frame(file.stem, str(file), None, "no frame could be decoded")
        else:
            bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if bgr is None:
                yield Frame(file.stem, str(file), None, "not a readable image")
            else:
                yield Frame(file.stem, str(file), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _batches(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    """Consecutive readable frames of one size, at most ``size`` at a time; an unreadable frame alone."""
    batch: list[Frame] = []
    for frame in frames:
        if frame.image is None or (batch and frame.image.shape != batch[0].image.shape) or len(batch) == size:
            if batch:
                yield batch
            batch = []
        if frame.image is None:
            yield [frame]
        else:
            batch.append(frame)
    if batch:
        yield batch


def _write_png(path: Path, rgb_or_index: np.ndarray) -> None:
    from mcibi.files import atomic_path

    img = cv2.cvtColor(rgb_or_index, cv2.COLOR_RGB2BGR) if rgb_or_index.ndim == 3 else rgb_or_index
    ok, encoded = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the PNG.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


def predict_inputs(segmenter: Segmenter, inputs: Iterable[str], out_dir: str | Path, batch_size: int = 4,
                   overlays: bool = True, show_progress: bool = True) -> tuple[int, list[str]]:
    """Write ``<out>/<name>.png`` (class indices: uint8, or 16-bit above 256 classes) and ``<out>/<name>_overlay.png``
    per image or video frame. Unreadable inputs are reported and skipped; returns (written, errors)."""
    out = Path(out_dir)
    files, missing = expand_inputs(inputs)
    errors = [f"{item}: no such file, folder or matching glob" for item in missing]
    dtype = np.uint8 if len(segmenter.classes) <= 256 else np.uint16
    written = 0
    with tqdm(desc=f"predict [{segmenter.protocol_name}]", unit="img", disable=not show_progress) as bar:
        for batch in _batches(read_frames(files), batch_size):
            if batch[0].image is None:
                errors.append(f"{batch[0].source}: {batch[0].error}")
                log.error("%s: %s; skipped", batch[0].source, batch[0].error)
                continue
            for frame, pred in zip(batch, segmenter.predict_batch([f.image for f in batch]), strict=True):
                _write_png(out / f"{frame.name}.png", pred.classes.astype(dtype))
                if overlays:
                    _write_png(out / f"{frame.name}_overlay.png", segmenter.overlay(frame.image, pred.classes))
                written += 1
            bar.update(len(batch))
    (out / "classes.json").parent.mkdir(parents=True, exist_ok=True)
    from mcibi.files import write_json

    write_json(out / "classes.json", {"classes": segmenter.classes, "palette": segmenter.palette.tolist(),
                                      "protocol": segmenter.protocol_name})
    return written, errors
