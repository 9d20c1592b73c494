"""Models: timm backbone, context heads, the MCIBI++ / MCIBI memories and the segmentor that combines them.

The classes take plain arguments; :mod:`mcibi.models.build` (the package's one reader of the experiment spec) maps
an experiment's ``model`` params to them.
"""

from mcibi.models.build import build_for_weights, build_segmentor
from mcibi.models.memory import DistributionMemory, VectorMemory
from mcibi.models.segmentor import HeadChannels, MemoryOptions, MemorySegmentor, SegmentorOutput

__all__ = ["DistributionMemory", "HeadChannels", "MemoryOptions", "MemorySegmentor", "SegmentorOutput",
           "VectorMemory", "build_for_weights", "build_segmentor"]
