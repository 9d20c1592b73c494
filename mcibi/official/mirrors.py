"""Where the official files come from: their URLs, optionally through a mirror, fetched into a folder.

A mirror serves the file of ``https://<host>/<path>`` at ``<mirror>/<host>/<path>`` (an offline copy, a local server
in the tests). Each kind of official file has its environment variable naming one, read when a file is fetched:
:data:`PRETRAINED_MIRROR_ENV` for the ImageNet initialisations (:mod:`mcibi.official.pretrained`),
:data:`RELEASE_MIRROR_ENV` for the released checkpoints and logs (:mod:`mcibi.official.released`). Transfers are
resumable (``.part`` + HTTP Range, :func:`mcibi.data.download.fetch`); checking what arrived is the caller's (each
kind records its checksums its own way).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PRETRAINED_MIRROR_ENV = "MCIBI_PRETRAINED_MIRROR"  # serves the official ImageNet files
RELEASE_MIRROR_ENV = "MCIBI_RELEASE_MIRROR"  # serves the authors' released checkpoints and training logs


def mirrored(url: str, mirror: str | None) -> str:
    """``url`` as served by a mirror at ``<mirror>/<host>/<path>``; ``url`` itself without a mirror."""
    if not mirror:
        return url
    u = urlsplit(url)
    return f"{mirror.rstrip('/')}/{u.netloc}{u.path}"


def mirror_from_env(env: str) -> Callable[[str], str]:
    """A URL map through the mirror that the environment variable ``env`` names when it is called (unset or
    empty: the URL unchanged)."""
    return lambda url: mirrored(url, os.environ.get(env))


def fetch_first(urls: Sequence[str], target: Path, url_map: Callable[[str], str]) -> tuple[str, Path]:
    """Download ``target`` from the first of ``urls`` (each through ``url_map``) that delivers it; return that URL
    and the complete ``target.part`` file (the caller checks it and renames it into place).

    Raises :class:`mcibi.data.download.ArchiveError` naming every failure (each is also logged as a warning).
    """
    from mcibi.data.download import ArchiveError, fetch

    errors = []
    for url in urls:
        try:
            return url, fetch(url_map(url), target)
        except ArchiveError as exc:
            errors.append(str(exc))
            log.warning("%s", exc)
    raise ArchiveError("; ".join(errors))


@contextmanager
def machine_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/.<name>.lock``: one download of ``name`` per machine (the processes of a
    multi-GPU run wait for the first one, then find the file)."""
    with open(folder / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
