"""The distribution memory against slow per-class reference formulations written here."""

import io

import pytest
import torch
import torch.nn.functional as F

from mcibi.models.memory import DistributionMemory, official_noise


def _memory(k=5, c=16, **kw):
    torch.manual_seed(0)
    return DistributionMemory(k, c, 8, **kw).eval()


def reference_update(memory, feats, labels, momentum, num_classes):
    """The official update, class by class, on full-resolution features, skipping every ignored value."""
    memory = memory.clone()
    b, c, h, w = feats.shape
    flat = feats.permute(0, 2, 3, 1).reshape(-1, c)
    seg = labels.reshape(-1)
    for cls in seg.unique().tolist():
        if cls < 0 or cls >= num_classes:
            continue
        mean_feat = flat[seg == cls].mean(0)
        memory[cls, 0] = (1 - momentum) * memory[cls, 0] + momentum * mean_feat.mean()
        memory[cls, 1] = (1 - momentum) * memory[cls, 1] + momentum * mean_feat.std()
    return memory


def test_noise_equals_the_official_global_rng_draws():
    saved = torch.get_rng_state()
    try:
        k, c = 4, 32
        noise = official_noise(k, c)
        mu, sigma = 0.3, 1.7
        for cls in range(k):
            torch.manual_seed(cls)  # what the official forward does for every class on every call
            drawn = torch.normal(mean=torch.full((1, c), mu), std=torch.full((1, c), sigma))
            assert torch.allclose(drawn[0], mu + sigma * noise[cls], atol=1e-6)
    finally:
        torch.set_rng_state(saved)


def test_initial_state_and_buffers_in_state_dict():
    mem = _memory()
    assert torch.equal(mem.memory, torch.tensor([[0.0, 1.0]] * 5))
    sd = mem.state_dict()
    assert "memory" in sd and "noise" in sd
    assert not any(p is mem.memory for p in mem.parameters())
    buf = io.BytesIO()
    mem.memory[2] = torch.tensor([0.5, 2.0])
    torch.save(sd, buf)
    other = _memory()
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(other.memory, mem.memory) and torch.equal(other.noise, mem.noise)


def test_first_update_and_momentum_full_resolution():
    mem = _memory()
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 16, 4, 4, generator=gen)
    labels = torch.randint(0, 3, (2, 16, 16), generator=gen)  # classes 3, 4 absent
    labels[0, :3] = 255
    labels[1, :, :2] = -100
    expected = reference_update(mem.memory, F.interpolate(feats, size=(16, 16), mode="bilinear"), labels, 0.1, 5)
    storage = mem.memory.data_ptr()
    mem.update(feats, labels, momentum=0.1, resolution="full")
    assert mem.memory.data_ptr() == storage  # in place
    assert torch.allclose(mem.memory, expected, atol=1e-6)
    assert torch.equal(mem.memory[3:], torch.tensor([[0.0, 1.0]] * 2))  # absent classes untouched
    # a second update composes with the configured momentum
    expected2 = reference_update(mem.memory, F.interpolate(feats * 2, size=(16, 16), mode="bilinear"), labels, 0.5, 5)
    mem.update(feats * 2, labels, momentum=0.5, resolution="full")
    assert torch.allclose(mem.memory, expected2, atol=1e-6)


def test_feature_resolution_update_against_reference():
    mem = _memory()
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 16, 4, 4, generator=gen)
    labels = torch.randint(0, 5, (2, 16, 16), generator=gen)
    labels[:, ::3] = 255
    small = F.interpolate(labels[:, None].float(), size=(4, 4), mode="nearest")[:, 0].long()
    expected = reference_update(mem.memory, feats, small, 0.1, 5)
    mem.update(feats, labels, momentum=0.1, resolution="feature")
    assert torch.allclose(mem.memory, expected, atol=1e-6)


def test_only_ignored_pixels_change_nothing():
    mem = _memory()
    mem.update(torch.randn(1, 16, 4, 4), torch.full((1, 8, 8), 255), momentum=0.1)
    mem.update(torch.randn(1, 16, 4, 4), torch.full((1, 8, 8), -100), momentum=0.1)
    assert torch.equal(mem.memory, torch.tensor([[0.0, 1.0]] * 5))


def reference_read(mem, feats, logits):
    """Soft aggregation with a per-class loop, then the module's own attention and bottleneck."""
    b, c, h, w = feats.shape
    weights = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, mem.num_classes)
    rows = [mem.memory[k, 0] + mem.memory[k, 1] * mem.noise[k] for k in range(mem.num_classes)]
    context = (weights @ torch.stack(rows)).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return mem.bottleneck(torch.cat([feats, mem.self_attention(feats, context)], dim=1))


@pytest.mark.parametrize("hard", [False, True])
def test_read_against_reference(hard):
    mem = _memory(hard_aggregate=hard)
    mem.memory.copy_(torch.tensor([[0.1, 0.9], [0.5, 1.2], [-0.3, 0.7], [0.0, 1.0], [0.2, 0.4]]))
    feats, logits = torch.randn(2, 16, 5, 6), torch.randn(2, 5, 5, 6)
    if hard:
        expected_logits = F.one_hot(logits.argmax(1), 5).permute(0, 3, 1, 2).float() * 1e4  # softmax → one-hot
        expected = reference_read(mem, feats, expected_logits)
    else:
        expected = reference_read(mem, feats, logits)
    with torch.no_grad():
        assert torch.allclose(mem(feats, logits), expected, atol=1e-5)


def test_downsample_before_sa_keeps_shape():
    mem = _memory(downsample_before_sa=True)
    out = mem(torch.randn(1, 16, 7, 9), torch.randn(1, 5, 7, 9))
    assert out.shape == (1, 16, 7, 9)


def test_read_does_not_touch_the_global_rng():
    mem = _memory()
    feats, logits = torch.randn(1, 16, 4, 4), torch.randn(1, 5, 4, 4)
    state = torch.get_rng_state()
    mem(feats, logits)
    assert torch.equal(torch.get_rng_state(), state)


def test_full_resolution_update_at_odd_sizes_equals_explicit_upsampling():
    """The pulled-back one-hot maps give the sums of explicitly upsampled features (non-integer ratios)."""
    mem = _memory(k=7)
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 16, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (3, 33, 50), generator=gen)
    labels[1, 10:20] = 255
    expected = reference_update(mem.memory, F.interpolate(feats, size=(33, 50), mode="bilinear"), labels, 0.3, 7)
    mem.update(feats, labels, momentum=0.3, resolution="full")
    assert torch.allclose(mem.memory, expected, atol=1e-5)
