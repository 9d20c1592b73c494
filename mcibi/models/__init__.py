"""Models: timm backbone, context heads, the MCIBI++ / MCIBI memories and the segmentor that combines them."""

from mcibi.models.memory import DistributionMemory, VectorMemory
from mcibi.models.segmentor import MemorySegmentor, SegmentorOutput, build_for_weights, build_segmentor

__all__ = ["DistributionMemory", "MemorySegmentor", "SegmentorOutput", "VectorMemory", "build_for_weights",
           "build_segmentor"]
