"""Checkpoints: atomic save, safe (``weights_only``) and strict load, a content digest checked on every load.

Every checkpoint carries the sha256 of its content (:func:`content_digest`: every tensor's dtype, shape and
bytes and every other value, in a canonical order), stored inside the file, so a copy made by DVC, MLflow or
``cp`` carries its own check. :func:`load_checkpoint` recomputes it: bytes changed on disk (a bad sector, a
truncated copy, a partial overwrite) are refused, naming the file and what to do, whether they break the zip
structure or only change tensor values (``torch.load`` reads those without complaint). Checkpoints of format 1
(written before the digest existed) still load, with a warning that they cannot be checked; a checkpoint written
now is of format 2 and must carry its digest. :func:`mcibi.models.build.save_checkpoint` and
:func:`mcibi.models.build.checkpoint_params` convert the params from and to
:class:`mcibi.spec.params.ExperimentParams`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcibi.files import atomic_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: with a content digest; 1: without (older versions), loaded with a warning
LEGACY_FORMATS = (1,)
DIGEST_KEY = "digest"  # {"sha256": <hex>} of everything else in the checkpoint

# what to do about a checkpoint that cannot be used as it is on disk
RECOVERY = ("Do not use this file. Restore it from a copy (`dvc checkout`/`dvc pull` for a DVC-tracked file, the "
            "MLflow run's logged model, a backup); for a training run's model.pt or resumable checkpoint, rerun "
            "`mcibi train` (it resumes from the newest intact checkpoint under checkpoints/; --restart trains afresh); "
            "for a converted official checkpoint, download and convert it again.")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the params it is used with."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's content differs from the digest recorded when it was written."""


def content_digest(state: Mapping[str, Any]) -> str:
    """sha256 (hex) of a checkpoint's content, ``digest`` key excluded: each tensor's dtype, shape and bytes, each
    other value's type and ``repr``, mappings by sorted key, sequences in order. Equal before saving and after
    loading; tuples and lists hash alike (a loader may turn one into the other)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        t = (t.cpu() if t.device.type != "cpu" else t).resolve_conj().resolve_neg().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        h.update(f"{{{len(value)}:".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, list | tuple):
        h.update(f"[{len(value)}:".encode())
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:  # str, int, float (repr is exact), bool, None
        h.update(f"{type(value).__name__}:{value!r};".encode())


def write_checkpoint(path: str | Path, model: nn.Module, params: dict[str, Any], **extra: Any) -> None:
    """Write model weights and buffers (memory included), the params (a plain dict) and ``extra`` (plain data)
    atomically, with the digest of all of it."""
    state = {
        "format_version": FORMAT_VERSION,
        "params": params,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    state[DIGEST_KEY] = {"sha256": content_digest(state)}
    # through a Python file object: a full disk then raises OSError(ENOSPC), which atomic_path turns into a
    # message naming the path (torch's own writer reports "[enforce fail at inline_container.cc] unexpected pos")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing pickled code (``weights_only=True``) and check its content digest.

    Raises :class:`CorruptCheckpointError` when the content differs from the digest (or a format-2 file has
    none), :class:`CheckpointError` when the file is missing, unreadable or not an mcibi checkpoint. A format-1
    checkpoint (no digest) loads with a warning.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such checkpoint. Train the experiment first (snakemake ... or mcibi train).")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted or foreign files: say which file
        raise CheckpointError(f"{file}: cannot be read as an mcibi checkpoint ({str(exc)[:300]}); the file is damaged "
                              f"or not a checkpoint. {RECOVERY}") from exc
    version = state.get("format_version") if isinstance(state, dict) else None
    if version in LEGACY_FORMATS:
        log.warning("%s: checkpoint of format %s, written by an older mcibi version without a content digest: "
                    "loaded as it is, but damage to its bytes cannot be detected (checkpoints written now carry "
                    "one: retraining or re-converting it gives a checked file)", file, version)
        return state
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file}: not an mcibi checkpoint of format {FORMAT_VERSION}.")
    recorded = state.get(DIGEST_KEY)
    recorded = recorded.get("sha256") if isinstance(recorded, dict) else None
    actual = content_digest(state)
    if recorded != actual:
        what = (f"its content has sha256 {actual[:16]}..., not the {recorded[:16]}... recorded when it was written"
                if isinstance(recorded, str) else "its recorded content digest is missing or unreadable")
        raise CorruptCheckpointError(f"{file}: corrupted checkpoint: {what}, so its bytes changed on disk after "
                                     f"it was saved. {RECOVERY}")
    return state


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the weights, buffers (the memory) and optimiser / scaler state tensors holding NaN or inf."""
    bad = [k for k, v in state.get("state_dict", {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    for group in ("optimizer", "scaler"):
        for key, value in _tensors(state.get(group) or {}, group):
            if value.is_floating_point() and not torch.isfinite(value).all():
                bad.append(key)
    return bad


def _tensors(tree: Any, prefix: str):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}[{i}]")


def load_weights(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load weights strictly: a missing or unexpected tensor, or a shape mismatch, is an error naming it."""
    own = model.state_dict()
    theirs = state["state_dict"]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    wrong = [f"'{k}' {tuple(v.shape)} (model expects {tuple(own[k].shape)})"
             for k, v in theirs.items() if own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not match the model: {', '.join(wrong)}.")
    model.load_state_dict(theirs, strict=True)
