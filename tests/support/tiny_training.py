"""A tiny prepared demo dataset and params for training tests (seconds per run on one CPU core)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from checkout import ROOT

DEMO_PARAMS = ROOT / "params" / "demo"


def tiny_dataset(folder: Path, train_images: int = 16, val_images: int = 4) -> Path:
    """Prepare the demo dataset under ``folder/demo`` with its splits cut to a few images; returns ``folder``."""
    from mcibi.data.download import download
    from mcibi.data.prepare import prepare

    archives = folder / "downloads"
    download("demo", archives)
    out = prepare("demo", archives, folder / "demo")
    for split, n in (("train", train_images), ("val", val_images)):
        lst = out / "splits" / f"{split}.txt"
        lst.write_text("\n".join(lst.read_text().split()[:n]) + "\n")
    return folder


def tiny_params(folder: Path, name: str = "tiny", memory: str = "mcibi++", dropout: float = 0.1, **train) -> Path:
    """Write ``folder/demo/{defaults,<name>}.yaml``: the demo defaults shrunk (48 px crops, 16 channels).

    ``train`` overrides keys of the ``train`` section (nested dicts merge one level deep).
    """
    data = yaml.safe_load((DEMO_PARAMS / "defaults.yaml").read_text())
    data["data"]["crop_size"] = [48, 48]
    data["data"]["train_resize"]["size"] = [64, 64]
    data["data"]["test_resize"]["size"] = [64, 64]
    data["model"]["channels"] = {"feats": 16, "transform": 8, "decoder": 16, "aux": 16}
    data["model"]["pool_scales"] = [1, 2]
    data["model"]["dropout"] = dropout
    t = data["train"]
    t.update({"total_batch_size": 4, "batch_per_device": 4, "epochs": 2, "log_every": 1, "checkpoint_every": 2,
              "keep_checkpoints": 2})
    for key, value in train.items():
        if isinstance(value, dict):
            t[key] = {**t[key], **value}
        else:
            t[key] = value
    ev = data["evaluate"]["protocols"]
    ev["msflip"]["crop"], ev["msflip"]["stride"] = [48, 48], [32, 32]
    d = folder / "demo"
    d.mkdir(parents=True, exist_ok=True)
    (d / "defaults.yaml").write_text(yaml.safe_dump(data))
    (d / f"{name}.yaml").write_text(yaml.safe_dump({"description": "tiny test experiment",
                                                    "model": {"framework": "upernet", "memory": {"kind": memory}}}))
    return d / f"{name}.yaml"


def mcibi_cmd(*args: str) -> list[str]:
    """The ``mcibi`` CLI run with this interpreter."""
    return [sys.executable, "-m", "mcibi", *args]


def env_one_thread() -> dict[str, str]:
    """Environment for reproducible CPU subprocesses: one thread, no MLflow telemetry."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing output, with a generous timeout."""
    return subprocess.run(cmd, capture_output=True, text=True, env=env_one_thread(), timeout=600, **kw)
