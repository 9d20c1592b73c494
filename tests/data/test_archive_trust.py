"""What an archive must be before anything extracts it.

Hostile archives (built in tests/support/miniature_datasets.py) try to write outside the extraction folder: the
CVE-2025-4517 symlink chain beyond PATH_MAX that tarfile's ``data`` filter misses on unpatched Pythons, ``..`` and
absolute names, a symlink then a file written through it, a hard link to outside, and the zip equivalents. Each
must be refused by ``mcibi verify-archives`` and by ``mcibi prepare`` (also when prepare trusts an earlier
verification record), with the sentinel file outside left as it was.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from miniature_datasets import (
    BUILDERS,
    SENTINEL,
    TAR_ESCAPES,
    ZIP_ESCAPES,
    Server,
    hostile_tar,
    hostile_zip,
    png_gray,
    sha256,
    zip_bytes,
)

from mcibi.cli import main
from mcibi.data.archives import UnsafeArchiveError, extract
from mcibi.data.download import verify_archives
from mcibi.data.prepare import prepare, verify_prepared
from mcibi.data.specs import SSSEG_MIRROR

LIP_MIRROR = SSSEG_MIRROR + "LIP.tar.gz"


@pytest.fixture(scope="module")
def server():
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture
def outside(tmp_path):
    """A folder outside every extraction folder, with a file each attack tries to overwrite."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / SENTINEL).write_text("original\n")
    return folder


def assert_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == [SENTINEL]
    assert (outside / SENTINEL).read_text() == "original\n"


def scratch_of(out: Path) -> Path:
    """Where prepare extracts for ``out`` (atomic_folder's mkdtemp: .<name>.<8 characters>/_raw), same length."""
    return out.parent / f".{out.name}.abcdefgh" / "_raw"


def _refused_everywhere(dataset: str, dl: Path, tmp_path: Path, outside: Path, caplog, member: str) -> None:
    """verify-archives, prepare, and prepare trusting a forged verification record all fail naming the member;
    nothing is written outside, nothing is prepared and the refused archive never becomes a checksum reference."""
    data = tmp_path / "data"
    out = data / dataset
    caplog.clear()
    report = data / f"{dataset}.archives.json"
    assert main(["verify-archives", dataset, "--dest", str(dl), "--report", str(report)]) == 1
    assert f"member '{member}" in caplog.text and "nothing of this archive is extracted" in caplog.text
    assert not report.exists()
    caplog.clear()
    assert main(["prepare", dataset, "--archives", str(dl), "--out", str(out), "--workers", "1"]) == 1
    assert f"member '{member}" in caplog.text
    # a verification record whose sizes match makes prepare skip verifying: extraction checks the members itself
    source = "mirror" if (dl / "LIP.tar.gz").exists() else "official"
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({"dataset": dataset, "source": source, "archives": {
        p.name: {"size": p.stat().st_size, "sha256": sha256(p.read_bytes())} for p in dl.iterdir()}}))
    caplog.clear()
    assert main(["prepare", dataset, "--archives", str(dl), "--out", str(out), "--archive-record", str(forged),
                 "--workers", "1"]) == 1
    assert f"member '{member}" in caplog.text and "nothing of this archive is extracted" in caplog.text
    assert_untouched(outside)
    assert not out.exists() and not [p for p in data.iterdir() if p.name.startswith(f".{dataset}.")]
    assert not (data / f"{dataset}.checksums.json").exists()


def test_the_crafted_chain_escapes_tarfiles_data_filter_alone(tmp_path, outside):
    """The fault the checks below inject is real: on a Python without the CVE-2025-4517 fix, tarfile with
    filter='data' writes through the chain (skipped where this Python's tarfile refuses it by itself)."""
    dest = tmp_path / "plain"
    data = hostile_tar(BUILDERS["lip"]().served[LIP_MIRROR], "symlink_chain_beyond_path_max", outside, dest)
    dest.mkdir()
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.FilterError, OSError) as exc:
        pytest.skip(f"this Python's tarfile refuses the chain by itself ({exc.__class__.__name__})")
    assert (outside / "written.txt").exists() and (outside / SENTINEL).read_text() == "overwritten\n"


@pytest.mark.parametrize("attack", TAR_ESCAPES)
def test_a_hostile_lip_tar_is_refused_before_anything_is_extracted(attack, tmp_path, outside, caplog):
    dl = tmp_path / "downloads" / "lip"
    dl.mkdir(parents=True)
    out = tmp_path / "data" / "lip"
    data = hostile_tar(BUILDERS["lip"]().served[LIP_MIRROR], attack, outside, scratch_of(out))
    (dl / "LIP.tar.gz").write_bytes(data)
    first_bad = {"symlink_chain_beyond_path_max": "a", "dotdot_name": "LIP/../", "absolute_name": "/",
                 "symlink_then_write_through": "LIP/out", "hardlink_to_outside": "LIP/hl"}[attack]
    _refused_everywhere("lip", dl, tmp_path, outside, caplog, first_bad)
    with pytest.raises(UnsafeArchiveError, match=r"LIP\.tar\.gz: member "):  # the extraction on its own
        extract(dl / "LIP.tar.gz", scratch_of(out))
    assert not list(scratch_of(out).iterdir())  # nothing of it was extracted, not even the good members
    assert_untouched(outside)


@pytest.mark.parametrize("attack", ZIP_ESCAPES)
def test_a_hostile_zip_is_refused_before_anything_is_extracted(attack, tmp_path, outside, caplog):
    """LIP's official zips placed by hand (no checksum is published for them)."""
    mini = BUILDERS["lip"]()
    dl = tmp_path / "downloads" / "lip"
    dl.mkdir(parents=True)
    (dl / "TrainVal_images.zip").write_bytes(hostile_zip(mini.manual["TrainVal_images.zip"], attack, outside))
    (dl / "TrainVal_parsing_annotations.zip").write_bytes(mini.manual["TrainVal_parsing_annotations.zip"])
    first_bad = {"zip_dotdot_name": "TrainVal_images/../", "zip_absolute_name": "/",
                 "zip_symlink_entry": "TrainVal_images/out' is a symbolic link"}[attack]
    _refused_everywhere("lip", dl, tmp_path, outside, caplog, first_bad)


def test_a_hostile_zip_nested_in_an_archive_is_refused_when_prepare_extracts_it(tmp_path, outside):
    """LIP's annotation zip holds a zip: verification sees only the outer archive (it passes), extraction checks
    the inner one before writing any of it."""
    mini = BUILDERS["lip"]()
    one = {"TrainVal_parsing_annotations/train_segmentations/x.png": png_gray(np.zeros((5, 7)))}
    inner = hostile_zip(zip_bytes(one), "zip_dotdot_name", outside)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "TrainVal_images.zip").write_bytes(mini.manual["TrainVal_images.zip"])
    (dl / "TrainVal_parsing_annotations.zip").write_bytes(zip_bytes(
        {"TrainVal_parsing_annotations/TrainVal_parsing_annotations.zip": inner}))
    verify_archives("lip", dl)
    with pytest.raises(UnsafeArchiveError, match=r"TrainVal_parsing_annotations\.zip: member 'TrainVal_images/\.\./"):
        prepare("lip", dl, tmp_path / "data" / "lip", workers=1)
    assert_untouched(outside)
    assert not (tmp_path / "data" / "lip").exists()


def test_dot_slash_names_and_a_root_entry_are_still_accepted(tmp_path):
    """`tar -C dir .` writes './' and './LIP/...': normalised, they are ordinary members."""
    mini = BUILDERS["lip"]()
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(mini.served[LIP_MIRROR])) as src, \
            tarfile.open(fileobj=buf, mode="w:gz") as tar:
        root = tarfile.TarInfo(".")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        for member in src:
            member.name = "./" + member.name
            tar.addfile(member, src.extractfile(member))
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "LIP.tar.gz").write_bytes(buf.getvalue())
    out = prepare("lip", dl, tmp_path / "data" / "lip", workers=1)
    assert verify_prepared("lip", out, expected=mini.splits)["splits"]["val"]["images"] == 2
