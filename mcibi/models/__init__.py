"""Models: timm backbone, context heads, the MCIBI++ memory and the segmentor that combines them."""

from mcibi.models.memory import DistributionMemory
from mcibi.models.segmentor import MemorySegmentor, SegmentorOutput, build_segmentor

__all__ = ["DistributionMemory", "MemorySegmentor", "SegmentorOutput", "build_segmentor"]
