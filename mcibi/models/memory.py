"""The class memories that give every pixel context beyond its image, read by soft aggregation + attention.

- :class:`DistributionMemory` (MCIBI++): per-class (μ, σ) in the buffer ``memory`` (K×2, initialised (0, 1)) and
  ``noise`` (K×C fixed standard-normal vectors, row k drawn from a CPU generator seeded with k — the same
  vectors the official code draws by reseeding the global RNG on every forward, which we never do).
- :class:`VectorMemory` (MCIBI v1, ablation): one C-vector per class, cosine-weighted updates.

``forward`` only reads; the training step calls ``update`` under ``no_grad`` and :meth:`ClassMemory.sync` under
DDP. Updates are vectorised over classes with no host synchronisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcibi.models.blocks import ConvBNReLU, SelfAttention, resize_bilinear


def official_noise(num_classes: int, channels: int) -> torch.Tensor:
    """Row k = ``torch.randn(1, C)`` from a CPU generator seeded with k (the official per-class draws)."""
    return torch.cat([torch.randn(1, channels, generator=torch.Generator().manual_seed(k)) for k in range(num_classes)])


def _interpolation_matrix(size_in: int, size_out: int, align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) matrix of 1-D bilinear resizing weights, exactly as ``F.interpolate`` computes them."""
    eye = torch.eye(size_in, device=like.device, dtype=like.dtype)[None, None]
    return F.interpolate(eye, size=(size_out, size_in), mode="bilinear", align_corners=align_corners)[0, 0]


class ClassMemory(nn.Module):
    """What both memory kinds share: per-pixel dataset-level context ``D = W · M`` from the K class
    representations M, attended by the pixel representations and fused with them (``O = CBR([R ; SA(R, D)])``).

    Subclasses hold the memory state in buffers and define :meth:`class_representations` and ``update``.
    """

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
        self.downsample_before_sa = ConvBNReLU(feats_channels, feats_channels, 3, stride=2) if downsample_before_sa \
            else None
        self.self_attention = SelfAttention(feats_channels, feats_channels, transform_channels, feats_channels)
        self.bottleneck = ConvBNReLU(feats_channels * 2, feats_channels, 3)
        self.init_state(num_classes, feats_channels)

    def init_state(self, num_classes: int, feats_channels: int) -> None:
        """Register the memory's buffers (``memory`` and whatever else the kind keeps)."""
        raise NotImplementedError

    def class_representations(self) -> torch.Tensor:
        """M (K×C): one representation per class."""
        raise NotImplementedError

    def forward(self, feats: torch.Tensor, gather_logits: torch.Tensor) -> torch.Tensor:
        """Memory output O = CBR([R ; SA(R, W·M)]) for pixel representations R and class logits L (W = softmax L)."""
        weights = gather_logits.softmax(dim=1)
        if self.hard_aggregate:
            weights = F.one_hot(weights.argmax(dim=1), self.num_classes).permute(0, 3, 1, 2).to(weights.dtype)
        reps = self.class_representations().to(weights.dtype)
        context = torch.einsum("bkhw,kc->bchw", weights, reps)  # dataset-level context D per pixel
        if self.downsample_before_sa is not None:
            attended = self.self_attention(self.downsample_before_sa(feats), self.downsample_before_sa(context))
            attended = resize_bilinear(attended, feats.shape[2:], self.align_corners)
        else:
            attended = self.self_attention(feats, context)
        return self.bottleneck(torch.cat([feats, attended], dim=1))

    @torch.no_grad()
    def sync(self) -> None:
        """Average the memory over DDP ranks after an update (no-op without a process group)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.memory, op=dist.ReduceOp.SUM)
            self.memory.div_(dist.get_world_size())

    def summary(self) -> dict[str, torch.Tensor]:
        """Per-class scalars that describe the memory (logged as trajectories over training)."""
        raise NotImplementedError


def _class_index(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels as long indices with every value outside [0, K) (255, -100, ...) sent to a spare bin K."""
    labels = labels.long()
    return torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)


def _labels_at(labels: torch.Tensor, size: torch.Size, resolution: str) -> torch.Tensor:
    """Labels for an update at ``resolution``: as given ("full") or nearest-downsampled to ``size`` ("feature")."""
    if resolution == "feature":
        return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
    if resolution != "full":
        raise ValueError(f"resolution must be 'full' or 'feature', got {resolution!r}")
    return labels


class DistributionMemory(ClassMemory):
    """MCIBI++: dataset-level class distributions (μ_k, σ_k) turned into context for every pixel."""

    def init_state(self, num_classes: int, feats_channels: int) -> None:
        """(μ, σ) = (0, 1) per class, and the official per-class noise vectors."""
        init = torch.stack([torch.zeros(num_classes), torch.ones(num_classes)], dim=1)
        self.register_buffer("memory", init)
        self.register_buffer("noise", official_noise(num_classes, feats_channels))

    def class_representations(self) -> torch.Tensor:
        """M (K×C): m_k = μ_k · 1 + σ_k · z_k."""
        return self.memory[:, :1] + self.memory[:, 1:] * self.noise

    def summary(self) -> dict[str, torch.Tensor]:
        """μ_k and σ_k."""
        return {"mu": self.memory[:, 0], "sigma": self.memory[:, 1]}

    @torch.no_grad()
    def update(
        self,
        feats: torch.Tensor,
        labels: torch.Tensor,
        momentum: float,
        resolution: str = "full",
    ) -> None:
        """Momentum update of (μ_k, σ_k) for every class present in ``labels``; absent classes are untouched.

        For class k, r̄_k is the mean pixel representation over its pixels, μ̂ / σ̂ the mean / unbiased std of r̄_k
        over channels; μ_k ← (1−m)μ_k + m μ̂ and likewise σ. ``resolution="full"`` upsamples the features to
        the label size (the official default); ``"feature"`` nearest-downsamples the labels instead (cheaper).
        Label values outside [0, K) — 255, -100, anything — are ignored. Vectorised, no host synchronisation.
        """
        feats = feats.float()
        k = self.num_classes
        labels = _labels_at(labels, feats.shape[2:], resolution)
        index = _class_index(labels, k)  # ignored pixels go to a spare bin k
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


class VectorMemory(ClassMemory):
    """MCIBI (ICCV'21, the predecessor, for ablation): one C-vector per class, read like MCIBI++.

    ``memory`` (K×C, zeros until a class is first seen) is updated from the pixels of each class present: a
    first sighting copies the class mean; afterwards m_k ← (1−m) m_k + m Σ_i w_i f_i with w_i ∝ 1 − cos(f_i, m_k),
    so pixels unlike the stored vector weigh more (the official ``cosine_similarity`` strategy).
    """

    def init_state(self, num_classes: int, feats_channels: int) -> None:
        """All-zero vectors: a class's slot is empty until it is first seen."""
        self.register_buffer("memory", torch.zeros(num_classes, feats_channels))

    def class_representations(self) -> torch.Tensor:
        """M (K×C): the stored vectors."""
        return self.memory

    def summary(self) -> dict[str, torch.Tensor]:
        """Norm and channel mean of each stored vector."""
        return {"norm": self.memory.norm(dim=1), "mean": self.memory.mean(dim=1)}

    @torch.no_grad()
    def update(
        self,
        feats: torch.Tensor,
        labels: torch.Tensor,
        momentum: float,
        resolution: str = "full",
    ) -> None:
        """Cosine-weighted momentum update of every class present in ``labels`` (others untouched).

        ``resolution="full"`` upsamples the features bilinearly to the label size (official); ``"feature"``
        nearest-downsamples the labels. Values outside [0, K) are ignored. Vectorised over classes and pixels,
        no host synchronisation. Where every pixel of a class equals the stored direction (all weights 0, a
        0/0 in the official code) the plain class mean is used instead.
        """
        feats = feats.float()
        k = self.num_classes
        labels = _labels_at(labels, feats.shape[2:], resolution)
        if feats.shape[2:] != labels.shape[-2:]:
            feats = resize_bilinear(feats, labels.shape[-2:], self.align_corners)
        b, c = feats.shape[:2]
        flat = feats.reshape(b, c, -1)  # (b, C, N)
        index = _class_index(labels, k).reshape(b, -1)  # (b, N), spare bin k for ignored pixels
        table = torch.cat([self.memory.float(), self.memory.new_zeros(1, c, dtype=torch.float32)])  # (K+1, C)
        stored = table[index].transpose(1, 2)  # (b, C, N): each pixel's current class vector
        dissimilarity = 1 - F.cosine_similarity(flat, stored, dim=1)  # (b, N)
        del stored
        counts = torch.bincount(index.reshape(-1), minlength=k + 1)[:k].to(flat.dtype)
        weight_sums = torch.zeros(k + 1, device=flat.device, dtype=flat.dtype)
        weight_sums.index_add_(0, index.reshape(-1), dissimilarity.reshape(-1))
        slots = index[:, None].expand_as(flat)
        sums = flat.new_zeros(b, c, k + 1).scatter_add_(2, slots, flat).sum(0).T[:k]  # Σ f per class
        weighted = flat.new_zeros(b, c, k + 1).scatter_add_(2, slots, flat * dissimilarity[:, None])
        weighted = weighted.sum(0).T[:k]  # Σ (1 − cos) f per class
        means = sums / counts.clamp_min(1)[:, None]
        weight_sums = weight_sums[:k, None]
        target = torch.where(weight_sums > 0, weighted / weight_sums.clamp_min(torch.finfo(flat.dtype).tiny), means)
        present = (counts > 0)[:, None]
        first = present & (self.memory == 0).all(dim=1, keepdim=True)
        blended = (1 - momentum) * self.memory.float() + momentum * target
        new = torch.where(first, means, torch.where(present, blended, self.memory.float()))
        self.memory.copy_(new.to(self.memory.dtype))
