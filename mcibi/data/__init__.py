"""Datasets: specs, download, preparation, the demo generator, the Dataset class and transforms."""

from mcibi.data.lookup import get_spec
from mcibi.data.specs import DATASETS, IGNORE_INDEX, DatasetSpec

__all__ = ["DATASETS", "IGNORE_INDEX", "DatasetSpec", "get_spec"]
