"""The model zoo's rows: what each row states, its paired baseline, its section, and the experiment selection
the workflow makes from them (imported when the workflow builds its DAG: no torch, no pandas).

The model-zoo page (MemoryNetV2 / MCIBI++ model zoo) lists 36 rows in two sections: "Results of Different
Frameworks" (FCN / PSNet / UperNet / DeepLabV3 with R-50-D8 on LIP, ADE20k, CityScapes, COCO-Stuff-10k) and
"SOTA Results" (R-101-D8, S-101-D8, HRNetV2p-W48, Swin-L on seven datasets). :data:`ROWS` records, per row,
what the model-zoo page states (crop, LR/policy/batch/epochs, train/eval set, the mIoU columns it reports) and the
official config whose model switches the row uses.

Naming: ``<framework>_<backbone>_<memory>`` with framework ``fcn | psnet | upernet | deeplabv3``, backbone
``r50 | r101 | s101 | hr48 | swinl`` (R-50-D8, R-101-D8, S-101-D8, HRNetV2p-W48, Swin-Large) and memory
``mcibipp`` (MCIBI++) or ``baseline`` (the same model, schedule and data without memory; framework rows only).
"""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("lip", "ade20k", "cityscapes", "cocostuff10k", "vspw", "pascalvoc", "pascalcontext")
SECTIONS = {"frameworks": "Results of Different Frameworks", "sota": "SOTA Results"}
# official config file-name suffix of each of our dataset names
OFFICIAL_DATASET = {"lip": "lip", "ade20k": "ade20k", "cityscapes": "cityscapes", "cocostuff10k": "cocostuff10k",
                    "vspw": "vspw", "pascalvoc": "voc", "pascalcontext": "pascalcontext59"}
# the datasets' titles on the model-zoo page (the headings of its tables)
DATASET_TITLES = {"lip": "LIP", "ade20k": "ADE20k", "cityscapes": "CityScapes", "cocostuff10k": "COCOStuff-10k",
                  "vspw": "VSPW", "pascalvoc": "PASCAL-VOC", "pascalcontext": "PASCAL-Context"}
# short backbone name -> the official config file name's layout part
BACKBONES = {"r50": "resnet50os8", "r101": "resnet101os8", "s101": "resnest101os8", "hr48": "hrnetv2w48",
             "swinl": "swinlarge"}
# the model-zoo page's backbone notation by timm architecture ({os}: output stride)
BACKBONE_NOTATION = {
    "resnet50c": "R-50-D{os}",
    "resnet101c": "R-101-D{os}",
    "resnest101e": "S-101-D{os}",
    "hrnet_w48": "HRNetV2p-W48",
    "swin_large_patch4_window12_384": "Swin-Large",
}
MEMORY_SUFFIX, BASELINE_SUFFIX = "_mcibipp", "_baseline"  # <framework>_<backbone><suffix>
# official file-name prefix of the head (the official FCN config has none)
OFFICIAL_HEAD = {"fcn": "", "psnet": "ppm_", "upernet": "upernet_", "deeplabv3": "aspp_"}
SIX_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def backbone_title(name: str, output_stride: int) -> str:
    """The model-zoo page's backbone notation (R-50-D8, ...); other timm names as '<name>-D<os>'."""
    base = name.split(".", 1)[0]  # timm pretrained tags (".ms_in22k") do not change the architecture
    return BACKBONE_NOTATION.get(base, f"{name}-D{{os}}").format(os=output_stride)


def baseline_of(stem: str) -> str | None:
    """The paired baseline's stem of a memory experiment (``x_mcibipp`` -> ``x_baseline``)."""
    return stem.removesuffix(MEMORY_SUFFIX) + BASELINE_SUFFIX if stem.endswith(MEMORY_SUFFIX) else None


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol as the official config (or its commented TTA block) states it."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    mode: str = "whole"
    crop: tuple[int, int] | None = None  # (h, w), as the official slideinference reads its cropsize
    stride: tuple[int, int] | None = None  # (h, w)
    probs: bool = False  # use_probs_before_resize
    resize: tuple[int, int] | None = None  # (h, w) its own test Resize (keep_ratio false); None = the dataset's

    def params(self) -> dict:
        resize = {"size": list(self.resize), "keep_ratio": False, "ratio_range": None} if self.resize else None
        return {"test_resize": resize, "scales": list(self.scales), "flip": self.flip, "mode": self.mode,
                "crop": list(self.crop) if self.crop else None, "stride": list(self.stride) if self.stride else None,
                "probs_before_resize": self.probs}


WHOLE = Protocol()


def _slide(size: int | tuple[int, int], stride: int, scales=(1.0,), flip=False) -> Protocol:
    hw = (size, size) if isinstance(size, int) else size
    return Protocol(tuple(scales), flip, "slide", hw, (stride, stride), True)


@dataclass(frozen=True)
class Row:
    """One model-zoo row: what the model-zoo page states, and the official config that provides its model switches."""

    dataset: str
    section: str  # frameworks | sota
    framework: str
    backbone: str  # key of BACKBONES
    crop: tuple[int, int]  # (h, w) as the model-zoo page's "Crop Size" (written h x w)
    lr: float
    batch: int  # total batch size
    epochs: int
    train_split: str
    eval_split: str
    protocols: dict[str, Protocol]  # the mIoU columns of the model-zoo page's table, in its order
    note: str = ""  # where the model-zoo page and the official config disagree, and what we follow

    @property
    def stem(self) -> str:
        return f"{self.framework}_{self.backbone}{MEMORY_SUFFIX}"

    @property
    def baseline_stem(self) -> str | None:
        """The paired baseline without memory (framework rows only)."""
        return baseline_of(self.stem) if self.section == "frameworks" else None

    @property
    def official_name(self) -> str:
        layout = BACKBONES[self.backbone]
        return f"mcibiplusplus_{OFFICIAL_HEAD[self.framework]}{layout}_{OFFICIAL_DATASET[self.dataset]}"


def _framework_rows(dataset: str, crop: tuple[int, int], lr: float, batch: int, epochs: int, eval_split: str,
                    note: str = "") -> list[Row]:
    return [Row(dataset, "frameworks", fw, "r50", crop, lr, batch, epochs, "train", eval_split, {"ss": WHOLE}, note)
            for fw in ("fcn", "psnet", "upernet", "deeplabv3")]


# official ms+flip block: test Resize(520, 520, keep_ratio=False), then slide 473/315 at [0.75, 1, 1.25], flip, probs
_LIP_TTA = {"ss": WHOLE, "flip": Protocol(flip=True),
            "msflip": Protocol((0.75, 1.0, 1.25), True, "slide", (473, 473), (315, 315), True, resize=(520, 520))}

_VSPW_NOTE = ("as the official sampler, every epoch draws one random frame per training video (data.train_sampling: "
              "frame_per_video; 2,806 samples, 42k iterations in 240 epochs)")

ROWS: tuple[Row, ...] = (
    # ------------------------------------------------------------------ Results of Different Frameworks
    *_framework_rows("lip", (473, 473), 0.01, 32, 150, "val"),
    *_framework_rows("ade20k", (512, 512), 0.01, 32, 150, "val",
                     "model-zoo page's schedule 0.01/poly/32/150; the official configs (and official page) use "
                     "0.01/poly/16/130"),
    *_framework_rows("cityscapes", (512, 1024), 0.01, 16, 220, "val",
                     "model-zoo page's batch 16; the official configs (and official page) use batch 8"),
    *_framework_rows("cocostuff10k", (512, 512), 0.001, 16, 110, "test"),
    # ------------------------------------------------------------------------------------ SOTA Results
    *(Row("vspw", "sota", "upernet", bb, (512, 512), lr, 16, 240, "train", "val", {"ss": _slide(512, 341)},
          _VSPW_NOTE) for bb, lr in (("r101", 0.01), ("swinl", 6e-5))),
    Row("pascalvoc", "sota", "upernet", "r50", (512, 512), 0.01, 16, 60, "trainaug", "val", {"ss": WHOLE},
        "model-zoo page's 'train/val': the official config trains on trainaug (VOC train + SBD, 10,582 images)"),
    Row("pascalvoc", "sota", "upernet", "r101", (512, 512), 0.01, 16, 60, "trainaug", "val", {"ss": WHOLE},
        "model-zoo page's 'train/val': the official config trains on trainaug (VOC train + SBD, 10,582 images)"),
    *(Row("pascalcontext", "sota", "upernet", bb, (480, 480), lr, 16, 260, "train", "val",
          {"ss": _slide(480, 320), "msflip": _slide(480, 320, SIX_SCALES, True)})
      for bb, lr in (("r101", 0.004), ("s101", 0.004), ("swinl", 6e-5))),
    Row("lip", "sota", "upernet", "r101", (473, 473), 0.01, 32, 150, "train", "val", _LIP_TTA),
    Row("lip", "sota", "upernet", "s101", (473, 473), 0.01, 32, 150, "train", "val", _LIP_TTA),
    Row("lip", "sota", "upernet", "swinl", (473, 473), 6e-5, 16, 110, "train", "val", _LIP_TTA),
    Row("lip", "sota", "deeplabv3", "hr48", (512, 512), 0.007, 40, 150, "train", "val", _LIP_TTA,
        "model-zoo page's crop 512x512; the official config (and official page) crop 473x473."),
    Row("ade20k", "sota", "upernet", "r101", (512, 512), 0.01, 16, 130, "train", "val",
        {"ss": WHOLE, "msflip": Protocol(SIX_SCALES, True, probs=True)}),
    Row("ade20k", "sota", "upernet", "s101", (512, 512), 0.004, 16, 180, "train", "val",
        {"ss": WHOLE, "msflip": Protocol((0.75, 1.0, 1.5), True, probs=True)}),
    Row("ade20k", "sota", "upernet", "swinl", (640, 640), 6e-5, 16, 130, "train", "val",
        {"ss": _slide(640, 426), "msflip": _slide(640, 426, SIX_SCALES, True)}),
    # the official slideinference reads cropsize [1024, 512] as (h, w): windows 1024 high and 512 wide
    *(Row("cityscapes", "sota", "deeplabv3", bb, (512, 1024), 0.01, 16, 440, "trainval", "test",
          {"msflip": _slide((1024, 512), 341, SIX_SCALES, True)},
          "model-zoo page's lr 0.01; the official config (and official page) use 0.004" if bb == "s101" else "")
      for bb in ("r101", "s101", "hr48")),
    Row("cocostuff10k", "sota", "upernet", "r101", (512, 512), 0.001, 16, 110, "train", "test",
        {"ss": WHOLE, "msflip": Protocol(SIX_SCALES, True, probs=False)}),
    Row("cocostuff10k", "sota", "upernet", "s101", (512, 512), 0.001, 32, 150, "train", "test",
        {"ss": WHOLE, "msflip": Protocol((0.75, 1.0, 1.5), True, probs=True)}),
    Row("cocostuff10k", "sota", "upernet", "swinl", (512, 512), 6e-5, 16, 150, "train", "test",
        {"ss": _slide(512, 341), "msflip": Protocol(SIX_SCALES, True, probs=True)}),
)


def rows_of(dataset: str) -> list[Row]:
    """The model-zoo rows of one dataset, in the model-zoo page's order (frameworks section first)."""
    return sorted((r for r in ROWS if r.dataset == dataset), key=lambda r: list(SECTIONS).index(r.section))


def catalogue_entry(dataset: str, stem: str) -> tuple[Row, bool] | None:
    """(row, is_baseline) of an experiment file stem, or None for an experiment outside the model zoo."""
    for row in rows_of(dataset):
        if stem == row.stem:
            return row, False
        if stem == row.baseline_stem:
            return row, True
    return None


def select(dataset: str, stems: list[str], wanted: str | list[str]) -> list[str]:
    """The experiment stems a workflow selection names: ``all``, ``frameworks`` (framework rows and their
    baselines), ``sota``, or an explicit list of stems (errors name the unknown ones)."""
    if wanted == "all":
        return list(stems)
    if isinstance(wanted, str) and wanted in SECTIONS:
        chosen = [s for s in stems if (e := catalogue_entry(dataset, s)) and e[0].section == wanted]
        if not chosen:
            raise ValueError(f"workflow/config.yaml: experiments.{dataset} is '{wanted}' but no experiment of "
                             f"params/{dataset}/ belongs to that section.")
        return chosen
    if isinstance(wanted, str):
        wanted = [wanted]
    unknown = sorted(set(wanted) - set(stems))
    if unknown:
        raise ValueError(f"workflow/config.yaml: experiments.{dataset} names {unknown}, not in params/{dataset}/ "
                         f"(known: {', '.join(stems)}; or use all, frameworks, sota).")
    return [s for s in stems if s in wanted]
