"""The only module that talks to timm: a feature pyramid of four NCHW maps from any features_only model."""

from __future__ import annotations

import timm
import torch
from torch import nn


class Backbone(nn.Module):
    """timm backbone returning its last four stages (strides 4, 8, 8, 8 at output stride 8).

    Widths come from timm's ``feature_info`` so heads size themselves; channels-last outputs of
    transformer backbones are permuted to NCHW here, nowhere else.
    """

    def __init__(self, name: str, pretrained: bool, output_stride: int = 8) -> None:
        super().__init__()
        try:
            probe = timm.create_model(name, features_only=True, pretrained=False)
        except RuntimeError as exc:
            raise ValueError(f"backbone '{name}' cannot be built by timm with features_only=True: {exc}") from exc
        num_stages = len(probe.feature_info)
        del probe
        out_indices = tuple(range(num_stages - 4, num_stages))
        kwargs = {"features_only": True, "pretrained": pretrained, "out_indices": out_indices}
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        self.body = timm.create_model(name, **kwargs)
        self.channels: list[int] = list(self.body.feature_info.channels())
        fmt = getattr(self.body, "output_fmt", "NCHW")
        self.channels_last_output = str(fmt).upper().endswith("NHWC")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(images)
        if self.channels_last_output:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)
