"""Checkpoints are written atomically and loaded strictly and safely; corrupted bytes are refused."""

import zipfile

import numpy as np
import pytest
import torch
from checkout import ROOT
from torch import nn

from mcibi.files import atomic_path
from mcibi.models.build import checkpoint_params, save_checkpoint
from mcibi.models.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    content_digest,
    load_checkpoint,
    load_weights,
)
from mcibi.spec.params import load_params

PARAMS = ROOT / "params" / "demo" / "upernet_mcibipp.yaml"


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


# ----------------------------------------------------------------------------------------- content digest
def _saved(tmp_path):
    """A small checkpoint with a few tensors of different sizes, optimiser state and plain extras."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.Conv2d(32, 32, 3), nn.Conv2d(32, 8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, load_params(PARAMS), iteration=3, optimizer=optimizer.state_dict(),
                    rng={"torch": torch.get_rng_state(), "python": (3, (1, 2, 3), None)}, curve=[{"loss": 0.5}])
    return path


def _overwrite(source, target, offset, n, seed):
    """Copy ``source`` to ``target`` with ``n`` bytes from ``offset`` replaced by different random bytes."""
    data = bytearray(source.read_bytes())
    noise = np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8)
    data[offset:offset + n] = (np.frombuffer(bytes(data[offset:offset + n]), np.uint8) ^ noise).tobytes()
    target.write_bytes(bytes(data))


def test_every_corruption_of_a_checkpoint_is_refused_naming_the_file(tmp_path):
    """Random bytes written into a saved checkpoint: 4 KiB blocks across the file (as in the incident: torch.load
    read such a model.pt without complaint) and 16-byte hits in the pickled state, the largest tensor's data and
    the zip directory. Each is refused, naming the file and what to do; those in tensor data by the digest."""
    path = _saved(tmp_path)
    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        records = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
    largest = max((i for k, i in records.items() if k.startswith("data/")), key=lambda i: i.file_size)
    # a record's data follows its 30-byte local header, name and (alignment) extra field
    tensor_at = largest.header_offset + 30 + len(largest.filename) + len(largest.extra) + largest.file_size // 2
    pickle_at = records["data.pkl"].header_offset + 30 + len("archive/data.pkl") + records["data.pkl"].file_size // 2
    hits = {f"4KiB@{f:.0%}": (int(size * f), 4096) for f in (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.85)}
    hits |= {"tensor data": (tensor_at, 16), "pickled state": (pickle_at, 16), "zip directory": (size - 120, 16)}
    bad = tmp_path / "copy.pt"
    kinds = {}
    for i, (what, (offset, n)) in enumerate(hits.items()):
        _overwrite(path, bad, offset, n, seed=i)
        with pytest.raises(CheckpointError, match=r"copy\.pt: .*Do not use this file.*--restart") as err:
            load_checkpoint(bad)
        kinds[what] = type(err.value).__name__
    assert kinds["tensor data"] == "CorruptCheckpointError", kinds  # torch.load alone would have read it
    assert "CorruptCheckpointError" in kinds.values() and "CheckpointError" in kinds.values(), kinds
    _overwrite(path, bad, tensor_at, 16, seed=99)
    with pytest.raises(CorruptCheckpointError, match=r"copy\.pt: corrupted checkpoint: its content has sha256 "
                       r"\w+\.\.\., not the \w+\.\.\. recorded when it was written"):
        load_checkpoint(bad)
    assert load_checkpoint(path)["iteration"] == 3  # the original is intact


def test_values_changed_inside_a_valid_file_are_refused(tmp_path):
    """A file re-written with one weight changed (a valid zip and pickle, the old digest) is refused."""
    path = _saved(tmp_path)
    state = torch.load(path, weights_only=True)
    state["state_dict"]["0.weight"][0, 0, 0, 0] += 1e-3
    torch.save(state, path)
    with pytest.raises(CorruptCheckpointError, match=r"model\.pt: corrupted checkpoint"):
        load_checkpoint(path)
    state["digest"] = None  # a digest that is missing or unreadable is no better
    torch.save(state, path)
    with pytest.raises(CorruptCheckpointError, match="digest is missing"):
        load_checkpoint(path)


def test_a_checkpoint_of_an_older_version_without_digest_loads_with_a_warning(tmp_path, caplog):
    path = _saved(tmp_path)
    state = torch.load(path, weights_only=True)
    del state["digest"]
    torch.save(state | {"format_version": 1}, path)
    with caplog.at_level("WARNING", logger="mcibi.models.checkpoint"):
        assert load_checkpoint(path)["iteration"] == 3
    assert "model.pt: checkpoint of format 1" in caplog.text and "cannot be detected" in caplog.text


def test_the_digest_covers_every_value_and_ignores_container_order():
    base = {"format_version": 2, "state_dict": {"a": torch.ones(2), "b": torch.zeros(1, dtype=torch.bfloat16)},
            "rng": {"python": (3, (1, 2), None)}, "iteration": 4}
    same = {"iteration": 4, "rng": {"python": [3, [1, 2], None]}, "format_version": 2,
            "state_dict": {"b": torch.zeros(1, dtype=torch.bfloat16), "a": torch.ones(2)}, "digest": {"sha256": "x"}}
    assert content_digest(base) == content_digest(same)
    for changed in ({"iteration": 5}, {"rng": {"python": (3, (1, 3), None)}},
                    {"state_dict": {"a": torch.ones(2, dtype=torch.float64), "b": base["state_dict"]["b"]}},
                    {"state_dict": {"a": torch.ones(1, 2), "b": base["state_dict"]["b"]}}):
        assert content_digest(base | changed) != content_digest(base)
