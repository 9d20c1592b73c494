"""The MCIBI++ distribution memory: per-class (μ, σ) read by soft aggregation + attention, updated by momentum.

State lives in buffers (saved in ``state_dict``): ``memory`` (K×2: μ, σ; initialised (0, 1)) and ``noise``
(K×C fixed standard-normal vectors, row k drawn from a CPU generator seeded with k — the same vectors the
official code draws by reseeding the global RNG on every forward, which we never do). ``forward`` only reads;
the training step calls :meth:`DistributionMemory.update` under ``no_grad`` and :meth:`sync` under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcibi.models.blocks import ConvBNReLU, SelfAttention


def official_noise(num_classes: int, channels: int) -> torch.Tensor:
    """Row k = ``torch.randn(1, C)`` from a CPU generator seeded with k (the official per-class draws)."""
    return torch.cat([torch.randn(1, channels, generator=torch.Generator().manual_seed(k)) for k in range(num_classes)])


def _interpolation_matrix(size_in: int, size_out: int, align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) matrix of 1-D bilinear resizing weights, exactly as ``F.interpolate`` computes them."""
    eye = torch.eye(size_in, device=like.device, dtype=like.dtype)[None, None]
    return F.interpolate(eye, size=(size_out, size_in), mode="bilinear", align_corners=align_corners)[0, 0]


class DistributionMemory(nn.Module):
    """Dataset-level class distributions (μ_k, σ_k) turned into context for every pixel."""

    def __init__(
        self,
        num_classes: int,
        feats_channels: int,
        transform_channels: int,
        hard_aggregate: bool = False,
        downsample_before_sa: bool = False,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.hard_aggregate = hard_aggregate
        self.align_corners = align_corners
        init = torch.stack([torch.zeros(num_classes), torch.ones(num_classes)], dim=1)
        self.register_buffer("memory", init)
        self.register_buffer("noise", official_noise(num_classes, feats_channels))
        self.downsample_before_sa = ConvBNReLU(feats_channels, feats_channels, 3, stride=2) if downsample_before_sa \
            else None
        self.self_attention = SelfAttention(feats_channels, feats_channels, transform_channels, feats_channels)
        self.bottleneck = ConvBNReLU(feats_channels * 2, feats_channels, 3)

    def class_representations(self) -> torch.Tensor:
        """M (K×C): m_k = μ_k · 1 + σ_k · z_k."""
        return self.memory[:, :1] + self.memory[:, 1:] * self.noise

    def forward(self, feats: torch.Tensor, gather_logits: torch.Tensor) -> torch.Tensor:
        """Memory output O = CBR([R ; SA(R, W·M)]) for pixel representations R and class logits L (W = softmax L)."""
        weights = gather_logits.softmax(dim=1)
        if self.hard_aggregate:
            weights = F.one_hot(weights.argmax(dim=1), self.num_classes).permute(0, 3, 1, 2).to(weights.dtype)
        reps = self.class_representations().to(weights.dtype)
        context = torch.einsum("bkhw,kc->bchw", weights, reps)  # dataset-level context D per pixel
        if self.downsample_before_sa is not None:
            attended = self.self_attention(self.downsample_before_sa(feats), self.downsample_before_sa(context))
            attended = F.interpolate(attended, size=feats.shape[2:], mode="bilinear", align_corners=self.align_corners)
        else:
            attended = self.self_attention(feats, context)
        return self.bottleneck(torch.cat([feats, attended], dim=1))

    @torch.no_grad()
    def update(
        self,
        feats: torch.Tensor,
        labels: torch.Tensor,
        momentum: float,
        resolution: str = "full",
        ignore_index: int = 255,
    ) -> None:
        """Momentum update of (μ_k, σ_k) for every class present in ``labels``; absent classes are untouched.

        For class k, r̄_k is the mean pixel representation over its pixels, μ̂ / σ̂ the mean / unbiased std of r̄_k
        over channels; μ_k ← (1−m)μ_k + m μ̂ and likewise σ. ``resolution="full"`` upsamples the features to
        the label size (the official default); ``"feature"`` nearest-downsamples the labels instead (cheaper).
        Label values outside [0, K) — 255, -100, anything — are ignored. Vectorised, no host synchronisation.
        """
        del ignore_index  # every value outside [0, K) is ignored, whichever convention the labels use
        feats = feats.float()
        k = self.num_classes
        if resolution == "feature":
            labels = F.interpolate(labels[:, None].float(), size=feats.shape[2:], mode="nearest")[:, 0]
        elif resolution != "full":
            raise ValueError(f"resolution must be 'full' or 'feature', got {resolution!r}")
        labels = labels.long()
        index = torch.where((labels >= 0) & (labels < k), labels, k)  # ignored pixels go to a spare bin k
        counts = torch.bincount(index.reshape(-1), minlength=k + 1)[:k].to(feats.dtype)
        if feats.shape[2:] == labels.shape[-2:]:
            b, c = feats.shape[:2]
            flat = feats.reshape(b, c, -1)
            sums = torch.zeros(b, c, k + 1, device=feats.device, dtype=feats.dtype)
            sums = sums.scatter_add_(2, index.reshape(b, 1, -1).expand_as(flat), flat).sum(0).T[:k]
        else:
            sums = self._class_sums_of_upsampled(feats, index)
        present = counts > 0
        means = sums / counts.clamp_min(1)[:, None]  # r̄_k
        mu_hat = means.mean(dim=1)
        sigma_hat = means.std(dim=1)  # unbiased, as torch.std in the official update
        stats = torch.stack([mu_hat, sigma_hat], dim=1).to(self.memory.dtype)
        m = torch.where(present, momentum, 0.0).to(self.memory.dtype)[:, None]
        self.memory.mul_(1 - m).add_(m * stats)

    def _class_sums_of_upsampled(self, feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per-class sums of the bilinearly upsampled features over the label map, without upsampling.

        Bilinear resizing is linear and separable, up(F) = Wy F Wxᵀ, so the sum over the pixels of class k is
        Σ_q M_k[q] F[q] with M_k = Wyᵀ 1[label = k] Wx: the one-hot label map pulled back to feature size. That
        is the official full-resolution update's arithmetic at a fraction of its memory traffic.
        """
        b, c, h, w = feats.shape
        big_h, big_w = index.shape[-2:]
        k1 = self.num_classes + 1
        wy = _interpolation_matrix(h, big_h, self.align_corners, feats)  # (H, h)
        wx = _interpolation_matrix(w, big_w, self.align_corners, feats)  # (W, w)
        rows = torch.arange(b, device=feats.device).view(b, 1, 1) * k1 + index  # (b, H, W): image-class slot
        rows = rows * big_h + torch.arange(big_h, device=feats.device).view(1, big_h, 1)
        pulled = torch.zeros(b * k1 * big_h, w, device=feats.device, dtype=feats.dtype)
        pulled.index_add_(0, rows.reshape(-1), wx.repeat(b * big_h, 1))  # Σ_x over each row's class pixels
        weights = torch.einsum("Yh,bkYw->bkhw", wy, pulled.view(b, k1, big_h, w))  # M_k per image
        return torch.einsum("bkq,bcq->kc", weights.reshape(b, k1, h * w), feats.reshape(b, c, h * w))[:-1]

    @torch.no_grad()
    def sync(self) -> None:
        """Average the memory over DDP ranks after an update (no-op without a process group)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.memory, op=dist.ReduceOp.SUM)
            self.memory.div_(dist.get_world_size())
