"""verify_data's rerun stamp follows the prepared files; the chain's DVC commit leaves `dvc status` clean with
linked (not copied) cache files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkout import ROOT

from mcibi.data.fingerprint import change_stamp, fingerprint
from mcibi.data.versioning import commit_data


def _folder(root: Path) -> Path:
    data = root / "data" / "demo"
    for name, content in (("manifest.json", "{}"), ("splits/train.txt", "a\n"), ("images/a.png", "IMG"),
                          ("labels/a.png", "LBL")):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(content)
    return data


def test_change_stamp_is_rewritten_only_when_the_verified_files_change(tmp_path):
    data = _folder(tmp_path)
    report, stamp = data / "verified.json", tmp_path / "logs" / "demo.changed"
    assert Path(change_stamp(data, report, stamp)).stat().st_mtime == 0  # not verified yet: nothing to signal
    report.write_text(json.dumps({"fingerprint": fingerprint(data)}))
    change_stamp(data, report, stamp)
    assert stamp.stat().st_mtime < report.stat().st_mtime  # verified as it is: no rerun
    os.utime(data / "images" / "a.png", (1, 1))  # a new timestamp alone (a checkout, a copy) changes nothing
    assert fingerprint(data) == json.loads(report.read_text())["fingerprint"]
    (data / "labels" / "a.png").write_text("LABEL")  # another size
    change_stamp(data, report, stamp)
    assert stamp.stat().st_mtime >= report.stat().st_mtime  # newer than the report: verify_data reruns
    first = stamp.stat().st_mtime_ns
    change_stamp(data, report, stamp)  # the same change seen again: the stamp is not rewritten
    assert stamp.stat().st_mtime_ns == first
    (data / "splits" / "train.txt").write_text("b\n")  # same size, other split: the contents count
    assert Path(stamp).read_text().strip() != fingerprint(data)


def _dvc(*args, cwd):
    exe = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, check=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path(sys.executable).with_name("dvc").is_file(), reason="dvc not installed")
def test_commit_data_leaves_dvc_clean_with_linked_cache(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc("init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    data = _folder(repo)
    _dvc("add", "data", cwd=repo)
    # a fresh clone after the chain: data.dvc says what data/ holds, the cache is empty ("not in cache")
    shutil.rmtree(repo / ".dvc" / "cache")
    (data / "labels" / "b.png").write_text("LBL2")  # and the chain prepared more than data.dvc recorded
    assert "not in cache" in _dvc("status", "data.dvc", cwd=repo).stdout
    md5 = commit_data(repo)
    assert md5.endswith(".dir") and md5 in (repo / "data.dvc").read_text()
    assert _dvc("status", "--json", "data.dvc", cwd=repo).stdout.strip() == "{}"
    for f in (data / "labels" / "b.png", data / "images" / "a.png"):  # linked into the cache, not copied
        st = os.stat(f)
        assert st.st_nlink >= 2 or f.is_symlink(), f


def test_commit_data_outside_a_dvc_repository_says_so(tmp_path, caplog):
    assert commit_data(tmp_path) == "not a DVC repository"
    assert "not versioned" in caplog.text
