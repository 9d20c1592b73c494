"""Segment a user's own images, folders, globs or videos with a trained model (``mcibi predict``, ``Segmenter``).

A :class:`Segmenter` holds a checkpoint's model in eval mode and the facts a prediction needs (class names,
left/right flip pairs, palette); :meth:`Segmenter.predict` runs one of the params' evaluation protocols
(``ss`` by default) through :func:`mcibi.evaluation.protocol_scores`, exactly as ``mcibi evaluate`` scores
images: resized as the test pipeline says, predicted at the original size. :func:`predict_inputs` writes a
class-index PNG and a colour overlay with a legend per image (per frame for videos).

Memory: the model runs at the protocol's scale whatever the image size, but the scores of every class at the
image's size (what ``mcibi evaluate`` argmaxes) grow with it: K x H x W floats, more with flips. Each image (or
batch) is planned against a memory budget (:attr:`Segmenter.max_memory_mb`, ``--max-memory-mb``; by default
half the memory available): when the full-size scores fit, the prediction is the evaluation's, unchanged;
otherwise the class map is computed in tiles (:func:`mcibi.evaluation.inference.predict_tta_classes`: the same
scores to float rounding, class indices stored as uint8/uint16); when not even the image, its class map and
overlay fit, the image is refused before it is decoded, naming the file, its size and the budget.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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
MIB = 1 << 20
MAX_WORK_BYTES = 512 * MIB  # most memory the tiles of a tiled prediction use at a time (larger ones are no faster)
MIN_TILE = 16  # the smallest tile side a tiled prediction accepts
OVERLAY_CHUNK_PIXELS = 1 << 18  # overlay blending works on this many pixels at a time (about 64 bytes each)
STREAMED_PNG_BYTES = 4 * MIB  # arrays larger than this are written with cv2.imwrite (no encoded copy in memory)
OPENCV_MAX_PIXELS = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))  # OpenCV decodes no larger image


class ImageTooLargeError(ValueError):
    """An image cannot be predicted within the memory budget; the message says its size, the need and the budget."""


def available_memory() -> int | None:
    """Bytes of memory available now: Linux's MemAvailable, capped by this process's cgroup limit when there is
    one; None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            avail = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return avail


def default_memory_budget_mb() -> int:
    """The default memory budget of a prediction: half the memory available now (4096 MiB when unknown)."""
    avail = available_memory()
    return max(avail // 2 // MIB, 1) if avail is not None else 4096


@dataclass(frozen=True)
class MemoryPlan:
    """How one batch of images of one size is predicted: whole (``tile`` None: the evaluation's path) or in tiles
    of ``tile`` = (h, w) output pixels; ``need``: the bytes estimated, ``parts``: what they are for."""

    tile: tuple[int, int] | None
    need: int
    parts: dict[str, int]


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
        self.max_memory_mb: int | None = None  # the memory budget; None: default_memory_budget_mb() when planning

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

    def predict_batch(self, images: list[np.ndarray], probs: bool = False,
                      tile: tuple[int, int] | None = None) -> list[Prediction]:
        """Predictions for RGB uint8 images of one size (H, W, 3), in one forward per protocol pass.

        Whole, as ``mcibi evaluate`` scores images, when the scores of every class at the images' size fit the
        memory budget (:meth:`memory_plan`); otherwise, or with ``tile`` = (h, w), the class maps are computed in
        tiles of that many output pixels (uint8/uint16 maps; equal to the whole path's up to float rounding, see
        :func:`mcibi.evaluation.inference.predict_tta_classes`). Probabilities are only computed whole.
        Raises :class:`ImageTooLargeError` when even the tiled path does not fit.
        """
        if not images:
            return []
        size = images[0].shape[:2]
        if any(im.shape[:2] != size for im in images):
            raise ValueError("predict_batch needs images of one size; use predict() per image otherwise.")
        if tile is not None:
            if probs:
                raise ValueError("probabilities are computed for whole images only (tile=None).")
            plan = MemoryPlan(tuple(tile), 0, {})
        else:
            plan = self.memory_plan(len(images), size, probs=probs)
        return self._predict(images, plan, probs)

    def _predict(self, images: list[np.ndarray], plan: MemoryPlan, probs: bool = False) -> list[Prediction]:
        from mcibi.evaluation.inference import predict_tta_classes
        from mcibi.evaluation.protocols import protocol_scores

        size = images[0].shape[:2]
        batch = torch.stack([self._tensor(im) for im in images]).to(self.device)
        batch = batch.contiguous(memory_format=self.layout)
        with torch.inference_mode():
            if plan.tile is not None:
                maps = predict_tta_classes(self.model, batch, size, plan.tile, num_classes=len(self.classes),
                                           **self._tta_arguments())
                return [Prediction(maps[i]) for i in range(len(images))]
            scores = protocol_scores(self.params, self.model, batch, self.protocol, self.flip_permutation, size)
            maps = scores.argmax(dim=1).to(torch.int32).cpu().numpy()
            if probs:
                p = scores if self.protocol.probs_before_resize else scores.softmax(dim=1)
                p = p.float().cpu().numpy()
        return [Prediction(maps[i], p[i] if probs else None) for i in range(len(images))]

    def _tta_arguments(self) -> dict[str, Any]:
        """The protocol as :func:`mcibi.evaluation.protocol_scores` passes it to inference (windows as (h, w))."""
        windows = self.protocol.windows_hw()
        crop, stride = windows if windows is not None else (None, None)
        return {"scales": self.protocol.scales, "flip": self.protocol.flip, "flip_permutation": self.flip_permutation,
                "mode": "whole" if windows is None else "slide", "crop": crop, "stride": stride,
                "probs_before_resize": self.protocol.probs_before_resize,
                "align_corners": self.params.model.align_corners, "max_batch": self.params.evaluate.window_batch}

    def memory_plan(self, n: int, size: tuple[int, int], probs: bool = False, outputs: bool = False,
                    overlays: bool = False, budget_mb: int | None = None) -> MemoryPlan:
        """Whole or tiled for ``n`` images of ``size`` = (H, W) within the memory budget (``budget_mb``, else
        :attr:`max_memory_mb`, else half the memory available); :class:`ImageTooLargeError` when neither fits.

        Counted: the scores at the model's scale (every pass, as the tiled path keeps them), then either the
        whole path's full-size scores (``(5 if flip else 3) x n x K x H x W`` floats at their peak, the argmax,
        the probabilities if asked for) or the class maps (1 or 2 bytes per pixel) plus the tiles' working set;
        with ``outputs`` also what :func:`predict_inputs` holds: the decoded images (3 bytes per pixel, and as
        much again while one is decoded), the class-index PNG's array and, with ``overlays``, one overlay image.
        The model's own forward pass, at the protocol's scale, is not counted: it does not grow with the image.
        """
        budget = (budget_mb if budget_mb is not None else self.max_memory_mb or default_memory_budget_mb()) * MIB
        h, w = size
        px, k, flips = h * w, len(self.classes), 2 if self.protocol.flip else 1
        index_bytes = 1 if k <= 256 else 2
        fixed: dict[str, int] = {}
        if outputs:
            fixed["decoded images"] = n * 3 * px
            fixed["decoding"] = 3 * px  # OpenCV's copy of the image being decoded
            fixed["class-index PNG"] = index_bytes * px
            if overlays:
                legend = 32 + 8 * max(len(c) for c in self.classes)
                fixed["overlay"] = 3 * max(h, 18 * k + 8) * (w + legend) + 64 * min(px, max(OVERLAY_CHUNK_PIXELS, w))
        passes = self._model_scale_sizes(size)
        fixed["scores at the model's scale"] = 2 * sum(4 * flips * n * k * a * b for a, b in passes)
        whole = dict(fixed) | {"scores at full size": (5 if flips == 2 else 3) * 4 * n * k * px,
                               "argmax": 12 * n * px}
        if probs:
            whole["probabilities"] = 2 * 4 * n * k * px
        whole_need = sum(whole.values())
        device_free = self._device_free()
        device_whole = whole["scores at full size"] + whole["argmax"] + whole.get("probabilities", 0)
        if whole_need <= budget and (device_free is None or device_whole <= device_free * 0.9):
            return MemoryPlan(None, whole_need, whole)
        tiled = dict(fixed) | {"class maps": n * index_bytes * px}
        tiled_need = sum(tiled.values())
        work = min(budget - tiled_need, MAX_WORK_BYTES)
        if device_free is not None:
            work = min(work, int(device_free * 0.5))
        tile = None if probs else self._tile(n, size, passes, work)
        if tile is None:
            need = whole_need if probs else tiled_need + self._tile_bytes(n, size, passes, (MIN_TILE, MIN_TILE))
            parts = ", ".join(f"{what}: {math.ceil(v / MIB)} MiB" for what, v in (whole if probs else tiled).items())
            raise ImageTooLargeError(
                f"{w}x{h} px image{'s' if n > 1 else ''}: predicting {'them' if n > 1 else 'it'} needs about "
                f"{math.ceil(need / MIB)} MiB ({parts}{', probabilities of every class at full size' if probs else ''})"
                ", more than the memory budget of "
                f"{budget // MIB} MiB. Raise the budget (--max-memory-mb, Segmenter.max_memory_mb) if the machine "
                f"has the memory{', leave out the overlays (--no-overlay)' if overlays else ''}, or cut the image "
                "into smaller ones.")
        tiled["tiles"] = self._tile_bytes(n, size, passes, tile)
        return MemoryPlan(tile, sum(tiled.values()), tiled)

    def _model_scale_sizes(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """(h, w) of each scale's input to the model (its scores are at most this large)."""
        from mcibi.data.transforms import rescale_size

        resize = self.protocol.test_resize or self.params.data.test_resize
        hs, ws = rescale_size(*size, resize.size, resize.keep_ratio)
        return [(max(int(hs * s), 1), max(int(ws * s), 1)) for s in self.protocol.scales]

    def _tile_bytes(self, n: int, size: tuple[int, int], passes: list[tuple[int, int]],
                    tile: tuple[int, int]) -> int:
        """Working memory of one output tile of ``predict_tta_classes``: the resize's gathers (source rows read by
        the tile x tile width, then the tile), the sums and the argmax."""
        (th, tw), k = tile, len(self.classes)
        flips = 2 if self.protocol.flip else 1
        hs = max(a for a, _ in passes)
        rows = min(hs, math.ceil(th * hs / size[0]) + 2)
        resize = 4 * k * flips * n * (3 * rows * tw + 2 * th * tw)
        combine = 4 * k * n * th * tw * 4 + 9 * n * th * tw
        return resize + combine

    def _tile(self, n: int, size: tuple[int, int], passes: list[tuple[int, int]],
              work: int) -> tuple[int, int] | None:
        """The largest tile (full-width rows, else square) whose working memory fits ``work`` bytes."""
        h, w = size

        def fits(t: tuple[int, int]) -> bool:
            return self._tile_bytes(n, size, passes, t) <= work

        if fits((1, w)):
            lo, hi = 1, h  # rows of full width
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits((mid, w)) else (lo, mid - 1)
            return lo, w
        side = MIN_TILE
        if not fits((side, side)):
            return None
        while side * 2 <= w and fits((side * 2, side * 2)):
            side *= 2
        return side, side

    def _device_free(self) -> int | None:
        """Free memory of the CUDA device the model runs on; None on other devices."""
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free)

    def predict(self, image: np.ndarray, probs: bool = False) -> np.ndarray | Prediction:
        """The class map (H, W) of one RGB uint8 image; with ``probs`` a :class:`Prediction` with probabilities."""
        out = self.predict_batch([image], probs=probs)[0]
        return out if probs else out.classes

    def overlay(self, image: np.ndarray, classes: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The image blended with the class colours, with a legend of the classes present on the right (RGB).
        Blended into the result a band of rows at a time, so that no float copy of the whole image is made."""
        h, w = classes.shape
        rows = max(1, OVERLAY_CHUNK_PIXELS // max(w, 1))
        seen = np.zeros(len(self.classes), bool)
        for y in range(0, h, rows):
            seen |= np.bincount(classes[y:y + rows].ravel(), minlength=len(self.classes)) > 0
        present = [int(k) for k in np.flatnonzero(seen)]
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
        for y in range(0, h, rows):
            band = classes[y:y + rows]
            mixed = (1 - alpha) * image[y:y + rows].astype(np.float32) + alpha * self.palette[band].astype(np.float32)
            canvas[y:y + rows, :w] = mixed.clip(0, 255).astype(np.uint8)
        canvas[:, image.shape[1]:] = legend
        return canvas


# ------------------------------------------------------------------------------------------------- inputs
@dataclass
class Frame:
    """One image to segment: its RGB pixels (None when unreadable, or not decoded yet) and where its outputs go.

    ``shape`` is the (H, W) the file's header announces before decoding (None: unknown); ``load`` decodes it.
    """

    name: str  # output stem, relative to the output folder (``<video>/<frame>`` for videos)
    source: str
    image: np.ndarray | None
    error: str = ""
    shape: tuple[int, int] | None = None
    video: str = ""  # the video file a frame comes from
    _decode: Callable[[], tuple[np.ndarray | None, str]] | None = field(default=None, repr=False)

    def load(self) -> Frame:
        """Decode the pixels if that has not happened yet (an unreadable file sets ``error``)."""
        if self._decode is not None:
            self.image, error = self._decode()
            self.error = self.error or error
            self._decode = None
        return self


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


def _header(file: str | Path) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(H, W) as coded in an image file's header and (H, W) as OpenCV will decode it (EXIF rotation applied),
    read without decoding the pixels; None when the header cannot be read."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read: no decompression bomb to guard against
    try:
        with Image.open(file) as im:
            w, h = im.size
            # the EXIF block read with the header (JPEG, WebP; a PNG's when it precedes the pixels): Image.getexif()
            # would decode a whole PNG to look for one after them
            raw = im.info.get("exif")
            exif = Image.Exif()
            if raw:
                exif.load(raw)
            elif im.format == "TIFF":
                exif = im.getexif()
            transposed = exif.get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - any header PIL cannot parse: OpenCV may still decode the file
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return (h, w), ((w, h) if transposed else (h, w))


def image_size(file: str | Path) -> tuple[int, int] | None:
    """(H, W) of an image file as OpenCV will decode it (EXIF rotation applied), read from its header without
    decoding the pixels; None when the header cannot be read."""
    header = _header(file)
    return header[1] if header else None


def _decode_image(file: Path, coded: tuple[int, int] | None) -> tuple[np.ndarray | None, str]:
    """RGB pixels of an image file, or None and why (``coded``: the (H, W) its header announced). OpenCV holds
    the pixels twice while decoding (its own buffer, then the array it returns): the memory plan counts it.
    Its ``imread(file, dst)`` form would not, but returns ``dst`` even when the file fails to decode."""
    bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
    if bgr is None:
        if coded is None:
            return None, "not a readable image"
        h, w = coded
        beyond = (f"; it is beyond OpenCV's limit of {OPENCV_MAX_PIXELS} pixels (raise it with the environment "
                  "variable OPENCV_IO_MAX_IMAGE_PIXELS)" if h * w > OPENCV_MAX_PIXELS else "")
        return None, (f"not a readable image: its header says {w}x{h} px but OpenCV cannot decode the pixels "
                      f"(a truncated or damaged file{beyond})")
    return _swap_red_blue(bgr), ""


def _swap_red_blue(image: np.ndarray) -> np.ndarray:
    """BGR <-> RGB in place, a band of rows at a time (``cv2.cvtColor(dst=src)`` copies the whole source first)."""
    rows = max(1, OVERLAY_CHUNK_PIXELS // max(image.shape[1], 1))
    for y in range(0, image.shape[0], rows):
        band = image[y:y + rows]
        cv2.cvtColor(band, cv2.COLOR_BGR2RGB, dst=band)
    return image


def read_frames(files: list[Path], lazy: bool = False) -> Iterator[Frame]:
    """The RGB frames of every file: one per image, every frame of a video (OpenCV); unreadable ones flagged.

    With ``lazy`` the pixels are decoded by :meth:`Frame.load` (images: their header's size is known before; a
    video's frames must be loaded in order, before the next one is requested).
    """
    for file in files:
        if file.suffix.lower() in VIDEO_SUFFIXES:
            cap = cv2.VideoCapture(str(file))
            if not cap.isOpened():
                yield Frame(file.stem, str(file), None, "OpenCV cannot open this video")
                continue
            announced = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
            index = 0
            while cap.grab():
                def decode(cap=cap) -> tuple[np.ndarray | None, str]:
                    ok, bgr = cap.retrieve()
                    if not ok:
                        return None, "this frame could not be decoded"
                    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr), ""

                frame = Frame(f"{file.stem}/{index:06d}", f"{file}#{index}", None,
                              shape=announced if min(announced) > 0 else None, video=str(file), _decode=decode)
                yield frame if lazy else frame.load()
                index += 1
            cap.release()
            if index == 0:
                yield Frame(file.stem, str(file), None, "no frame could be decoded")
        else:
            header = _header(file)
            coded, shape = header if header else (None, None)
            frame = Frame(file.stem, str(file), None, shape=shape,
                          _decode=lambda file=file, coded=coded: _decode_image(file, coded))
            yield frame if lazy else frame.load()


def _batches(frames: Iterable[Frame], size: int,
             admit: Callable[[int, tuple[int, int]], MemoryPlan] | None = None
             ) -> Iterator[tuple[list[Frame], MemoryPlan | None]]:
    """Consecutive readable frames of one size, at most ``size`` at a time, with their plan; an unreadable or
    refused frame alone (plan None).

    With ``admit`` (n, (H, W)) -> plan, raising :class:`ImageTooLargeError`, a frame joins a batch only if the
    batch with it fits, and is decoded only once admitted: a pending batch goes first, so no two batches'
    pixels are held at once, and an image too large is refused from its header's size before decoding.
    """
    batch: list[Frame] = []
    refused_video = ""

    def plan_of(n: int, shape: tuple[int, int]) -> MemoryPlan | None:
        return admit(n, shape) if admit is not None else None

    def fits(n: int, shape: tuple[int, int]) -> bool:
        try:
            plan_of(n, shape)
        except ImageTooLargeError:
            return False
        return True

    def flush() -> Iterator[tuple[list[Frame], MemoryPlan | None]]:
        nonlocal batch
        if batch:
            done, batch = batch, []
            yield done, plan_of(len(done), done[0].image.shape[:2])

    for frame in frames:
        if frame.video and frame.video == refused_video:
            continue  # the video's first frame was refused: so is every other (one size)
        if frame.image is None and frame._decode is None:  # unreadable before any decoding
            yield from flush()
            yield [frame], None
            continue
        shape = frame.image.shape[:2] if frame.image is not None else frame.shape
        if batch and (shape is None or shape != batch[0].image.shape[:2] or len(batch) == size
                      or not fits(len(batch) + 1, shape)):
            yield from flush()
        if shape is not None and admit is not None:
            try:
                admit(1, shape)
            except ImageTooLargeError as exc:
                frame.error = str(exc) + (" All frames of this video are skipped." if frame.video else "")
                frame._decode, frame.image = None, None
                refused_video = frame.video
                yield [frame], None
                continue
        frame.load()
        if frame.image is None:
            yield from flush()
            yield [frame], None
            continue
        real = frame.image.shape[:2]
        if batch and real != batch[0].image.shape[:2]:  # the header announced another size
            yield from flush()
        if shape is None and admit is not None:  # no header to tell: checked once decoded
            try:
                admit(1, real)
            except ImageTooLargeError as exc:
                frame.error, frame.image = str(exc), None
                yield [frame], None
                continue
        batch.append(frame)
    yield from flush()


def _write_png(path: Path, rgb_or_index: np.ndarray, scratch: bool = False) -> None:
    """Write an RGB or class-index array as a PNG, atomically. ``scratch``: the array may be modified (an RGB one
    is turned to BGR in place instead of copied). Arrays above :data:`STREAMED_PNG_BYTES` are streamed to the
    file by ``cv2.imwrite`` rather than encoded in memory."""
    from mcibi.files import atomic_path

    img = rgb_or_index
    if img.ndim == 3:
        img = _swap_red_blue(img) if scratch else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.nbytes <= STREAMED_PNG_BYTES:
        ok, encoded = cv2.imencode(".png", img)
        if not ok:
            raise OSError(f"{path}: OpenCV could not encode the PNG.")
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(encoded.data)
        return
    with atomic_path(path) as tmp:
        png = tmp.with_name(tmp.name + ".png")  # cv2.imwrite picks the format from the suffix
        try:
            if not cv2.imwrite(str(png), img):
                full = shutil.disk_usage(path.parent).free < img.nbytes
                raise OSError(errno.ENOSPC if full else errno.EIO,
                              "no space left on the device" if full else "OpenCV could not write the PNG", str(path))
            os.replace(png, tmp)
        finally:
            png.unlink(missing_ok=True)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)))


def predict_inputs(segmenter: Segmenter, inputs: Iterable[str], out_dir: str | Path, batch_size: int = 4,
                   overlays: bool = True, show_progress: bool = True,
                   max_memory_mb: int | None = None) -> tuple[int, list[str]]:
    """Write ``<out>/<name>.png`` (class indices: uint8, or 16-bit above 256 classes) and ``<out>/<name>_overlay.png``
    per image or video frame. Unreadable inputs, and images that do not fit the memory budget (``max_memory_mb``,
    else the segmenter's, else half the memory available now; see :meth:`Segmenter.memory_plan`), are reported
    by name and skipped; returns (written, errors)."""
    out = Path(out_dir)
    files, missing = expand_inputs(inputs)
    errors = [f"{item}: no such file, folder or matching glob" for item in missing]
    dtype = np.uint8 if len(segmenter.classes) <= 256 else np.uint16
    budget = max_memory_mb or segmenter.max_memory_mb or default_memory_budget_mb()
    log.info("memory budget %d MiB (--max-memory-mb): larger images are predicted in tiles or refused", budget)

    def admit(n: int, shape: tuple[int, int]) -> MemoryPlan:
        return segmenter.memory_plan(n, shape, outputs=True, overlays=overlays, budget_mb=budget)

    written = 0
    with tqdm(desc=f"predict [{segmenter.protocol_name}]", unit="img", disable=not show_progress) as bar:
        for batch, plan in _batches(read_frames(files, lazy=True), batch_size, admit):
            if batch[0].image is None:
                errors.append(f"{batch[0].source}: {batch[0].error}")
                log.error("%s: %s; skipped", batch[0].source, batch[0].error)
                continue
            if plan.tile is not None:
                log.info("%s: %dx%d px, predicted in tiles of %dx%d output pixels (%d MiB)", batch[0].source,
                         batch[0].image.shape[1], batch[0].image.shape[0], plan.tile[1], plan.tile[0],
                         math.ceil(plan.need / MIB))
            try:
                predictions = segmenter._predict([f.image for f in batch], plan)
            except Exception as exc:
                names = ", ".join(f.source for f in batch)
                if not _out_of_memory(exc):
                    raise type(exc)(f"{names}: {exc}") from exc
                size = "x".join(map(str, batch[0].image.shape[1::-1]))
                errors.append(f"{names}: out of memory predicting {size} px ({exc}); lower --max-memory-mb so that "
                              "it is predicted in smaller tiles, or free memory")
                log.error("%s", errors[-1])
                continue
            for frame, pred in zip(batch, predictions, strict=True):
                _write_png(out / f"{frame.name}.png", pred.classes.astype(dtype, copy=False))
                if overlays:
                    _write_png(out / f"{frame.name}_overlay.png", segmenter.overlay(frame.image, pred.classes),
                               scratch=True)
                frame.image = None  # its memory goes back before the next frame is written
                written += 1
            bar.update(len(batch))
    (out / "classes.json").parent.mkdir(parents=True, exist_ok=True)
    from mcibi.files import write_json

    write_json(out / "classes.json", {"classes": segmenter.classes, "palette": segmenter.palette.tolist(),
                                      "protocol": segmenter.protocol_name})
    return written, errors
