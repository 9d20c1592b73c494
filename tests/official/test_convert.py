"""Official MCIBI++ checkpoints map onto our models tensor for tensor (names and shapes from the official keys)."""

import dataclasses
import re

import pytest
import torch
from checkout import ROOT

import mcibi
from mcibi.models import build_segmentor
from mcibi.models.checkpoint import CheckpointError
from mcibi.official.keys import official_key_to_ours
from mcibi.spec.params import ChannelParams, load_params

KEYS = ROOT / "tests" / "fixtures" / "official_keys"  # the official checkpoints' tensor names
BASE = load_params(ROOT / "params" / "demo" / "upernet_mcibipp.yaml").model


def _official(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (KEYS / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        shapes[key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return shapes


def _params_for(shapes: dict, framework: str):
    classes = shapes["decoder_cls.conv2.bias"][0]
    kernel = shapes["decoder_cls.conv1.weight"][-1]
    context = ("aspp" if "context_within_image_module.global_branch.1.weight" in shapes
               else "ppm" if "context_within_image_module.bottleneck.0.weight" in shapes else "none")
    return dataclasses.replace(
        BASE, framework=framework, context_module=context, num_classes=classes, classifier_kernel=kernel,
        backbone=dataclasses.replace(BASE.backbone, name="resnet50c", pretrained=False),
        channels=ChannelParams(feats=512, transform=256, decoder=512, aux=512),
        dilations=(1, 12, 24, 36), use_self_attention=any(k.startswith("self_attention.") for k in shapes),
    )


def test_stem_renames():
    assert official_key_to_ours("backbone_net.stem.7.running_var") == "backbone.body.bn1.running_var"
    assert official_key_to_ours("backbone_net.stem.3.weight") == "backbone.body.conv1.3.weight"
    assert official_key_to_ours("backbone_net.layer4.2.bn3.bias") == "backbone.body.layer4.2.bn3.bias"
    assert official_key_to_ours("memory_module.memory") == "memory_module.memory"


@pytest.mark.slow
@pytest.mark.parametrize("file,framework", [
    ("keys_fcn_lip.txt", "fcn"), ("keys_psnet_lip.txt", "psnet"), ("keys_upernet_lip.txt", "upernet"),
    ("keys_deeplabv3_lip.txt", "deeplabv3"), ("keys_fcn_ade20k.txt", "fcn"), ("keys_psnet_ade20k.txt", "psnet"),
    ("keys_upernet_ade20k.txt", "upernet"), ("keys_deeplabv3_ade20k.txt", "deeplabv3"),
])
def test_every_official_r50_model_converts_strictly(file, framework):
    shapes = _official(file)
    params = _params_for(shapes, framework)
    gen = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=gen) if s else torch.tensor(1) for k, s in shapes.items()}
    converted = mcibi.convert_official_checkpoint({"model": official}, params)
    model = build_segmentor(params)
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.memory_module.memory, official["memory_module.memory"])
    assert torch.equal(model.backbone.body.bn1.weight, official["backbone_net.stem.7.weight"])


def test_missing_and_unexpected_tensors_are_named():
    params = dataclasses.replace(BASE, framework="fcn", context_module="none", classifier_kernel=1)
    good = {}
    for k, v in build_segmentor(params).state_dict().items():
        if k.endswith("memory_module.noise"):
            continue
        if k.startswith("backbone.body."):
            k = "backbone_net." + k[len("backbone.body."):]
            k = k.replace("backbone_net.conv1.", "backbone_net.stem.")
            k = k.replace("backbone_net.bn1.", "backbone_net.stem.7.")
        good[k] = v
    mcibi.convert_official_checkpoint(good, params)  # the round trip is accepted
    extra = dict(good, **{"decoder_cwi.conv2.bias": torch.zeros(8)})
    with pytest.raises(CheckpointError, match="unexpected \\['decoder_cwi.conv2.bias'\\]"):
        mcibi.convert_official_checkpoint(extra, params)
    del good["decoder_cls.conv2.bias"]
    with pytest.raises(CheckpointError, match="missing \\['decoder_cls.conv2.bias'\\]"):
        mcibi.convert_official_checkpoint(good, params)


def test_swin_patch_merging_order_maps_the_official_unfold_to_timm():
    from mcibi.official.keys import _unfold_to_timm_order

    b, h, w, c = 2, 6, 8, 5
    x = torch.randn(b, h, w, c)
    official = torch.nn.Unfold(kernel_size=2, stride=2)(x.permute(0, 3, 1, 2)).transpose(1, 2)  # (B, L, 4C)
    timm_order = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3).reshape(b, -1, 4 * c)
    assert torch.equal(timm_order, official[..., _unfold_to_timm_order(c)])


def test_official_swin_tensors_rename_and_reorder():
    from mcibi.official.keys import _unfold_to_timm_order, official_swin_to_ours

    reduction, norm = torch.randn(8, 16), torch.randn(16)
    state = {
        "backbone_net.patch_embed.projection.weight": torch.zeros(1),
        "backbone_net.stages.0.blocks.1.attn.w_msa.qkv.weight": torch.zeros(2),
        "backbone_net.stages.0.blocks.1.attn.w_msa.relative_position_index": torch.zeros(3),
        "backbone_net.stages.2.blocks.0.ffn.layers.0.0.bias": torch.zeros(4),
        "backbone_net.stages.2.blocks.0.ffn.layers.1.weight": torch.zeros(5),
        "backbone_net.stages.0.downsample.reduction.weight": reduction,
        "backbone_net.stages.0.downsample.norm.weight": norm,
        "backbone_net.norm3.bias": torch.zeros(6),
        "decoder_cls.conv1.weight": torch.zeros(7),
    }
    out = official_swin_to_ours(state)
    assert set(out) == {
        "backbone.body.patch_embed.proj.weight", "backbone.body.layers_0.blocks.1.attn.qkv.weight",
        "backbone.body.layers_2.blocks.0.mlp.fc1.bias", "backbone.body.layers_2.blocks.0.mlp.fc2.weight",
        "backbone.body.layers_1.downsample.reduction.weight", "backbone.body.layers_1.downsample.norm.weight",
        "backbone.out_norms.3.bias", "decoder_cls.conv1.weight",
    }
    order = _unfold_to_timm_order(4)
    assert torch.equal(out["backbone.body.layers_1.downsample.reduction.weight"], reduction[:, order])
    assert torch.equal(out["backbone.body.layers_1.downsample.norm.weight"], norm[order])
