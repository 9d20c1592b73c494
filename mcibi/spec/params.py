"""Experiment parameters: frozen dataclasses and a strict YAML loader.

One YAML file per experiment under ``params/<dataset>/``; an optional ``params/<dataset>/defaults.yaml`` is
deep-merged underneath it (the only defaults layer). After merging, every field must be present, no unknown
key may appear and every value must have the declared type: violations raise :class:`ParamsError` naming the
file and the dotted key, before any job starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from mcibi.files import json_digest

DEFAULTS_FILE = "defaults.yaml"


class ParamsError(ValueError):
    """A params file is invalid; the message names the file, the key and what to do."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key  # the dotted key at fault ('' when the file as a whole is)


# --------------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ResizeParams:
    """Resize of the whole image before cropping (train) or before inference (test)."""

    size: tuple[int, int]  # (h, w) target; with keep_ratio the image fits inside it (mmcv "rescale")
    keep_ratio: bool  # keep the aspect ratio (fit inside size); false = resize to size exactly
    ratio_range: tuple[float, float] | None  # random scale factor range (train only); null = fixed


@dataclass(frozen=True)
class RotationParams:
    """Random rotation augmentation (LIP); label fill is the ignore index."""

    prob: float  # probability that a training image is rotated
    max_degrees: float  # the angle is a whole number of degrees drawn from [-max_degrees, max_degrees); 0 = off


@dataclass(frozen=True)
class DataParams:
    """Which prepared dataset to use and how its training/testing images are transformed."""

    name: str  # a key of mcibi.data.specs.DATASETS; prepared data lives in <data_root>/<name>/
    train_split: str  # the split trained on; one the dataset has labels for
    eval_split: str  # the split the evaluations run on
    crop_size: tuple[int, int]  # (h, w) of the random training crop (padded where the image is smaller)
    train_resize: ResizeParams  # resize of each training image before the crop
    cat_max_ratio: float  # random crop retried while one class covers more than this share (1.0 = off)
    flip_prob: float  # probability of a horizontal flip (left/right class pairs swapped where the dataset has them)
    rotation: RotationParams  # random rotation of training images
    photometric: bool  # mmseg-style PhotoMetricDistortion
    test_resize: ResizeParams  # resize of each image before inference (a protocol's test_resize replaces it)
    # image: every training image once per epoch; frame_per_video: one random frame of every training video per
    # epoch (the official VSPW loader; ids '<video>/<frame>'), so an epoch is #videos samples
    train_sampling: Literal["image", "frame_per_video"]


# -------------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class BackboneParams:
    """A timm backbone used through ``features_only``."""

    name: str  # timm model name, e.g. resnet50c, resnet101c, resnet10t
    # false: random init; true: timm's ImageNet weights for `name`; official: the file the official toolbox starts
    # from (open-mmlab V1c ResNets, ResNeSt, HRNet, the Swin 22k release), see mcibi/official/pretrained.py
    pretrained: Literal[False, True, "official"]
    output_stride: Literal[4, 8, 16, 32]  # input size / feature size (dilated ResNets: 8); HRNet: 4 (its finest branch)
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
    downsample_before_sa: bool  # halve the features (3x3 conv, stride 2) before the memory's self-attention
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

    framework: Literal["fcn", "psnet", "upernet", "deeplabv3"]  # the segmentation framework the memory extends
    # context within image (official context_within_image): fcn none, psnet ppm, deeplabv3 aspp, and upernet
    # ppm or aspp (the official UperNet configs use both)
    context_module: Literal["none", "ppm", "aspp"]
    num_classes: int  # classes the model predicts; must be the dataset's
    backbone: BackboneParams  # the feature extractor
    memory: MemoryParams  # the dataset-level memory
    channels: ChannelParams  # widths of the head
    pool_scales: tuple[int, ...]  # PPM (psnet, upernet)
    dilations: tuple[int, ...]  # ASPP (deeplabv3)
    use_self_attention: bool  # second self-attention between CWI features and memory output (non-FPN)
    fuse_memory_cwi_before_fpn: bool  # UperNet: memory output joins the CWI features before the FPN; false: after it
    aux_head: bool  # auxiliary classifier on the backbone's second-last stage (its loss: train.loss_weights.aux)
    classifier_kernel: Literal[1, 3]  # first conv of decoder_cls (official: 3 for UperNet, 1 or 3 otherwise)
    cwi_classifier_kernel: Literal[1, 3]  # first conv of decoder_cwi (official: 3 in 4 configs, else 1)
    dropout: float  # channel dropout (Dropout2d) before the last 1x1 conv of every classifier
    align_corners: bool  # align_corners of every bilinear resize in the model and the losses
    # fine-tune from these weights: an mcibi checkpoint (e.g. a converted released one,
    # runs/<ds>/official/<exp>/model.pt) or an official sssegmentation .pth (converted on load); null = start from
    # the backbone init
    init_from: str | None = None


# -------------------------------------------------------------------------------------------------------- train
@dataclass(frozen=True)
class OptimizerParams:
    """SGD with momentum (every CNN row of the model zoo) or AdamW (its Swin rows), with parameter rules."""

    name: Literal["sgd", "adamw"]  # the optimiser
    lr: float  # base learning rate (of the heads), decayed per iteration by train.schedule
    momentum: float  # SGD only
    weight_decay: float  # SGD: L2 penalty added to the gradient; AdamW: decoupled decay
    betas: tuple[float, float]  # AdamW only
    no_decay_norms: bool  # no weight decay on normalisation layers' weights and biases
    no_decay_keys: tuple[str, ...] | None  # no weight decay on parameters whose name contains one of these
    backbone_lr_mult: float  # lr of the backbone's parameters = lr x this (1.0 = same as the heads)


@dataclass(frozen=True)
class ScheduleParams:
    """Poly decay per iteration, lr = (base - min) * (1 - it / max_it) ** power + min, times a linear warmup.

    During the first ``warmup_iters`` iterations the poly value is scaled by a factor rising linearly from
    ``warmup_ratio`` to 1 (mmseg's ``warmup='linear'``); 0 iterations = no warmup.
    """

    power: float  # exponent of the poly decay
    min_lr: float  # learning rate the decay ends at (the last iteration)
    warmup_iters: int  # iterations of linear warmup; 0 = none
    warmup_ratio: float  # factor the warmup starts from (rising linearly to 1)


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

    cls: float  # the final classifier (decoder_cls)
    cwi: float  # the context-within-image classifier (decoder_cwi; memory models with a context module)
    pr: float  # the pixel-representation classifier (decoder_pr; memory models)
    aux: float  # the auxiliary head (model.aux_head)
    memory: float  # MCIBI v1 representation consistency: decoder_pr on the stored vectors, from epoch 2 on


@dataclass(frozen=True)
class SamplerParams:
    """How an epoch becomes iterations: their number and which images each takes (see :mod:`mcibi.spec.sampler`)."""

    # loader: the shuffled order in global batches, the last partial one dropped (N // total iterations);
    # distributed: torch's DistributedSampler over `replicas` processes with a DataLoader of total / replicas
    # images and drop_last on each, as the official training: the order padded to a multiple of `replicas` with
    # its first images, ceil(N / replicas) // (total / replicas) iterations
    kind: Literal["loader", "distributed"]
    # distributed: the process count the epoch is laid out for (the official runs: 8 GPUs), whatever our run
    # uses; it must divide train.total_batch_size. loader: 1
    replicas: int


@dataclass(frozen=True)
class TrainParams:
    """The optimisation schedule; the batch size is the total over all processes and accumulation steps."""

    seed: int  # random seed of the run: initialisation, data order and augmentation
    total_batch_size: int  # images per optimiser step, whatever the number of GPUs
    batch_per_device: int  # most images one device holds in one forward; more means gradient accumulation
    epochs: int  # passes over the training set; iterations = epochs x the iterations of one epoch (train.sampler)
    sampler: SamplerParams  # how an epoch becomes iterations
    optimizer: OptimizerParams  # the optimiser and its parameter rules
    schedule: ScheduleParams  # the learning-rate schedule
    loss_weights: LossWeights  # weights of the loss terms
    num_workers: int  # data-loading worker processes per training process
    log_every: int  # iterations between loss records
    # NHWC activations (same arithmetic up to rounding): faster convolutions on tensor cores and AVX-512 CPUs,
    # slower backward on AVX2 CPUs; auto = NHWC on CUDA and AVX-512 CPUs, NCHW elsewhere
    channels_last: Literal[False, True, "auto"]
    precision: Literal["fp32", "bf16", "fp16"]  # autocast dtype (fp16 adds a gradient scaler); memory stays fp32
    compile: bool  # torch.compile the model for training
    sync_batchnorm: bool  # SyncBatchNorm under multi-GPU DDP (batch statistics over every GPU's images)
    checkpoint_every: int  # iterations between resumable checkpoints (0 = none until the final weights)
    keep_checkpoints: int  # resumable checkpoints kept (the newest N); the final model.pt is kept apart
    resources: ResourceParams  # what the training job asks for


# --------------------------------------------------------------------------------------------------------- eval
@dataclass(frozen=True)
class ProtocolParams:
    """One evaluation protocol: test-time resize, scales, flip, whole or sliding-window inference."""

    # resize of the original image before the scales; null = data.test_resize (official LIP ms+flip: 520x520
    # while ss and flip use 473x473)
    test_resize: ResizeParams | None
    scales: tuple[float, ...]  # scale factors of the (resized) image, predictions averaged; [1.0] = single scale
    flip: bool  # also predict the horizontally flipped image and average
    # whole image, or sliding windows: 'slide' reads crop and stride as (h, w), as the official slideinference reads
    # its cropsize and stride (CityScapes' [1024, 512]: windows 1024 high, 512 wide); 'slide_wh' reads them as
    # (w, h), the order of the official configs' Resize sizes ([1024, 512]: windows 512 high, 1024 wide)
    mode: Literal["whole", "slide", "slide_wh"]
    crop: tuple[int, int] | None  # window in slide modes, in the mode's order
    stride: tuple[int, int] | None  # stride in slide modes, in the mode's order
    probs_before_resize: bool  # softmax before resizing/averaging (official use_probs_before_resize)

    def windows_hw(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """(window, stride) as (h, w) whatever order the mode reads them in; None in whole mode.

        The one place the two readings meet, so that inference only knows (h, w)."""
        if self.mode == "whole":
            return None
        if self.crop is None or self.stride is None:
            raise ValueError(f"protocol mode '{self.mode}' needs both crop and stride, got {self.crop} and "
                             f"{self.stride}.")
        if self.mode == "slide_wh":
            return (self.crop[1], self.crop[0]), (self.stride[1], self.stride[0])
        return self.crop, self.stride


PROTOCOL_NAMES = ("ss", "flip", "msflip")
SLIDE_MODES = ("slide", "slide_wh")  # ProtocolParams.mode values that run sliding windows
CONTEXT_MODULES = {"fcn": ("none",), "psnet": ("ppm",), "upernet": ("ppm", "aspp"), "deeplabv3": ("aspp",)}
PROTOCOL_TITLES = {"ss": "mIoU", "flip": "mIoU (flip)", "msflip": "mIoU (ms+flip)"}


@dataclass(frozen=True)
class EvalParams:
    """Protocols keyed by name: ``ss`` (single scale), ``flip``, ``msflip`` (multi-scale + flip)."""

    protocols: dict[str, ProtocolParams]  # the evaluations of the experiment by name: ss, flip, msflip
    channels_last: bool  # NHWC activations
    fold_batchnorm: bool  # fold eval-mode BatchNorm into the preceding convolutions (same logits up to rounding)
    window_batch: int  # sliding windows (x flips) per forward pass; bounds GPU memory, not the result
    resources: ResourceParams  # what each evaluation job asks for


# --------------------------------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class ExperimentParams:
    """One experiment = one params file = one training run and its evaluations."""

    description: str  # what the experiment is, in a sentence (logged with the run)
    data: DataParams  # the dataset and its transforms
    model: ModelParams  # the network
    train: TrainParams  # the optimisation
    evaluate: EvalParams  # the evaluation protocols and their jobs
    name: str = ""  # "<dataset>/<file stem>", filled by load_params
    path: str = ""  # the params file, filled by load_params


# ------------------------------------------------------------------------------------------------------ loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, file: Path) -> Any:
    """Convert ``value`` to type ``tp`` or raise ParamsError naming ``file`` and ``key``."""

    def fail(why: str) -> typing.NoReturn:
        raise ParamsError(f"{file}: key '{key}': {why}. Fix the value in the params file.", key)

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
    if origin is Literal:  # by type too: YAML's true is not the 1 of Literal[1, 3], nor 1 the true of a switch
        if not any(value == a and type(value) is type(a) for a in args):
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
    if tp is int:  # a whole number written as a float (1e3, 2.0) is that integer, as JSON Schema's 'integer'
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail(f"expected a number, got {value!r}")
        if not math.isfinite(value):
            fail(f"expected a finite number, got {value!r} (.nan and .inf would stop the run at its first step)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(f"expected a string, got {value!r}")
        return value
    fail(f"unsupported type {_type_name(tp)}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The field types of a params dataclass (resolving the annotations once, not per file)."""
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict, prefix: str, file: Path) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    settable = {n for n, f in fields.items() if not (cls is ExperimentParams and n in ("name", "path"))}
    where = f"{prefix}." if prefix else ""
    unknown = sorted(set(data) - settable)
    if unknown:
        raise ParamsError(
            f"{file}: unknown key '{where}{unknown[0]}'"
            f" (valid keys here: {', '.join(sorted(settable))}). Remove or rename it.", f"{where}{unknown[0]}"
        )
    missing = [n for n in sorted(settable) if n not in data]
    if missing:
        raise ParamsError(
            f"{file}: missing required key '{where}{missing[0]}'. Add it to the file or to {DEFAULTS_FILE}."
        )
    return cls(**{n: _convert(hints[n], data[n], f"{where}{n}", file) for n in settable})


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Floats in exponent notation without a dot or without the exponent's sign (1e-2, 1E-3, 5e+4, 1.0e5): numbers in
# YAML 1.2, which people and most tools read, but strings to PyYAML's YAML 1.1 resolver. Anchored at both ends.
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
FLOAT_FIRST_CHARS = list("-+0123456789.")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's safe loader where PyYAML was built with it (the same documents, 5x faster than the pure-Python one;
    the workflow's parse step reads every params file of the catalogue), reading :data:`EXPONENT_FLOAT` as floats."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, FLOAT_FIRST_CHARS)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc}).") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping.")
    return data


def _fail(file: Path, key: str, why: str) -> typing.NoReturn:
    raise ParamsError(f"{file}: key '{key}' {why}", key)


@functools.lru_cache(maxsize=1)
def timm_model_names() -> frozenset[str]:
    """Architecture names timm registers, read from its source files (importing timm would import torch, which
    the workflow's parse step must not); empty when timm is not installed."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    found = re.compile(r"@register_model\s*\ndef\s+(\w+)\s*\(")
    return frozenset(n for f in models.glob("*.py") for n in found.findall(f.read_text(encoding="utf-8")))


def _check(params: ExperimentParams, file: Path) -> None:
    """Cross-field and range checks the types cannot express."""
    from mcibi.data.lookup import get_spec

    try:
        spec = get_spec(params.data.name)
    except KeyError as exc:
        raise ParamsError(f"{file}: key 'data.name': {exc.args[0]}", "data.name") from None
    if params.model.num_classes != spec.num_classes:
        _fail(file, "model.num_classes", f"is {params.model.num_classes} but dataset '{spec.name}' has "
              f"{spec.num_classes} classes. Set it to {spec.num_classes}.")
    _check_evaluate(params.evaluate, file)
    _check_train(params.train, file)
    _check_data(params.data, spec, file)
    _check_model(params.model, file)


def _check_data(d: DataParams, spec: Any, file: Path) -> None:
    labelled = [s for s in spec.splits if s not in spec.unlabelled_splits]
    if d.train_split not in labelled:
        _fail(file, "data.train_split", f"is '{d.train_split}', which dataset '{spec.name}' has no labels for "
              f"(labelled splits: {', '.join(labelled)}).")
    if d.eval_split not in spec.splits:
        _fail(file, "data.eval_split", f"is '{d.eval_split}', a split dataset '{spec.name}' does not have "
              f"(splits: {', '.join(spec.splits)}).")
    for key, resize in (("data.train_resize", d.train_resize), ("data.test_resize", d.test_resize)):
        if min(resize.size) <= 0:
            _fail(file, f"{key}.size", f"must be positive, got {list(resize.size)}.")
        if resize.ratio_range is not None:
            lo, hi = resize.ratio_range
            if not 0 < lo <= hi:
                _fail(file, f"{key}.ratio_range", f"must be [low, high] with 0 < low <= high, got [{lo}, {hi}].")
    if min(d.crop_size) <= 0:
        _fail(file, "data.crop_size", f"must be positive, got {list(d.crop_size)}.")
    # the largest training image after the random resize: a crop beyond it is all padding around the image
    r = d.train_resize
    top = r.ratio_range[1] if r.ratio_range is not None else 1.0
    if r.keep_ratio:
        fits = max(d.crop_size) <= max(r.size) * top and min(d.crop_size) <= min(r.size) * top
    else:
        fits = all(c <= s * top for c, s in zip(d.crop_size, r.size, strict=True))
    if not fits:
        _fail(file, "data.crop_size", f"{list(d.crop_size)} is larger than the largest resized training image "
              f"(data.train_resize.size {list(r.size)} x {top}): every crop would be mostly padding. Use a crop "
              "within the resized images or resize them larger.")
    for key, value in (("data.flip_prob", d.flip_prob), ("data.rotation.prob", d.rotation.prob)):
        if not 0.0 <= value <= 1.0:
            _fail(file, key, f"is a probability and must be in [0, 1], got {value}.")
    if not 0.0 < d.cat_max_ratio <= 1.0:
        _fail(file, "data.cat_max_ratio", f"must be in (0, 1] (1 = off), got {d.cat_max_ratio}.")
    if d.rotation.max_degrees < 0:
        _fail(file, "data.rotation.max_degrees", f"must be zero or positive, got {d.rotation.max_degrees}.")


def _check_model(m: ModelParams, file: Path) -> None:
    known = timm_model_names()
    arch = m.backbone.name.split(".", 1)[0]  # timm names may carry a pretrained tag: <arch>.<tag>
    if known and arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        _fail(file, "model.backbone.name", f"'{m.backbone.name}' is not a timm model"
              f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}. Use a name timm.list_models() "
              "gives.")
    if not 0.0 < m.memory.momentum <= 1.0:
        _fail(file, "model.memory.momentum", f"must be in (0, 1], got {m.memory.momentum}.")
    if m.memory.warmup_epochs < 0:
        _fail(file, "model.memory.warmup_epochs", f"must be zero or positive, got {m.memory.warmup_epochs}.")
    allowed = CONTEXT_MODULES[m.framework]
    if m.context_module not in allowed:
        _fail(file, "model.context_module", f"is '{m.context_module}', but framework '{m.framework}' takes "
              f"{' or '.join(repr(c) for c in allowed)}.")
    if not 0.0 <= m.backbone.drop_path_rate < 1.0:
        _fail(file, "model.backbone.drop_path_rate", f"must be in [0, 1), got {m.backbone.drop_path_rate}.")
    if not 0.0 <= m.dropout < 1.0:
        _fail(file, "model.dropout", f"is a probability and must be in [0, 1), got {m.dropout}.")
    if not m.backbone.stem_first_relu and not m.backbone.name.startswith("hrnet"):
        _fail(file, "model.backbone.stem_first_relu", "is false, which only HRNet backbones support (the official "
              f"'mcibi_version' stem). Set it to true for '{m.backbone.name}'.")
    for key, values in (("model.pool_scales", m.pool_scales), ("model.dilations", m.dilations),
                        ("model.channels", dataclasses.astuple(m.channels))):
        if min(values) <= 0:
            _fail(file, key, f"must be positive, got {list(values)}.")


def _check_train(t: TrainParams, file: Path) -> None:
    positive = {
        "train.total_batch_size": t.total_batch_size, "train.epochs": t.epochs, "train.log_every": t.log_every,
        "train.optimizer.lr": t.optimizer.lr, "train.batch_per_device": t.batch_per_device,
        "train.keep_checkpoints": t.keep_checkpoints, "train.optimizer.backbone_lr_mult": t.optimizer.backbone_lr_mult,
        "train.resources.cpus_per_gpu": t.resources.cpus_per_gpu, "train.resources.mem_mb": t.resources.mem_mb,
        "train.resources.runtime": t.resources.runtime, "train.schedule.power": t.schedule.power,
    }
    non_negative = {
        "train.checkpoint_every": t.checkpoint_every, "train.schedule.warmup_iters": t.schedule.warmup_iters,
        "train.resources.gpus": t.resources.gpus, "train.num_workers": t.num_workers,
        "train.optimizer.momentum": t.optimizer.momentum, "train.optimizer.weight_decay": t.optimizer.weight_decay,
        "train.schedule.min_lr": t.schedule.min_lr,
    } | {f"train.loss_weights.{k}": v for k, v in dataclasses.asdict(t.loss_weights).items()}
    _check_signs(positive, non_negative, file)
    if not 0.0 <= t.schedule.warmup_ratio <= 1.0:
        _fail(file, "train.schedule.warmup_ratio", f"must be in [0, 1], got {t.schedule.warmup_ratio}.")
    if t.schedule.min_lr > t.optimizer.lr:
        _fail(file, "train.schedule.min_lr", f"({t.schedule.min_lr}) is above train.optimizer.lr "
              f"({t.optimizer.lr}): the poly schedule would raise the lr. Make it at most the lr.")
    if t.optimizer.momentum >= 1.0:
        _fail(file, "train.optimizer.momentum", f"must be below 1, got {t.optimizer.momentum}.")
    if not all(0.0 <= b < 1.0 for b in t.optimizer.betas):
        _fail(file, "train.optimizer.betas", f"must be in [0, 1), got {list(t.optimizer.betas)}.")
    _check_sampler(t, file)
    per_device = min(t.batch_per_device, t.total_batch_size)
    if t.total_batch_size % per_device:
        _fail(file, "train.total_batch_size", f"({t.total_batch_size}) is not a multiple of "
              f"'train.batch_per_device' ({t.batch_per_device}); make it one so that gradient accumulation covers "
              "the batch exactly.")


def _check_sampler(t: TrainParams, file: Path) -> None:
    """``train.sampler``: one stream for ``loader``; for ``distributed`` replicas that share the batch evenly."""
    s = t.sampler
    if s.replicas <= 0:
        _fail(file, "train.sampler.replicas", f"must be positive, got {s.replicas}.")
    if s.kind == "loader" and s.replicas != 1:
        _fail(file, "train.sampler.replicas", f"is {s.replicas}, but kind 'loader' lays the epoch out as one stream: "
              "set 1, or kind 'distributed' for DistributedSampler's layout over that many replicas.")
    if s.kind == "distributed" and t.total_batch_size % s.replicas:
        _fail(file, "train.sampler.replicas", f"({s.replicas}) does not divide train.total_batch_size "
              f"({t.total_batch_size}): each replica's DataLoader takes total / replicas images per iteration. Use "
              "a divisor of the batch (the official runs: 8).")


def _check_evaluate(e: EvalParams, file: Path) -> None:
    for name, proto in e.protocols.items():
        key = f"evaluate.protocols.{name}"
        if name not in PROTOCOL_NAMES:
            raise ParamsError(f"{file}: unknown protocol '{key}' (valid: {', '.join(PROTOCOL_NAMES)}).", key)
        if min(proto.scales) <= 0:
            _fail(file, f"{key}.scales", f"must be positive, got {list(proto.scales)}.")
        if proto.test_resize is not None:
            if min(proto.test_resize.size) <= 0:
                _fail(file, f"{key}.test_resize.size", f"must be positive, got {list(proto.test_resize.size)}.")
            if proto.test_resize.ratio_range is not None:
                _fail(file, f"{key}.test_resize.ratio_range", "must be null (test-time resizing is not random).")
        if proto.mode in SLIDE_MODES:
            if proto.crop is None or proto.stride is None:
                raise ParamsError(f"{file}: protocol '{name}' uses {proto.mode} mode: set both 'crop' and 'stride'.",
                                  key)
            if min(proto.crop) <= 0 or min(proto.stride) <= 0:
                _fail(file, key, f"slide crop and stride must be positive, got {list(proto.crop)} and "
                      f"{list(proto.stride)}.")
            if any(s > c for s, c in zip(proto.stride, proto.crop, strict=True)):
                _fail(file, f"{key}.stride", f"{list(proto.stride)} exceeds the window {list(proto.crop)}: pixels "
                      "between windows would never be predicted.")
    _check_signs({"evaluate.window_batch": e.window_batch, "evaluate.resources.cpus_per_gpu": e.resources.cpus_per_gpu,
                  "evaluate.resources.mem_mb": e.resources.mem_mb, "evaluate.resources.runtime": e.resources.runtime},
                 {"evaluate.resources.gpus": e.resources.gpus}, file)


def _check_signs(positive: dict[str, float], non_negative: dict[str, float], file: Path) -> None:
    for key, value in positive.items():
        if value <= 0:
            _fail(file, key, f"must be positive, got {value}.")
    for key, value in non_negative.items():
        if value < 0:
            _fail(file, key, f"must be zero or positive, got {value}.")


def _origin(key: str, layers: list[tuple[Path, dict]]) -> Path | None:
    """The last layer (file) that sets ``key`` (dotted, list indices allowed), or None."""
    parts = re.sub(r"\[\d+\]", "", key).split(".") if key else []
    for file, data in reversed(layers):
        node: Any = data
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            if parts:
                return file
    return None


def load_params(path: str | Path) -> ExperimentParams:
    """Load, merge with the directory's ``defaults.yaml`` and strictly validate one experiment file."""
    file = Path(path)
    if not file.is_file():
        raise ParamsError(f"{file}: no such params file. Experiments live in params/<dataset>/<name>.yaml.")
    if file.name == DEFAULTS_FILE:
        raise ParamsError(f"{file}: this is the defaults layer, not an experiment; pass an experiment file.")
    defaults_file = file.parent / DEFAULTS_FILE
    layers = [(defaults_file, _read_yaml(defaults_file))] if defaults_file.is_file() else []
    layers.append((file, _read_yaml(file)))
    data = merge(layers[0][1], layers[-1][1]) if len(layers) == 2 else layers[0][1]
    try:
        params = _build(ExperimentParams, data, "", file)
        params = dataclasses.replace(params, name=f"{file.parent.name}/{file.stem}", path=str(file))
        _check(params, file)
    except ParamsError as exc:
        source = _origin(exc.key, layers)
        if source is None or source == file:
            raise
        # the faulty value comes from the defaults layer: name that file (and the experiment it was merged into)
        message = str(exc).replace(f"{file}:", f"{source} (the defaults layer of {file.name}):", 1)
        fix = "Fix the value in the params file."
        message = message.replace(fix, f"Fix it in {source}.") if fix in message else f"{message} Fix it in {source}."
        raise ParamsError(message, exc.key) from None
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


# Keys added after checkpoints were first written, with the value that reproduces what older versions did. A
# checkpoint whose stored params lack one loads with this value (params files themselves must state every key).
LEGACY_DEFAULTS: dict[str, Any] = {
    "data.train_sampling": "image",
    "model.context_module": lambda d: CONTEXT_MODULES[d["model"]["framework"]][0],  # UperNet was always PPM
    "train.sampler": lambda d: {"kind": "loader", "replicas": 1},  # N // total iterations, no padding
}


def params_from_dict(data: dict, source: str | Path) -> ExperimentParams:
    """Rebuild validated params from :func:`to_dict` output (e.g. stored in a checkpoint).

    Params written by an older version may lack keys added since; those take their :data:`LEGACY_DEFAULTS`.
    """
    data = copy.deepcopy(data)
    name, path = data.pop("name", ""), data.pop("path", "")
    for key, default in LEGACY_DEFAULTS.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = default(data) if callable(default) else default
    params = _build(ExperimentParams, data, "", Path(source))
    return dataclasses.replace(params, name=name, path=path)


# Params that say how a run executes, not what it computes: a checkpoint resumes across changes of these (more
# wall time, another GPU count, a different checkpoint interval, the memory layout), and the workflow does not
# retrain for them. Some change float rounding (compile, layout, accumulation), as the CPU's instruction set does.
EXECUTION_KEYS = ("train.checkpoint_every", "train.keep_checkpoints", "train.resources", "train.num_workers",
                  "train.log_every", "train.batch_per_device", "train.compile", "train.channels_last", "evaluate",
                  "description")


class Untracked:
    """A workflow rule param that says how a job runs (launcher, threads), not what it computes: Snakemake's params
    rerun trigger compares only values of builtin types, so wrapping one keeps its edits from rerunning the job."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return str(self.value)


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def trajectory(params: ExperimentParams) -> dict[str, Any]:
    """The params that decide the weights a run ends with (dotted keys; everything but :data:`EXECUTION_KEYS`)."""
    flat = flatten({k: v for k, v in to_dict(params).items() if k not in ("name", "path")})
    return {k: v for k, v in flat.items() if not _matches(k, EXECUTION_KEYS)}


def trajectory_hash(params: ExperimentParams) -> str:
    """Short hash of :func:`trajectory`: the workflow retrains when, and only when, it changes."""
    return json_digest(trajectory(params))


# what an evaluation's numbers depend on besides the checkpoint (which carries the model) and its protocol
EVALUATION_KEYS = ("data.name", "data.eval_split", "data.test_resize", "evaluate.channels_last",
                   "evaluate.fold_batchnorm")


def protocol_hash(params: ExperimentParams, protocol: str) -> str:
    """Short hash of what evaluating ``protocol`` depends on: that protocol and the test-time data settings (other
    protocols, resources and the description do not count)."""
    flat = flatten({k: v for k, v in to_dict(params).items() if k not in ("name", "path")})
    data = {k: v for k, v in flat.items() if _matches(k, EVALUATION_KEYS)}
    data |= {k: v for k, v in flat.items() if _matches(k, (f"evaluate.protocols.{protocol}",))}
    return json_digest(data)
