"""The embedded demo dataset: a deterministic generator of small scenes where context beyond one image helps.

Every image holds some of: a "person" (torso with a left and a right arm, told apart only by their side of
the torso — a left/right class pair that flipping swaps), squares, triangles, and disks of two classes,
``amber_disk`` and ``ochre_disk``, whose colours differ slightly but consistently across the dataset; a
per-image illumination gain and colour cast larger than that difference makes them ambiguous inside one image
— exactly what a dataset-level memory of class statistics can resolve. The output is a tar archive in a raw
"official" layout that :mod:`mcibi.data.prepare` converts like any real dataset's archive.
"""

from __future__ import annotations

import functools
import hashlib
import io
import tarfile
from pathlib import Path

import cv2
import numpy as np

from mcibi.data.specs import DEMO
from mcibi.files import atomic_path

SIZE = 128
DEMO_SEED = 0
CLASS = {name: i for i, name in enumerate(DEMO.classes)}
COLOURS = {  # RGB before per-image illumination
    "torso": (60, 90, 200),
    "arm": (205, 160, 125),
    "amber_disk": (232, 150, 40),
    "ochre_disk": (206, 134, 52),
    "square": (80, 175, 85),
    "triangle": (175, 70, 160),
}


def _colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    base = np.array(COLOURS[name], dtype=np.float64)
    return tuple(int(v) for v in np.clip(base + rng.normal(0, 3, 3), 0, 255))


def _person(rng, image, label) -> None:
    w, h = int(rng.integers(16, 26)), int(rng.integers(38, 58))
    x1, y1 = int(rng.integers(22, SIZE - 22 - w)), int(rng.integers(4, SIZE - 4 - h))
    arm_w, arm_len = int(rng.integers(7, 12)), int(rng.integers(22, 36))
    top = y1 + int(rng.integers(2, 8))
    skin = _colour(rng, "arm")
    cv2.rectangle(image, (x1 - arm_w, top), (x1 - 1, top + arm_len), skin, -1)
    cv2.rectangle(label, (x1 - arm_w, top), (x1 - 1, top + arm_len), CLASS["left_arm"], -1)
    cv2.rectangle(image, (x1 + w, top), (x1 + w + arm_w - 1, top + arm_len), skin, -1)
    cv2.rectangle(label, (x1 + w, top), (x1 + w + arm_w - 1, top + arm_len), CLASS["right_arm"], -1)
    cv2.rectangle(image, (x1, y1), (x1 + w - 1, y1 + h), _colour(rng, "torso"), -1)
    cv2.rectangle(label, (x1, y1), (x1 + w - 1, y1 + h), CLASS["torso"], -1)


def _disk(rng, image, label, name: str) -> None:
    r = int(rng.integers(7, 15))
    c = (int(rng.integers(r, SIZE - r)), int(rng.integers(r, SIZE - r)))
    cv2.circle(image, c, r, _colour(rng, name), -1)
    cv2.circle(label, c, r, CLASS[name], -1)


def _square(rng, image, label) -> None:
    s = int(rng.integers(12, 26))
    x, y = int(rng.integers(0, SIZE - s)), int(rng.integers(0, SIZE - s))
    cv2.rectangle(image, (x, y), (x + s, y + s), _colour(rng, "square"), -1)
    cv2.rectangle(label, (x, y), (x + s, y + s), CLASS["square"], -1)


def _triangle(rng, image, label) -> None:
    s = int(rng.integers(14, 28))
    x, y = int(rng.integers(0, SIZE - s)), int(rng.integers(0, SIZE - s))
    pts = np.array([[x, y + s], [x + s, y + s], [x + s // 2, y]], dtype=np.int32)
    cv2.fillPoly(image, [pts], _colour(rng, "triangle"))
    cv2.fillPoly(label, [pts], CLASS["triangle"])


def render_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its class-index label map."""
    base = rng.uniform(70, 130, 3)
    coarse = cv2.resize(rng.normal(0, 18, (8, 8, 3)), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    image = np.clip(base + coarse + rng.normal(0, 8, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    label = np.zeros((SIZE, SIZE), np.uint8)
    painters = []
    if rng.random() < 0.75:
        painters.append(_person)
    disk_names = ["amber_disk", "ochre_disk"]
    for _ in range(int(rng.integers(1, 4))):
        painters.append(functools.partial(_disk, name=disk_names[int(rng.integers(0, 2))]))
    painters += [_square] * int(rng.integers(0, 3)) + [_triangle] * int(rng.integers(0, 3))
    for j in rng.permutation(len(painters)):
        image = np.ascontiguousarray(image)
        painters[j](rng, image, label)
    gain = rng.uniform(0.8, 1.2) * rng.uniform(0.93, 1.07, 3)  # illumination + colour cast, larger than the
    shaded = image.astype(np.float64) * gain + rng.normal(0, 4, image.shape)  # amber/ochre difference
    return np.clip(shaded, 0, 255).astype(np.uint8), label


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def generate_archive(out_path: str | Path, seed: int = DEMO_SEED) -> Path:
    """Write ``demo.tar`` (raw layout: demo/images, demo/labels, demo/<split>.txt, demo/classes.txt) atomically.

    Deterministic: image i of split s comes from ``default_rng([seed, s, i])`` and tar headers are fixed.
    """
    out = Path(out_path)
    members: dict[str, bytes] = {"demo/classes.txt": ("\n".join(DEMO.classes) + "\n").encode()}
    for s, (split, count) in enumerate(DEMO.splits.items()):
        ids = [f"{split}_{i:04d}" for i in range(count)]
        for i, image_id in enumerate(ids):
            image, label = render_sample(np.random.default_rng([seed, s, i]))
            members[f"demo/images/{image_id}.png"] = _png(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            members[f"demo/labels/{image_id}.png"] = _png(label)
        members[f"demo/{split}.txt"] = ("\n".join(ids) + "\n").encode()
    with atomic_path(out) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            _add(tar, name, members[name])
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
