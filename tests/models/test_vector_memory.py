"""The MCIBI v1 vector memory against a slow transcription of the official per-class update."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mcibi.engine.losses import compute_losses
from mcibi.engine.step import build_optimizer, memory_metrics, train_step
from mcibi.models.memory import VectorMemory
from mcibi.spec.params import load_params


def reference_update(memory, feats, labels, momentum, num_classes):
    """The official ``FeaturesMemory.update`` (cosine_similarity, one vector per class), class by class."""
    memory = memory.clone()
    c = feats.shape[1]
    flat = feats.permute(0, 2, 3, 1).reshape(-1, c)
    seg = labels.reshape(-1)
    for cls in seg.unique().tolist():
        if cls < 0 or cls >= num_classes:
            continue
        feats_cls = flat[seg == cls]
        if (memory[cls] == 0).sum() == c:
            memory[cls] = feats_cls.mean(0)
            continue
        similarity = F.cosine_similarity(feats_cls, memory[cls].expand_as(feats_cls))
        weight = (1 - similarity) / (1 - similarity).sum()
        memory[cls] = (1 - momentum) * memory[cls] + momentum * (feats_cls * weight[:, None]).sum(0)
    return memory


def _memory(k=6, c=16):
    torch.manual_seed(0)
    return VectorMemory(k, c, 8).eval()


def test_starts_empty_and_first_sighting_copies_the_class_mean():
    mem = _memory()
    assert torch.equal(mem.memory, torch.zeros(6, 16)) and "memory" in mem.state_dict()
    feats = torch.randn(2, 16, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8))
    mem.update(feats, labels, momentum=0.5)
    expected = reference_update(torch.zeros(6, 16), feats, labels, 0.5, 6)
    assert torch.allclose(mem.memory, expected, atol=1e-6)
    assert torch.equal(mem.memory[3:], torch.zeros(3, 16))  # absent classes stay empty


@pytest.mark.parametrize("ignore", [255, -100])
def test_repeated_updates_match_the_official_rule_and_ignore_labels(ignore):
    mem = _memory()
    expected = mem.memory.clone()
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        feats = torch.randn(2, 16, 6, 7, generator=gen) + step
        labels = torch.randint(0, 6, (2, 6, 7), generator=gen)
        labels[:, :2] = ignore
        mem.update(feats, labels, momentum=0.3)
        expected = reference_update(expected, feats, labels, 0.3, 6)
        assert torch.allclose(mem.memory, expected, atol=1e-5), step
    assert torch.isfinite(mem.memory).all()


def test_full_resolution_upsamples_features_feature_resolution_downsamples_labels():
    feats = torch.randn(1, 16, 5, 5)
    labels = torch.randint(0, 6, (1, 20, 20))
    start = torch.randn(6, 16)
    full, small = _memory(), _memory()
    full.memory.copy_(start)
    small.memory.copy_(start)
    full.update(feats, labels, momentum=0.2, resolution="full")
    small.update(feats, labels, momentum=0.2, resolution="feature")
    up = F.interpolate(feats, size=(20, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(full.memory, reference_update(start, up, labels, 0.2, 6), atol=1e-5)
    down = F.interpolate(labels[:, None].float(), size=(5, 5), mode="nearest")[:, 0].long()
    assert torch.allclose(small.memory, reference_update(start, feats, down, 0.2, 6), atol=1e-5)


def test_identical_pixels_give_the_mean_instead_of_nan():
    mem = _memory()
    direction = torch.randn(16)
    mem.memory[0] = direction
    feats = direction.view(1, 16, 1, 1).expand(1, 16, 4, 4).clone()  # cos = 1 everywhere: 0/0 officially
    mem.update(feats, torch.zeros(1, 4, 4, dtype=torch.long), momentum=0.5)
    assert torch.allclose(mem.memory[0], direction, atol=1e-6)


def test_read_uses_the_stored_vectors():
    mem = _memory()
    mem.memory.copy_(torch.randn(6, 16))
    feats, logits = torch.randn(2, 16, 4, 4), torch.randn(2, 6, 4, 4)
    out = mem(feats, logits)
    context = torch.einsum("bkhw,kc->bchw", logits.softmax(1), mem.memory)
    expected = mem.bottleneck(torch.cat([feats, mem.self_attention(feats, context)], 1))
    assert torch.allclose(out, expected, atol=1e-6)


def test_v1_training_step_consistency_loss_from_the_second_epoch(tmp_path):
    params = load_params("params/demo/upernet_mcibipp.yaml")
    memory = dataclasses.replace(params.model.memory, kind="mcibi", momentum=0.9, adjust_momentum_by_lr=True)
    model_params = dataclasses.replace(params.model, memory=memory)
    params = dataclasses.replace(params, model=model_params)
    from mcibi import build_segmentor

    torch.manual_seed(0)
    model = build_segmentor(model_params)
    assert isinstance(model.memory_module, VectorMemory)
    optimizer = build_optimizer(model, params)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 8, (2, 64, 64))
    first = train_step(model, images, labels, optimizer, params.train.optimizer.lr, params, epoch=0)
    assert "memory" not in first  # official: only when epoch > 1 (1-based)
    present = labels.unique()
    assert (model.memory_module.memory[present].abs().sum(1) > 0).all()  # first sighting filled the slots
    second = train_step(model, images, labels, optimizer, params.train.optimizer.lr, params, epoch=1)
    assert second["memory"] > 0
    out = model(images, classify_memory=True)
    assert out.logits_memory.shape == (8, 8)
    losses = compute_losses(out, labels, params)
    target = F.cross_entropy(out.logits_memory, torch.arange(8)) * params.train.loss_weights.memory
    assert torch.allclose(losses["memory"], target)
    metrics = memory_metrics(model, type("S", (), {"classes": [f"c{i}" for i in range(8)]})())
    assert set(metrics) == {f"memory.{s}.c{i}" for s in ("norm", "mean") for i in range(8)}
