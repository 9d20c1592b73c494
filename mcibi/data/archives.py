"""Reading extracted dataset archives, for the converters and :func:`mcibi.data.prepare.prepare`: extraction,
locating folders and list files, label files mapped through lookup tables, and the :class:`Plan` a converter
returns. A leaf module: it imports nothing else of mcibi's.
"""

from __future__ import annotations

import logging
import re
import stat
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class PreparedDataError(ValueError):
    """A prepared dataset is incomplete or has invalid content; the message names the file."""


# ------------------------------------------------------------------------------------------------ label tables
def label_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A lookup table raw value -> train id; values not in ``mapping`` are invalid (-1)."""
    lut = np.full(size, -1, np.int16)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
    return lut


def apply_table(raw: np.ndarray, lut: np.ndarray, where: Path | str) -> np.ndarray:
    """Map raw label values through ``lut`` to a uint8 train-id map; invalid values raise naming the file."""
    if raw.ndim != 2:
        raise PreparedDataError(f"{where}: expected a single-channel label map, got shape {raw.shape}.")
    values = raw.astype(np.int64, copy=False)
    bad = (values < 0) | (values >= len(lut))
    if not bad.any():
        mapped = lut[values]
        bad = mapped < 0
        if not bad.any():
            return mapped.astype(np.uint8)
    raise PreparedDataError(f"{where}: raw label values {sorted(set(values[bad].tolist()))[:8]} are not part of the "
                            "dataset's label encoding.")


def read_index_png(path: Path) -> np.ndarray:
    """Class indices of a label PNG: palette ("P") images give their palette indices, not colour luminance."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise PreparedDataError(f"{path}: label PNG in mode {im.mode}; expected indices (P, L or 16-bit).")
        return np.asarray(im)


def read_mat(path: Path, *keys: str | int) -> np.ndarray:
    """One array of a MATLAB file, following ``keys`` (field names and indices) into structs."""
    from scipy.io import loadmat

    try:
        value = loadmat(str(path))
    except (ValueError, OSError, NotImplementedError) as exc:
        raise PreparedDataError(f"{path}: unreadable .mat file ({exc}).") from exc
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, ValueError) as exc:
            raise PreparedDataError(f"{path}: no '{key}' in the .mat file.") from exc
    return np.asarray(value)


# --------------------------------------------------------------------------------------------------- extraction
class UnsafeArchiveError(PreparedDataError):
    """An archive member would be written outside the extraction folder, or is a link, device or fifo."""


_LINK_OR_SPECIAL = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                    stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket"}


def _refuse(archive: Path, name: str, why: str) -> UnsafeArchiveError:
    name = name if len(name) <= 120 else name[:117] + "..."
    return UnsafeArchiveError(
        f"{archive}: member {name!r} {why}. Dataset archives hold only files and folders below their own root, so "
        "nothing of this archive is extracted. Delete it and download it again; if the official source or the "
        "mirror serves it like this, do not use that source."
    )


def member_path(archive: Path, name: str) -> PurePosixPath:
    """The normalised relative path a member name denotes, computed on the name alone (never on the disk).

    Refuses empty and absolute names (``/x``, ``\\x``, ``C:x``), NUL characters and any ``..`` component (also
    between backslashes), so the path stays inside the extraction folder whatever the folder holds.
    """
    if not name or "\x00" in name:
        raise _refuse(archive, name, "has an empty or NUL-containing name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise _refuse(archive, name, "has an absolute name")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, name, "has a '..' component (it would land outside the extraction folder)")
    return PurePosixPath(*parts)


def archive_kind(archive: Path) -> str:
    """'zip' or 'tar', sniffed from the content the same way for verification and extraction."""
    if zipfile.is_zipfile(archive):
        return "zip"
    if tarfile.is_tarfile(archive):
        return "tar"
    raise PreparedDataError(f"{archive}: neither a zip nor a tar archive (corrupt, incomplete or another format); "
                            "delete it and download it again.")


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    members = []
    for info in zf.infolist():
        member_path(archive, info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)  # the Unix mode, where the zip recorded one
        if kind in _LINK_OR_SPECIAL:
            raise _refuse(archive, info.filename, f"is {_LINK_OR_SPECIAL[kind]}")
        members.append(info)
    return members


def _tar_members(archive: Path, tar: tarfile.TarFile, read: bool = False) -> list[tarfile.TarInfo]:
    members = []
    for member in tar:  # reads every header (and, with ``read``, every file's bytes: the gzip CRC at the end)
        path = member_path(archive, member.name)
        if member.issym() or member.islnk():
            target = member.linkname if len(member.linkname) <= 80 else member.linkname[:77] + "..."
            raise _refuse(archive, member.name, f"is a {'symbolic' if member.issym() else 'hard'} link (to "
                                                f"{target!r}; no dataset archive needs links)")
        if not (member.isreg() or member.isdir()):
            what = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
                    tarfile.FIFOTYPE: "a fifo"}.get(member.type, f"of unsupported type {member.type!r}")
            raise _refuse(archive, member.name, f"is {what}")
        if member.isreg() and not path.parts:
            raise _refuse(archive, member.name, "is a file named like the extraction folder itself")
        if read and member.isreg():
            fh = tar.extractfile(member)
            while fh.read(1 << 20):
                pass
        if path.parts:  # "./" (the archive's root folder) is the extraction folder itself
            members.append(member)
    return members


def check_members(archive: Path, read: bool = False) -> str:
    """Refuse an archive that has a member outside its root, a link, a device or a fifo; return its kind.

    Every member name is normalised and checked lexically (:func:`member_path`); links of any kind are refused, so
    no path below the extraction folder can lead out of it. With ``read`` every member's bytes are read as well
    (zip: CRC of each member, tar: the whole stream), for archives without a published checksum. Raises
    :class:`UnsafeArchiveError` naming the archive and the member, PreparedDataError for other faults (zip CRC)
    and the tarfile/zipfile/OS errors of an unreadable file.
    """
    kind = archive_kind(archive)
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            _zip_members(archive, zf)
            bad = zf.testzip() if read else None
        if bad is not None:
            raise PreparedDataError(f"{archive}: member {bad} fails its CRC check: the archive is corrupt.")
    else:
        with tarfile.open(archive) as tar:
            _tar_members(archive, tar, read)
    return kind


def extract(archive: Path, dest: Path) -> None:
    """Extract a zip or tar archive into ``dest`` once every member has passed :func:`check_members`' checks.

    Nothing is extracted from an archive with one bad member. tarfile's ``data`` filter stays on as a second line
    (it alone is not enough on every Python this project supports: CVE-2025-4517).
    """
    dest.mkdir(parents=True, exist_ok=True)
    log.info("extracting %s", archive)
    if archive_kind(archive) == "zip":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest, members=_zip_members(archive, zf))
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, members=_tar_members(archive, tar), filter="data")


def locate(root: Path, marker: str, max_depth: int = 5) -> Path:
    """The shallowest folder D under ``root`` where ``D/marker`` exists; PreparedDataError if none does."""
    level = [root]
    for _ in range(max_depth + 1):
        for folder in sorted(level):
            if (folder / marker).exists():
                return folder
        level = [c for f in level for c in f.iterdir() if c.is_dir() and not c.name.startswith("__MACOSX")]
    top = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise PreparedDataError(f"{root}: no '{marker}' in the extracted archives (top level: {top[:10]}); "
                            "is this the right archive?")


def read_ids(path: Path) -> list[str]:
    """Non-empty stripped lines of a list file (first column)."""
    if not path.is_file():
        raise PreparedDataError(f"{path}: missing list file.")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ what converters find
@dataclass
class Plan:
    """What a converter found: for every sample id its image and how to read its train-id label."""

    splits: dict[str, list[str]] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, Callable[[], np.ndarray | Path]] = field(default_factory=dict)  # train ids, or a PNG of them

    def add(self, image_id: str, image: Path, label: Callable[[], np.ndarray | Path]) -> None:
        self.images[image_id] = image
        self.labels[image_id] = label
