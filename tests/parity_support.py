"""Shared by the parity tests (tests/test_parity*.py): the official configs and the official toolbox.

The official toolbox (sssegmentation 1.7.0) is installed by the test extra (``pip install -e '.[test]'``), so
these tests always run; a missing install is an error, not a skip.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml

OFFICIAL_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_configs.yaml"


@cache
def _official_configs() -> dict:
    # the one place that says where the official configs dump lives
    if not OFFICIAL_CONFIGS.is_file():
        pytest.skip(f"{OFFICIAL_CONFIGS} (the official configs dump) is not beside the repository")
    return yaml.safe_load(OFFICIAL_CONFIGS.read_text())


def official_config(name: str) -> dict:
    """A fresh deep copy of the official SEGMENTOR_CFG ``name`` (the official constructors edit it in place)."""
    return copy.deepcopy(_official_configs()[name])


def randomise_state(official: torch.nn.Module) -> None:
    """Non-trivial state for an official MCIBI++ model: random BN statistics, norm affines and memory, so that a
    misplaced norm, a wrong channel order or an unused memory shows in the outputs."""
    with torch.no_grad():
        for m in official.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
        official.memory_module.memory.data.copy_(torch.rand_like(official.memory_module.memory) + 0.1)
