"""Where the experiment spec meets the models: the one module of :mod:`mcibi.models` that reads :mod:`mcibi.spec`.

Every model class takes plain arguments (names, widths, switches); this module maps the ``model`` section of an
experiment's params to them, and converts the params a checkpoint stores beside its weights (plain data in
:mod:`mcibi.models.checkpoint`) to and from :class:`~mcibi.spec.params.ExperimentParams`. The import contract
(``[tool.importlinter]`` in pyproject.toml) keeps every other models module free of the spec.

The ImageNet initialisation ``pretrained: official`` is not the models' business: those files are the official
toolbox's, loaded by :func:`mcibi.official.pretrained.build_pretrained_segmentor` around :func:`build_segmentor`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from mcibi.models.backbone import Backbone
from mcibi.models.checkpoint import write_checkpoint
from mcibi.models.segmentor import HeadChannels, MemoryOptions, MemorySegmentor
from mcibi.spec.params import CONTEXT_MODULES, ExperimentParams, ModelParams, params_from_dict, to_dict


def build_backbone(params: ModelParams) -> Backbone:
    """The backbone of ``params``: timm's ImageNet weights for ``pretrained: true``, random otherwise (``official``
    too: its file is loaded by the caller, see the module docstring)."""
    b = params.backbone
    return Backbone(b.name, b.pretrained is True, b.output_stride, params.align_corners,
                    drop_path_rate=b.drop_path_rate, stem_first_relu=b.stem_first_relu)


def _segmentor(params: ModelParams) -> MemorySegmentor:
    """The segmentor of ``params`` with the backbone :func:`build_backbone` gives (built first: the random draws
    happen in the same order as in one constructor)."""
    p = params
    if p.context_module not in CONTEXT_MODULES[p.framework]:
        raise ValueError(f"framework '{p.framework}' cannot use context module '{p.context_module}' "
                         f"(valid: {CONTEXT_MODULES[p.framework]})")
    memory = None if p.memory.kind == "none" else MemoryOptions(
        p.memory.kind, hard_aggregate=p.memory.hard_aggregate, downsample_before_sa=p.memory.downsample_before_sa,
        force_use_preds_pr=p.memory.force_use_preds_pr)
    return MemorySegmentor(
        build_backbone(p),
        num_classes=p.num_classes,
        context_module=p.context_module,
        fpn=p.framework == "upernet",
        channels=HeadChannels(p.channels.feats, p.channels.transform, p.channels.decoder, p.channels.aux),
        memory=memory,
        pool_scales=p.pool_scales,
        dilations=p.dilations,
        use_self_attention=p.use_self_attention,
        fuse_memory_cwi_before_fpn=p.fuse_memory_cwi_before_fpn,
        aux_head=p.aux_head,
        classifier_kernel=p.classifier_kernel,
        cwi_classifier_kernel=p.cwi_classifier_kernel,
        dropout=p.dropout,
        align_corners=p.align_corners,
    )


def build_segmentor(params: ModelParams) -> MemorySegmentor:
    """The segmentor that ``params`` (the ``model`` section of an experiment file) describes, with its backbone's
    initial weights: random (``pretrained: false``) or timm's (``true``).

    ``pretrained: official`` is an error here, never a silently random backbone: build it with
    :func:`mcibi.official.pretrained.build_pretrained_segmentor` (or :func:`mcibi.build_segmentor`), or use
    :func:`build_for_weights` when every weight comes from a checkpoint.
    """
    if params.backbone.pretrained == "official":
        raise ValueError(f"model.backbone.pretrained: official: the official ImageNet file of "
                         f"'{params.backbone.name}' is loaded by mcibi.official.pretrained.build_pretrained_segmentor "
                         "(or mcibi.build_segmentor); mcibi.models.build_segmentor builds random (false) or "
                         "timm-initialised (true) backbones.")
    return _segmentor(params)


def build_for_weights(params: ModelParams) -> MemorySegmentor:
    """The architecture of ``params`` to load a checkpoint's weights into: no ImageNet download (``pretrained``) and
    no ``init_from``, since every weight is replaced (evaluating or converting must never fetch a file)."""
    return _segmentor(dataclasses.replace(params, init_from=None,
                                          backbone=dataclasses.replace(params.backbone, pretrained=False)))


def save_checkpoint(path: str | Path, model: nn.Module, params: ExperimentParams, **extra: Any) -> None:
    """Write ``model``'s weights and buffers (memory included), ``params`` and ``extra`` (plain data) atomically
    (:func:`mcibi.models.checkpoint.write_checkpoint`)."""
    write_checkpoint(path, model, to_dict(params), **extra)


def checkpoint_params(state: dict[str, Any], path: str | Path) -> ExperimentParams:
    """The params a checkpoint (read by :func:`mcibi.models.checkpoint.load_checkpoint`) was trained with."""
    return params_from_dict(state["params"], path)
