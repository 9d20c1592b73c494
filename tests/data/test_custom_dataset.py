"""Custom datasets: a description file, `mcibi new-dataset` (errors name files, nothing half-written), and the
whole chain plus the Snakemake report on a small folder dataset made here."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from checkout import ROOT, copy_repo
from folder_dataset import CLASSES, folder_dataset
from PIL import Image


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
                MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _mcibi(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mcibi", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with the demo params (the row to start from) and a user folder dataset."""
    shutil.copytree(ROOT / "params" / "demo", tmp_path / "params" / "demo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MCIBI_DATASETS", raising=False)
    return tmp_path, folder_dataset(tmp_path / "user")


def test_new_dataset_writes_params_and_registers(workdir):
    from mcibi.catalogue.custom import new_dataset
    from mcibi.data.lookup import get_spec
    from mcibi.spec.params import load_params

    tmp, desc = workdir
    files = new_dataset(desc, "demo/upernet_mcibipp", epochs=3, dvc_file=None, show_progress=False)
    assert [f.as_posix() for f in files] == ["datasets/shapes.yaml", "params/shapes/defaults.yaml",
                                             "params/shapes/upernet_mcibipp.yaml",
                                             "params/shapes/upernet_baseline.yaml"]
    spec = get_spec("shapes")
    assert spec.classes == tuple(CLASSES) and spec.splits == {"train": 18, "val": 6}
    mem, base = load_params(files[2]), load_params(files[3])
    assert mem.model.memory.kind == "mcibi++" and base.model.memory.kind == "none"
    assert mem.model.num_classes == 3 and mem.data.crop_size == (64, 64) and mem.train.epochs == 3
    assert mem.evaluate.protocols["msflip"].crop == (64, 64)  # the row's 96 window, scaled by 64/96
    assert mem.train.total_batch_size == 8 and dataclasses.replace(mem.model, memory=base.model.memory) == base.model

    from mcibi.data.prepare import prepare_custom

    out = prepare_custom("datasets/shapes.yaml", tmp / "data" / "shapes", show_progress=False)
    label = np.asarray(Image.open(out / "labels" / "img000.png"))
    assert set(np.unique(label)) <= {0, 1, 2} and (out / "images" / "img000.jpg").is_file()
    from mcibi.data.prepare import verify_prepared

    assert verify_prepared("shapes", out)["splits"]["val"]["images"] == 6


@pytest.mark.parametrize("median", [(1024, 2048), (300, 600)], ids=["row-size", "smaller"])
def test_scaled_slide_windows_keep_their_orientation(median):
    """From a CityScapes model-zoo row, windows scale with the crop and stay as the official runs them: taller than wide
    (1024x512 on the 512x1024 crop), no side beyond the crop's longer side."""
    from mcibi.catalogue.custom import experiment_params
    from mcibi.spec.params import load_params, params_from_dict

    row = load_params(ROOT / "params" / "cityscapes" / "deeplabv3_r101_mcibipp.yaml")
    d, _ = experiment_params(row, "cityscapes", 19, 1000, median)
    proto = params_from_dict(d, "custom").evaluate.protocols["msflip"]
    crop = d["data"]["crop_size"]
    assert proto.mode == "slide" and proto.crop == (crop[1], crop[0]) and proto.crop[0] > proto.crop[1]
    assert max(proto.crop) <= max(crop) and proto.stride[0] == proto.stride[1] <= min(proto.crop)


@pytest.mark.parametrize("damage, message", [
    ("size", "differs from its mask"),
    ("colour", "colours [(9, 9, 9)] are not in the palette"),
    ("unreadable", "unreadable image"),
    ("unpaired", "no mask"),
])
def test_new_dataset_names_the_bad_file_and_writes_nothing(workdir, damage, message):
    tmp, desc = workdir
    images, masks = tmp / "user" / "shapes" / "images", tmp / "user" / "shapes" / "masks"
    if damage == "size":
        Image.new("RGB", (60, 64)).save(images / "img005.jpg")
        bad = images / "img005.jpg"
    elif damage == "colour":
        Image.new("RGB", (64, 64), (9, 9, 9)).save(masks / "img007.png")
        bad = masks / "img007.png"
    elif damage == "unreadable":
        (images / "img003.jpg").write_bytes(b"\xff\xd8 truncated")
        bad = images / "img003.jpg"
    else:
        Image.new("RGB", (64, 64)).save(images / "extra.png")
        bad = images / "extra.png"
    env = _env(tmp)
    proc = _mcibi(tmp, env, "new-dataset", str(desc), "--from", "demo/upernet_mcibipp")
    assert proc.returncode == 1
    assert str(bad) in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp / "datasets").exists() and not (tmp / "params" / "shapes").exists()


def test_description_errors_name_the_file(workdir):
    from mcibi.data.custom import CustomDatasetError, load_description

    tmp, desc = workdir
    data = yaml.safe_load(desc.read_text())
    for change, message in (({"classs": ["a"]}, "unknown key(s) ['classs']"),
                            ({"name": "My Set"}, "lower-case letters and digits"),
                            ({"palette": [[0, 0, 0]]}, "1 colours for 3 classes"),
                            ({"name": "lip"}, "built-in dataset")):
        desc.write_text(yaml.safe_dump(data | change))
        with pytest.raises(CustomDatasetError, match=re.escape(message)) as err:
            load_description(desc)
        assert str(desc) in str(err.value)


@pytest.mark.slow
def test_custom_dataset_in_the_workflow(tmp_path):
    """After new-dataset, `snakemake results/<name>` plans prepare_custom (no download) -> verify -> train ->
    evaluate -> figures -> table, and the data steps run for real. (Training onwards are the rules the demo chain
    test runs end to end.)"""
    repo = copy_repo(tmp_path / "repo")
    desc = folder_dataset(tmp_path / "user", count=16)
    env = _env(tmp_path)
    proc = _mcibi(repo, env, "new-dataset", str(desc), "--from", "demo/upernet_mcibipp", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "  shapes:\n    cmd: python -m snakemake --cores all results/shapes" in (repo / "dvc.yaml").read_text()

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=600)

    plan = snakemake("-n", "--cores", "1", "results/shapes")
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    stats = plan.stdout[plan.stdout.index("Job stats:"):]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}
    assert jobs == {"prepare_custom": 1, "verify_data": 1, "dvc_commit": 1, "mlflow_experiment": 1, "train": 2,
                    "evaluate": 6, "figures": 2, "report": 1, "total": 15}
    data = snakemake("--cores", "1", "data/shapes/verified.json")
    assert data.returncode == 0, data.stderr[-3000:]
    assert (repo / "data" / "shapes" / "splits" / "val.txt").read_text().count("\n") == 4
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "user" / "shapes" / "masks" / "img001.png")
    again = snakemake("-n", "--cores", "1", "data/shapes/verified.json")  # an edited mask re-prepares
    assert "prepare_custom" in again.stdout and "img001.png" in again.stdout
