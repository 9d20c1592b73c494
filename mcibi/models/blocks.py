"""Building blocks shared by heads and memory: ConvBNReLU, PPM, ASPP, SelfAttention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize_bilinear(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear")``; on CPU, up to 2x per side, through the channels-last kernel.

    Speed: PyTorch's NCHW bilinear kernel on CPU is slow for maps of many channels, slower than going through
    channels-last and back; for larger factors converting the big output back to NCHW costs more than it saves, so
    those stay NCHW. Values agree to float rounding, gradients exactly.
    """
    if (x.device.type != "cpu" or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last)
            or size[0] * size[1] > 4 * x.shape[2] * x.shape[3]):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    y = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                      align_corners=align_corners)
    return y.contiguous()


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) → BatchNorm → ReLU; SyncBatchNorm under DDP via ``convert_sync_batchnorm``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class PPM(nn.Module):
    """Pyramid pooling: per scale adaptive average pool → CBR(1) → upsample; concat with input → CBR(3)."""

    def __init__(self, in_ch: int, out_ch: int, pool_scales: Sequence[int], align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), *ConvBNReLU(in_ch, out_ch, 1)) for s in pool_scales
        )
        self.bottleneck = ConvBNReLU(in_ch + out_ch * len(pool_scales), out_ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        levels = [x] + [
            resize_bilinear(b(x), size, self.align_corners) for b in self.branches
        ]
        return self.bottleneck(torch.cat(levels, dim=1))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: CBR(1) for dilation 1, dilated CBR(3) otherwise, plus image pooling."""

    def __init__(self, in_ch: int, out_ch: int, dilations: Sequence[int], align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.parallel_branches = nn.ModuleList(
            ConvBNReLU(in_ch, out_ch, 1) if d == 1 else ConvBNReLU(in_ch, out_ch, 3, dilation=d) for d in dilations
        )
        self.global_branch = nn.Sequential(nn.AdaptiveAvgPool2d(1), *ConvBNReLU(in_ch, out_ch, 1))
        self.bottleneck = ConvBNReLU(out_ch * (len(dilations) + 1), out_ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.parallel_branches]
        pooled = self.global_branch(x)
        outs.append(resize_bilinear(pooled, x.shape[2:], self.align_corners))
        return self.bottleneck(torch.cat(outs, dim=1))


class SelfAttention(nn.Module):
    """Global attention: queries from one map, keys/values from another, scaled by T^-0.5, softmax over keys.

    Projections as in the official block: query/key 2 × CBR(1) to T, value CBR(1) to T, output CBR(1) T→out.
    """

    def __init__(self, query_ch: int, key_ch: int, transform_ch: int, out_ch: int) -> None:
        super().__init__()
        self.transform_ch = transform_ch
        self.query_project = nn.Sequential(ConvBNReLU(query_ch, transform_ch), ConvBNReLU(transform_ch, transform_ch))
        self.key_project = nn.Sequential(ConvBNReLU(key_ch, transform_ch), ConvBNReLU(transform_ch, transform_ch))
        self.value_project = ConvBNReLU(key_ch, transform_ch)
        self.out_project = ConvBNReLU(transform_ch, out_ch)

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        b, _, h, w = query_feats.shape
        q = self.query_project(query_feats).flatten(2).transpose(1, 2)[:, None]  # B, 1, HW, T
        k = self.key_project(key_feats).flatten(2).transpose(1, 2)[:, None]  # B, 1, N, T
        v = self.value_project(key_feats).flatten(2).transpose(1, 2)[:, None]  # B, 1, N, T
        # softmax(q k^T / sqrt(T)) v, fused (flash / memory-efficient kernels where available)
        context = F.scaled_dot_product_attention(q, k, v, scale=self.transform_ch**-0.5)
        context = context[:, 0].transpose(1, 2).reshape(b, self.transform_ch, h, w)
        return self.out_project(context)
