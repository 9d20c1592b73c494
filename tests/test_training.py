"""The training step: schedule values, losses, the memory update it owns, seeded reproducibility."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mcibi.models import build_segmentor
from mcibi.models.segmentor import onehot_gather_logits
from mcibi.params import load_params
from mcibi.training import compute_losses, memory_momentum, poly_lr, train_step

DEMO = Path(__file__).resolve().parents[1] / "params" / "demo"


def _params(name="upernet_mcibipp.yaml", **memory):
    p = load_params(DEMO / name)
    if memory:
        p = dataclasses.replace(p, model=dataclasses.replace(p.model, memory=dataclasses.replace(p.model.memory,
                                                                                                  **memory)))
    return p


def test_poly_lr_at_known_iterations():
    assert poly_lr(0.01, 1e-4, 0.9, 0, 100) == pytest.approx(0.01)
    assert poly_lr(0.01, 1e-4, 0.9, 50, 100) == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    assert poly_lr(0.01, 1e-4, 0.9, 100, 100) == pytest.approx(1e-4)
    assert poly_lr(0.01, 0.0, 1.0, 25, 100) == pytest.approx(0.0075)


def test_memory_momentum_follows_lr_when_asked():
    assert memory_momentum(_params(), 0.005) == pytest.approx(0.1)
    assert memory_momentum(_params(adjust_momentum_by_lr=True), 0.005) == pytest.approx(0.05)


def test_onehot_warmup_weights():
    labels = torch.tensor([[[0, 1], [255, 2]]])
    w = onehot_gather_logits(labels, (2, 2), 3)
    assert w.shape == (1, 3, 2, 2)
    assert w[0, :, 0, 0].tolist() == [1, 0, 0] and w[0, :, 1, 1].tolist() == [0, 0, 1]
    assert w[0, :, 1, 0].tolist() == [0, 0, 0]  # ignored pixel: all zero


def test_losses_weighting_and_terms():
    p = _params()
    model = build_segmentor(p.model).train()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 8, (2, 64, 64))
    out = model(images)
    losses = compute_losses(out, labels, p)
    assert set(losses) == {"cls", "cwi", "pr", "aux", "total"}
    total = sum(float(losses[k].detach()) for k in ("cls", "cwi", "pr", "aux"))
    assert float(losses["total"].detach()) == pytest.approx(total, rel=1e-5)
    baseline = build_segmentor(_params("upernet_baseline.yaml").model).train()
    assert set(compute_losses(baseline(images), labels, p)) == {"cls", "aux", "total"}


def test_train_step_updates_memory_with_the_configured_momentum():
    p = _params()
    torch.manual_seed(0)
    model = build_segmentor(p.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 4
    labels[0, :4] = 255
    before = model.memory_module.memory.clone()
    losses = train_step(model, images, labels, opt, 0.01, p, epoch=0)
    assert math.isfinite(losses["total"])
    after = model.memory_module.memory
    changed = (after != before).any(dim=1)
    assert changed[[0, 4]].all() and not changed[[1, 2, 3, 5, 6, 7]].any()  # absent classes untouched
    # the first update moves each present class 10% (m = 0.1) of the way from (0, 1) towards the batch value
    m = 0.1
    est = (after[0] - (1 - m) * before[0]) / m
    assert torch.isfinite(est).all()


def test_same_seed_same_weights():
    p = _params()

    def run():
        torch.manual_seed(p.train.seed)
        model = build_segmentor(p.model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            images = torch.randn(2, 3, 48, 48, generator=gen)
            labels = torch.randint(0, 8, (2, 48, 48), generator=gen)
            train_step(model, images, labels, opt, 0.01, p, epoch=0)
        return model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("align", [False, True])
def test_upsampled_cross_entropy_equals_the_nchw_formulation(align):
    from mcibi.training import upsampled_cross_entropy

    logits = torch.randn(2, 7, 5, 6, requires_grad=True)
    labels = torch.randint(0, 7, (2, 37, 41))
    labels[0, :3] = 255
    ours = upsampled_cross_entropy(logits, labels, align)
    (grad,) = torch.autograd.grad(ours, logits)
    up = F.interpolate(logits, size=(37, 41), mode="bilinear", align_corners=align)
    reference = F.cross_entropy(up, labels, ignore_index=255)
    (ref_grad,) = torch.autograd.grad(reference, logits)
    assert torch.allclose(ours, reference, rtol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-7, rtol=1e-5)
