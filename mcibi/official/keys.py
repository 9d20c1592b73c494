"""Official parameter names and layouts to ours, for the released MCIBI++ checkpoints and the official ImageNet
files alike: the ResNet deep stem, Swin's stages and patch merging, the ImageNet files' unused tensors."""

from __future__ import annotations

import re

import torch

# The official ResNetV1c / ResNeSt deep stem is ``stem.{0,1,3,4,6,7}``, timm's resnet*c / resnest ``conv1.{0,1,3,4,6}``
# + ``bn1`` (under ``backbone_net.`` in the MCIBI++ checkpoints, at the top of the ImageNet files).
RESNET_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
               "stem.6.": "conv1.6.", "stem.7.": "bn1."}


def resnet_stem_key(key: str) -> str:
    """``key`` of an official ResNet backbone with its deep-stem prefix renamed to timm's (others unchanged)."""
    for old, new in RESNET_STEM.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def official_key_to_ours(key: str) -> str:
    """Our parameter name for an official MCIBI++ tensor name: ours except the backbone (``backbone_net.`` ->
    ``backbone.body.``, deep stem renamed); Swin checkpoints go through :func:`official_swin_to_ours` first."""
    if key.startswith("backbone_net."):
        return "backbone.body." + resnet_stem_key(key[len("backbone_net."):])
    return key


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


# ------------------------------------------------------------------------------------------------ ImageNet files
# tensors of the official ImageNet files that a segmentation backbone does not use: the classifiers and, in the
# original Swin release, constant buffers timm rebuilds
IMAGENET_UNUSED = {
    "resnet": re.compile(r"^fc\.(weight|bias)$"),
    "hrnet": re.compile(r"^(incre_modules|downsamp_modules|final_layer|classifier)\."),
    "swin": re.compile(r"^(head\.(weight|bias)|norm\.(weight|bias)|.*\.relative_position_index|.*\.attn_mask)$"),
}
_SWIN_LAYER = re.compile(r"^layers\.(\d+)\.(blocks|downsample)\.")


def swin_release_key(key: str) -> str:
    """Original Swin release name -> timm's: a stage's patch merging is timm's next stage's ``downsample`` (the
    2x2 concatenation order is the same in both), ``layers.i`` -> ``layers_i``."""
    m = _SWIN_LAYER.match(key)
    if not m:
        return key
    stage = int(m[1]) + (1 if m[2] == "downsample" else 0)
    return f"layers_{stage}.{m[2]}." + key[m.end():]


# per family of ImageNet file: its tensor name -> the name in our timm ``body``
IMAGENET_KEY = {"resnet": resnet_stem_key, "hrnet": lambda key: key, "swin": swin_release_key}
