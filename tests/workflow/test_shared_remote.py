"""One DVC remote shared by two clones (two machines, or a cluster's login node and a laptop): the demo prepared
and pushed in one clone is pulled in the other, whose workflow then downloads and prepares nothing again."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from checkout import ROOT, copy_repo

pytestmark = [pytest.mark.slow, pytest.mark.workflow]
DVC = Path(sys.executable).with_name("dvc")


def _run(*cmd, cwd):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _clone(path: Path, remote: Path) -> Path:
    repo = copy_repo(path)
    _run("git", "init", "-q", cwd=repo)
    _run(DVC, "init", "-q", cwd=repo)
    for f in (".dvc/config", ".dvcignore"):
        (repo / f).write_text((ROOT / f).read_text())
    _run(DVC, "remote", "add", "-d", "shared", remote, cwd=repo)
    return repo


@pytest.mark.skipif(not DVC.is_file(), reason="dvc not installed")
def test_data_pushed_from_one_clone_is_pulled_in_another_and_not_prepared_again(tmp_path):
    remote = tmp_path / "remote"
    first = _clone(tmp_path / "first", remote)
    snakemake = [sys.executable, "-m", "snakemake", "--cores", "2"]
    _run(*snakemake, "logs/dvc/demo.committed", cwd=first)  # download, verify, prepare, verify, dvc commit
    _run(DVC, "push", cwd=first)
    assert any(remote.rglob("*")), "nothing was pushed"

    second = _clone(tmp_path / "second", remote)
    (second / "data.dvc").write_text((first / "data.dvc").read_text())  # what `git pull` brings
    _run(DVC, "pull", "data.dvc", cwd=second)  # plain `dvc pull` also wants the stages' outs (runs/, results/)
    assert (second / "data" / "demo" / "manifest.json").read_text() == \
        (first / "data" / "demo" / "manifest.json").read_text()
    plan = _run(*snakemake, "-n", "results/demo", cwd=second)
    stats = plan[plan.index("Job stats:"):]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}
    assert not {"download", "verify_archives", "prepare"} & set(jobs), jobs
    assert jobs["train"] == 2  # the rest of the chain is still to run
