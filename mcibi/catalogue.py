"""The experiment catalogue: every row of the seed model zoo as a params file, its paired baseline, its section.

The seed page (MemoryNetV2 / MCIBI++ model zoo) lists 36 rows in two sections: "Results of Different
Frameworks" (FCN / PSNet / UperNet / DeepLabV3 with R-50-D8 on LIP, ADE20k, CityScapes, COCO-Stuff-10k) and
"SOTA Results" (R-101-D8, S-101-D8, HRNetV2p-W48, Swin-L on seven datasets). :data:`ROWS` records, per row,
what the seed table states (crop, LR/policy/batch/epochs, train/eval set, the mIoU columns it reports) and the
official config whose model switches the row uses. :func:`write_catalogue` turns them into
``params/<dataset>/<framework>_<backbone>_<memory>.yaml`` plus one ``defaults.yaml`` per dataset; the files are
committed, and the test suite checks that they are exactly what this module generates.

Naming: ``<framework>_<backbone>_<memory>`` with framework ``fcn | psnet | upernet | deeplabv3``, backbone
``r50 | r101 | s101 | hr48 | swinl`` (R-50-D8, R-101-D8, S-101-D8, HRNetV2p-W48, Swin-Large) and memory
``mcibipp`` (MCIBI++) or ``baseline`` (the same model, schedule and data without memory; framework rows only).

    python -m mcibi.catalogue write            # regenerate params/<dataset>/ for the seven datasets
    python -m mcibi.catalogue check            # exit 1 if a committed file differs from the generated one
    python -m mcibi.catalogue budget           # iterations, images, GPU-hours, checkpoint disk per experiment
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from mcibi.data.specs import get_spec
from mcibi.files import write_text
from mcibi.params import DEFAULTS_FILE, _merge, to_dict

log = logging.getLogger(__name__)

DATASETS = ("lip", "ade20k", "cityscapes", "cocostuff10k", "vspw", "pascalvoc", "pascalcontext")
SECTIONS = {"frameworks": "Results of Different Frameworks", "sota": "SOTA Results"}
# official config file-name suffix of each of our dataset names
OFFICIAL_DATASET = {"lip": "lip", "ade20k": "ade20k", "cityscapes": "cityscapes", "cocostuff10k": "cocostuff10k",
                    "vspw": "vspw", "pascalvoc": "voc", "pascalcontext": "pascalcontext59"}
# seed table titles of the datasets (the section headings of the seed page)
DATASET_TITLES = {"lip": "LIP", "ade20k": "ADE20k", "cityscapes": "CityScapes", "cocostuff10k": "COCOStuff-10k",
                  "vspw": "VSPW", "pascalvoc": "PASCAL-VOC", "pascalcontext": "PASCAL-Context"}
# short backbone name -> (official layout part, seed notation)
BACKBONES = {"r50": ("resnet50os8", "R-50-D8"), "r101": ("resnet101os8", "R-101-D8"),
             "s101": ("resnest101os8", "S-101-D8"), "hr48": ("hrnetv2w48", "HRNetV2p-W48"),
             "swinl": ("swinlarge", "Swin-Large")}
# official file-name prefix of the head (the official FCN config has none)
OFFICIAL_HEAD = {"fcn": "", "psnet": "ppm_", "upernet": "upernet_", "deeplabv3": "aspp_"}
SIX_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
DEFAULT_OFFICIAL_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_configs.yaml"
PUBLISHED_FILE = "published.csv"


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol as the official config (or its commented TTA block) states it."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    mode: str = "whole"
    crop: tuple[int, int] | None = None  # (h, w)
    stride: tuple[int, int] | None = None
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
    """One seed table row: what the seed states, and the official config that provides its model switches."""

    dataset: str
    section: str  # frameworks | sota
    framework: str
    backbone: str  # key of BACKBONES
    crop: tuple[int, int]  # (h, w) as the seed's "Crop Size" (written h x w)
    lr: float
    batch: int  # total batch size
    epochs: int
    train_split: str
    eval_split: str
    protocols: dict[str, Protocol]  # the mIoU columns of the seed table, in its order
    note: str = ""  # where the seed and the official config disagree, and what we follow

    @property
    def stem(self) -> str:
        return f"{self.framework}_{self.backbone}_mcibipp"

    @property
    def baseline_stem(self) -> str | None:
        """The paired baseline without memory (framework rows only)."""
        return f"{self.framework}_{self.backbone}_baseline" if self.section == "frameworks" else None

    @property
    def official_name(self) -> str:
        layout = BACKBONES[self.backbone][0]
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
                     "seed schedule 0.01/poly/32/150; the official configs (and official page) use 0.01/poly/16/130"),
    *_framework_rows("cityscapes", (512, 1024), 0.01, 16, 220, "val",
                     "seed batch 16; the official configs (and official page) use batch 8"),
    *_framework_rows("cocostuff10k", (512, 512), 0.001, 16, 110, "test"),
    # ------------------------------------------------------------------------------------ SOTA Results
    *(Row("vspw", "sota", "upernet", bb, (512, 512), lr, 16, 240, "train", "val", {"ss": _slide(512, 341)},
          _VSPW_NOTE) for bb, lr in (("r101", 0.01), ("swinl", 6e-5))),
    Row("pascalvoc", "sota", "upernet", "r50", (512, 512), 0.01, 16, 60, "trainaug", "val", {"ss": WHOLE},
        "seed 'train/val': the official config trains on trainaug (VOC train + SBD, 10,582 images)"),
    Row("pascalvoc", "sota", "upernet", "r101", (512, 512), 0.01, 16, 60, "trainaug", "val", {"ss": WHOLE},
        "seed 'train/val': the official config trains on trainaug (VOC train + SBD, 10,582 images)"),
    *(Row("pascalcontext", "sota", "upernet", bb, (480, 480), lr, 16, 260, "train", "val",
          {"ss": _slide(480, 320), "msflip": _slide(480, 320, SIX_SCALES, True)})
      for bb, lr in (("r101", 0.004), ("s101", 0.004), ("swinl", 6e-5))),
    Row("lip", "sota", "upernet", "r101", (473, 473), 0.01, 32, 150, "train", "val", _LIP_TTA),
    Row("lip", "sota", "upernet", "s101", (473, 473), 0.01, 32, 150, "train", "val", _LIP_TTA),
    Row("lip", "sota", "upernet", "swinl", (473, 473), 6e-5, 16, 110, "train", "val", _LIP_TTA),
    Row("lip", "sota", "deeplabv3", "hr48", (512, 512), 0.007, 40, 150, "train", "val", _LIP_TTA,
        "seed crop 512x512; the official config (and official page) crop 473x473."),
    Row("ade20k", "sota", "upernet", "r101", (512, 512), 0.01, 16, 130, "train", "val",
        {"ss": WHOLE, "msflip": Protocol(SIX_SCALES, True, probs=True)}),
    Row("ade20k", "sota", "upernet", "s101", (512, 512), 0.004, 16, 180, "train", "val",
        {"ss": WHOLE, "msflip": Protocol((0.75, 1.0, 1.5), True, probs=True)}),
    Row("ade20k", "sota", "upernet", "swinl", (640, 640), 6e-5, 16, 130, "train", "val",
        {"ss": _slide(640, 426), "msflip": _slide(640, 426, SIX_SCALES, True)}),
    *(Row("cityscapes", "sota", "deeplabv3", bb, (512, 1024), 0.01, 16, 440, "trainval", "test",
          {"msflip": _slide((512, 1024), 341, SIX_SCALES, True)},
          "seed lr 0.01; the official config (and official page) use 0.004" if bb == "s101" else "")
      for bb in ("r101", "s101", "hr48")),
    Row("cocostuff10k", "sota", "upernet", "r101", (512, 512), 0.001, 16, 110, "train", "test",
        {"ss": WHOLE, "msflip": Protocol(SIX_SCALES, True, probs=False)}),
    Row("cocostuff10k", "sota", "upernet", "s101", (512, 512), 0.001, 32, 150, "train", "test",
        {"ss": WHOLE, "msflip": Protocol((0.75, 1.0, 1.5), True, probs=True)}),
    Row("cocostuff10k", "sota", "upernet", "swinl", (512, 512), 6e-5, 16, 150, "train", "test",
        {"ss": _slide(512, 341), "msflip": Protocol(SIX_SCALES, True, probs=True)}),
)

# pipelines of mcibi.data.specs by crop (the 640 one for ADE20k's Swin-L row; LIP's HRNet row crops 512 from
# the 473 pipeline's 520x520 resize, as its seed row states)
_PIPELINE = {("ade20k", (640, 640)): "640x640"}

# shared by every dataset: execution settings, not part of the seed tables
_EXECUTION = {
    "num_workers": 4, "log_every": 50, "channels_last": True, "precision": "fp32", "compile": False,
    "sync_batchnorm": True, "checkpoint_every": 2000, "keep_checkpoints": 2,
}
GPUS = 8  # the official runs: 8 GPUs share the total batch


def rows_of(dataset: str) -> list[Row]:
    """The seed rows of one dataset, in the seed page's order (frameworks section first)."""
    return sorted((r for r in ROWS if r.dataset == dataset), key=lambda r: list(SECTIONS).index(r.section))


def catalogue_entry(dataset: str, stem: str) -> tuple[Row, bool] | None:
    """(row, is_baseline) of an experiment file stem, or None for an experiment outside the seed tables."""
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


# ----------------------------------------------------------------------------------------- published numbers
@cache
def published() -> tuple[dict[str, str], ...]:
    """The published mIoU values (``mcibi/published.csv``): one record per row, protocol and source."""
    text = resources.files("mcibi").joinpath(PUBLISHED_FILE).read_text()
    return tuple(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))


def published_miou(dataset: str, stem: str, protocol: str, source: str = "seed") -> float | None:
    """The published mIoU (percent) of one row and protocol from ``source`` (seed or official), None if the
    source leaves the cell empty."""
    for rec in published():
        if (rec["dataset"], rec["experiment"], rec["protocol"], rec["source"]) == (dataset, stem, protocol, source):
            return float(rec["miou"]) if rec["miou"] else None
    return None


# --------------------------------------------------------------------------------------------- params files
def _optimizer(cfg: dict, row: Row) -> tuple[dict, dict]:
    """(train.optimizer, train.schedule) from the official scheduler with the seed row's learning rate."""
    sched, opt = cfg["scheduler"], cfg["scheduler"]["optimizer"]
    rules = opt.get("params_rules") or {}
    adamw = opt["type"] == "AdamW"
    optimizer = {
        "name": "adamw" if adamw else "sgd",
        "lr": row.lr,
        "momentum": float(opt.get("momentum", 0.9)),
        "weight_decay": float(opt["weight_decay"]),
        "betas": [float(b) for b in opt.get("betas", (0.9, 0.999))],
        # the official rules match parameter names: its 'norm' rule spares the backbone's norms (named norm*), not
        # the head's BatchNorms (named by position), so it is a name key here, not no_decay_norms
        "no_decay_norms": False,
        "no_decay_keys": sorted(k for k, v in rules.items() if v.get("wd_multiplier") == 0.0) or None,
        "backbone_lr_mult": float(rules.get("backbone_net", {}).get("lr_multiplier", 1.0)),
    }
    warm = sched.get("warmup_cfg") or {}
    schedule = {"power": float(sched.get("power", 0.9)),
                "min_lr": float(sched["min_lr"]) if "min_lr" in sched else round(row.lr * 0.01, 12),
                "warmup_iters": int(warm.get("iters", 0)), "warmup_ratio": float(warm.get("ratio", 1e-6))}
    return optimizer, schedule


def experiment_dict(row: Row, cfg: dict, baseline: bool = False) -> dict:
    """The complete (merged) params of one row, or of its baseline."""
    from mcibi.official import model_params_from_official

    spec = get_spec(row.dataset)
    data = spec.data_params(_PIPELINE.get((row.dataset, row.crop)))
    data.update(train_split=row.train_split, eval_split=row.eval_split, crop_size=list(row.crop))
    model = to_dict(model_params_from_official(row.official_name, cfg, pretrained=True))
    if baseline:
        model["memory"]["kind"] = "none"
    optimizer, schedule = _optimizer(cfg, row)
    per_device = row.batch // GPUS  # every seed batch (8, 16, 32, 40) is a multiple of 8
    title = f"{DATASET_TITLES[row.dataset]}, {SECTIONS[row.section]}"
    what = (f"{'Baseline without memory for' if baseline else 'MCIBI++:'} {row.framework} "
            f"{BACKBONES[row.backbone][1]} ({title})")
    desc = f"{what}; model switches from the official {row.official_name}"
    if row.note:
        desc += f". Note: {row.note}"
    return {
        "description": desc,
        "data": data,
        "model": model,
        "train": {
            "seed": 0, "total_batch_size": row.batch, "batch_per_device": per_device, "epochs": row.epochs,
            "optimizer": optimizer, "schedule": schedule,
            "loss_weights": {"cls": 1.0, "cwi": 1.0, "pr": 0.4, "aux": 0.4, "memory": 1.0},
            **_EXECUTION,
            "resources": {"gpus": GPUS, "cpus_per_gpu": 4, "mem_mb": 128000, "runtime": 1440},
        },
        "evaluate": {
            "protocols": {name: proto.params() for name, proto in row.protocols.items()},
            "channels_last": True, "fold_batchnorm": True, "window_batch": 8,
            "resources": {"gpus": 1, "cpus_per_gpu": 8, "mem_mb": 64000, "runtime": 720},
        },
    }


# keys every experiment file states itself (what its seed row is about), never taken from defaults.yaml
_ROW_KEYS = {("description",), ("data", "train_split"), ("data", "eval_split"), ("data", "crop_size"), ("model",),
             ("train", "total_batch_size"), ("train", "batch_per_device"), ("train", "epochs"),
             ("train", "optimizer"), ("train", "schedule"), ("train", "resources"), ("evaluate", "protocols")}


def _split(d: dict, prefix: tuple = ()) -> tuple[dict, dict]:
    """(row part, shareable part) of a params dict by :data:`_ROW_KEYS`."""
    own, shared = {}, {}
    for k, v in d.items():
        key = (*prefix, k)
        if key in _ROW_KEYS:
            own[k] = v
        elif isinstance(v, dict) and any(r[: len(key)] == key for r in _ROW_KEYS):
            o, s = _split(v, key)
            if o:
                own[k] = o
            if s:
                shared[k] = s
        else:
            shared[k] = v
    return own, shared


def _atomic(d: dict) -> bool:
    """A mapping of scalars (a resize, a protocol, a backbone): shared or stated whole, never split."""
    return not any(isinstance(v, dict) for v in d.values())


def _common(dicts: list[dict]) -> dict:
    """The keys (deeply) whose values are equal in every dict."""
    out = {}
    for k, v in dicts[0].items():
        vals = [d.get(k) for d in dicts]
        if all(isinstance(x, dict) and not _atomic(x) for x in vals):
            sub = _common(vals)
            if sub:
                out[k] = sub
        elif all(x == v for x in vals) and all(k in d for d in dicts):
            out[k] = v
    return out


def _minus(d: dict, base: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and not _atomic(v):
            sub = _minus(v, base[k])
            if sub:
                out[k] = sub
        elif k not in base or base[k] != v:
            out[k] = v
    return out


class _Dumper(yaml.SafeDumper):
    """Block mappings, except small mappings of scalars (a backbone, a protocol) and lists of scalars, which
    stay on one line."""


def _list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(x, dict | list) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    flat = all(not isinstance(v, dict) and not (isinstance(v, list) and any(isinstance(x, dict | list) for x in v))
               for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flat and len(data) <= 7)


_Dumper.add_representer(list, _list)
_Dumper.add_representer(dict, _dict)


def _yaml(header: str, data: dict) -> str:
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body


def generate(dataset: str, configs: dict) -> dict[str, str]:
    """File name -> text of every params file of ``dataset`` (``defaults.yaml`` and one file per experiment)."""
    full: dict[str, dict] = {}
    rows = {}
    for row in rows_of(dataset):
        cfg = configs[row.official_name]
        full[row.stem] = experiment_dict(row, cfg)
        rows[row.stem] = (row, False)
        if row.baseline_stem:
            full[row.baseline_stem] = experiment_dict(row, cfg, baseline=True)
            rows[row.baseline_stem] = (row, True)
    parts = {stem: _split(d) for stem, d in full.items()}
    defaults = _common([shared for _, shared in parts.values()])
    files = {DEFAULTS_FILE: _yaml(
        f"Shared settings of the {DATASET_TITLES[dataset]} experiments (the one defaults layer of params/{dataset}/).\n"
        "Generated by `python -m mcibi.catalogue write` from the seed model zoo and the official configs; edit the\n"
        "catalogue (mcibi/catalogue.py), not this file. Every experiment file here is merged over it, then\n"
        "validated strictly. Execution settings (precision, channels_last, workers, resources) do not change the\n"
        "trajectory's arithmetic beyond rounding; precision fp32 as the official runs (8 GPUs).", defaults)}
    for stem, (own, shared) in parts.items():
        row, baseline = rows[stem]
        body = _merge(_minus(shared, defaults), own)
        ordered = {k: body[k] for k in ("description", "data", "model", "train", "evaluate") if k in body}
        head = (f"{DATASET_TITLES[dataset]} / {SECTIONS[row.section]}: {row.framework} {BACKBONES[row.backbone][1]}, "
                f"{'baseline without memory' if baseline else 'MCIBI++'}\n"
                f"Seed row: crop {row.crop[0]}x{row.crop[1]}, LR/POLICY/BS/EPOCH {row.lr:g}/poly/{row.batch}/"
                f"{row.epochs}, {row.train_split}/{row.eval_split}, columns "
                + ", ".join(row.protocols) + f". Model: official {row.official_name}.\n"
                "Generated by `python -m mcibi.catalogue write`; do not edit by hand.")
        files[f"{stem}.yaml"] = _yaml(head, ordered)
    return files


# ------------------------------------------------------------------------------------------------ budgets
# ASSUMED training throughput (images per second per GPU) at a 512x512 crop on an A100/H100-class GPU in fp32/TF32
# with the MCIBI++ head. Not measured here (no GPU was available to this work): replace them with
# `bench/train.py --device cuda` figures. Other crops scale with their pixel count.
ASSUMED_IMAGES_PER_GPU_S = {"r50": 14.0, "r101": 10.0, "s101": 8.0, "hr48": 10.0, "swinl": 6.0}
# parameters of the built models (measured: build_segmentor, pretrained false), for checkpoint sizes
PARAMETERS_M = {"r50": 73, "r101": 133, "s101": 137, "hr48": 106, "swinl": 275}


@dataclass(frozen=True)
class Budget:
    """What one run of a row costs, derived from its schedule (see :func:`budget`)."""

    iterations: int
    images: int
    gpu_hours: float
    checkpoint_gb: float


def budget(row: Row, rate: dict[str, float] | None = None) -> Budget:
    """Iterations = epochs x floor(train images / total batch) (the training loop's count; VSPW: one frame per
    video per epoch, as the official sampler), images = iterations x batch, GPU-hours = images / (assumed
    images/s/GPU at 512x512 x 512^2 / crop pixels) / 3600, checkpoint disk = parameters x 4 bytes x (the final
    weights + ``keep_checkpoints`` resumable ones holding SGD momentum (x2) or AdamW moments (x3))."""
    spec = get_spec(row.dataset)
    iterations = row.epochs * (spec.splits[row.train_split] // row.batch)
    images = iterations * row.batch
    per_s = (rate or ASSUMED_IMAGES_PER_GPU_S)[row.backbone] * (512 * 512) / (row.crop[0] * row.crop[1])
    states = 3 if row.backbone == "swinl" else 2
    ckpt = PARAMETERS_M[row.backbone] * 1e6 * 4 * (1 + _EXECUTION["keep_checkpoints"] * states) / 1e9
    return Budget(iterations, images, images / per_s / 3600, ckpt)


def budget_markdown(dataset: str) -> str:
    """A markdown table of the dataset's runs: iterations, images, GPU-hours (assumed rate), checkpoint disk."""
    lines = ["| experiment | iterations | images seen | GPU-hours (assumed rate) | checkpoints (GB) |",
             "|---|--:|--:|--:|--:|"]
    total_h = total_gb = 0.0
    for row in rows_of(dataset):
        b = budget(row)
        for stem in (row.stem, row.baseline_stem):
            if stem:
                lines.append(f"| `{stem}` | {b.iterations:,} | {b.images:,} | {b.gpu_hours:.0f} "
                             f"| {b.checkpoint_gb:.1f} |")
                total_h += b.gpu_hours
                total_gb += b.checkpoint_gb
    lines.append(f"| **all** | | | **{total_h:.0f}** | **{total_gb:.1f}** |")
    return "\n".join(lines) + "\n"


def load_official_configs(path: str | Path = DEFAULT_OFFICIAL_CONFIGS) -> dict:
    """The official configs dump (``../shared/reference/official_configs.yaml``)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: official configs dump not found; pass --official PATH.")
    return yaml.safe_load(file.read_text())


def write_catalogue(params_root: str | Path, configs: dict, datasets: tuple[str, ...] = DATASETS) -> list[Path]:
    """Write every dataset's params files (atomically); return the paths written."""
    written = []
    for ds in datasets:
        for name, text in generate(ds, configs).items():
            path = Path(params_root) / ds / name
            write_text(path, text)
            written.append(path)
    return written


def check_catalogue(params_root: str | Path, configs: dict, datasets: tuple[str, ...] = DATASETS) -> list[str]:
    """Files that differ from (or are missing against) what :func:`generate` writes."""
    bad = []
    for ds in datasets:
        for name, text in generate(ds, configs).items():
            path = Path(params_root) / ds / name
            if not path.is_file() or path.read_text() != text:
                bad.append(str(path))
    return bad


def main(argv: list[str] | None = None) -> int:
    """``python -m mcibi.catalogue write|check``."""
    parser = argparse.ArgumentParser(prog="python -m mcibi.catalogue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("write", "check", "budget"))
    parser.add_argument("--params-root", type=Path, default=Path("params"))
    parser.add_argument("--official", type=Path, default=DEFAULT_OFFICIAL_CONFIGS)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if a.action == "budget":
        for ds in DATASETS:
            sys.stdout.write(f"\n{ds}\n\n{budget_markdown(ds)}")
        return 0
    configs = load_official_configs(a.official)
    if a.action == "write":
        paths = write_catalogue(a.params_root, configs)
        log.info("wrote %d files under %s", len(paths), a.params_root)
        return 0
    bad = check_catalogue(a.params_root, configs)
    for path in bad:
        log.error("%s differs from the catalogue; run `python -m mcibi.catalogue write`", path)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
