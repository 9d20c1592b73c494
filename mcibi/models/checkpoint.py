"""Checkpoint files: atomic write, safe (``weights_only``) and strict load.

A checkpoint holds the weights and buffers (the memory included), the experiment's params as plain data and
whatever the writer adds (iteration, optimiser state, ...). :func:`mcibi.models.build.save_checkpoint` and
:func:`mcibi.models.build.checkpoint_params` convert the params from and to :class:`mcibi.spec.params.ExperimentParams`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcibi.files import atomic_path

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the params it is used with."""


def write_checkpoint(path: str | Path, model: nn.Module, params: dict[str, Any], **extra: Any) -> None:
    """Write model weights and buffers (memory included), the params (a plain dict) and ``extra`` (plain data)
    atomically."""
    state = {
        "format_version": FORMAT_VERSION,
        "params": params,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    # through a Python file object: a full disk then raises OSError(ENOSPC), which atomic_path turns into a
    # message naming the path (torch's own writer reports "[enforce fail at inline_container.cc] unexpected pos")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing pickled code (``weights_only=True``)."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such checkpoint. Train the experiment first (snakemake ... or mcibi train).")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted or foreign files: say which file
        raise CheckpointError(f"{file}: cannot be read as an mcibi checkpoint ({exc}). Delete it and retrain.") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: not an mcibi checkpoint of format {FORMAT_VERSION}.")
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
