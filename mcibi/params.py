"""Experiment parameters: frozen dataclasses and a strict YAML loader.

One YAML file per experiment under ``params/<dataset>/``; an optional ``params/<dataset>/defaults.yaml`` is
deep-merged underneath it (the only defaults layer). After merging, every field must be present, no unknown
key may appear and every value must have the declared type: violations raise :class:`ParamsError` naming the
file and the dotted key, before any job starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULTS_FILE = "defaults.yaml"


class ParamsError(ValueError):
    """A params file is invalid; the message names the file, the key and what to do."""


# --------------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ResizeParams:
    """Resize of the whole image before cropping (train) or before inference (test)."""

    size: tuple[int, int]  # (h, w) target; with keep_ratio the image fits inside it (mmcv "rescale")
    keep_ratio: bool
    ratio_range: tuple[float, float] | None  # random scale factor range (train only), None = fixed


@dataclass(frozen=True)
class RotationParams:
    """Random rotation augmentation (LIP); label fill is the ignore index."""

    prob: float
    max_degrees: float


@dataclass(frozen=True)
class DataParams:
    """Which prepared dataset to use and how its training/testing images are transformed."""

    name: str  # a key of mcibi.data.specs.DATASETS; prepared data lives in <data_root>/<name>/
    train_split: str
    eval_split: str
    crop_size: tuple[int, int]  # (h, w)
    train_resize: ResizeParams
    cat_max_ratio: float  # random crop retried while one class covers more than this share (1.0 = off)
    flip_prob: float
    rotation: RotationParams
    photometric: bool  # mmseg-style PhotoMetricDistortion
    test_resize: ResizeParams
    # image: every training image once per epoch; frame_per_video: one random frame of every training video per
    # epoch (the official VSPW loader; ids '<video>/<frame>'), so an epoch is #videos samples
    train_sampling: Literal["image", "frame_per_video"]


# -------------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class BackboneParams:
    """A timm backbone used through ``features_only``."""

    name: str  # timm model name, e.g. resnet50c, resnet101c, resnet10t
    pretrained: bool
    output_stride: Literal[4, 8, 16, 32]  # HRNet: 4 (its finest branch; the official configs say so)
    drop_path_rate: float  # stochastic depth (official Swin-L: 0.3; CNNs: 0)
    stem_first_relu: bool  # false = official HRNet 'mcibi_version' stem (no ReLU after bn1); HRNet only


@dataclass(frozen=True)
class MemoryParams:
    """The dataset-level memory ("context beyond image") and its update rule."""

    kind: Literal["none", "mcibi++", "mcibi"]  # none = plain framework; mcibi = v1 vector memory (ablation)
    momentum: float  # base momentum m of the per-iteration update
    adjust_momentum_by_lr: bool  # m = base * lr / base_lr
    update_resolution: Literal["full", "feature"]  # full = official (features upsampled to label size)
    hard_aggregate: bool  # one-hot argmax class weights instead of softmax
    downsample_before_sa: bool
    force_use_preds_pr: bool  # gather with the pixel-representation logits even when CWI is on
    warmup_epochs: int  # epochs during which the ground truth replaces the gathering logits


@dataclass(frozen=True)
class ChannelParams:
    """Widths of the head; the official values are feats 512, transform 256, decoder 512, aux 512."""

    feats: int  # C: pixel representations, context-within-image output, memory output
    transform: int  # T: self-attention key/query/value width
    decoder: int  # hidden width of the classifiers and FPN outputs
    aux: int  # hidden width of the auxiliary head


@dataclass(frozen=True)
class ModelParams:
    """Everything :func:`mcibi.build_segmentor` needs."""

    framework: Literal["fcn", "psnet", "upernet", "deeplabv3"]
    # context within image (official context_within_image): fcn none, psnet ppm, deeplabv3 aspp, and upernet
    # ppm or aspp (the official UperNet configs use both)
    context_module: Literal["none", "ppm", "aspp"]
    num_classes: int
    backbone: BackboneParams
    memory: MemoryParams
    channels: ChannelParams
    pool_scales: tuple[int, ...]  # PPM (psnet, upernet)
    dilations: tuple[int, ...]  # ASPP (deeplabv3)
    use_self_attention: bool  # second self-attention between CWI features and memory output (non-FPN)
    fuse_memory_cwi_before_fpn: bool
    aux_head: bool
    classifier_kernel: Literal[1, 3]  # first conv of decoder_cls (official: 3 for UperNet, 1 or 3 otherwise)
    cwi_classifier_kernel: Literal[1, 3]  # first conv of decoder_cwi (official: 3 in 4 configs, else 1)
    dropout: float
    align_corners: bool


# -------------------------------------------------------------------------------------------------------- train
@dataclass(frozen=True)
class OptimizerParams:
    """SGD with momentum (every R-50/R-101 row of the seed tables) or AdamW (Swin rows), with parameter rules."""

    name: Literal["sgd", "adamw"]
    lr: float
    momentum: float  # SGD only
    weight_decay: float
    betas: tuple[float, float]  # AdamW only
    no_decay_norms: bool  # no weight decay on normalisation layers' weights and biases (seed's Swin configs)
    no_decay_keys: tuple[str, ...] | None  # no weight decay on parameters whose name contains one of these
    backbone_lr_mult: float  # lr of the backbone's parameters = lr x this (1.0 = same as the heads)


@dataclass(frozen=True)
class ScheduleParams:
    """Poly decay per iteration, lr = (base - min) * (1 - it / max_it) ** power + min, times a linear warmup.

    During the first ``warmup_iters`` iterations the poly value is scaled by a factor rising linearly from
    ``warmup_ratio`` to 1 (mmseg's ``warmup='linear'``); 0 iterations = no warmup.
    """

    power: float
    min_lr: float
    warmup_iters: int
    warmup_ratio: float


@dataclass(frozen=True)
class ResourceParams:
    """What one job asks its scheduler for (SLURM via the Snakemake executor plugin; local runs use the CPUs)."""

    gpus: int  # 0 = CPU job; > 1 launches torchrun --nproc_per_node=gpus
    cpus_per_gpu: int  # CPU cores per GPU (per job when gpus is 0): data-loading workers and torch threads
    mem_mb: int  # host memory of the job
    runtime: int  # wall-time limit in minutes (a cut training job resumes from its last checkpoint)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the cross-entropy terms (cls, cwi, pr, aux; memory: MCIBI v1 only)."""

    cls: float
    cwi: float
    pr: float
    aux: float
    memory: float  # MCIBI v1 representation consistency: decoder_pr on the stored vectors, from epoch 2 on


@dataclass(frozen=True)
class TrainParams:
    """The optimisation schedule; the batch size is the total over all processes and accumulation steps."""

    seed: int
    total_batch_size: int  # images per optimiser step, whatever the number of GPUs
    batch_per_device: int  # most images one device holds in one forward; more means gradient accumulation
    epochs: int
    optimizer: OptimizerParams
    schedule: ScheduleParams
    loss_weights: LossWeights
    num_workers: int
    log_every: int  # iterations between loss records
    channels_last: bool  # NHWC activations (same arithmetic; faster convolutions on CPU and tensor cores)
    precision: Literal["fp32", "bf16", "fp16"]  # autocast dtype (fp16 adds a gradient scaler); memory stays fp32
    compile: bool  # torch.compile the model for training
    sync_batchnorm: bool  # SyncBatchNorm under multi-GPU DDP (batch statistics over every GPU's images)
    checkpoint_every: int  # iterations between resumable checkpoints (0 = none until the final weights)
    keep_checkpoints: int  # resumable checkpoints kept (the newest N); the final model.pt is kept apart
    resources: ResourceParams


# --------------------------------------------------------------------------------------------------------- eval
@dataclass(frozen=True)
class ProtocolParams:
    """One evaluation protocol: test-time resize, scales, flip, whole or sliding-window inference."""

    # resize of the original image before the scales; null = data.test_resize (official LIP ms+flip: 520x520
    # while ss and flip use 473x473)
    test_resize: ResizeParams | None
    scales: tuple[float, ...]
    flip: bool
    mode: Literal["whole", "slide"]
    crop: tuple[int, int] | None  # (h, w) window for slide mode
    stride: tuple[int, int] | None  # (h, w) stride for slide mode
    probs_before_resize: bool  # softmax before resizing/averaging (official use_probs_before_resize)


PROTOCOL_NAMES = ("ss", "flip", "msflip")
CONTEXT_MODULES = {"fcn": ("none",), "psnet": ("ppm",), "upernet": ("ppm", "aspp"), "deeplabv3": ("aspp",)}
PROTOCOL_TITLES = {"ss": "mIoU", "flip": "mIoU (flip)", "msflip": "mIoU (ms+flip)"}


@dataclass(frozen=True)
class EvalParams:
    """Protocols keyed by name: ``ss`` (single scale), ``flip``, ``msflip`` (multi-scale + flip)."""

    protocols: dict[str, ProtocolParams]
    channels_last: bool  # NHWC activations
    fold_batchnorm: bool  # fold eval-mode BatchNorm into the preceding convolutions (same logits up to rounding)
    window_batch: int  # sliding windows (x flips) per forward pass; bounds GPU memory, not the result
    resources: ResourceParams


# --------------------------------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class ExperimentParams:
    """One experiment = one params file = one training run and its evaluations."""

    description: str
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvalParams
    name: str = ""  # "<dataset>/<file stem>", filled by load_params
    path: str = ""  # the params file, filled by load_params


# ------------------------------------------------------------------------------------------------------ loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, file: Path) -> Any:
    """Convert ``value`` to type ``tp`` or raise ParamsError naming ``file`` and ``key``."""

    def fail(why: str) -> typing.NoReturn:
        raise ParamsError(f"{file}: key '{key}': {why}. Fix the value in the params file.")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, key, file)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            fail("must not be null")
        return _convert(inner[0], value, key, file)
    if origin is Literal:
        if value not in args:
            fail(f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            fail(f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            if not value:
                fail("must not be empty")
            return tuple(_convert(args[0], v, f"{key}[{i}]", file) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f"expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]", file) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict) or not value:
            fail("expected a non-empty mapping")
        return {str(k): _convert(args[1], v, f"{key}.{k}", file) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail(f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(f"expected a string, got {value!r}")
        return value
    fail(f"unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str, file: Path) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    settable = {n for n, f in fields.items() if not (cls is ExperimentParams and n in ("name", "path"))}
    where = f"{prefix}." if prefix else ""
    unknown = sorted(set(data) - settable)
    if unknown:
        raise ParamsError(
            f"{file}: unknown key '{where}{unknown[0]}'"
            f" (valid keys here: {', '.join(sorted(settable))}). Remove or rename it."
        )
    missing = [n for n in sorted(settable) if n not in data]
    if missing:
        raise ParamsError(
            f"{file}: missing required key '{where}{missing[0]}'. Add it to the file or to {DEFAULTS_FILE}."
        )
    return cls(**{n: _convert(hints[n], data[n], f"{where}{n}", file) for n in settable})


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc}).") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping.")
    return data


def _check(params: ExperimentParams, file: Path) -> None:
    """Cross-field checks the types cannot express."""
    from mcibi.data.specs import get_spec

    try:
        spec = get_spec(params.data.name)
    except KeyError as exc:
        raise ParamsError(f"{file}: key 'data.name': {exc.args[0]}") from None
    if params.model.num_classes != spec.num_classes:
        raise ParamsError(
            f"{file}: key 'model.num_classes' is {params.model.num_classes} but dataset '{spec.name}' has "
            f"{spec.num_classes} classes. Set it to {spec.num_classes}."
        )
    for name, proto in params.evaluate.protocols.items():
        if name not in PROTOCOL_NAMES:
            raise ParamsError(
                f"{file}: unknown protocol 'evaluate.protocols.{name}' (valid: {', '.join(PROTOCOL_NAMES)})."
            )
        if proto.mode == "slide" and (proto.crop is None or proto.stride is None):
            raise ParamsError(f"{file}: protocol '{name}' uses slide mode: set both 'crop' and 'stride'.")
        if proto.test_resize is not None and proto.test_resize.ratio_range is not None:
            raise ParamsError(f"{file}: key 'evaluate.protocols.{name}.test_resize.ratio_range' must be null "
                              "(test-time resizing is not random).")
    positive = {
        "train.total_batch_size": params.train.total_batch_size,
        "train.epochs": params.train.epochs,
        "train.log_every": params.train.log_every,
        "train.optimizer.lr": params.train.optimizer.lr,
        "train.batch_per_device": params.train.batch_per_device,
        "train.keep_checkpoints": params.train.keep_checkpoints,
        "train.optimizer.backbone_lr_mult": params.train.optimizer.backbone_lr_mult,
        "evaluate.window_batch": params.evaluate.window_batch,
        "train.resources.cpus_per_gpu": params.train.resources.cpus_per_gpu,
        "evaluate.resources.cpus_per_gpu": params.evaluate.resources.cpus_per_gpu,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ParamsError(f"{file}: key '{key}' must be positive, got {value}.")
    non_negative = {
        "train.checkpoint_every": params.train.checkpoint_every,
        "train.schedule.warmup_iters": params.train.schedule.warmup_iters,
        "train.resources.gpus": params.train.resources.gpus,
        "evaluate.resources.gpus": params.evaluate.resources.gpus,
        "train.num_workers": params.train.num_workers,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ParamsError(f"{file}: key '{key}' must be zero or positive, got {value}.")
    if not 0.0 <= params.train.schedule.warmup_ratio <= 1.0:
        raise ParamsError(f"{file}: key 'train.schedule.warmup_ratio' must be in [0, 1].")
    per_device = min(params.train.batch_per_device, params.train.total_batch_size)
    if params.train.total_batch_size % per_device:
        raise ParamsError(
            f"{file}: key 'train.total_batch_size' ({params.train.total_batch_size}) is not a multiple of "
            f"'train.batch_per_device' ({params.train.batch_per_device}); make it one so that gradient "
            "accumulation covers the batch exactly."
        )
    if not 0.0 < params.model.memory.momentum <= 1.0:
        raise ParamsError(f"{file}: key 'model.memory.momentum' must be in (0, 1].")
    allowed = CONTEXT_MODULES[params.model.framework]
    if params.model.context_module not in allowed:
        raise ParamsError(
            f"{file}: key 'model.context_module' is '{params.model.context_module}', but framework "
            f"'{params.model.framework}' takes {' or '.join(repr(c) for c in allowed)}."
        )
    if not 0.0 <= params.model.backbone.drop_path_rate < 1.0:
        raise ParamsError(f"{file}: key 'model.backbone.drop_path_rate' must be in [0, 1).")
    if not params.model.backbone.stem_first_relu and not params.model.backbone.name.startswith("hrnet"):
        raise ParamsError(
            f"{file}: key 'model.backbone.stem_first_relu' is false, which only HRNet backbones support (the "
            f"official 'mcibi_version' stem). Set it to true for '{params.model.backbone.name}'."
        )


def load_params(path: str | Path) -> ExperimentParams:
    """Load, merge with the directory's ``defaults.yaml`` and strictly validate one experiment file."""
    file = Path(path)
    if not file.is_file():
        raise ParamsError(f"{file}: no such params file. Experiments live in params/<dataset>/<name>.yaml.")
    if file.name == DEFAULTS_FILE:
        raise ParamsError(f"{file}: this is the defaults layer, not an experiment; pass an experiment file.")
    defaults_file = file.parent / DEFAULTS_FILE
    data = _merge(_read_yaml(defaults_file), _read_yaml(file)) if defaults_file.is_file() else _read_yaml(file)
    params = _build(ExperimentParams, data, "", file)
    params = dataclasses.replace(params, name=f"{file.parent.name}/{file.stem}", path=str(file))
    _check(params, file)
    return params


def experiment_files(params_root: str | Path, dataset: str) -> list[Path]:
    """All experiment files of one dataset, sorted (``defaults.yaml`` excluded)."""
    folder = Path(params_root) / dataset
    return sorted(p for p in folder.glob("*.yaml") if p.name != DEFAULTS_FILE)


def to_dict(params: Any) -> dict:
    """Plain nested dict of a params dataclass (tuples as lists), for logging and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(params))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a nested dict (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def params_from_dict(data: dict, source: str | Path) -> ExperimentParams:
    """Rebuild validated params from :func:`to_dict` output (e.g. stored in a checkpoint)."""
    data = dict(data)
    name, path = data.pop("name", ""), data.pop("path", "")
    params = _build(ExperimentParams, data, "", Path(source))
    return dataclasses.replace(params, name=name, path=path)
