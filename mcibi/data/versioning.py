"""Commit the prepared data to the DVC cache once the chain has verified it, so ``dvc push`` works straight away.

``data.dvc`` tracks all of ``data/``. After ``verify_data`` passes, :func:`commit_data` runs ``dvc commit`` on it:
the files move into ``.dvc/cache`` and come back as links (``cache.type`` in ``.dvc/config``: hardlink, else
symlink; DVC copies when the first type is not hardlink), so a 10 GB dataset takes 10 GB, not 20. Outside a DVC
repository it does nothing and says so.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

_LOCKED = ("unable to acquire lock", "lock")


class DataVersionError(RuntimeError):
    """``dvc commit`` failed; the message says what DVC printed and what to do."""


def _dvc() -> list[str]:
    exe = Path(sys.executable).with_name("dvc")
    return [str(exe)] if exe.is_file() else [shutil.which("dvc") or "dvc"]


def _run(args: list[str], repo: Path) -> subprocess.CompletedProcess:
    command = [*_dvc(), *args]
    try:
        return subprocess.run(command, cwd=repo, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise DataVersionError(f"{command[0]}: no dvc program beside {sys.executable} or on PATH, so {repo} was not "
                               "committed to the DVC cache (the prepared data is unchanged). Install DVC (it is in "
                               "requirements.lock) or put it on PATH, then rerun.") from exc


def commit_data(repo: str | Path = ".", target: str = "data.dvc", attempts: int = 10) -> str:
    """``dvc commit --force <target>`` in ``repo`` (retrying while another job holds DVC's lock), then check that
    ``dvc status <target>`` is clean. Returns the md5 now recorded, or 'not a DVC repository'."""
    root = Path(repo).resolve()
    if not (root / ".dvc").is_dir() or not (root / target).is_file():
        log.warning("%s: no .dvc/ or %s; the prepared data is not versioned (run `dvc init` and `dvc add data` to "
                    "version it)", root, target)
        return "not a DVC repository"
    for i in range(attempts):
        proc = _run(["commit", "--force", target], root)
        if proc.returncode == 0:
            break
        if i == attempts - 1 or not any(s in proc.stderr.lower() for s in _LOCKED):
            raise DataVersionError(f"{root / target}: `dvc commit` failed ({proc.stderr.strip()[-800:]}). Fix the "
                                   "cause, then run `dvc commit data.dvc` (or rerun the workflow).")
        time.sleep(2.0 * (i + 1))  # another dataset's job is committing
    status = _run(["status", "--json", target], root)
    if status.returncode != 0 or status.stdout.strip() not in ("{}", ""):
        raise DataVersionError(f"{root / target}: still not clean after `dvc commit`: {status.stdout.strip()[-800:]}"
                               f"{status.stderr.strip()[-400:]}")
    md5 = next((line.split(":", 1)[1].strip() for line in (root / target).read_text().splitlines()
                if line.strip().startswith("- md5:")), "unknown")
    log.info("committed %s to the DVC cache (md5 %s); `dvc push` shares it, `git add %s` records it", target, md5,
             target)
    return md5
