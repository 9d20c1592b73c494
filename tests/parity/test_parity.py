"""Converted weights give the official implementation's logits (fp32, eval mode, 1e-4 relative).

The official toolbox (sssegmentation 1.7.0) comes with the test extra; the official configs through
:func:`parity_support.official_config`.
"""

import pytest
import torch
from parity_support import official_config, randomise_state

from mcibi.catalogue.official import model_params_from_official
from mcibi.models import build_segmentor
from mcibi.official.checkpoints import convert_official_checkpoint


@pytest.mark.parametrize("name", [
    "mcibiplusplus_resnet50os8_lip",  # the fast tier's case (-m "not slow"); the others are marked slow
] + [pytest.param(name, marks=pytest.mark.slow) for name in [
    "mcibiplusplus_ppm_resnet50os8_lip", "mcibiplusplus_upernet_resnet50os8_lip",
    "mcibiplusplus_aspp_resnet50os8_ade20k",
    "mcibiplusplus_upernet_resnet50os8_voc",  # UperNet with the ASPP context
    "mcibiplusplus_upernet_resnet101os8_ade20k",  # R-101-D8
    "mcibiplusplus_upernet_resnest101os8_ade20k",  # S-101-D8
    "mcibiplusplus_upernet_swinlarge_ade20k",  # Swin-L: renamed, patch merging reordered, output norms
    "mcibiplusplus_aspp_hrnetv2w48_lip",  # HRNetV2p-W48 (the cityscapes config's mcibi_version stem is newer
    # than sssegmentation 1.7.0, which rejects the key)
]])
def test_converted_official_model_gives_the_same_logits(name, monkeypatch):
    from ssseg.modules.models.segmentors.mcibiplusplus.mcibiplusplus import MCIBIPlusPlus
    from ssseg.modules.utils import SSSegInputStructure

    cfg = official_config(name)
    if "hrnet" in name:  # sssegmentation 1.7.0's HRModule reads an attribute it never sets
        from ssseg.modules.models.backbones import hrnet

        monkeypatch.setattr(hrnet.HRModule, "use_checkpoint", False, raising=False)
    cfg["backbone"]["pretrained"] = False
    cfg["norm_cfg"] = {"type": "BatchNorm2d"}  # single process
    # built before the official constructor, which edits cfg in place
    model_params = model_params_from_official(name, cfg)
    ours = build_segmentor(model_params).eval()
    torch.manual_seed(0)
    official = MCIBIPlusPlus(cfg, mode="TEST")
    randomise_state(official)
    official.eval()
    ours.load_state_dict(convert_official_checkpoint(official.state_dict(), model_params), strict=True)
    images = torch.randn(1, 3, 65, 81)  # odd sizes: padding and rounding paths too
    with torch.no_grad():
        expected = official(SSSegInputStructure(images=images, mode="TEST")).seg_logits
        got = ours(images).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
