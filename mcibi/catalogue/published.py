"""The published mIoU of every seed row and protocol (``mcibi/published.csv``: the seed page's and the official
model zoo's values)."""

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


def published_miou(dataset: str, stem: str, protocol: str, source: str = "seed") -> float | None:
    """The published mIoU (percent) of one row and protocol from ``source`` (seed or official), None if the
    source leaves the cell empty."""
    for rec in published():
        if (rec["dataset"], rec["experiment"], rec["protocol"], rec["source"]) == (dataset, stem, protocol, source):
            return float(rec["miou"]) if rec["miou"] else None
    return None
