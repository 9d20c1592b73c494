"""From a dataset's verified archives to the prepared on-disk format (see :mod:`mcibi.data.specs`), and the
check of a prepared dataset.

:func:`prepare` checks the archives (never extracts one that fails), extracts them into a scratch folder beside
the output, lets the dataset's converter (:mod:`mcibi.data.converters`) say which image and which raw label
make each sample, converts every label to train ids in parallel, writes the split lists and the manifest, and
renames the result into place. :func:`verify_prepared` checks the result against the documented split sizes.
:func:`prepare_custom` does the same for a user's own folders (:mod:`mcibi.data.custom`).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from mcibi.data.archives import PreparedDataError, extract
from mcibi.data.converters import CONVERTERS
from mcibi.data.custom import CustomDatasetError, image_ext, load_description, scan, to_train_ids, validate
from mcibi.data.lookup import resolve
from mcibi.data.specs import IGNORE_INDEX, DatasetSpec
from mcibi.files import atomic_folder, write_json

log = logging.getLogger(__name__)
EXIF_ORIENTATION = 0x0112


def reencode(src: Path, target: Path) -> bool:
    """Write the image ``src`` in ``target``'s format (by its suffix) through OpenCV; False when ``src`` cannot be
    decoded or ``target`` written."""
    bgr = cv2.imread(str(src), cv2.IMREAD_COLOR)
    return bgr is not None and bool(cv2.imwrite(str(target), bgr))


def _write_sample(spec: DatasetSpec, out: Path, image_id: str, image: Path,
                  label_fn: Callable[[], np.ndarray | Path]) -> None:
    if not image.is_file():
        raise PreparedDataError(f"{image}: missing image for sample '{image_id}'.")
    label = label_fn()
    label_src = None
    if isinstance(label, Path):  # already an index PNG in the prepared encoding: moved as it is
        label_src, label = label, cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
        if label is None or label.ndim != 2 or label.dtype != np.uint8:
            raise PreparedDataError(f"{label_src}: not a single-channel 8-bit PNG.")
    with Image.open(image) as im:
        width, height = im.size
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    if (height, width) != label.shape:
        raise PreparedDataError(f"{image}: size {(height, width)} differs from its label's {label.shape}.")
    target = out / "images" / f"{image_id}{spec.image_ext}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if orientation != 1:
        # OpenCV would rotate/flip such an image on reading while its label keeps the stored pixel grid: write
        # the stored pixels again without the EXIF orientation (one re-encode, for these rare files only)
        log.warning("%s: EXIF orientation %s dropped so that the image stays aligned with its label", image,
                    orientation)
        with Image.open(image) as im:
            im.convert("RGB").save(target, format="PNG" if spec.image_ext == ".png" else "JPEG", quality=95)
    elif image.suffix.lower() == spec.image_ext:
        os.replace(image, target)  # the scratch copy is not needed any more: move, do not re-encode
    else:
        if not reencode(image, target):
            raise PreparedDataError(f"{image}: could not convert to {spec.image_ext}.")
    label_file = out / "labels" / f"{image_id}.png"
    label_file.parent.mkdir(parents=True, exist_ok=True)
    if label_src is not None:
        os.replace(label_src, label_file)
    elif not cv2.imwrite(str(label_file), label, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise PreparedDataError(f"{label_file}: could not write.")


def _check_archives(spec: DatasetSpec, archive_dir: Path, record: dict | None,
                    checksums: str | Path | None = None) -> dict:
    """The verification record of the archives: trusted if sizes match ``record``, else recomputed."""
    from mcibi.data.download import present_source, verify_archives

    if record is not None:
        source = next((s for s in spec.sources if s.name == record.get("source")), None)
        if source is not None and all(
            (archive_dir / a.name).is_file()
            and (archive_dir / a.name).stat().st_size == record["archives"].get(a.name, {}).get("size")
            for a in source.archives
        ):
            return record
        log.info("archive record does not match the files in %s; verifying again", archive_dir)
    present_source(spec, archive_dir)
    return verify_archives(spec, archive_dir, checksums)


def prepare(dataset: str | DatasetSpec, archive_dir: str | Path, out_dir: str | Path, *,
            archive_record: dict | None = None, workers: int | None = None,
            checksums: str | Path | None = None) -> Path:
    """Convert the archives into ``out_dir`` (built beside it, then renamed into place) with its manifest.

    The archives are checked first (``archive_record``, the output of ``verify_archives``, avoids hashing them
    twice when the files still have the recorded sizes; ``checksums`` is the first-seen sha256 record
    :func:`~mcibi.data.download.verify_archives` uses otherwise); one that fails is never extracted, and
    extraction checks every member again before it writes anything (:func:`~mcibi.data.archives.extract`).
    """
    spec = resolve(dataset)
    if spec.name not in CONVERTERS:
        raise PreparedDataError(f"no converter for dataset '{spec.name}' (supported: {sorted(CONVERTERS)}).")
    archives = Path(archive_dir)
    record = _check_archives(spec, archives, archive_record, checksums)
    out = Path(out_dir)
    start = time.perf_counter()
    with atomic_folder(out) as tmp:
        raw = tmp / "_raw"
        source = next(s for s in spec.sources if s.name == record["source"])
        for archive in source.archives:
            extract(archives / archive.name, raw)
        plan = CONVERTERS[spec.name](spec, raw)
        ids = sorted(plan.images)
        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            jobs = [pool.submit(_write_sample, spec, tmp, i, plan.images[i], plan.labels[i]) for i in ids]
            for job in tqdm(jobs, desc=f"prepare {spec.name}", unit="img", mininterval=2.0):
                job.result()
        shutil.rmtree(raw)
        (tmp / "splits").mkdir(exist_ok=True)
        for split, split_ids in plan.splits.items():
            missing = sorted(set(split_ids) - set(plan.images))
            if missing:
                raise PreparedDataError(f"split '{split}' lists '{missing[0]}' which has no image/label pair.")
            (tmp / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
        manifest = {
            "name": spec.name,
            "classes": list(spec.classes),
            "num_classes": spec.num_classes,
            "ignore_index": IGNORE_INDEX,
            "flip_pairs": [list(p) for p in spec.flip_pairs],
            "image_ext": spec.image_ext,
            "splits": {s: len(v) for s, v in plan.splits.items()},
        }
        if spec.name != "demo":
            manifest |= {"label_conversion": spec.label_conversion, "archives": record,
                         "unlabelled_splits": list(spec.unlabelled_splits)}
            if spec.count_unit == "video":
                manifest["videos"] = {s: len({i.split("/")[0] for i in v}) for s, v in plan.splits.items()}
        write_json(tmp / "manifest.json", manifest)
    seconds = time.perf_counter() - start
    log.info("prepared %s in %s: %d images in %.1f s (%.1f images/s)", spec.name, out, len(plan.images), seconds,
             len(plan.images) / max(seconds, 1e-9))
    return out


# ------------------------------------------------------------------------------------------------------- verify
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_AGAIN = "Prepare the dataset again (mcibi prepare, or snakemake -R prepare) from its verified archives."


def _split_ids(data_dir: Path, split: str) -> list[str]:
    return [line.strip() for line in (data_dir / "splits" / f"{split}.txt").read_text().splitlines() if line.strip()]


def _undecodable(file: Path, data: bytes) -> PreparedDataError:
    """Why OpenCV could not decode ``data``: not an image at all, or an image whose pixel data is cut short."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            header = f"{im.format} {im.size[0]}x{im.size[1]}"
            if data.startswith(PNG_SIGNATURE):
                why = ("truncated (the PNG ends before its IEND chunk)" if not data.endswith(b"IEND\xaeB`\x82")
                       else "corrupt (its header is readable, its pixel data cannot be decoded)")
            else:
                try:
                    im.load()
                    why = "corrupt (its header is readable, OpenCV cannot decode its pixel data)"
                except (OSError, ValueError, SyntaxError) as exc:
                    why = f"truncated or corrupt ({exc})"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return PreparedDataError(f"{file}: not an image ({len(data)} bytes starting {data[:8]!r}); it cannot be "
                                 f"decoded. {_AGAIN}")
    return PreparedDataError(f"{file}: {why}: a {header} image of {len(data)} bytes. {_AGAIN}")


def _decode(file: Path, flags: int, image: bool = False) -> tuple[np.ndarray, int]:
    """Decode a file completely with OpenCV's imread, exactly as the training loader reads it; with ``image`` also
    its EXIF orientation. A JPEG is decoded by PIL as well, which, unlike imread, fails on a truncated one (imread
    fills the missing rows with grey and only prints a warning); libpng already fails on a truncated PNG."""
    pixels = cv2.imread(str(file), flags)
    data = file.read_bytes()
    if pixels is None:
        raise _undecodable(file, data)
    png = data.startswith(PNG_SIGNATURE)
    if png and not (image and any(m in data for m in _PNG_EXIF_MARKERS)):
        return pixels, 1  # no chunk PIL could read an orientation from: skip its second full decode of the PNG
    try:
        with Image.open(io.BytesIO(data)) as im:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1) if image else 1
            if not png:
                im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))  # every scan, cheap IDCT
                im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PreparedDataError(f"{file}: truncated or corrupt ({exc}); OpenCV decodes it only partly (the rest "
                                f"grey). {_AGAIN}") from None
    return pixels, orientation


_PNG_EXIF_MARKERS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")  # where PIL finds a PNG's EXIF


def _verify_sample(spec: DatasetSpec, root: Path, image_id: str, list_file: Path) -> np.ndarray:
    """Decode one image/label pair completely, as the loader does; per-class pixel counts, or PreparedDataError
    naming the file and the reason (missing, not an image, truncated, label values, EXIF orientation, size)."""
    image_file = root / "images" / f"{image_id}{spec.image_ext}"
    label_file = root / "labels" / f"{image_id}.png"
    for f in (image_file, label_file):
        if not f.is_file():
            raise PreparedDataError(f"{f}: missing (listed in {list_file}).")
    label, _ = _decode(label_file, cv2.IMREAD_UNCHANGED)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise PreparedDataError(f"{label_file}: not a single-channel 8-bit PNG.")
    bad = (label >= spec.num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise PreparedDataError(
            f"{label_file}: label values {sorted(set(label[bad].tolist()))[:5]} outside [0, "
            f"{spec.num_classes}) and not {IGNORE_INDEX}."
        )
    image, orientation = _decode(image_file, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, image=True)
    if orientation != 1:
        raise PreparedDataError(f"{image_file}: EXIF orientation {orientation}: OpenCV would turn it against "
                                "its label; prepare again.")
    if image.shape[:2] != label.shape:
        raise PreparedDataError(f"{image_file}: size {image.shape[:2]} differs from its label's {label.shape} "
                                f"({label_file}). {_AGAIN}")
    values = np.where(label == IGNORE_INDEX, spec.num_classes, label)
    return np.bincount(values.ravel(), minlength=spec.num_classes + 1)


def verify_prepared(dataset: str | DatasetSpec, data_dir: str | Path, expected: dict[str, int] | None = None,
                    workers: int | None = None) -> dict:
    """Check counts per split, then decode every image and label completely, as training reads them: files exist
    and decode (a truncated file or a non-image is named as such), label values are in [0, K) or 255, no EXIF
    rotation, image and label sizes match.

    ``expected`` replaces the documented split sizes of the spec (miniature data in tests); ``workers`` threads
    decode in parallel (default min(8, CPUs)); the first bad file in list order is reported. Returns a summary
    (counts and per-class pixel frequencies per split) for the workflow's record.
    """
    spec = resolve(dataset)
    expected = spec.splits if expected is None else expected
    root = Path(data_dir)
    manifest_file = root / "manifest.json"
    if not manifest_file.is_file():
        raise PreparedDataError(f"{manifest_file}: missing. Run `mcibi prepare {spec.name}` first.")
    manifest = json.loads(manifest_file.read_text())
    if manifest["classes"] != list(spec.classes) or manifest["ignore_index"] != IGNORE_INDEX:
        raise PreparedDataError(f"{manifest_file}: classes or ignore index differ from the spec; prepare again.")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise PreparedDataError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process: truncated JPEGs would "
                                "pass the check. Unset it (it is off by default) and verify again.")
    summary: dict = {"dataset": spec.name, "splits": {}}
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for split, documented in expected.items():
            list_file = root / "splits" / f"{split}.txt"
            if not list_file.is_file():
                raise PreparedDataError(f"{list_file}: missing split list.")
            ids = _split_ids(root, split)
            count = len({i.split("/")[0] for i in ids}) if spec.count_unit == "video" else len(ids)
            if count != documented:
                unit = "videos" if spec.count_unit == "video" else "images"
                raise PreparedDataError(f"{list_file}: {count} {unit}, the dataset documents {documented}.")
            pixels = np.zeros(spec.num_classes + 1, np.int64)
            with tqdm(total=len(ids), desc=f"verify {spec.name}/{split}", mininterval=5.0) as bar:
                for start in range(0, len(ids), 64 * workers):  # bounded look-ahead; results in list order
                    chunk = ids[start:start + 64 * workers]
                    for counts in pool.map(functools.partial(_verify_sample, spec, root, list_file=list_file), chunk):
                        pixels += counts
                    bar.update(len(chunk))
            total = max(int(pixels.sum()), 1)
            summary["splits"][split] = {
                "images": len(ids),
                "class_pixel_share": {n: round(int(c) / total, 6) for n, c in zip(spec.classes, pixels, strict=False)},
                "ignored_pixel_share": round(int(pixels[-1]) / total, 6),
            }
            if spec.count_unit == "video":
                summary["splits"][split]["videos"] = count
    return summary


def prepare_custom(description: str | Path, out_dir: str | Path, show_progress: bool = True) -> Path:
    """Validate and convert a custom dataset (:mod:`mcibi.data.custom`) into the prepared format (built beside
    ``out_dir``, renamed into place): images copied (or converted to PNG), masks as uint8 class ids with 255 ignored,
    split lists, manifest."""
    desc = load_description(description)
    checked = validate(desc, show_progress)
    images, masks, splits = scan(desc)
    ext = image_ext(images)
    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        for image_id in tqdm(sorted(images), desc=f"prepare {desc.name}", unit="img", disable=not show_progress,
                             mininterval=2.0):
            target = tmp / "images" / f"{image_id}{ext}"
            target.parent.mkdir(parents=True, exist_ok=True)
            src = images[image_id]
            if src.suffix.lower() in ((".jpg", ".jpeg") if ext == ".jpg" else (".png",)):
                shutil.copyfile(src, target)
            else:
                if not reencode(src, target):
                    raise CustomDatasetError(f"{src}: could not convert to {ext}.")
            label_file = tmp / "labels" / f"{image_id}.png"
            label_file.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(label_file), to_train_ids(desc, masks[image_id])):
                raise CustomDatasetError(f"{label_file}: could not write.")
        (tmp / "splits").mkdir()
        for split, ids in splits.items():
            (tmp / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        write_json(tmp / "manifest.json", {
            "name": desc.name, "classes": list(desc.classes), "num_classes": len(desc.classes),
            "ignore_index": IGNORE_INDEX, "flip_pairs": [list(p) for p in desc.flip_pairs], "image_ext": ext,
            "splits": {s: len(v) for s, v in splits.items()}, "palette": [list(c) for c in desc.palette],
            "label_conversion": f"{desc.mask_format} masks", "median_size": list(checked["median_size"]),
            "description": desc.text})
    return out
