"""mcibi: MCIBI++ (MemoryNetV2, TPAMI 2022) semantic segmentation as a reproducible experiment pipeline.

The public API is small: :func:`load_params` reads a strictly validated experiment file,
:func:`build_segmentor` builds the model its ``model`` section describes, :func:`convert_official_checkpoint`
turns an official sssegmentation state dict into that model's and :class:`Segmenter` segments images with a
trained run (torch and timm load on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcibi.spec.params import ExperimentParams, ModelParams, ParamsError, load_params

if TYPE_CHECKING:
    import torch

    from mcibi.models.segmentor import MemorySegmentor

__all__ = ["ExperimentParams", "ModelParams", "ParamsError", "Segmenter", "build_segmentor",
           "convert_official_checkpoint",
           "load_params"]
__version__ = "0.1.0"


def build_segmentor(model_params: ModelParams) -> MemorySegmentor:
    """Build the segmentor described by the ``model`` section of an experiment's params, its backbone initialised
    as ``backbone.pretrained`` says (the official ImageNet file for ``official``)."""
    from mcibi.official.pretrained import build_pretrained_segmentor

    return build_pretrained_segmentor(model_params)


def convert_official_checkpoint(
    state_dict: dict[str, torch.Tensor], model_params: ModelParams
) -> dict[str, torch.Tensor]:
    """Our state dict for ``model_params`` from an official MCIBI++ one; strict (errors name the tensors)."""
    from mcibi.official.checkpoints import convert_official_checkpoint as _convert

    return _convert(state_dict, model_params)


def __getattr__(name: str):
    """``mcibi.Segmenter`` (:mod:`mcibi.evaluation.predict`) loads torch on first use only."""
    if name == "Segmenter":
        from mcibi.evaluation.predict import Segmenter

        return Segmenter
    raise AttributeError(f"module 'mcibi' has no attribute {name!r}")
