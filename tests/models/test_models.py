"""Segmentor shapes for every framework with and without memory, switches, and forward purity."""

import dataclasses

import pytest
import torch
from checkout import ROOT

from mcibi.models import build_segmentor
from mcibi.spec.params import load_params

BASE = load_params(ROOT / "params" / "demo" / "upernet_mcibipp.yaml").model


CONTEXT = {"fcn": "none", "psnet": "ppm", "upernet": "ppm", "deeplabv3": "aspp"}


def _model_params(framework, kind="mcibi++", **changes):
    memory_changes = {k: v for k, v in changes.items() if hasattr(BASE.memory, k)}
    memory = dataclasses.replace(BASE.memory, kind=kind, **memory_changes)
    rest = {k: v for k, v in changes.items() if not hasattr(BASE.memory, k)}
    channels = dataclasses.replace(BASE.channels, feats=32, transform=16, decoder=32, aux=32)
    rest.setdefault("context_module", CONTEXT[framework])
    return dataclasses.replace(BASE, framework=framework, memory=memory, channels=channels, **rest)


@pytest.mark.parametrize("framework", ["fcn", "psnet", "upernet", "deeplabv3"])
@pytest.mark.parametrize("kind", ["none", "mcibi++", "mcibi"])
def test_output_fields_and_shapes(framework, kind):
    model = build_segmentor(_model_params(framework, kind)).train()
    out = model(torch.randn(2, 3, 64, 64))
    stride = 4 if framework == "upernet" else 8  # UperNet predicts at its finest FPN level
    assert out.logits.shape == (2, 8, 64 // stride, 64 // stride)
    assert out.logits_aux.shape == (2, 8, 8, 8)
    if kind == "none":
        assert out.logits_pr is None and out.logits_cwi is None and out.representations is None
        assert model.memory_module is None
    else:
        assert out.logits_pr.shape == (2, 8, 8, 8) and out.representations.shape == (2, 32, 8, 8)
        assert (out.logits_cwi is None) == (framework == "fcn")
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).logits_aux is None  # aux head only when training


def test_official_widths_derive_from_feature_info():
    params = dataclasses.replace(_model_params("upernet"), channels=BASE.channels)
    model = build_segmentor(params)
    # resnet10t stages: 64, 128, 256, 512 channels; FPN top level = [memory ; cwi] = 2 x feats
    assert model.lateral_convs[0][0].in_channels == 64 and model.lateral_convs[0][0].out_channels == 128
    assert model.decoder_cls.conv1.in_channels == 3 * 64 + 128
    assert model.auxiliary_decoder[0].in_channels == 256
    assert model.backbone.channels == [64, 128, 256, 512]


@pytest.mark.parametrize("switch", [
    {"use_self_attention": True}, {"downsample_before_sa": True}, {"hard_aggregate": True},
    {"force_use_preds_pr": True}, {"fuse_memory_cwi_before_fpn": False}, {"classifier_kernel": 1},
    {"cwi_classifier_kernel": 3},
])
@pytest.mark.parametrize("framework", ["upernet", "deeplabv3"])
def test_switches_build_and_run(framework, switch):
    model = build_segmentor(_model_params(framework, **switch)).train()
    out = model(torch.randn(2, 3, 48, 48))
    assert torch.isfinite(out.logits).all()
    if switch.get("use_self_attention"):
        assert model.self_attention is not None


def test_warmup_gathers_with_ground_truth():
    model = build_segmentor(_model_params("psnet")).train()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 8, (2, 64, 64))
    torch.manual_seed(0)
    a = model(images, gather_labels=labels).logits
    torch.manual_seed(0)
    b = model(images).logits
    assert not torch.allclose(a, b)


def test_dropout_masks_differ_between_iterations():
    """The official forward reseeds the global RNG per class, so dropout repeats; ours must not."""
    model = build_segmentor(_model_params("deeplabv3")).train()
    x = torch.randn(2, 3, 48, 48)
    state = torch.get_rng_state()
    a, b = model(x).logits, model(x).logits
    assert not torch.equal(a, b)
    assert not torch.equal(torch.get_rng_state(), state)  # advanced by dropout, not reset


def test_backbone_output_stride_8():
    model = build_segmentor(_model_params("fcn"))
    feats = model.backbone(torch.randn(1, 3, 96, 96))
    assert [f.shape[-1] for f in feats] == [24, 12, 12, 12]


@pytest.mark.parametrize("name,stride,channels", [
    ("hrnet_w18_small", 4, [240] * 4),  # HRNetV2: 16 + 32 + 64 + 128 branch channels concatenated
    ("swin_tiny_patch4_window7_224", 32, [96, 192, 384, 768]),  # NHWC outputs permuted to NCHW
    ("resnest14d", 8, [256, 512, 1024, 2048]),  # ResNeSt (S-101-D8 is resnest101e)
])
def test_backbone_adapters(name, stride, channels):
    from mcibi.models.backbone import Backbone

    backbone = Backbone(name, pretrained=False, output_stride=8).eval()
    assert backbone.channels == channels
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 96, 128))  # not a multiple of Swin's window: padded inside timm
    assert [f.shape[1] for f in feats] == channels
    assert feats[-1].shape[-2:] == (-(-96 // stride), -(-128 // stride))


def test_hrnet_deeplabv3_with_memory_runs():
    params = dataclasses.replace(_model_params("deeplabv3"), aux_head=False,
                                 backbone=dataclasses.replace(BASE.backbone, name="hrnet_w18_small"))
    params = dataclasses.replace(params, memory=dataclasses.replace(params.memory, downsample_before_sa=True))
    model = build_segmentor(params).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 8, 16, 16) and out.logits_aux is None


def test_hrnet_mcibi_version_stem_drops_the_first_relu():
    from mcibi.models.backbone import Backbone

    torch.manual_seed(0)
    plain = Backbone("hrnet_w18_small", pretrained=False).eval()
    torch.manual_seed(0)
    official = Backbone("hrnet_w18_small", pretrained=False, stem_first_relu=False).eval()
    assert isinstance(official.body.act1, torch.nn.Identity) and isinstance(plain.body.act1, torch.nn.ReLU)
    official.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(plain(x)[0], official(x)[0])
    with pytest.raises(ValueError, match="HRNet"):
        Backbone("resnet10t", pretrained=False, stem_first_relu=False)


def test_drop_path_rate_reaches_timm():
    from mcibi.models.backbone import Backbone

    backbone = Backbone("swin_tiny_patch4_window7_224", pretrained=False, drop_path_rate=0.3)
    rates = [m.drop_prob for m in backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.3)


@pytest.mark.parametrize("framework", ["fcn", "psnet", "upernet", "deeplabv3"])
@pytest.mark.parametrize("kind", ["none", "mcibi++", "mcibi"])
def test_backward_reaches_every_parameter(framework, kind):
    import torch.nn.functional as F

    model = build_segmentor(_model_params(framework, kind)).train()
    images, labels = torch.randn(2, 3, 48, 48), torch.randint(0, 8, (2, 48, 48))
    out = model(images, classify_memory=kind == "mcibi")
    terms = [out.logits, out.logits_aux, out.logits_pr, out.logits_cwi]
    up = [F.interpolate(t, size=(48, 48), mode="bilinear") for t in terms if t is not None]
    loss = sum(F.cross_entropy(t, labels) for t in up)
    if out.logits_memory is not None:
        loss = loss + F.cross_entropy(out.logits_memory, torch.arange(8))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


MODEL_ZOO_BACKBONE_CONFIGS = [  # one official config per model-zoo backbone, with the channels its heads must see
    ("mcibiplusplus_upernet_resnet101os8_ade20k", "resnet101c", 2048),  # R-101-D8
    ("mcibiplusplus_upernet_resnest101os8_ade20k", "resnest101e", 2048),  # S-101-D8
    ("mcibiplusplus_aspp_resnest101os8_cityscapes", "resnest101e", 2048),
    ("mcibiplusplus_aspp_hrnetv2w48_cityscapes", "hrnet_w48", 720),  # HRNetV2p-W48, mcibi_version stem
    ("mcibiplusplus_upernet_swinlarge_ade20k", "swin_large_patch4_window12_384.ms_in22k", 1536),  # Swin-L, 22k
]


@pytest.mark.slow
@pytest.mark.parametrize("name,backbone,top_channels", MODEL_ZOO_BACKBONE_CONFIGS)
def test_every_model_zoo_backbone_builds_and_runs(name, backbone, top_channels):
    from mcibi.catalogue.official import load_official_config, model_params_from_official

    cfg = load_official_config(None, name)
    params = model_params_from_official(name, cfg, pretrained=False)
    model = build_segmentor(params).eval()
    assert params.backbone.name == backbone and model.backbone.channels[-1] == top_channels
    if backbone.startswith("swin"):
        assert model.backbone.body.layers_0.blocks[0].window_size == (12, 12)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.logits.shape[:2] == (1, cfg["num_classes"]) and torch.isfinite(out.logits).all()


def test_swin_official_window_order_equals_timm_where_no_padding_is_needed():
    from timm.models.swin_transformer import SwinTransformerBlock

    from mcibi.models.backbone import Backbone

    backbone = Backbone("swin_tiny_patch4_window7_224", pretrained=False).eval()
    blocks = [m for m in backbone.modules() if isinstance(m, SwinTransformerBlock)]
    assert blocks and all(b.always_partition for b in blocks)
    x = torch.randn(1, 3, 224, 224)  # maps 56, 28, 14, 7: whole windows, so the order cannot matter
    with torch.no_grad():
        ours = backbone(x)
        for b in blocks:
            del b._attn  # back to timm's shift-then-pad
        theirs = backbone(x)
        odd = torch.randn(1, 3, 100, 124)
        timm_odd = backbone(odd)
        backbone._use_official_window_padding()
        official_odd = backbone(odd)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs, strict=True))
    assert not torch.allclose(timm_odd[0], official_odd[0], atol=1e-5)  # padded maps: the order matters


def test_hrnet_fuses_bilinearly_and_takes_odd_sizes():
    from mcibi.models.backbone import Backbone

    backbone = Backbone("hrnet_w18_small", pretrained=False).eval()
    ups = [m for m in backbone.modules() if isinstance(m, torch.nn.Upsample)]
    assert ups and all(m.mode == "bilinear" and m.align_corners is False for m in ups)
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 65, 81))  # timm's own fusion fails on the 17x21 -> 9x11 branch sizes
    assert feats[0].shape == (1, 240, 17, 21)
