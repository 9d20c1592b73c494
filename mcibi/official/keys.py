"""Official parameter names and layouts to ours: the MCIBI++ segmentor's backbone stem and Swin's stages."""

from __future__ import annotations

import re

import torch

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
