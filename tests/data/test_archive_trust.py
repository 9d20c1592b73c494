"""What an archive must be before anything extracts it, and that it stays the same file.

Hostile archives (built in tests/support/miniature_datasets.py) try to write outside the extraction folder: the
CVE-2025-4517 symlink chain beyond PATH_MAX that tarfile's ``data`` filter misses on unpatched Pythons, ``..`` and
absolute names, a symlink then a file written through it, a hard link to outside, and the zip equivalents. Each
must be refused by ``mcibi verify-archives`` and by ``mcibi prepare`` (also when prepare trusts an earlier
verification record), with the sentinel file outside left as it was. Archives without a published checksum are
recorded on their first verification; a different file later is refused, also on another clone.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
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
    local_path,
    png_gray,
    sha256,
    zip_bytes,
)

from mcibi.cli import main
from mcibi.data.archives import UnsafeArchiveError, extract
from mcibi.data.download import ArchiveError, download, verify_archives
from mcibi.data.lookup import get_spec
from mcibi.data.prepare import prepare, verify_prepared
from mcibi.data.specs import SSSEG_MIRROR

LIP_MIRROR = SSSEG_MIRROR + "LIP.tar.gz"
COCO_URL = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip"


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


def test_a_file_that_is_no_archive_is_refused_naming_it(tmp_path):
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "LIP.tar.gz").write_bytes(b"<html>not the archive</html>" * 20)
    with pytest.raises(ArchiveError, match=r"LIP\.tar\.gz: neither a zip nor a tar archive .*download it again"):
        verify_archives("lip", dl)


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


# ------------------------------------------------------------------------------------- first-seen sha256 record
def _changed_lip_mirror(mini) -> bytes:
    """The mirror's LIP.tar.gz with one label pixel changed: a valid archive, just not the same file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(mini.served[LIP_MIRROR])) as src, \
            tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member in src:
            data = src.extractfile(member).read()
            if member.name == "LIP/train_segmentations/77_471474.png":
                data = png_gray(np.ones((5, 7)))
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def test_an_unpublished_archive_is_recorded_on_first_download_and_another_clone_refuses_a_changed_one(
        server, tmp_path):
    """LIP's mirror archive has no published checksum. Clone A downloads it and records its sha256 in
    data/lip.checksums.json (DVC-tracked); clone B got that record with `dvc pull`; the mirror now serves another
    file: B refuses it, saying which file, both sha256 and what to do; deleting the entry accepts the new file."""
    mini = BUILDERS["lip"]()
    server.serve(mini)
    spec = get_spec("lip")  # the real spec: nothing recorded for LIP.tar.gz
    record_a = tmp_path / "a" / "data" / "lip.checksums.json"
    download(spec, tmp_path / "a" / "downloads", url_map=server.url_map, retry_delay=0, checksums=record_a)
    first = sha256(mini.served[LIP_MIRROR])
    entry = json.loads(record_a.read_text())["archives"]["mirror/LIP.tar.gz"]
    assert entry["sha256"] == first and entry["size"] == len(mini.served[LIP_MIRROR])
    again = verify_archives(spec, tmp_path / "a" / "downloads", record_a)["archives"]["LIP.tar.gz"]
    assert again["verified"] is False and "sha256 matches the one recorded" in again["checked_with"]

    record_b = tmp_path / "b" / "data" / "lip.checksums.json"
    record_b.parent.mkdir(parents=True)
    shutil.copy(record_a, record_b)  # what `dvc pull` gives the second clone
    changed = _changed_lip_mirror(mini)
    server.files[local_path(LIP_MIRROR)] = changed
    dl_b = tmp_path / "b" / "downloads"
    with pytest.raises(ArchiveError) as err:
        download(spec, dl_b, url_map=server.url_map, retry_delay=0, checksums=record_b)
    msg = str(err.value)
    for needle in (str(dl_b / "LIP.tar.gz"), f"sha256 {sha256(changed)}", f"sha256 {first}", str(record_b),
                   "delete the entry 'mirror/LIP.tar.gz'", "the downloaded file was deleted"):
        assert needle in msg, needle
    assert not list(dl_b.glob("LIP.tar.gz*"))
    # the same file placed by hand: verify-archives and prepare refuse it too, nothing is prepared
    (dl_b / "LIP.tar.gz").write_bytes(changed)
    with pytest.raises(ArchiveError, match=f"sha256 {sha256(changed)} .* differs from the sha256 {first}"):
        verify_archives(spec, dl_b, record_b)
    with pytest.raises(ArchiveError, match="differs from the sha256"):
        prepare(spec, dl_b, tmp_path / "b" / "data" / "lip", workers=1, checksums=record_b)
    assert not (tmp_path / "b" / "data" / "lip").exists()
    assert json.loads(record_b.read_text()) == json.loads(record_a.read_text())  # the reference is kept
    # the upstream file changed for good: delete the entry, the new file becomes the reference
    (dl_b / "LIP.tar.gz").unlink()
    data = json.loads(record_b.read_text())
    del data["archives"]["mirror/LIP.tar.gz"]
    record_b.write_text(json.dumps(data))
    download(spec, dl_b, url_map=server.url_map, retry_delay=0, checksums=record_b)
    assert json.loads(record_b.read_text())["archives"]["mirror/LIP.tar.gz"]["sha256"] == sha256(changed)


def test_cli_verify_archives_keeps_the_record_beside_its_report_and_refuses_a_changed_file(tmp_path, caplog):
    mini = BUILDERS["cocostuff10k"]()
    dl, data = tmp_path / "downloads", tmp_path / "data"
    dl.mkdir()
    (dl / "cocostuff-10k-v1.1.zip").write_bytes(mini.served[COCO_URL])
    args = ["verify-archives", "cocostuff10k", "--dest", str(dl), "--report", str(data / "cocostuff10k.archives.json")]
    assert main(args) == 0
    record = data / "cocostuff10k.checksums.json"
    first = sha256(mini.served[COCO_URL])
    assert json.loads(record.read_text())["archives"]["official/cocostuff-10k-v1.1.zip"]["sha256"] == first
    with zipfile.ZipFile(dl / "cocostuff-10k-v1.1.zip", "a") as zf:
        zf.writestr("COCOStuff10k/extra.txt", b"one more file")
    caplog.clear()
    assert main(args) == 1
    changed = sha256((dl / "cocostuff-10k-v1.1.zip").read_bytes())
    assert f"sha256 {changed}" in caplog.text and f"sha256 {first}" in caplog.text
    assert "delete the entry 'official/cocostuff-10k-v1.1.zip'" in caplog.text
