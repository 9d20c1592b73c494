"""The only module that talks to timm: a feature pyramid of four NCHW maps from any features_only model.

Three layouts are handled here and nowhere else:
- CNNs (ResNet-D "c" variants, ResNeSt, ...): the last four stages, dilated to the requested output stride;
- HRNet: the four branch outputs upsampled to the finest (stride 4) and concatenated (HRNetV2, 720 channels
  for W48); the official models feed that one map to every head input, so it is returned four times; the
  cross-branch fusion upsamples bilinearly, as the official backbone does (timm: nearest);
- transformers with channels-last outputs (Swin): a LayerNorm per output stage (the official backbone's
  norm0..norm3), then permuted to NCHW; arbitrary input sizes are padded inside timm (``strict_img_size=False``)
  so crops need not match the pretraining resolution.
"""

from __future__ import annotations

import types

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mcibi.models.blocks import resize_bilinear


def _is_hrnet(name: str) -> bool:
    return name.startswith("hrnet")


def _is_swin(name: str) -> bool:
    return name.startswith(("swin", "swinv2"))


def _official_hrnet_fusion(module: nn.Module, x: list[torch.Tensor]) -> list[torch.Tensor]:
    """Forward of a timm ``HighResolutionModule`` with the official fusion: each coarser branch is resized to
    the target branch's size after its (bilinear) upsampling, so odd sizes line up."""
    if module.num_branches == 1:
        return [module.branches[0](x[0])]
    x = [branch(xi) for branch, xi in zip(module.branches, x, strict=True)]
    fused = []
    for i, fuse_outer in enumerate(module.fuse_layers):
        y = None
        for j, fuse in enumerate(fuse_outer):
            term = fuse(x[j])
            if j > i:
                term = resize_bilinear(term, x[i].shape[2:], False)
            y = term if y is None else y + term
        fused.append(module.fuse_act(y))
    return fused


def _official_window_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(Shifted) window attention of a timm Swin block in the official order: pad to whole windows, then shift.

    timm shifts first and pads after, so on maps that are not a multiple of the window (a 640 crop gives
    160×160 at stride 4, windows of 12) the windows hold other tokens than the official ones.
    """
    from timm.models.swin_transformer import window_partition, window_reverse

    _, h, w, c = x.shape
    wh, ww = block.window_size
    x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    hp, wp = x.shape[1:3]
    shift = tuple(block.shift_size)
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    mask = block.get_attn_mask(x) if any(shift) else None  # regions of the padded, shifted map
    windows = block.attn(window_partition(x, (wh, ww)).view(-1, wh * ww, c), mask=mask)
    x = window_reverse(windows.view(-1, wh, ww, c), (wh, ww), hp, wp)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class Backbone(nn.Module):
    """timm backbone returning four maps (CNN strides 4, 8, 8, 8 at output stride 8).

    ``channels`` lists their widths, from timm's ``feature_info``, so heads size themselves. ``pretrained``: timm's
    ImageNet weights for ``name`` (true) or a random start (false). The official toolbox's ImageNet files are not
    loaded here: :func:`mcibi.official.pretrained.load_official_backbone` loads one into ``body`` once built.
    """

    def __init__(self, name: str, pretrained: bool, output_stride: int = 8, align_corners: bool = False,
                 drop_path_rate: float = 0.0, stem_first_relu: bool = True) -> None:
        super().__init__()
        self.name = name
        self.align_corners = align_corners
        self.hrnet = _is_hrnet(name)
        if pretrained not in (False, True):
            raise ValueError(f"backbone '{name}': pretrained must be false or true (timm's weights), got "
                             f"{pretrained!r}. The official ImageNet files load through mcibi.official.pretrained "
                             "(build_pretrained_segmentor, load_official_backbone).")
        kwargs: dict = {"features_only": True, "pretrained": pretrained is True}
        if drop_path_rate > 0:
            kwargs["drop_path_rate"] = drop_path_rate  # stochastic depth (Swin-L: 0.3 in the official configs)
        if not stem_first_relu and not self.hrnet:
            raise ValueError(f"backbone '{name}': stem_first_relu=False is the official HRNet 'mcibi_version' "
                             "switch and exists for HRNet backbones only; set it to true.")
        if self.hrnet:
            kwargs["feature_location"] = ""  # raw branch outputs, not the classification "incre" modules
            kwargs["out_indices"] = (1, 2, 3, 4)
        elif _is_swin(name):
            kwargs["strict_img_size"] = False
            kwargs["always_partition"] = True  # the official keeps the 12×12 window on maps smaller than it
            kwargs["dynamic_img_size"] = True
            kwargs["out_indices"] = (0, 1, 2, 3)
        else:
            kwargs["out_indices"] = self._last_four(name)
            if output_stride != 32:
                kwargs["output_stride"] = output_stride
        try:
            self.body = timm.create_model(name, **kwargs)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"backbone '{name}' cannot be built by timm with {kwargs}: {exc}") from exc
        if output_stride < 32 and name.startswith("resnest"):
            self._undo_dilated_shortcut_pooling()
        if _is_swin(name):
            self._use_official_window_padding()
        if self.hrnet:
            self._use_official_hrnet_fusion()
        if not stem_first_relu:  # official HRNet mcibi_version: conv1 -> bn1 -> conv2 (no ReLU in between)
            self.body.act1 = nn.Identity()
        stage_channels = list(self.body.feature_info.channels())
        self.channels = [sum(stage_channels)] * 4 if self.hrnet else stage_channels
        self.channels_last_output = str(getattr(self.body, "output_fmt", "NCHW")).upper().endswith("NHWC")
        # transformers: a LayerNorm on every output stage, as the official (mmseg-style) Swin has (norm0..norm3);
        # timm's features_only outputs are un-normalised. Fresh (identity) on ImageNet weights, as officially.
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in stage_channels) if _is_swin(name) else None

    def _undo_dilated_shortcut_pooling(self) -> None:
        """ResNeSt's average-pool shortcuts in dilated stages: timm blurs them with a 2×2 stride-1 pool, the
        official ResNeSt pools with kernel = stride = 1, i.e. not at all. (Other timm ResNet-D models, such as
        the demo's resnet10t, keep timm's behaviour: no official model to match.)"""
        for module in self.body.modules():
            shortcut = getattr(module, "downsample", None)
            if isinstance(shortcut, nn.Sequential) and len(shortcut) and "AvgPool" in type(shortcut[0]).__name__:
                stride = shortcut[0].stride
                if stride in (1, (1, 1)):
                    shortcut[0] = nn.Identity()

    def _use_official_hrnet_fusion(self) -> None:
        """HRNet's cross-branch fusion as the official backbone computes it: bilinear (not nearest) upsampling
        of the coarser branches, resized to the finer branch's exact size (which also admits odd input sizes)."""
        for module in self.body.modules():
            if isinstance(module, nn.Upsample):
                module.mode, module.align_corners = "bilinear", False
            if type(module).__name__ == "HighResolutionModule":
                module.forward = types.MethodType(_official_hrnet_fusion, module)

    def _use_official_window_padding(self) -> None:
        """Swin on any input size as the official backbone computes it: the image padded right/bottom to the
        patch size, and in every block the map padded to whole windows *before* the cyclic shift."""
        self.body.patch_embed.dynamic_img_pad = True
        for module in self.body.modules():
            if type(module).__name__ == "SwinTransformerBlock":
                module._attn = types.MethodType(_official_window_attention, module)

    @staticmethod
    def _last_four(name: str) -> tuple[int, ...]:
        probe = timm.create_model(name, features_only=True, pretrained=False)
        n = len(probe.feature_info)
        return tuple(range(n - 4, n))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = list(self.body(images))
        if self.out_norms is not None:
            feats = [norm(f) for norm, f in zip(self.out_norms, feats, strict=True)]  # NHWC: over channels
        if self.channels_last_output:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        if self.hrnet:
            size = feats[0].shape[2:]
            up = [feats[0]] + [resize_bilinear(f, size, self.align_corners)
                               for f in feats[1:]]
            fused = torch.cat(up, dim=1)
            return [fused] * 4
        return feats
