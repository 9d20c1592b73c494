"""BatchNorm folding and channels-last give the same numbers as the plain model."""

import dataclasses

import pytest
import torch

from mcibi.engine.step import build_optimizer, train_step
from mcibi.models import build_segmentor
from mcibi.models.folding import fold_batchnorm
from mcibi.spec.params import load_params

PARAMS = load_params("params/demo/upernet_mcibipp.yaml")


def _model(backbone: str, framework: str = "upernet"):
    p = PARAMS.model
    context = {"fcn": "none", "psnet": "ppm", "upernet": "ppm", "deeplabv3": "aspp"}[framework]
    p = dataclasses.replace(p, framework=framework, context_module=context, aux_head=not backbone.startswith("hrnet"),
                            backbone=dataclasses.replace(p.backbone, name=backbone))
    torch.manual_seed(0)
    model = build_segmentor(p)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial statistics, or folding would be the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    model.memory_module.memory[:, 0] = torch.linspace(-1, 1, p.num_classes)
    return model.eval()


def _count_bn(model):
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("backbone,framework,all_folded", [
    ("resnet10t", "upernet", True), ("resnet10t", "deeplabv3", True), ("resnet10t", "fcn", True),
    ("hrnet_w18_small", "deeplabv3", True), ("swin_tiny_patch4_window7_224", "upernet", True),
    ("resnest14d", "psnet", False),  # split attention keeps its own BatchNorms
])
def test_folded_model_gives_the_same_logits(backbone, framework, all_folded):
    model = _model(backbone, framework)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert (_count_bn(folded) == 0) == all_folded and _count_bn(folded) < _count_bn(model)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x).logits
        got = folded(x).logits
        got_cl = folded.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last)).logits
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale
    assert (got_cl - expected).abs().max() <= 1e-5 * scale
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched


def test_channels_last_training_step_matches_nchw():
    params = PARAMS
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = build_segmentor(params.model).to(memory_format=layout)
        optimizer = build_optimizer(model, params)
        gen = torch.Generator().manual_seed(3)
        images = torch.randn(2, 3, 64, 64, generator=gen).contiguous(memory_format=layout)
        labels = torch.randint(0, 8, (2, 64, 64), generator=gen)
        torch.manual_seed(1)  # same dropout masks
        losses = train_step(model, images, labels, optimizer, 0.01, params, epoch=0)
        results.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (loss_a, state_a), (loss_b, state_b) = results
    assert loss_a["total"] == pytest.approx(loss_b["total"], rel=1e-5)
    for key, value in state_a.items():
        assert torch.allclose(value.float(), state_b[key].float(), rtol=1e-4, atol=1e-5), key
