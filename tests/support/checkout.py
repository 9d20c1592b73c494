"""The repository as the tests see it: its root, and a copy without run outputs for workflow runs."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
# top-level names a copy leaves out: run outputs, caches, local data and tracking stores (mcibi/data is code)
SKIP_TOP = {".git", ".venv", ".snakemake", "runs", "results", "data", "downloads", "logs", "benchmarks", "mlflow.db",
            "mlruns", ".pytest_cache", ".ruff_cache", "datasets", ".dvc"}


def copy_repo(dest: Path) -> Path:
    """Copy the repository to ``dest`` without run outputs and caches; returns ``dest``."""
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if (Path(d) == ROOT and n in SKIP_TOP)
                                                         or n in ("__pycache__", ".pytest_cache")
                                                         or n.endswith(".egg-info")])
    return dest


def load_script(relative: str, name: str) -> ModuleType:
    """Import a script of the repository that is not part of the package (``.ci/lock.py``, ``bench/pages.py``)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
