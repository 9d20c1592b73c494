"""Resumable checkpoints: writing them, finding the newest usable one, conflicts with edited params or changed
data, --restart.

The data version a run trains on (:func:`data_version`) uses the workflow's notion of a data change
(:mod:`mcibi.data.fingerprint`: every file's relative path and size, the contents of ``manifest.json`` and the
split lists), the change that makes ``verify_data`` rerun and so the train job: ``train_files`` covers the files
training reads (the manifest, the training split's list, its images and labels), ``fingerprint`` the whole
prepared folder (the value ``verified.json`` records). Checkpoints and ``model.pt`` record both; a checkpoint
whose ``train_files`` differs from the data as it is now is a conflict like edited params. A change confined to
other splits (evaluation images) leaves the weights valid: training resumes, and the evaluations rerun.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from torch import nn

from mcibi.data.fingerprint import files_fingerprint, fingerprint, recorded
from mcibi.models.build import save_checkpoint
from mcibi.models.checkpoint import CheckpointError, load_checkpoint, non_finite_tensors
from mcibi.spec.params import (
    ExperimentParams,
    params_from_dict,
    trajectory,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = re.compile(r"^iter_(\d{8})\.pt$")
NON_FINITE_SUFFIX = ".nonfinite"  # renamed aside: a checkpoint with NaN/inf weights (older versions wrote them)


class ResumeConflictError(ValueError):
    """The run folder holds checkpoints of other params or other data; nothing is deleted without ``--restart``."""



def data_version(root: str | Path, split: str, ids: list[str], image_ext: str) -> dict[str, str]:
    """The version of the prepared data a run trains on: ``dataset``, ``split``, ``train_files`` (the
    :func:`~mcibi.data.fingerprint.files_fingerprint` of the manifest, the split list and each training image and
    label) and ``fingerprint`` (the whole folder's)."""
    folder = Path(root)
    names = ["manifest.json", f"splits/{split}.txt"]
    names += [name for image_id in ids for name in (f"images/{image_id}{image_ext}", f"labels/{image_id}.png")]
    return {"dataset": folder.name, "split": split, "train_files": files_fingerprint(folder, names),
            "fingerprint": fingerprint(folder)}


def unverified_change(root: str | Path, version: dict[str, str]) -> str | None:
    """Why the data differs from what ``verify-data`` checked (its ``verified.json``), or None when it does not
    or was never verified."""
    report = Path(root) / "verified.json"
    verified = recorded(report)
    if verified is None or verified == version["fingerprint"]:
        return None
    return (f"{Path(root)} changed since `mcibi verify-data` checked it ({report} records fingerprint {verified}, the "
            f"folder now has {version['fingerprint']}): training on unverified data. Run `mcibi verify-data "
            f"{version['dataset']}` (the workflow does this before training)")


def _describe(version: dict[str, str]) -> str:
    return f"training files {version.get('train_files')} (dataset fingerprint {version.get('fingerprint')})"


def resumable_checkpoints(folder: Path) -> list[Path]:
    """The folder's ``iter_<n>.pt`` files, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)), key=lambda p: p.name)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys if old.get(k) != new.get(k)]


def find_resume_state(folder: Path, params: ExperimentParams,
                      data: dict[str, str] | None = None) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint under ``folder``, or None when there is none.

    Nothing is deleted here: a checkpoint of other trajectory params (the params file was edited) or trained on
    other data (``data``, from :func:`data_version`: its training files changed) stops the run with
    :class:`ResumeConflictError` naming the differences and the ways out; one holding NaN/inf weights, memory or
    optimiser state is renamed ``*.nonfinite`` and an older one is used; an unreadable or corrupted one (its
    content digest does not match) is skipped with a warning. A checkpoint recording no data version (older
    versions) is resumed from with a warning.
    """
    want = trajectory(params)
    found, conflicts, data_conflicts = None, [], []
    for path in reversed(resumable_checkpoints(folder)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping unreadable checkpoint %s (%s)", path, exc)
            continue
        try:
            diff = _differences(trajectory(params_from_dict(state["params"], path)), want)
        except ValueError as exc:
            diff = [f"(its params cannot be read by this version: {exc})"]
        if diff:
            conflicts.append((path, diff))
            continue
        trained_on = state.get("data_version")
        if data is not None and isinstance(trained_on, dict) and trained_on.get("train_files") != data["train_files"]:
            data_conflicts.append((path, trained_on))
            continue
        bad = non_finite_tensors(state)
        if bad:
            aside = path.with_name(path.name + NON_FINITE_SUFFIX)
            path.rename(aside)
            log.warning("%s holds non-finite values (%s%s); renamed to %s, not resumed from", path,
                        ", ".join(bad[:3]), " ..." if len(bad) > 3 else "", aside.name)
            continue
        if found is None:
            found = (state, path)
    if conflicts:
        path, diff = conflicts[0]
        raise ResumeConflictError(
            f"{folder}: {len(conflicts)} checkpoint(s) (newest {path.name}) were trained with other params than "
            f"{params.path or params.name}; differing keys: {'; '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}. "
            "Nothing was deleted. Either restore those values in the params file (training then resumes), move the "
            f"run folder {folder.parent} away, or rerun `mcibi train` with --restart, which moves the old checkpoints "
            f"to {folder.name}.archived-<time>/ and starts afresh.")
    if data_conflicts:
        path, old = data_conflicts[0]
        raise ResumeConflictError(
            f"{folder}: {len(data_conflicts)} checkpoint(s) (newest {path.name}) were trained on other data than "
            f"{data['dataset']}/{data['split']} holds now: data version {_describe(old)} -> {_describe(data)}. "
            "Resuming would keep weights trained on the old data. Nothing was deleted. Either restore the data they "
            "were trained on (e.g. `dvc checkout` of the matching data.dvc; training then resumes), move the run "
            f"folder {folder.parent} away, or rerun `mcibi train` with --restart, which moves the old checkpoints "
            f"to {folder.name}.archived-<time>/ and trains afresh on the data as it is.")
    if found is not None and data is not None and not isinstance(found[0].get("data_version"), dict):
        log.warning("%s records no data version (written by an older version): it cannot be checked against the "
                    "data as it is now (%s); resuming from it. If the prepared data changed since, rerun with "
                    "--restart.", found[1], _describe(data))
    return found


def archive_checkpoints(folder: Path) -> Path | None:
    """Move ``folder`` (a run's checkpoints) to ``<folder>.archived-<UTC time>`` (``--restart``); None if empty."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    target = folder.with_name(f"{folder.name}.archived-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('~')[0]}~{n}")
        n += 1
    folder.rename(target)
    log.warning("--restart: moved the previous checkpoints %s to %s", folder, target)
    return target


def save_resumable(folder: Path, core: nn.Module, params: ExperimentParams, keep: int, **extra: Any) -> Path:
    """Write ``iter_<n>.pt`` atomically and delete all but the newest ``keep`` resumable checkpoints."""
    path = folder / f"iter_{extra['iteration']:08d}.pt"
    save_checkpoint(path, core, params, **extra)
    for old in resumable_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path

