"""MemorySegmentor: backbone + context-within-image head + optional MCIBI++ memory + classifiers + aux head.

``forward`` only computes and returns a :class:`SegmentorOutput` of feature-resolution logits (callers
upsample: the training step for the losses, inference per protocol) plus the pixel representations the
training step updates the memory from. ``memory=None`` builds the plain framework (the baseline): FCN, PSPNet,
UperNet or DeepLabV3 without the memory branch and its extra classifiers; ``MemoryOptions("mcibi++")`` the
distribution memory; ``MemoryOptions("mcibi")`` the v1 vector memory in the same place (an ablation of the memory
kind). Every argument is a plain value; :mod:`mcibi.models.build` maps an experiment's ``model`` params to them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcibi.models.backbone import Backbone
from mcibi.models.blocks import ASPP, PPM, ConvBNReLU, SelfAttention, resize_bilinear
from mcibi.models.memory import ClassMemory, DistributionMemory, VectorMemory

MEMORY_KINDS: dict[str, type[ClassMemory]] = {"mcibi++": DistributionMemory, "mcibi": VectorMemory}
CONTEXT_MODULE_KINDS = ("none", "ppm", "aspp")  # context within the image on the top stage: none (FCN), PPM or ASPP


@dataclass
class SegmentorOutput:
    """Feature-resolution logits (B, K, h, w) and what the training step needs."""

    logits: torch.Tensor  # final prediction (decoder_cls)
    logits_cwi: torch.Tensor | None = None  # context-within-image classifier (memory models with CWI)
    logits_pr: torch.Tensor | None = None  # pixel-representation classifier (memory models)
    logits_aux: torch.Tensor | None = None  # auxiliary head on backbone stage 3 (training only)
    representations: torch.Tensor | None = None  # R, what the memory is updated from (memory models)
    logits_memory: torch.Tensor | None = None  # (K, K) decoder_pr applied to the stored vectors (MCIBI v1 loss)


def classifier(in_ch: int, hidden: int, num_classes: int, dropout: float, kernel_size: int = 1,
               named: bool = True) -> nn.Sequential:
    """CBR(kernel) → Dropout2d → Conv1×1 to the classes; layer names follow the official decoders
    (conv1, bn1, act1, dropout, conv2) or, with ``named=False``, its auxiliary head (0..4)."""
    layers = [
        ("conv1", nn.Conv2d(in_ch, hidden, kernel_size, padding=kernel_size // 2, bias=False)),
        ("bn1", nn.BatchNorm2d(hidden)),
        ("act1", nn.ReLU(inplace=True)),
        ("dropout", nn.Dropout2d(dropout)),
        ("conv2", nn.Conv2d(hidden, num_classes, 1)),
    ]
    return nn.Sequential(OrderedDict(layers)) if named else nn.Sequential(*(m for _, m in layers))


def onehot_gather_logits(labels: torch.Tensor, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """One-hot ground truth at the feature size (nearest), ignored pixels all-zero: the memory-warmup weights."""
    small = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    valid = (small >= 0) & (small < num_classes)
    onehot = F.one_hot(small.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    return onehot * valid[:, None]


@dataclass(frozen=True)
class HeadChannels:
    """Widths of the head (the official values: feats 512, transform 256, decoder 512, aux 512)."""

    feats: int  # C: pixel representations, context-within-image output, memory output
    transform: int  # T: self-attention key/query/value width (the memory's)
    decoder: int  # hidden width of the classifiers and of the FPN outputs
    aux: int  # hidden width of the auxiliary head


@dataclass(frozen=True)
class MemoryOptions:
    """The class memory of a memory model and how it is read."""

    kind: str  # a key of MEMORY_KINDS: "mcibi++" (distribution memory) or "mcibi" (v1 vector memory)
    hard_aggregate: bool = False  # gather the memory by the argmax class instead of the softmax weights
    downsample_before_sa: bool = False  # the memory's self-attention on stride-2 maps
    force_use_preds_pr: bool = False  # gather by the pixel-representation logits even when a CWI classifier exists


class MemorySegmentor(nn.Module):
    """One of FCN / PSNet / UperNet / DeepLabV3, with or without a class memory (MCIBI++ or MCIBI v1).

    The framework is the pair (``context_module``, ``fpn``): FCN none, PSNet PPM, DeepLabV3 ASPP, UperNet the FPN with
    PPM or ASPP on the top stage. ``memory=None`` builds the plain framework (the baseline).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        context_module: str,
        fpn: bool,
        channels: HeadChannels,
        memory: MemoryOptions | None,
        pool_scales: Sequence[int],
        dilations: Sequence[int],
        use_self_attention: bool,
        fuse_memory_cwi_before_fpn: bool,
        aux_head: bool,
        classifier_kernel: int,
        cwi_classifier_kernel: int,
        dropout: float,
        align_corners: bool,
    ) -> None:
        super().__init__()
        ch, k = channels, num_classes
        if context_module not in CONTEXT_MODULE_KINDS:
            raise ValueError(f"context module '{context_module}' is not one of {CONTEXT_MODULE_KINDS}.")
        if memory is not None and memory.kind not in MEMORY_KINDS:
            raise ValueError(f"memory kind '{memory.kind}' is not one of {tuple(MEMORY_KINDS)}.")
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.fuse_memory_cwi_before_fpn = fuse_memory_cwi_before_fpn
        self.force_use_preds_pr = memory is not None and memory.force_use_preds_pr
        self.backbone = backbone
        stage_ch = self.backbone.channels
        top_ch = stage_ch[-1]
        self.with_memory = memory is not None
        self.is_fpn = fpn

        cwi = context_module
        self.context_within_image_module: nn.Module | None = None
        if cwi == "ppm":
            self.context_within_image_module = PPM(top_ch, ch.feats, pool_scales, align_corners)
        elif cwi == "aspp":
            self.context_within_image_module = ASPP(top_ch, ch.feats, dilations, align_corners)

        self.bottleneck: nn.Module | None = None
        self.memory_module: ClassMemory | None = None
        self.decoder_pr: nn.Module | None = None
        self.decoder_cwi: nn.Module | None = None
        self.self_attention: nn.Module | None = None
        if self.with_memory or cwi == "none":
            self.bottleneck = ConvBNReLU(top_ch, ch.feats, 3)  # pixel representations R (FCN: its conv)
        if memory is not None:
            self.decoder_pr = classifier(ch.feats, ch.decoder, k, dropout)
            if self.has_cwi:
                self.decoder_cwi = classifier(ch.feats, ch.decoder, k, dropout, kernel_size=cwi_classifier_kernel)
            self.memory_module = MEMORY_KINDS[memory.kind](k, ch.feats, ch.transform, memory.hard_aggregate,
                                                           memory.downsample_before_sa, align_corners)
            if self.has_cwi and use_self_attention:  # the official code applies it with the FPN too
                self.self_attention = SelfAttention(ch.feats, ch.feats, ch.feats // 2, ch.feats)

        # width of what reaches the classifier (or the FPN top level)
        if not self.has_cwi:
            fused_ch = ch.feats
        elif self.with_memory and (not self.is_fpn or fuse_memory_cwi_before_fpn):
            fused_ch = 2 * ch.feats
        else:
            fused_ch = ch.feats
        if self.is_fpn:
            self.lateral_convs = nn.ModuleList(ConvBNReLU(c, fused_ch, 1) for c in stage_ch[:-1])
            self.fpn_convs = nn.ModuleList(ConvBNReLU(fused_ch, ch.decoder, 3) for _ in stage_ch[:-1])
            cls_in = ch.decoder * (len(stage_ch) - 1) + fused_ch
            if self.with_memory and not fuse_memory_cwi_before_fpn:
                cls_in += ch.feats
            self.decoder_cls = classifier(cls_in, ch.decoder, k, dropout, kernel_size=classifier_kernel)
        else:
            self.decoder_cls = classifier(fused_ch, ch.decoder, k, dropout, kernel_size=classifier_kernel)
        self.auxiliary_decoder = (classifier(stage_ch[-2], ch.aux, k, dropout, kernel_size=3, named=False)
                                  if aux_head else None)

    @property
    def has_cwi(self) -> bool:
        """Whether the framework has a context-within-image module (all but FCN)."""
        return self.context_within_image_module is not None

    def _up(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Bilinear resize to ``size``; a map already that size is returned as it is (resizing it would copy the
        same values: at output stride 8 the three coarsest FPN levels share one resolution)."""
        if x.shape[2:] == size:
            return x
        return resize_bilinear(x, size, self.align_corners)

    def forward(self, images: torch.Tensor, gather_labels: torch.Tensor | None = None,
                classify_memory: bool = False) -> SegmentorOutput:
        """Compute the logits; ``gather_labels`` (training warmup only) replaces the memory's gathering logits
        by the one-hot ground truth, as the official ``warmup_epoch`` does; ``classify_memory`` also classifies
        the stored class vectors with ``decoder_pr`` (the MCIBI v1 representation-consistency loss's input)."""
        stages = self.backbone(images)
        x = stages[-1]
        out = SegmentorOutput(logits=x)  # logits filled below
        feats_cwi = self._context(x)
        memory_out = self._read_memory(x, feats_cwi, out, gather_labels, classify_memory) if self.with_memory else None
        fused = self._fuse(x, feats_cwi, memory_out)
        if self.is_fpn:
            fused = self._fpn(stages[:-1], fused, memory_out)
        out.logits = self.decoder_cls(fused)
        if self.training and self.auxiliary_decoder is not None:
            out.logits_aux = self.auxiliary_decoder(stages[-2])
        return out

    def _context(self, x: torch.Tensor) -> torch.Tensor | None:
        """Context within the image (PPM or ASPP on the top stage), None for FCN."""
        return self.context_within_image_module(x) if self.has_cwi else None

    def _read_memory(self, x: torch.Tensor, feats_cwi: torch.Tensor | None, out: SegmentorOutput,
                     gather_labels: torch.Tensor | None, classify_memory: bool) -> torch.Tensor:
        """The memory branch: pixel representations R and their classifiers (recorded in ``out``), the memory
        read gathered by those logits (or the one-hot labels), refined by self-attention with the context."""
        reps = self.bottleneck(x)
        out.representations = reps
        out.logits_pr = self.decoder_pr(reps)
        if self.decoder_cwi is not None:
            out.logits_cwi = self.decoder_cwi(feats_cwi)
        use_pr = self.force_use_preds_pr or out.logits_cwi is None
        gather = out.logits_pr if use_pr else out.logits_cwi
        if gather_labels is not None:
            gather = onehot_gather_logits(gather_labels, gather.shape[2:], self.num_classes)
        memory_out = self.memory_module(reps, gather)
        if classify_memory:
            vectors = self.memory_module.class_representations()
            out.logits_memory = self.decoder_pr(vectors[:, :, None, None].to(reps.dtype))[:, :, 0, 0]
        if self.self_attention is not None:
            memory_out = self.self_attention(feats_cwi, memory_out)
        return memory_out

    def _fuse(self, x: torch.Tensor, feats_cwi: torch.Tensor | None, memory_out: torch.Tensor | None) -> torch.Tensor:
        """What reaches the classifier (or the FPN's top level): context and memory read, concatenated unless the
        FPN takes the memory read beside its levels."""
        if memory_out is None:
            return feats_cwi if feats_cwi is not None else self.bottleneck(x)
        if feats_cwi is None:
            return memory_out
        if self.is_fpn and not self.fuse_memory_cwi_before_fpn:
            return feats_cwi
        return torch.cat([memory_out, feats_cwi], dim=1)

    def _fpn(self, lower: list[torch.Tensor], top: torch.Tensor, memory_out: torch.Tensor | None) -> torch.Tensor:
        """UperNet's FPN: laterals of the lower stages plus ``top``, top-down sums, 3x3 convs, every level (and
        the memory read when it was not fused before) at the finest resolution, concatenated."""
        laterals = [conv(s) for conv, s in zip(self.lateral_convs, lower, strict=True)] + [top]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + self._up(laterals[i], laterals[i - 1].shape[2:])
        levels = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = levels[0].shape[2:]
        levels = [levels[0]] + [self._up(lv, size) for lv in levels[1:]]
        if memory_out is not None and not self.fuse_memory_cwi_before_fpn:
            levels.append(self._up(memory_out, size))
        return torch.cat(levels, dim=1)

