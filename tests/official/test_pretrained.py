"""``pretrained: official``: the official ImageNet files, in their release format and built from the official backbone
classes with random weights, give our backbones the official backbones' features (the official loader is the
reference); the download goes through a loopback server (cache, resume, checksum from the file name)."""

import copy

import pytest
import torch
from miniature_datasets import Server, local_path, sha256

from mcibi.catalogue.official import load_official_configs
from mcibi.models.backbone import Backbone
from mcibi.official.pretrained import (
    OFFICIAL_WEIGHTS,
    OfficialWeights,
    PretrainedError,
    fetch_official_weights,
    load_official_backbone,
    official_backbone_to_ours,
    read_official_file,
)

ssseg = pytest.importorskip("ssseg", reason="the official sssegmentation package is not installed")



def _official_backbone(config: str, **over):
    from ssseg.modules.models.backbones import BuildBackbone, hrnet

    hrnet.HRModule.use_checkpoint = False  # sssegmentation 1.7.0's HRModule reads an attribute it never sets
    cfg = copy.deepcopy(load_official_configs()[config]["backbone"])
    cfg.pop("mcibi_version", None)
    if cfg["type"] != "SwinTransformer":
        cfg["norm_cfg"] = {"type": "BatchNorm2d"}  # single process
    cfg.update({"pretrained": False, "selected_indices": [0, 1, 2, 3], **over})
    return BuildBackbone(cfg)


def _randomised(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.05)
    return module.state_dict()


def _features_diff(official: torch.nn.Module, ours: Backbone) -> float:
    """Max relative difference of the feature maps (the official HRNet returns its one concatenated map, ours
    repeats it for the four head inputs)."""
    images = torch.randn(1, 3, 65, 81)
    with torch.no_grad():
        expected = official.eval()(images)
        got = ours.eval()(images)[: len(expected)]
    assert len(got) == len(expected) and got[0].shape == expected[0].shape
    diff = max((g - e).abs().max().item() / e.abs().max().item() for g, e in zip(got, expected, strict=True))
    print(f"features max relative difference: {diff:.2e}")
    return diff


@pytest.mark.slow
def test_resnet50_v1c_official_file_served_cached_and_converted(tmp_path, monkeypatch):
    """The whole path: download from a loopback server (first transfer broken off, resumed), sha256-prefix check,
    cache, strict conversion; our features equal the official backbone's loaded by the official loader."""
    source = _official_backbone("mcibiplusplus_upernet_resnet50os8_lip")
    state = dict(_randomised(source))
    state |= {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}  # the ImageNet classifier
    file = tmp_path / "release.pth"
    torch.save({"state_dict": state}, file)
    data = file.read_bytes()
    real = OFFICIAL_WEIGHTS["resnet50c"]
    url = real.url.replace("2cccc1ad", sha256(data)[:8])  # the same file-name convention for our random file
    monkeypatch.setitem(OFFICIAL_WEIGHTS, "resnet50c", OfficialWeights(real.structure_type, url, real.family))
    server = Server().start()
    try:
        server.files[local_path(url)] = data
        server.truncate_once.add(local_path(url))
        monkeypatch.setenv("MCIBI_PRETRAINED_MIRROR", f"http://127.0.0.1:{server.port}")
        monkeypatch.setenv("MCIBI_PRETRAINED_DIR", str(tmp_path / "cache"))
        ours = Backbone("resnet50c", pretrained=False, output_stride=8)
        load_official_backbone(ours.body, "resnet50c")
        assert [r[2] for r in server.requests_for(url.rsplit("/", 1)[1])] == [None, f"bytes={len(data) // 2}-"]
        load_official_backbone(Backbone("resnet50c", pretrained=False, output_stride=8).body, "resnet50c")  # cached
        assert len(server.requests_for(url.rsplit("/", 1)[1])) == 2
    finally:
        server.stop()
    official = _official_backbone("mcibiplusplus_upernet_resnet50os8_lip", pretrained=True,
                                  pretrained_model_path=str(file))
    assert _features_diff(official, ours) < 1e-5


def test_a_corrupt_download_is_rejected_and_deleted(tmp_path, monkeypatch):
    weights = OFFICIAL_WEIGHTS["resnet101c"]
    server = Server().start()
    try:
        server.files[local_path(weights.url)] = b"not the file" * 100
        monkeypatch.setenv("MCIBI_PRETRAINED_MIRROR", f"http://127.0.0.1:{server.port}")
        with pytest.raises(PretrainedError, match="e67eebb6"):
            fetch_official_weights(weights, tmp_path)
    finally:
        server.stop()
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith('.lock')]


@pytest.mark.parametrize("config, name, family, smaller", [
    # the model zoo's S-101-D8 and HRNetV2p-W48 stand in as their smaller siblings (same names and layout per family)
    ("mcibiplusplus_upernet_resnest101os8_lip", "resnest50d", "resnet",
     {"structure_type": "resnest50", "depth": 50, "stem_channels": 64}),
    ("mcibiplusplus_aspp_hrnetv2w48_lip", "hrnet_w18", "hrnet",
     {"structure_type": "hrnetv2_w18", "arch": "hrnetv2_w18"}),
])
def test_resnest_and_hrnet_official_files_load_as_officially(config, name, family, smaller, tmp_path):
    source = _official_backbone(config, **smaller)
    state = dict(_randomised(source))
    if family == "resnet":
        state |= {"fc.weight": torch.randn(10, 2048), "fc.bias": torch.randn(10)}
    else:  # the ImageNet HRNet's classification head
        state |= {"incre_modules.0.0.conv1.weight": torch.randn(32, 18, 1, 1), "classifier.weight": torch.randn(10, 4)}
    file = tmp_path / "release.pth"
    torch.save(state, file)
    official = _official_backbone(config, **smaller, pretrained=True, pretrained_model_path=str(file))
    ours = Backbone(name, pretrained=False, output_stride=4 if family == "hrnet" else 8)
    ours.body.load_state_dict(official_backbone_to_ours(read_official_file(file), family, ours.body.state_dict()))
    assert _features_diff(official, ours) < 1e-5


def _swin_release_format(mmseg: dict[str, torch.Tensor], head: int = 10) -> dict[str, torch.Tensor]:
    """The original Swin release's names and channel order, from the official (mmseg-style) state dict: the exact
    inverse of the official loader's ``swinconvert``, plus the tensors the release holds besides."""
    perm = [0, 2, 1, 3]
    out = {}
    for k, v in mmseg.items():
        if k.startswith("norm"):  # the official output norms are not in the release
            continue
        new = k.replace("stages", "layers", 1).replace("attn.w_msa.", "attn.").replace("ffn.layers.0.0.", "mlp.fc1.")
        new = new.replace("ffn.layers.1.", "mlp.fc2.").replace("patch_embed.projection", "patch_embed.proj")
        if "downsample.reduction" in k:
            o, i = v.shape
            v = v.reshape(o, i // 4, 4).transpose(1, 2)[:, perm, :].reshape(o, i)
        elif "downsample.norm" in k:
            v = v.reshape(-1, 4).transpose(0, 1)[perm, :].reshape(-1)
        out[new] = v
        if new.endswith("blocks.1.attn.relative_position_index"):  # shifted blocks store their mask
            out[new.replace("attn.relative_position_index", "attn_mask")] = torch.zeros(4, 49, 49)
    c = mmseg["norm3.weight"].shape[0]
    return out | {"norm.weight": torch.ones(c), "norm.bias": torch.zeros(c), "head.weight": torch.randn(head, c),
                  "head.bias": torch.zeros(head)}


def test_swin_release_loads_as_officially(tmp_path):
    """Swin-T stands in for Swin-L (same names and patch-merging layout, 7x smaller): the release format through
    the official loader (its swinconvert) and through ours give the same features."""
    tiny = {"structure_type": "swin_tiny_patch4_window7_224", "pretrain_img_size": 224, "embed_dims": 96,
            "window_size": 7, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "drop_path_rate": 0.3}
    source = _official_backbone("mcibiplusplus_upernet_swinlarge_ade20k", **tiny)
    file = tmp_path / "swin_release.pth"
    torch.save({"model": _swin_release_format(dict(_randomised(source)))}, file)
    official = _official_backbone("mcibiplusplus_upernet_swinlarge_ade20k", **tiny, pretrained=True,
                                  pretrained_model_path=str(file))
    ours = Backbone("swin_tiny_patch4_window7_224", pretrained=False, output_stride=32)
    ours.body.load_state_dict(official_backbone_to_ours(read_official_file(file), "swin", ours.body.state_dict()))
    assert _features_diff(official, ours) < 1e-5


def test_a_file_for_another_backbone_is_an_error(tmp_path):
    ours = Backbone("resnet10t", pretrained=False)
    with pytest.raises(PretrainedError, match="unexpected"):
        official_backbone_to_ours({"stem.0.weight": torch.zeros(1), "extra.weight": torch.zeros(1)}, "resnet",
                                  ours.body.state_dict())


def test_official_init_is_loaded_around_the_models_builder(tmp_path, monkeypatch):
    """``pretrained: official``: mcibi.models builds the architecture (and refuses to build it silently random), the
    caller-level builder loads the file into its backbone; every other tensor and the RNG stream are those of the
    same model built without the file."""
    import dataclasses

    from mcibi.models import build_segmentor
    from mcibi.official.keys import RESNET_STEM
    from mcibi.official.pretrained import build_pretrained_segmentor
    from mcibi.spec.params import load_params

    params = load_params("params/demo/upernet_mcibipp.yaml").model  # resnet10t: the official deep-stem names
    official = dataclasses.replace(params, backbone=dataclasses.replace(params.backbone, pretrained="official"))
    random = dataclasses.replace(params, backbone=dataclasses.replace(params.backbone, pretrained=False))
    ours_to_official = {new: old for old, new in RESNET_STEM.items()}
    body = Backbone("resnet10t", pretrained=False).body
    state = dict(_randomised(body))
    file_state = {next((ours_to_official[p] + k[len(p):] for p in ours_to_official if k.startswith(p)), k): v
                  for k, v in state.items()}
    file = tmp_path / "resnet10t_official.pth"
    torch.save({"state_dict": file_state | {"fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}}, file)
    url = f"https://download.example/resnet10t_v1c-{sha256(file.read_bytes())[:8]}.pth"
    (tmp_path / "cache").mkdir()
    file.rename(tmp_path / "cache" / url.rsplit("/", 1)[1])
    monkeypatch.setitem(OFFICIAL_WEIGHTS, "resnet10t", OfficialWeights("resnet10t", url, "resnet"))
    monkeypatch.setenv("MCIBI_PRETRAINED_DIR", str(tmp_path / "cache"))

    with pytest.raises(ValueError, match="build_pretrained_segmentor"):
        build_segmentor(official)
    torch.manual_seed(3)
    loaded = build_pretrained_segmentor(official).state_dict()
    rng_loaded = torch.get_rng_state()
    torch.manual_seed(3)
    plain = build_segmentor(random).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_loaded)
    assert list(loaded) == list(plain)
    for key, value in loaded.items():
        expected = state[key.removeprefix("backbone.body.")] if key.startswith("backbone.body.") else plain[key]
        assert torch.equal(value, expected), key
