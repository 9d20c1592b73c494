"""Translation of the official toolbox's MCIBI++ configs into our model params (for parity checks, benchmarks
and writing params files that match a released checkpoint)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from mcibi.spec.params import BackboneParams, ChannelParams, MemoryParams, ModelParams

# official file-name stem (between "mcibiplusplus_" and "_<dataset>") -> (framework, timm backbone, stride)
_LAYOUTS = {
    "resnet50os8": ("fcn", "resnet50c", 8),
    "ppm_resnet50os8": ("psnet", "resnet50c", 8),
    "upernet_resnet50os8": ("upernet", "resnet50c", 8),
    "aspp_resnet50os8": ("deeplabv3", "resnet50c", 8),
    "upernet_resnet101os8": ("upernet", "resnet101c", 8),
    "aspp_resnet101os8": ("deeplabv3", "resnet101c", 8),
    "upernet_resnest101os8": ("upernet", "resnest101e", 8),
    "aspp_resnest101os8": ("deeplabv3", "resnest101e", 8),
    "aspp_hrnetv2w48": ("deeplabv3", "hrnet_w48", 4),
    # the official initialises from the ImageNet-22k checkpoint (swin_large_patch4_window12_384_22k); timm's
    # untagged name would load the 22k->1k fine-tuned one
    "upernet_swinlarge": ("upernet", "swin_large_patch4_window12_384.ms_in22k", 32),
}


OFFICIAL_CONFIGS = "official_configs.yaml"  # shipped in the package: every official MCIBI++ config


def load_official_configs(path: str | Path | None = None) -> dict:
    """Every official MCIBI++ config (the official SEGMENTOR_CFG dumped as plain data) by name: the copy shipped
    in the package (``mcibi/official_configs.yaml``), or the dump at ``path``."""
    if path is None:
        return yaml.safe_load(resources.files("mcibi.catalogue").joinpath(OFFICIAL_CONFIGS).read_text())
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: official configs dump not found; leave the path out to use the copy "
                                "shipped in mcibi.")
    return yaml.safe_load(file.read_text())


def load_official_config(path: str | Path | None, name: str) -> dict:
    """One official config by name (``path``: None for the copy shipped in the package)."""
    configs = load_official_configs(path)
    if name not in configs:
        raise KeyError(f"{path or OFFICIAL_CONFIGS}: no official config '{name}'.")
    return configs[name]


def model_params_from_official(name: str, cfg: dict, pretrained: bool | str = False) -> ModelParams:
    """Our ``ModelParams`` computing what the official config ``name`` computes."""
    stem = name.removeprefix("mcibiplusplus_").rsplit("_", 1)[0]
    if stem not in _LAYOUTS:
        raise KeyError(f"official config '{name}': unknown layout '{stem}' (known: {', '.join(sorted(_LAYOUTS))}).")
    framework, backbone, stride = _LAYOUTS[stem]
    head = cfg["head"]
    cwi = head["context_within_image"]
    momentum = head["update_cfg"]["momentum_cfg"]
    return ModelParams(
        framework=framework,
        context_module=cwi["type"] if cwi["is_on"] else "none",
        num_classes=cfg["num_classes"],
        backbone=BackboneParams(name=backbone, pretrained=pretrained, output_stride=stride,
                                drop_path_rate=float(cfg["backbone"].get("drop_path_rate", 0.0)),
                                stem_first_relu=not cfg["backbone"].get("mcibi_version", False)),
        memory=MemoryParams(kind="mcibi++", momentum=momentum["base_momentum"],
                            adjust_momentum_by_lr=momentum["adjust_by_learning_rate"], update_resolution="full",
                            hard_aggregate=head["use_hard_aggregate"],
                            downsample_before_sa=head["downsample_before_sa"],
                            force_use_preds_pr=head["force_use_preds_pr"], warmup_epochs=head["warmup_epoch"]),
        channels=ChannelParams(feats=head["feats_channels"], transform=head["transform_channels"],
                               decoder=head["decoder"]["cls"]["out_channels"],
                               aux=(cfg["auxiliary"] or {}).get("out_channels", 512)),
        pool_scales=tuple(cwi["cfg"]["pool_scales"]),
        dilations=tuple(cwi["cfg"]["dilations"]),
        use_self_attention=cwi.get("use_self_attention", True),
        fuse_memory_cwi_before_fpn=head["fuse_memory_cwi_before_fpn"],
        aux_head=cfg["auxiliary"] is not None,
        classifier_kernel=head["decoder"]["cls"].get("kernel_size", 1),
        cwi_classifier_kernel=head["decoder"]["cwi"].get("kernel_size", 1),
        dropout=head["decoder"]["cls"]["dropout"],
        align_corners=cfg["align_corners"],
    )


# ------------------------------------------------------------------------------------------------ Swin weights
