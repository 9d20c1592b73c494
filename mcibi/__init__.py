"""mcibi: MCIBI++ (MemoryNetV2, TPAMI 2022) semantic segmentation as a reproducible experiment pipeline.

The public API is small: :func:`load_params` reads a strictly validated experiment file and
:func:`build_segmentor` builds the model its ``model`` section describes.
"""

from mcibi.params import ExperimentParams, ParamsError, load_params

__all__ = ["ExperimentParams", "ParamsError", "build_segmentor", "load_params"]
__version__ = "0.1.0"


def build_segmentor(model_params):  # noqa: ANN001, ANN201 - re-exported with the real signature below
    """Build the segmentor described by ``ModelParams`` (imports torch/timm lazily)."""
    from mcibi.models import build_segmentor as _build

    return _build(model_params)
