"""Resumable checkpoints: writing them, finding the newest usable one, conflicts with edited params, --restart."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from torch import nn

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
    """The run folder holds checkpoints of other params; nothing is deleted without ``--restart``."""



def resumable_checkpoints(folder: Path) -> list[Path]:
    """The folder's ``iter_<n>.pt`` files, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)), key=lambda p: p.name)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys if old.get(k) != new.get(k)]


def find_resume_state(folder: Path, params: ExperimentParams) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint under ``folder``, or None when there is none.

    Nothing is deleted here: a checkpoint of other trajectory params (the params file was edited) stops the run
    with :class:`ResumeConflictError` naming the differing keys and the ways out; one holding NaN/inf weights,
    memory or optimiser state is renamed ``*.nonfinite`` and an older one is used; an unreadable one is skipped.
    """
    want = trajectory(params)
    found, conflicts = None, []
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

