"""Shared by the parity tests (tests/test_parity*.py): the official configs and the official toolbox.

The official toolbox (sssegmentation 1.7.0) is installed by the test extra (``pip install -e '.[test]'``), so
these tests always run; a missing install is an error, not a skip.
"""

from __future__ import annotations

import copy

import torch

from mcibi.catalogue.official import load_official_config


def official_config(name: str) -> dict:
    """A fresh deep copy of the official SEGMENTOR_CFG ``name`` (the copy shipped in mcibi; the official
    constructors edit it in place)."""
    return copy.deepcopy(load_official_config(None, name))


def randomise_state(official: torch.nn.Module) -> None:
    """Non-trivial state for an official MCIBI++ model: random BN statistics, norm affines and memory, so that a
    misplaced norm, a wrong channel order or an unused memory shows in the outputs (and class maps vary)."""
    with torch.no_grad():
        for m in official.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
        official.memory_module.memory.data.copy_(torch.rand_like(official.memory_module.memory) + 0.1)


def calibrate(official: torch.nn.Module, images: list[torch.Tensor]) -> None:
    """Make a random-weight official model's class maps depend on the image: BatchNorm statistics measured on
    ``images`` (normalised, (1, 3, h, w) each; random statistics give nearly the same map for every image), then
    the final classifier's bias centred on their logits so that no class wins everywhere."""
    from ssseg.modules.utils import SSSegInputStructure

    size = images[0].shape[-2:]  # one batch (BatchNorm after global pooling needs more than one image)
    images = [torch.cat([torch.nn.functional.interpolate(x, size=size, mode="bilinear") for x in images])]
    norms = [m for m in official.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the images
            m.train()
        for image in images:
            official(SSSegInputStructure(images=image, mode=official.mode))
        for m in norms:
            m.eval()
            m.momentum = 0.1
        means = [official(SSSegInputStructure(images=image, mode=official.mode)).seg_logits.mean(dim=(0, 2, 3))
                 for image in images]
        official.decoder_cls.conv2.bias -= torch.stack(means).mean(dim=0)
