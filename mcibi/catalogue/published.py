"""The published mIoU of every model-zoo row and protocol (``mcibi/published.csv``: the model-zoo page's and the
official model-zoo page's values)."""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources

PUBLISHED_FILE = "published.csv"


@cache
def published() -> tuple[dict[str, str], ...]:
    """The published mIoU values (``mcibi/published.csv``): one record per row, protocol and source."""
    text = resources.files("mcibi.catalogue").joinpath(PUBLISHED_FILE).read_text()
    return tuple(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))


def published_miou(dataset: str, stem: str, protocol: str, source: str = "model_zoo") -> float | None:
    """The published mIoU (percent) of one row and protocol from ``source`` (``model_zoo``: the model-zoo page,
    ``official``: the official model-zoo page), None if the source leaves the cell empty."""
    for rec in published():
        if (rec["dataset"], rec["experiment"], rec["protocol"], rec["source"]) == (dataset, stem, protocol, source):
            return float(rec["miou"]) if rec["miou"] else None
    return None
