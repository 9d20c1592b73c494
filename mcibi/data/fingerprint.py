"""A cheap fingerprint of a prepared dataset folder, so that ``verify_data`` reruns when its files change.

The fingerprint hashes every file's relative path and size, plus the contents of the small files that say what
the dataset is (``manifest.json``, the split lists): a stat per image, fractions of a second for 100k files. It
ignores timestamps, so a copy, ``dvc checkout`` or ``dvc pull`` of the same data matches; an edit that keeps a
file's exact byte size is not seen (the loader still checks every pair it reads). ``verify-data`` records it
in ``verified.json``; at DAG-build time :func:`change_stamp` compares it with the folder as it is now and, when
they differ, rewrites a stamp file that ``verify_data`` takes as input, so Snakemake reruns the verification
(and, if it fails, nothing downstream starts). Standard library only: the workflow's parse step imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

RECORD_KEY = "fingerprint"  # where verify-data's report stores it
_SKIP = ("verified.json",)  # verify-data's own report, written after the fingerprint is taken


def fingerprint(folder: str | Path) -> str:
    """sha256 over (relative path, size) of every file under ``folder`` and the contents of its manifest and split
    lists (dot files and ``verified.json`` excluded); ``"absent"`` when the folder does not exist."""
    root = Path(folder)
    if not root.is_dir():
        return "absent"
    rows: list[str] = []

    def walk(path: str, rel: str) -> None:
        with os.scandir(path) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                name = f"{rel}{e.name}"
                if e.is_dir():
                    walk(e.path, name + "/")
                elif name not in _SKIP:
                    rows.append(_row(name, e.path))

    walk(str(root), "")
    return _digest(rows)


def files_fingerprint(folder: str | Path, names: Iterable[str]) -> str:
    """:func:`fingerprint` over the files ``names`` (relative paths) only; a missing one counts as size -1."""
    root = Path(folder)
    rows = []
    for name in names:
        try:
            rows.append(_row(name, str(root / name)))
        except OSError:
            rows.append(f"{name}\t-1\t")
    return _digest(rows)


def _row(name: str, path: str) -> str:
    """A file's line of the fingerprint: relative path, size and, for the manifest and split lists, content."""
    size = os.stat(path).st_size  # follows symlinks (a DVC symlink cache)
    small = name == "manifest.json" or name.startswith("splits/")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if small else ""
    return f"{name}\t{size}\t{digest}"


def _digest(rows: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()[:20]


def recorded(report: str | Path) -> str | None:
    """The fingerprint a ``verify-data`` report holds (None: no report, or one from an older version)."""
    try:
        return json.loads(Path(report).read_text()).get(RECORD_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def change_stamp(folder: str | Path, report: str | Path, stamp: str | Path) -> str:
    """The stamp file ``verify_data`` depends on; rewritten (so newer than the report) only when the folder's
    files differ from those the report verified. A new stamp is dated before the report, so it triggers nothing."""
    stamp_file = Path(stamp)
    if not Path(report).is_file():
        if not stamp_file.exists():  # verification is pending anyway (its report is missing)
            _write(stamp_file, "unverified", old=True)
        return str(stamp_file)
    now, then = fingerprint(folder), recorded(report)
    previous = stamp_file.read_text().strip() if stamp_file.is_file() else None
    if then is None:  # a report of an older version: adopt the folder as it is now as the verified state
        if previous is None or not previous.startswith("adopted "):
            _write(stamp_file, f"adopted {now}", old=True)
            return str(stamp_file)
        then = previous.split()[1]
    if now != then:
        if previous != now:  # once per change: the rerun records ``now`` in the report
            _write(stamp_file, now, old=False)
    elif not stamp_file.exists():
        _write(stamp_file, now, old=True)
    return str(stamp_file)


def _write(path: Path, text: str, old: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    if old:
        os.utime(path, ns=(0, 0))
