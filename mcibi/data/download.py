"""Getting a dataset's archives and checking them against recorded checksums.

For ``demo`` the "download" is the deterministic generator; real datasets plug their sources in here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mcibi.data.specs import get_spec
from mcibi.data.synthetic import generate_archive, sha256_file

log = logging.getLogger(__name__)


class ArchiveError(RuntimeError):
    """An archive is missing or does not match its recorded checksum."""


def download(dataset: str, dest_dir: str | Path) -> list[Path]:
    """Make every archive of ``dataset`` present in ``dest_dir``; archives already verified are kept."""
    spec = get_spec(dataset)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sha in spec.archives.items():
        path = dest / name
        if path.is_file() and sha is not None and sha256_file(path) == sha:
            log.info("%s already present and verified", path)
        elif dataset == "demo":
            log.info("generating %s", path)
            generate_archive(path)
        else:
            raise ArchiveError(
                f"downloading dataset '{dataset}' is not supported yet: place {name} in {dest} by hand."
            )
        paths.append(path)
    return paths


def verify_archives(dataset: str, dest_dir: str | Path) -> dict:
    """Check each archive's sha256 against the recorded one; return {name: {sha256, size}}.

    An archive without a recorded checksum is reported with its size only (and logged as unverified).
    """
    spec = get_spec(dataset)
    record = {}
    for name, expected in spec.archives.items():
        path = Path(dest_dir) / name
        if not path.is_file():
            raise ArchiveError(f"{path}: missing. Run `mcibi download {dataset}` first.")
        actual = sha256_file(path)
        if expected is not None and actual != expected:
            raise ArchiveError(
                f"{path}: sha256 {actual} does not match the recorded {expected}. The file is corrupt or "
                f"incomplete: delete it and download again."
            )
        if expected is None:
            log.warning("%s: no checksum recorded for this archive; only its size is reported", path)
        record[name] = {"sha256": actual, "size": path.stat().st_size, "verified": expected is not None}
    return {"dataset": dataset, "archives": record}
