"""Official MCIBI++ checkpoints map onto our models tensor for tensor (names and shapes from the official keys)."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from mcibi.checkpoint import CheckpointError, convert_official_checkpoint, official_key_to_ours
from mcibi.models import build_segmentor
from mcibi.params import ChannelParams, load_params

KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_keys"
BASE = load_params(Path(__file__).resolve().parents[1] / "params" / "demo" / "upernet_mcibipp.yaml").model


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
    if not KEYS.is_dir():
        pytest.skip("../shared/reference/official_keys is not beside the repository")
    shapes = _official(file)
    params = _params_for(shapes, framework)
    gen = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=gen) if s else torch.tensor(1) for k, s in shapes.items()}
    converted = convert_official_checkpoint({"model": official}, params)
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
    convert_official_checkpoint(good, params)  # the round trip is accepted
    extra = dict(good, **{"decoder_cwi.conv2.bias": torch.zeros(8)})
    with pytest.raises(CheckpointError, match="unexpected \\['decoder_cwi.conv2.bias'\\]"):
        convert_official_checkpoint(extra, params)
    del good["decoder_cls.conv2.bias"]
    with pytest.raises(CheckpointError, match="missing \\['decoder_cls.conv2.bias'\\]"):
        convert_official_checkpoint(good, params)
