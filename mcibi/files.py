"""Atomic file writing: every output is written to a temporary file beside it, then renamed into place.

A job killed half-way (cluster wall time, ``kill -9``) therefore never leaves a truncated checkpoint, metrics
file or table that a later step would trust.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


# OS errors a user must act on, in words (the rest keep their own message)
_WHY = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system"}


class WriteError(RuntimeError):
    """Writing an output failed for a reason the user must fix (full disk, permissions, read-only file system);
    the message names the path and says that the previous version of the file, if any, is unchanged."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


def describe_write_error(exc: OSError, target: str | Path) -> str:
    """One sentence for an OS error met while writing ``target``: what happened, where, and what to do."""
    target = Path(target)
    why = _WHY.get(exc.errno or 0, exc.strerror or str(exc))
    where = exc.filename if exc.filename and Path(exc.filename).parent != target.parent else target
    advice = {errno.ENOSPC: "Free space there (or write elsewhere)", errno.EDQUOT: "Free space within your quota",
              errno.EROFS: "Write to a writable location"}.get(exc.errno or 0, "Make the folder writable for you")
    free = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            free = f", {shutil.disk_usage(_existing(target.parent)).free / 2**20:.0f} MiB free"
    return (f"cannot write {target}: {why} ({where}{free}); nothing was replaced (an existing {target.name} is "
            f"unchanged). {advice}, then rerun.")


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only if the block succeeds.

    A full disk, missing permission or read-only file system raises :class:`WriteError` naming ``path``; the
    partial temporary file is removed and the previous ``path`` is untouched.
    """
    target = Path(path)
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give outputs the usual permissions
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.errno not in _WHY:
            raise
        raise WriteError(describe_write_error(exc, target), exc.errno) from exc
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` that replaces it (mode 0o755) when the block succeeds; removed otherwise,
    so a prepared dataset is either complete or absent."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, indented, trailing newline)."""
    with atomic_open(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


def json_digest(data: Any) -> str:
    """Short sha256 of ``data`` as sorted-key JSON: equal digests, equal content (params, evaluation records)."""
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_open(path) as fh:
        fh.write(text)
