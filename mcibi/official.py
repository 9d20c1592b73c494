"""Translation of the official toolbox's MCIBI++ configs into our model params (for parity checks, benchmarks
and writing params files that match a released checkpoint)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch
import yaml

from mcibi.params import BackboneParams, ChannelParams, MemoryParams, ModelParams

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
        return yaml.safe_load(resources.files("mcibi").joinpath(OFFICIAL_CONFIGS).read_text())
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
_SWIN_RENAMES = (("patch_embed.projection.", "body.patch_embed.proj."), ("patch_embed.norm.", "body.patch_embed.norm."),
                 (".attn.w_msa.", ".attn."), (".ffn.layers.0.0.", ".mlp.fc1."), (".ffn.layers.1.", ".mlp.fc2."))
_SWIN_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.")
_SWIN_MERGE = re.compile(r"^stages\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)$")
_SWIN_OUT_NORM = re.compile(r"^norm(\d+)\.(weight|bias)$")


def _unfold_to_timm_order(channels: int) -> torch.Tensor:
    """Index i of timm's 2×2 patch-merging input = index ``order[i]`` of the official ``nn.Unfold`` one.

    timm concatenates the four neighbours offset-major ((kw·2 + kh)·C + c), the official sampler is
    channel-major (c·4 + kh·2 + kw).
    """
    order = torch.empty(4 * channels, dtype=torch.long)
    for kh in range(2):
        for kw in range(2):
            timm_idx = (kw * 2 + kh) * channels + torch.arange(channels)
            order[timm_idx] = torch.arange(channels) * 4 + kh * 2 + kw
    return order


def official_swin_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official (mmseg-style) Swin backbone tensors (``backbone_net.*``) as our ``backbone.*`` tensors.

    Renames to timm's layout (a stage's patch merging is timm's next stage's ``downsample``), reorders the
    patch-merging channels from the official unfold order to timm's concatenation order, maps the output
    norms ``norm{i}`` to ``out_norms.{i}`` and drops ``relative_position_index`` (a constant timm rebuilds).
    Other tensors pass through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith("backbone_net."):
            out[key] = value
            continue
        rest = key[len("backbone_net."):]
        if rest.endswith("relative_position_index"):
            continue
        if m := _SWIN_OUT_NORM.match(rest):
            out[f"backbone.out_norms.{m[1]}.{m[2]}"] = value
            continue
        if m := _SWIN_MERGE.match(rest):
            order = _unfold_to_timm_order(value.shape[-1] // 4)
            value = value[:, order] if m[2] == "reduction" else value[order]
            out[f"backbone.body.layers_{int(m[1]) + 1}.downsample.{m[2]}.{m[3]}"] = value
            continue
        rest = _SWIN_BLOCK.sub(lambda m: f"body.layers_{m[1]}.blocks.", rest)
        for old, new in _SWIN_RENAMES:
            rest = rest.replace(old, new)
        out["backbone." + rest] = value
    return out
