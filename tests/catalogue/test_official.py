"""Every official MCIBI++ config translates into our model params with its switches."""

import pytest

from mcibi.catalogue.official import load_official_configs, model_params_from_official


def test_all_official_configs_translate():
    configs = load_official_configs()
    assert len(configs) == 37
    by_name = {name: model_params_from_official(name, cfg) for name, cfg in configs.items()}
    lip = by_name["mcibiplusplus_upernet_resnet50os8_lip"]
    assert (lip.framework, lip.backbone.name, lip.num_classes, lip.use_self_attention) == ("upernet", "resnet50c", 20,
                                                                                            False)
    assert lip.classifier_kernel == 3 and lip.aux_head
    hrnet = by_name["mcibiplusplus_aspp_hrnetv2w48_cityscapes"]
    assert hrnet.backbone.name == "hrnet_w48" and hrnet.memory.downsample_before_sa and not hrnet.aux_head
    swin_ade = by_name["mcibiplusplus_upernet_swinlarge_ade20k"]
    assert swin_ade.use_self_attention and swin_ade.backbone.output_stride == 32
    assert sum(p.memory.force_use_preds_pr for p in by_name.values()) == 1
    assert not hrnet.backbone.stem_first_relu  # mcibi_version: true
    assert by_name["mcibiplusplus_aspp_hrnetv2w48_lip"].backbone.stem_first_relu
    assert hrnet.cwi_classifier_kernel == 3
    assert sum(p.cwi_classifier_kernel == 3 for p in by_name.values()) == 4
    assert swin_ade.backbone.drop_path_rate == pytest.approx(0.3) and lip.backbone.drop_path_rate == 0.0
    # the official UperNet configs take their context within image from ASPP in 11 of 21 cases
    assert by_name["mcibiplusplus_upernet_resnet101os8_ade20k"].context_module == "aspp"
    assert lip.context_module == "ppm" and by_name["mcibiplusplus_resnet50os8_lip"].context_module == "none"
    assert sum(p.framework == "upernet" and p.context_module == "aspp" for p in by_name.values()) == 11
