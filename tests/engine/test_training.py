"""The training step: schedule values, losses, the memory update it owns, seeded reproducibility."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from checkout import ROOT

from mcibi.engine.losses import compute_losses
from mcibi.engine.optim import poly_lr
from mcibi.engine.step import memory_momentum, train_step
from mcibi.models import build_segmentor
from mcibi.models.segmentor import onehot_gather_logits
from mcibi.spec.params import load_params

DEMO = ROOT / "params" / "demo"


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
@pytest.mark.parametrize("classes", [7, 40])  # short rows stay NCHW, long ones run class-innermost
def test_upsampled_cross_entropy_equals_the_nchw_formulation(align, classes):
    from mcibi.engine.layout import class_rows_are_fast
    from mcibi.engine.losses import upsampled_cross_entropy

    assert class_rows_are_fast(40, torch.device("cpu")) or torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    assert not class_rows_are_fast(7, torch.device("cpu")) and class_rows_are_fast(7, torch.device("meta"))
    logits = torch.randn(2, classes, 5, 6, requires_grad=True)
    labels = torch.randint(0, classes, (2, 37, 41))
    labels[0, :3] = 255
    ours = upsampled_cross_entropy(logits, labels, align)
    (grad,) = torch.autograd.grad(ours, logits)
    up = F.interpolate(logits, size=(37, 41), mode="bilinear", align_corners=align)
    reference = F.cross_entropy(up, labels, ignore_index=255)
    (ref_grad,) = torch.autograd.grad(reference, logits)
    assert torch.allclose(ours, reference, rtol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------ schedules, parameter rules, batch plans
def test_warmup_then_poly_at_known_iterations():
    from mcibi.engine.optim import scheduled_lr
    from mcibi.spec.params import ScheduleParams

    s = ScheduleParams(power=1.0, min_lr=0.0, warmup_iters=10, warmup_ratio=0.1)
    assert scheduled_lr(1.0, s, 0, 100) == pytest.approx(0.1)  # ratio x poly(0) = 0.1 x 1
    assert scheduled_lr(1.0, s, 5, 100) == pytest.approx(0.95 * (1 - (1 - 0.5) * 0.9))  # poly 0.95, factor 0.55
    assert scheduled_lr(1.0, s, 10, 100) == pytest.approx(0.9)  # warmup over: plain poly
    assert scheduled_lr(1.0, s, 100, 100) == pytest.approx(0.0)
    none = ScheduleParams(power=0.9, min_lr=1e-4, warmup_iters=0, warmup_ratio=1e-6)
    assert scheduled_lr(0.01, none, 37, 100) == poly_lr(0.01, 1e-4, 0.9, 37, 100)


class _Rules(torch.nn.Module):
    """Names as in timm's Swin under our segmentor: backbone.body.*, a head outside the backbone."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.body = torch.nn.Module()
        self.backbone.body.absolute_pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
        self.backbone.body.relative_position_bias_table = torch.nn.Parameter(torch.zeros(9, 2))
        self.backbone.body.norm = torch.nn.LayerNorm(8)
        self.backbone.body.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Conv2d(8, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)


def test_adamw_parameter_rules():
    from mcibi.engine.optim import build_optimizer, set_lr
    from mcibi.spec.params import OptimizerParams

    opt = OptimizerParams(name="adamw", lr=6e-5, momentum=0.9, weight_decay=0.01, betas=(0.9, 0.999),
                          no_decay_norms=True, no_decay_keys=("absolute_pos_embed", "relative_position_bias_table"),
                          backbone_lr_mult=0.1)
    model = _Rules()
    optimizer = build_optimizer(model, opt)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["weight_decay"], g["lr_mult"]): sorted(names[id(p)] for p in g["params"])
              for g in optimizer.param_groups}
    assert groups == {
        (0.0, 0.1): ["backbone.body.absolute_pos_embed", "backbone.body.norm.bias", "backbone.body.norm.weight",
                     "backbone.body.relative_position_bias_table"],
        (0.01, 0.1): ["backbone.body.proj.bias", "backbone.body.proj.weight"],
        (0.01, 1.0): ["head.bias", "head.weight"],
        (0.0, 1.0): ["bn.bias", "bn.weight"],
    }
    set_lr(optimizer, 1e-4)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-5, 1e-5, 1e-4, 1e-4])


def test_sgd_without_rules_is_one_group():
    p = _params()
    from mcibi.engine.step import build_optimizer

    model = build_segmentor(p.model)
    optimizer = build_optimizer(model, p)
    assert isinstance(optimizer, torch.optim.SGD) and len(optimizer.param_groups) == 1
    assert len(optimizer.param_groups[0]["params"]) == len([q for q in model.parameters() if q.requires_grad])


def test_batch_plan_splits_the_total_batch():
    from mcibi.distributed import batch_plan

    assert batch_plan(16, 8, 1) == batch_plan(16, 8, 1)
    one = batch_plan(16, 8, 1)
    assert (one.accumulation, one.micro_batch, one.per_process) == (2, 8, 16)
    eight = batch_plan(16, 8, 8)
    assert (eight.accumulation, eight.micro_batch) == (1, 2)
    odd = batch_plan(12, 5, 1)
    assert (odd.accumulation, odd.micro_batch) == (3, 4)  # fewest steps with micro-batch <= 5
    with pytest.raises(ValueError, match="cannot be split over 3 processes"):
        batch_plan(16, 8, 3)


# -------------------------------------------------------------------------------- accumulation, memory, AMP
class _Toy(torch.nn.Module):
    """Per-pixel classifier (no BatchNorm, no dropout): its gradient is a mean over images, so batches compose."""

    def __init__(self, memory=None):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.cls = torch.nn.Conv2d(8, 8, 1)
        self.aux = torch.nn.Conv2d(8, 8, 1)
        if memory is not None:
            self.memory_module = memory

    def forward(self, x, gather_labels=None, classify_memory=False):
        from types import SimpleNamespace

        f = torch.relu(self.conv(x))
        return SimpleNamespace(logits=self.cls(f), logits_cwi=None, logits_pr=None, logits_aux=self.aux(f),
                               logits_memory=None, representations=f)


def _toy_batch(n=4):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, 12, 12, generator=gen), torch.randint(0, 8, (n, 12, 12), generator=gen)


def test_gradient_accumulation_equals_the_big_batch():
    p = _params("upernet_baseline.yaml")
    images, labels = _toy_batch()
    results = []
    for accumulation in (1, 2, 4):
        model = _Toy()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        losses = [train_step(model, images, labels, opt, 0.1, p, epoch=0, accumulation=accumulation)
                  for _ in range(2)]
        results.append((model.state_dict(), losses[0]))
    (big, big_loss), *others = results
    for state, loss in others:
        assert loss["total"] == pytest.approx(big_loss["total"], rel=1e-6)
        for k in big:
            assert torch.allclose(state[k], big[k], atol=1e-7, rtol=1e-5), k


def test_accumulated_memory_update_is_the_mean_of_the_micro_batch_updates():
    from mcibi.models.memory import DistributionMemory

    p = _params()
    images, labels = _toy_batch()
    model = _Toy(DistributionMemory(8, 8, 4))
    start = model.memory_module.memory.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with torch.no_grad():
        feats = torch.relu(model.conv(images))
    expected = []
    for half in (slice(0, 2), slice(2, 4)):
        model.memory_module.memory.copy_(start)
        model.memory_module.update(feats[half], labels[half], momentum=0.1, resolution="full")
        expected.append(model.memory_module.memory.clone())
    model.memory_module.memory.copy_(start)
    train_step(model, images, labels, opt, 0.01, p, epoch=0, accumulation=2)
    assert torch.allclose(model.memory_module.memory, (expected[0] + expected[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_runs_with_an_fp32_memory(precision):
    p = _params()
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, precision=precision))
    torch.manual_seed(0)
    model = build_segmentor(p.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    images, labels = torch.randn(2, 3, 48, 48), torch.randint(0, 8, (2, 48, 48))
    before = model.memory_module.memory.clone()
    weights = [q.detach().clone() for q in model.parameters()]
    losses = train_step(model, images, labels, opt, 0.01, p, epoch=0, scaler=scaler)
    assert math.isfinite(losses["total"])
    assert model.memory_module.memory.dtype == torch.float32 and not torch.equal(model.memory_module.memory, before)
    assert all(q.dtype == torch.float32 for q in model.parameters())
    changed = sum(not torch.equal(q, w) for q, w in zip(model.parameters(), weights, strict=True))
    # fp16's scaler starts at 2**16 and skips a step whose gradients overflow; bf16 always steps
    assert changed > 0 or (precision == "fp16" and scaler.get_scale() < 2.0**16)
