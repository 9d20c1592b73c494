"""Per-dataset converters: from the extracted archives (official layout, or the sssegmentation mirror's) to a
:class:`~mcibi.data.archives.Plan` of samples whose labels are read as train ids.

Every converter finds its folders by their real names wherever they sit in the extracted tree, so the official
archives and the mirror's repackaging (which keeps the official folder names) go through the same code. Label
handling follows the model zoo's configs (sssegmentation) exactly; the tables live in :mod:`mcibi.data.labelsets`
and each conversion is summarised in the dataset's spec (``label_conversion``).
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mcibi.data import labelsets as L
from mcibi.data.archives import (
    Plan,
    PreparedDataError,
    apply_table,
    extract,
    label_table,
    locate,
    read_ids,
    read_index_png,
    read_mat,
)
from mcibi.data.specs import IGNORE_INDEX, DatasetSpec

IGNORE = IGNORE_INDEX


def _png(path: Path, table: np.ndarray) -> np.ndarray:
    if not path.is_file():
        raise PreparedDataError(f"{path}: missing label.")
    return apply_table(read_index_png(path), table, path)


def _mat(path: Path, table: np.ndarray, *keys: str | int) -> np.ndarray:
    if not path.is_file():
        raise PreparedDataError(f"{path}: missing label.")
    return apply_table(read_mat(path, *keys), table, path)


def _png_label(path: Path, table: np.ndarray) -> Callable[[], np.ndarray]:
    return functools.partial(_png, path, table)


# ---------------------------------------------------------------------------------------------------------- demo
def convert_demo(spec: DatasetSpec, raw: Path) -> Plan:
    """The demo archive already holds index PNGs in the prepared encoding: they are moved as they are."""
    root = raw / "demo"
    names = tuple((root / "classes.txt").read_text().split())
    if names != spec.classes:
        raise PreparedDataError(f"{root / 'classes.txt'}: classes {names} differ from the spec {spec.classes}")
    plan = Plan()
    for split in spec.splits:
        plan.splits[split] = read_ids(root / f"{split}.txt")
        for i in plan.splits[split]:
            plan.add(i, root / "images" / f"{i}.png", functools.partial(lambda p: p, root / "labels" / f"{i}.png"))
    return plan


# ----------------------------------------------------------------------------------------------------------- LIP
def _extract_nested(raw: Path) -> None:
    """Extract zips found inside the extracted tree (LIP's annotation zip holds a zip of the same name)."""
    for inner in sorted(raw.rglob("*.zip")):
        if zipfile.is_zipfile(inner):
            extract(inner, inner.parent)
            inner.unlink()


def convert_lip(spec: DatasetSpec, raw: Path) -> Plan:
    """LIP: ``{train,val}_images/<id>.jpg``, ``{train,val}_segmentations/<id>.png`` (values 0..19, no remap)."""
    table = label_table({i: i for i in range(20)} | {255: IGNORE})
    try:
        images, segs = locate(raw, "train_images"), locate(raw, "train_segmentations")
    except PreparedDataError:
        _extract_nested(raw)
        images, segs = locate(raw, "train_images"), locate(raw, "train_segmentations")
    plan = Plan()
    for split in ("train", "val"):
        lists = [d / f"{split}_id.txt" for d in (images, segs, images.parent) if (d / f"{split}_id.txt").is_file()]
        if lists:
            ids = read_ids(lists[0])
        else:  # the id lists are optional: the folder listing is the split
            ids = sorted(p.stem for p in (images / f"{split}_images").glob("*.jpg"))
        plan.splits[split] = ids
        for i in ids:
            if i in plan.images:
                raise PreparedDataError(f"LIP id '{i}' appears in more than one split.")
            plan.add(i, images / f"{split}_images" / f"{i}.jpg",
                     _png_label(segs / f"{split}_segmentations" / f"{i}.png", table))
    return plan


# -------------------------------------------------------------------------------------------------------- ADE20k
def convert_ade20k(spec: DatasetSpec, raw: Path) -> Plan:
    """ADEChallengeData2016: reduce zero label (0 -> ignore, 1..150 -> 0..149)."""
    table = label_table({0: IGNORE} | {i: i - 1 for i in range(1, 151)})
    root = locate(raw, "images/training")
    plan = Plan()
    for split, folder in (("train", "training"), ("val", "validation")):
        ids = sorted(p.stem for p in (root / "images" / folder).glob("*.jpg"))
        plan.splits[split] = ids
        for i in ids:
            plan.add(i, root / "images" / folder / f"{i}.jpg", _png_label(root / "annotations" / folder / f"{i}.png",
                                                                         table))
    return plan


# ---------------------------------------------------------------------------------------------------- CityScapes
def cityscapes_table() -> np.ndarray:
    """labelId -> trainId from cityscapesScripts' table (trainId 255 and -1 -> ignore)."""
    mapping = {label_id: IGNORE if train_id is None else train_id
               for label_id, train_id in L.cityscapes_train_ids().items()}
    return label_table(mapping | {255: IGNORE})


def convert_cityscapes(spec: DatasetSpec, raw: Path) -> Plan:
    """``leftImg8bit/<set>/<city>/<x>_leftImg8bit.png`` + ``gtFine/<set>/<city>/<x>_gtFine_labelIds.png``."""
    table = cityscapes_table()
    images, labels = locate(raw, "leftImg8bit/train"), locate(raw, "gtFine/train")
    plan = Plan()
    for split in ("train", "val", "test"):
        ids = []
        for image in sorted((images / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            base = image.name[: -len("_leftImg8bit.png")]
            image_id = f"{image.parent.name}/{base}"
            ids.append(image_id)
            label = labels / "gtFine" / split / image.parent.name / f"{base}_gtFine_labelIds.png"
            plan.add(image_id, image, _png_label(label, table))
        plan.splits[split] = ids
    plan.splits["trainval"] = plan.splits["train"] + plan.splits["val"]
    return plan


# ------------------------------------------------------------------------------------------------ COCO-Stuff-10k
def convert_cocostuff10k(spec: DatasetSpec, raw: Path) -> Plan:
    """COCO-Stuff-10k v1.1: ``annotations/<id>.mat`` field ``S`` (0 unlabeled, 1..182) -> 182-way train ids.

    The model zoo's configs (sssegmentation, MCIBI++ with num_classes 182) and the official DeepLab conversion both
    use ``S - 1`` with 0 ignored; the 11 raw ids that are never annotated (12, 26, 29, 30, 45, 66, 68, 69, 71,
    83, 91) stay as dead train ids.
    """
    table = label_table({0: IGNORE, 255: IGNORE} | {i: i - 1 for i in range(1, 183)})
    root = locate(raw, "imageLists")
    plan = Plan()
    for split in ("train", "test"):
        ids = read_ids(root / "imageLists" / f"{split}.txt")
        plan.splits[split] = ids
        for i in ids:
            plan.add(i, root / "images" / f"{i}.jpg",
                     functools.partial(_mat, root / "annotations" / f"{i}.mat", table, "S"))
    return plan


# ---------------------------------------------------------------------------------------------------------- VSPW
def convert_vspw(spec: DatasetSpec, raw: Path) -> Plan:
    """VSPW 480p: ``data/<video>/origin/<f>.jpg`` + ``data/<video>/mask/<f>.png``; every frame of each video."""
    table = label_table({0: IGNORE, 253: IGNORE, 254: IGNORE, 255: IGNORE} | {i: i - 1 for i in range(1, 125)})
    root = locate(raw, "data")
    if not (root / "train.txt").is_file():
        root = locate(raw, "train.txt")
    plan = Plan()
    for split in ("train", "val"):
        ids = []
        for video in read_ids(root / f"{split}.txt"):
            frames = sorted((root / "data" / video / "origin").glob("*.jpg"))
            if not frames:
                raise PreparedDataError(f"{root / 'data' / video / 'origin'}: no frames for video '{video}'.")
            for frame in frames:
                image_id = f"{video}/{frame.stem}"
                ids.append(image_id)
                plan.add(image_id, frame, _png_label(root / "data" / video / "mask" / f"{frame.stem}.png", table))
        plan.splits[split] = ids
    return plan


# ---------------------------------------------------------------------------------------------------- PASCAL VOC
def convert_pascalvoc(spec: DatasetSpec, raw: Path) -> Plan:
    """VOC2012 + SBD: palette PNGs read as indices, SBD ``GTcls.Segmentation`` for the augmented ids.

    trainaug = (VOC train + SBD train + SBD val) - VOC val (10,582 ids); ids with a VOC annotation use it (it
    has the 255 void band), the others the SBD .mat. The sssegmentation mirror ships ``trainaug.txt`` and
    index PNGs instead of SBD; that layout is read too.
    """
    table = label_table({i: i for i in range(21)} | {255: IGNORE})
    voc = locate(raw, "ImageSets/Segmentation")
    train = read_ids(voc / "ImageSets/Segmentation/train.txt")
    val = read_ids(voc / "ImageSets/Segmentation/val.txt")
    plan = Plan(splits={"train": train, "val": val})
    try:
        sbd = locate(raw, "dataset/cls") / "dataset"
    except PreparedDataError:
        sbd = None
    if sbd is not None:
        sbd_ids = set(read_ids(sbd / "train.txt")) | set(read_ids(sbd / "val.txt"))
        plan.splits["trainaug"] = sorted((set(train) | sbd_ids) - set(val))
        for i in sorted(set(train) | set(val) | set(plan.splits["trainaug"])):
            image = voc / "JPEGImages" / f"{i}.jpg"
            if not image.is_file() and (sbd / "img" / f"{i}.jpg").is_file():
                image = sbd / "img" / f"{i}.jpg"
            voc_label = voc / "SegmentationClass" / f"{i}.png"
            if i in train or i in val or voc_label.is_file():
                plan.add(i, image, _png_label(voc_label, table))
            else:
                plan.add(i, image,
                         functools.partial(_mat, sbd / "cls" / f"{i}.mat", table, "GTcls", 0, "Segmentation", 0))
    else:
        plan.splits["trainaug"] = read_ids(voc / "ImageSets/Segmentation/trainaug.txt")
        folders = [voc / f for f in ("SegmentationClassAug", "SegmentationClass") if (voc / f).is_dir()]
        if not folders:
            raise PreparedDataError(f"{voc}: neither SegmentationClassAug/ nor SegmentationClass/ is there.")
        for i in sorted(set(train) | set(val) | set(plan.splits["trainaug"])):
            label = next((f / f"{i}.png" for f in folders if (f / f"{i}.png").is_file()), folders[-1] / f"{i}.png")
            plan.add(i, voc / "JPEGImages" / f"{i}.jpg", _png_label(label, table))
    return plan


# ------------------------------------------------------------------------------------------------ PASCAL-Context
def pascalcontext_table() -> np.ndarray:
    """459-class LabelMap id -> 59-class train id (the 59 ids, sorted, -> 0..58; all other ids -> ignore)."""
    mapping = {i: IGNORE for i in range(L.PASCALCONTEXT_NUM_RAW + 1)}
    mapping |= {raw_id: k for k, raw_id in enumerate(L.PASCALCONTEXT59_IDS)}
    return label_table(mapping, size=L.PASCALCONTEXT_NUM_RAW + 1)


def convert_pascalcontext(spec: DatasetSpec, raw: Path) -> Plan:
    """VOC2010 images + Mottaghi et al. ``trainval/<id>.mat`` (``LabelMap``, 459 classes) -> 59 classes.

    Splits are VOC2010 ``ImageSets/Main/{train,val}.txt`` (4,998 / 5,105). The mirror's already converted
    ``SegmentationClassContext`` PNGs (0 background, 1..59) are read with reduce-zero-label instead.
    """
    voc = locate(raw, "ImageSets/Main")
    plan = Plan()
    if (voc / "SegmentationClassContext").is_dir():
        table = label_table({0: IGNORE, 255: IGNORE} | {i: i - 1 for i in range(1, 60)})
        for split in ("train", "val"):
            plan.splits[split] = read_ids(voc / "ImageSets/SegmentationContext" / f"{split}.txt")
            for i in plan.splits[split]:
                plan.add(i, voc / "JPEGImages" / f"{i}.jpg",
                         _png_label(voc / "SegmentationClassContext" / f"{i}.png", table))
        return plan
    table = pascalcontext_table()
    ann = locate(raw, "trainval") / "trainval"
    for split in ("train", "val"):
        plan.splits[split] = read_ids(voc / "ImageSets/Main" / f"{split}.txt")
        for i in plan.splits[split]:
            plan.add(i, voc / "JPEGImages" / f"{i}.jpg", functools.partial(_mat, ann / f"{i}.mat", table, "LabelMap"))
    return plan


CONVERTERS: dict[str, Callable[[DatasetSpec, Path], Plan]] = {
    "demo": convert_demo,
    "lip": convert_lip,
    "ade20k": convert_ade20k,
    "cityscapes": convert_cityscapes,
    "cocostuff10k": convert_cocostuff10k,
    "vspw": convert_vspw,
    "pascalvoc": convert_pascalvoc,
    "pascalcontext": convert_pascalcontext,
}
