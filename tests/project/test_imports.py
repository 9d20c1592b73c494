"""The package's import contract (``[tool.importlinter]`` in pyproject.toml): the layers, the torch-free experiment
spec the workflow parses, and models that take plain arguments. ``lint-imports`` checks this checkout; a planted
violation (a lazy import inside a function) shows the contract is in force."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from checkout import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` of the venv running the tests on the package under ``root`` (first on the path: the editable
    install may point at another checkout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_package_keeps_its_import_contract():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert {c["id"] for c in contracts} == {"layers", "parse-time", "models-plain"}
    assert proc.stdout.count(" KEPT") == len(contracts), proc.stdout


def test_lazy_imports_that_break_the_contract_are_reported(tmp_path):
    shutil.copytree(ROOT / "mcibi", tmp_path / "mcibi", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    planted = {
        "mcibi/models/blocks.py": "def _planted():\n    from mcibi.official import pretrained  # noqa\n",
        "mcibi/spec/runs.py": "def _planted():\n    import torch  # noqa\n",
        "mcibi/models/memory.py": "def _planted():\n    from mcibi.spec import params  # noqa\n",
    }
    for file, code in planted.items():
        with open(tmp_path / file, "a") as fh:
            fh.write("\n\n" + code)
    proc = _lint(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "mcibi.models.blocks -> mcibi.official.pretrained" in proc.stdout
    assert "mcibi.spec.runs -> torch" in proc.stdout
    assert "mcibi.models.memory -> mcibi.spec.params" in proc.stdout
    assert proc.stdout.count(" BROKEN") == 3, proc.stdout
