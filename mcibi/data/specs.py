"""Per-dataset facts the rest of the code reads: classes, ignore index, flip pairs, splits, sources, pipelines.

Everything known about a dataset lives in its :class:`DatasetSpec` here (class names and raw label tables are
kept as data in :mod:`mcibi.data.labelsets`). Sources and numbers: ``shared/research/datasets.md``.

The prepared on-disk format (written by :mod:`mcibi.data.prepare`, read by :mod:`mcibi.data.dataset`) is the
same for every dataset::

    <data_root>/<name>/
        manifest.json          name, classes, ignore_index, flip_pairs, image_ext, splits {split: count}
        images/<id><image_ext> RGB images (PNG or JPEG)
        labels/<id>.png        single-channel uint8 PNG of class indices, ignore_index = 255
        splits/<split>.txt     one <id> per line (ids may contain '/')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mcibi.data import labelsets as L

IGNORE_INDEX = 255  # the one ignore value used on disk, in losses, metrics and the memory update


# ----------------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Archive:
    """One file of a source, with every checksum we could find for it.

    ``sha256`` is checked when recorded, otherwise the published ``sha1``/``md5``, otherwise ``size``; with none of
    them the archive's own CRCs are tested (zip/gzip) and the verification record says it is unverified.
    """

    name: str  # file name in downloads/<dataset>/
    urls: tuple[str, ...] = ()  # tried in order; empty: cannot be fetched automatically
    sha256: str | None = None
    sha1: str | None = None
    md5: str | None = None
    size: int | None = None
    parts: int = 0  # > 0: served as <url>.001 .. .<parts> (7z/zip volumes), joined into ``name`` after download
    package_id: int | None = None  # CityScapes download package
    note: str = ""


@dataclass(frozen=True)
class Source:
    """A complete set of archives from one provider; sources are tried in order (official first)."""

    name: str  # "official", "mirror", "generated"
    kind: Literal["http", "cityscapes", "generated"]
    archives: tuple[Archive, ...]
    homepage: str = ""
    note: str = ""


# --------------------------------------------------------------------------------------------------- pipelines
@dataclass(frozen=True)
class Resize:
    """Resize before cropping (train) or inference (test); ``size`` is (h, w), or (short, long) with keep_ratio."""

    size: tuple[int, int]
    keep_ratio: bool
    ratio_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class Pipeline:
    """The model zoo's train/test transforms of one dataset config (sssegmentation ``configs/_base_/datasets``)."""

    crop_size: tuple[int, int]  # (h, w)
    train_resize: Resize
    test_resize: Resize
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    rotation: tuple[float, float] = (0.0, 0.0)  # (probability, max degrees)
    photometric: bool = True

    def data_params(self) -> dict:
        """The transform keys of a params file's ``data:`` section (see :class:`mcibi.params.DataParams`)."""

        def resize(r: Resize) -> dict:
            return {"size": list(r.size), "keep_ratio": r.keep_ratio,
                    "ratio_range": list(r.ratio_range) if r.ratio_range else None}

        return {
            "crop_size": list(self.crop_size),
            "train_resize": resize(self.train_resize),
            "cat_max_ratio": self.cat_max_ratio,
            "flip_prob": self.flip_prob,
            "rotation": {"prob": self.rotation[0], "max_degrees": self.rotation[1]},
            "photometric": self.photometric,
            "test_resize": resize(self.test_resize),
        }


def _scene(short: int, long: int, crop: int | tuple[int, int]) -> Pipeline:
    """The common scene-parsing pipeline: keep-ratio resize x U(0.5, 2), crop with cat-max-ratio, flip, PMD."""
    crop_hw = (crop, crop) if isinstance(crop, int) else crop
    return Pipeline(crop_hw, Resize((short, long), True, (0.5, 2.0)), Resize((short, long), True))


# -------------------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one dataset."""

    name: str
    classes: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]  # class ids swapped by a horizontal flip (left/right parts)
    splits: dict[str, int]  # documented number of images (or videos, see count_unit) per split
    image_ext: str
    sources: tuple[Source, ...]
    pipelines: dict[str, Pipeline] = field(default_factory=dict)  # first = default
    train_split: str = "train"
    eval_split: str = "val"
    count_unit: Literal["image", "video"] = "image"  # what ``splits`` counts; video ids are '<video>/<frame>'
    unlabelled_splits: tuple[str, ...] = ()  # splits whose labels are not public (placeholders on disk)
    label_conversion: str = ""  # how raw labels become train ids (also written to the manifest)
    citation_counts: str = ""  # where the documented split sizes come from

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def archives(self) -> dict[str, str | None]:
        """Archive name -> recorded sha256 of the first (preferred) source."""
        return {a.name: a.sha256 for a in self.sources[0].archives}

    @property
    def pipeline(self) -> Pipeline | None:
        """The default pipeline (the model zoo's main config for this dataset)."""
        return next(iter(self.pipelines.values()), None)

    def flip_permutation(self) -> list[int]:
        """Class index permutation that a horizontal flip applies (identity except the flip pairs)."""
        perm = list(range(self.num_classes))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    def data_params(self, pipeline: str | None = None) -> dict:
        """A complete params ``data:`` section for this dataset (the defaults layer a params file builds on)."""
        pipe = self.pipelines[pipeline] if pipeline else self.pipeline
        if pipe is None:
            raise KeyError(f"dataset '{self.name}' has no pipeline recorded")
        return {"name": self.name, "train_split": self.train_split, "eval_split": self.eval_split,
                **pipe.data_params(),
                "train_sampling": "frame_per_video" if self.count_unit == "video" else "image"}


DEMO = DatasetSpec(
    name="demo",
    classes=(
        "background",
        "torso",
        "left_arm",
        "right_arm",
        "amber_disk",
        "ochre_disk",
        "square",
        "triangle",
    ),
    flip_pairs=((2, 3),),
    splits={"train": 240, "val": 60},
    image_ext=".png",
    sources=(Source("generated", "generated", (
        Archive("demo.tar", sha256="5cc1b203447fecd711a96ddd349d7b886f058d26c83f33f1939cc2c39de83e82"),)),),
    pipelines={"128x128": Pipeline((96, 96), Resize((128, 128), False, (0.75, 1.25)), Resize((128, 128), False))},
    label_conversion="index PNGs as generated",
)

SSSEG_MIRROR = "https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_datasets/"
MIRROR_NOTE = ("sssegmentation's GitHub release mirror (scripts/prepare_datasets.sh); no checksums or sizes are "
               "published for its assets")

LIP = DatasetSpec(
    name="lip",
    classes=L.LIP_CLASSES,
    flip_pairs=((14, 15), (16, 17), (18, 19)),  # leftArm/rightArm, leftLeg/rightLeg, leftShoe/rightShoe
    splits={"train": 30462, "val": 10000},
    image_ext=".jpg",
    sources=(
        Source("official", "http", (
            Archive("TrainVal_images.zip", note="Google Drive / Baidu links on the LIP page; no stable direct URL"),
            Archive("TrainVal_parsing_annotations.zip", note="holds a nested zip of the same name"),
        ), homepage="https://lip.sysuhcp.com/overview.php",
            note="no direct download URL or checksum is published: place the two zips by hand to use them"),
        Source("mirror", "http", (Archive("LIP.tar.gz", urls=(SSSEG_MIRROR + "LIP.tar.gz",)),), note=MIRROR_NOTE),
    ),
    pipelines={"473x473": Pipeline(
        (473, 473), Resize((520, 520), False, (0.75, 1.25)), Resize((473, 473), False), rotation=(0.6, 30.0))},
    label_conversion="grayscale PNG values 0..19 kept as they are (no remap); any other value is an error",
    citation_counts="LIP overview page: 30,462 train / 10,000 val (test labels are not public)",
)

ADE20K = DatasetSpec(
    name="ade20k",
    classes=L.ADE20K_CLASSES,
    flip_pairs=(),
    splits={"train": 20210, "val": 2000},
    image_ext=".jpg",
    sources=(
        Source("official", "http", (
            Archive("ADEChallengeData2016.zip",
                    urls=("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",),
                    sha1="219e1696abb36c8ba3a3afe7fb2f4b4606a897c7", note="SHA1 from dmlc/gluon-cv ade20k.py"),
        ), homepage="http://sceneparsing.csail.mit.edu/"),
        Source("mirror", "http", (Archive("ADE20k.tar.gz", urls=(SSSEG_MIRROR + "ADE20k.tar.gz",)),),
               note=MIRROR_NOTE),
    ),
    pipelines={"512x512": _scene(512, 2048, 512), "640x640": _scene(640, 2560, 640)},
    label_conversion="reduce zero label: 0 (other) -> 255, 1..150 -> 0..149",
    citation_counts="sceneparsing.csail.mit.edu: 20,210 train / 2,000 val",
)

CITYSCAPES = DatasetSpec(
    name="cityscapes",
    classes=L.CITYSCAPES_CLASSES,
    flip_pairs=(),
    splits={"train": 2975, "val": 500, "trainval": 3475, "test": 1525},
    image_ext=".png",
    sources=(
        Source("official", "cityscapes", (
            Archive("gtFine_trainvaltest.zip", package_id=1, sha1="99f532cb1af174f5fcc4c5bc8feea8c66246ddbc",
                    note="241 MB; SHA1 from dmlc/gluon-cv cityscapes.py; MD5 served by the site after login"),
            Archive("leftImg8bit_trainvaltest.zip", package_id=3, sha1="2c0b77ce9933cc635adda307fbba5566f5d9d404",
                    note="11 GB; SHA1 from dmlc/gluon-cv cityscapes.py; MD5 served by the site after login"),
        ), homepage="https://www.cityscapes-dataset.com/downloads/",
            note="an account is required; no public mirror is used (the sssegmentation 7z mirror redistributes "
                 "the data, which the licence does not allow)"),
    ),
    pipelines={"512x1024": _scene(1024, 2048, (512, 1024))},
    train_split="train",
    unlabelled_splits=("test",),
    label_conversion="labelIds -> trainIds with cityscapesScripts' label table (19 classes, the rest 255)",
    citation_counts="cityscapesScripts README: 2,975 train / 500 val / 1,525 test (fine); trainval = train + val",
)

COCOSTUFF10K = DatasetSpec(
    name="cocostuff10k",
    classes=L.COCOSTUFF10K_CLASSES,
    flip_pairs=(),
    splits={"train": 9000, "test": 1000},
    image_ext=".jpg",
    sources=(
        Source("official", "http", (
            Archive("cocostuff-10k-v1.1.zip", urls=(
                "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip",),
                note="2.0 GB; no checksum published"),
        ), homepage="https://github.com/nightrome/cocostuff10k"),
        Source("mirror", "http", (Archive("COCOStuff10k.tar.gz", urls=(SSSEG_MIRROR + "COCOStuff10k.tar.gz",)),),
               note=MIRROR_NOTE),
    ),
    pipelines={"512x512": _scene(512, 2048, 512)},
    eval_split="test",
    label_conversion=("182-way as the model zoo's configs (num_classes 182): .mat S 0 -> 255, 1..182 -> 0..181; "
                      "the 11 raw ids never annotated stay as dead classes (excluded from mIoU by nanmean)"),
    citation_counts="nightrome/cocostuff10k imageLists: 9,000 train / 1,000 test",
)

VSPW = DatasetSpec(
    name="vspw",
    classes=L.VSPW_CLASSES,
    flip_pairs=(),
    splits={"train": 2806, "val": 343},
    image_ext=".jpg",
    sources=(
        Source("official", "http", (
            Archive("VSPW_480p.zip", urls=(
                "https://drive.usercontent.google.com/download?id=1rRujAmy3mzYqI0NjrdyVANDfrnFnBEp1"
                "&export=download&confirm=t",), note="Google Drive file of the VSPW-dataset-download README"),
        ), homepage="https://www.vspwdataset.com/"),
        Source("mirror", "http", (Archive("VSPW_480p.zip", urls=(SSSEG_MIRROR + "VSPW_480p.zip",), parts=10),),
               note=MIRROR_NOTE + "; 10 volumes joined into one zip"),
    ),
    pipelines={"512x512": _scene(512, 2048, 512)},
    count_unit="video",
    label_conversion="0 (others) and 253/254/255 (void) -> 255, 1..124 -> 0..123; masks read as indices (PIL)",
    citation_counts="VSPW paper (CVPR 2021): 3,536 videos = 2,806 train / 343 val / 387 test (test masks private)",
)

PASCALVOC = DatasetSpec(
    name="pascalvoc",
    classes=L.PASCALVOC_CLASSES,
    flip_pairs=(),
    splits={"trainaug": 10582, "train": 1464, "val": 1449},
    image_ext=".jpg",
    sources=(
        Source("official", "http", (
            Archive("VOCtrainval_11-May-2012.tar", urls=(
                "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",),
                md5="6cd6e144f989b92b3379bac3b3de84fd", sha1="4e443f8a2eca6b1dac8a6c57641b67dd40621a49",
                note="MD5 from torchvision, SHA1 from gluon-cv"),
            Archive("benchmark.tgz", urls=(
                "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"),
                md5="82b4d87ceb2ed10f6038a1cba92111cb", sha1="7129e0a480c2d6afb02b517bb18ac54283bfaa35",
                note="SBD (Hariharan et al.); MD5 from torchvision, SHA1 from gluon-cv"),
        ), homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"),
        Source("mirror", "http", (Archive("VOCdevkit.zip", urls=(SSSEG_MIRROR + "VOCdevkit.zip",), parts=3),),
               note=MIRROR_NOTE + "; 3 volumes joined into one zip"),
    ),
    pipelines={"512x512": _scene(512, 2048, 512)},
    train_split="trainaug",
    label_conversion=("VOC palette PNGs read as palette indices (not luminance): 0..20 kept, 255 (void) kept; SBD "
                      "GTcls.Segmentation .mat for the augmented ids; trainaug = (VOC train + SBD train + SBD val)"
                      " - VOC val"),
    citation_counts="VOC2012: 1,464 train / 1,449 val; trainaug 10,582 (mmsegmentation voc_aug.py)",
)

PASCALCONTEXT = DatasetSpec(
    name="pascalcontext",
    classes=L.PASCALCONTEXT59_CLASSES,
    flip_pairs=(),
    splits={"train": 4998, "val": 5105},
    image_ext=".jpg",
    sources=(
        Source("official", "http", (
            Archive("VOCtrainval_03-May-2010.tar", urls=(
                "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",),
                sha1="bf9985e9f2b064752bf6bd654d89f017c76c395a", note="SHA1 from gluon-cv pascal_context.py"),
            Archive("trainval.tar.gz", urls=("https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz",),
                    md5="df034edb2c12aa7d33b42b20bb1796e3",
                    note="Mottaghi et al. full-scene annotations (459-class LabelMap .mat); MD5 from a third-party "
                         "script, not from the authors"),
        ), homepage="https://cs.stanford.edu/~roozbeh/pascal-context/"),
        Source("mirror", "http", (Archive("PascalContext.tar.gz", urls=(SSSEG_MIRROR + "PascalContext.tar.gz",)),),
               note=MIRROR_NOTE),
    ),
    pipelines={"480x480": Pipeline((480, 480), Resize((520, 520), True, (0.5, 2.0)), Resize((520, 520), True))},
    label_conversion=("459-class LabelMap -> 59 classes: the 59 ids (sorted) -> 0..58, everything else "
                      "(background and the other 400 classes) -> 255"),
    citation_counts="PASCAL-Context (VOC2010 trainval): 4,998 train / 5,105 val",
)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (DEMO, LIP, ADE20K, CITYSCAPES, COCOSTUFF10K, VSPW, PASCALVOC, PASCALCONTEXT)
}
