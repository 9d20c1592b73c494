"""Checkpoints are written atomically and loaded strictly and safely."""

from pathlib import Path

import pytest
import torch
from torch import nn

from mcibi.files import atomic_path
from mcibi.models.build import checkpoint_params, save_checkpoint
from mcibi.models.checkpoint import CheckpointError, load_checkpoint, load_weights
from mcibi.spec.params import load_params

PARAMS = Path(__file__).resolve().parents[2] / "params" / "demo" / "upernet_mcibipp.yaml"


class Tiny(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1)
        self.register_buffer("memory", torch.zeros(k, 2))


def test_roundtrip_keeps_weights_buffers_and_params(tmp_path):
    params = load_params(PARAMS)
    model = Tiny()
    model.memory.fill_(0.25)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, params, iteration=7)
    state = load_checkpoint(path)
    assert state["iteration"] == 7
    assert checkpoint_params(state, path) == params
    other = Tiny()
    load_weights(other, state, path)
    assert torch.equal(other.memory, model.memory) and torch.equal(other.conv.weight, model.conv.weight)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary files left


def test_strict_load_names_the_tensor(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, Tiny(3), load_params(PARAMS))
    with pytest.raises(CheckpointError, match="conv.weight"):
        load_weights(Tiny(4), load_checkpoint(path), path)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
