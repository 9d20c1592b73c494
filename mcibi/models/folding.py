"""Inference-only rewrite of a trained segmentor: BatchNorm folded into the convolution that feeds it.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals one convolution with scaled
weights and a bias. Folding removes one full pass over every activation map (about a tenth of a CPU forward)
and gives the same logits up to float rounding. Only pairs whose adjacency is known are folded:

- consecutive ``Conv2d`` → ``BatchNorm2d`` children of an ``nn.Sequential`` (our ConvBNReLU, classifiers,
  PPM/ASPP branches, timm's deep stems and downsample paths);
- ``convN`` → ``bnN`` attributes of modules whose forward applies them back to back (timm's ResNet blocks,
  also used by HRNet, and the HRNet stem), and consecutive children of timm's ``FeatureListNet`` (the ResNet
  stem ``conv1`` → ``bn1``).

Anything else (ResNeSt's split attention, Swin's LayerNorms) is left as it is. The model is copied, never
changed in place, so a training model is never silently altered.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_NAMED_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def _named_pair_classes() -> tuple[type, ...]:
    """timm classes whose forward runs ``convN`` then ``bnN`` back to back (ResNet blocks, also HRNet's)."""
    from timm.models.hrnet import HighResolutionNet
    from timm.models.resnet import BasicBlock, Bottleneck

    return BasicBlock, Bottleneck, HighResolutionNet  # HighResolutionNetFeatures subclasses HighResolutionNet


def _runs_children_in_order(module: nn.Module) -> bool:
    """Sequential, or timm's FeatureListNet, whose forward applies its children one after the other."""
    return isinstance(module, nn.Sequential) or type(module).__name__ == "FeatureListNet"


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    """``module`` itself if it is a Conv2d, or the last child of a Sequential that is one (a deep stem)."""
    if isinstance(module, nn.Conv2d):
        return module
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Conv2d):
        return module[-1]
    return None


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Scale ``conv``'s weights and set its bias so that it computes ``bn(conv(x))`` (eval statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    new_bias = (bias - bn.running_mean) * scale + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias)


def _foldable(conv: nn.Conv2d | None, bn: nn.Module | None) -> bool:
    return (conv is not None and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every known Conv → BatchNorm pair folded; returns the copy."""
    folded = copy.deepcopy(model).eval()
    named = _named_pair_classes()
    for module in list(folded.modules()):
        if _runs_children_in_order(module):
            children = list(module._modules.items())
            for (_, first), (name, second) in zip(children, children[1:], strict=False):
                conv = _last_conv(first)
                if _foldable(conv, second):
                    _fold_into(conv, second)
                    module._modules[name] = nn.Identity()
        if isinstance(module, named):
            for conv_name, bn_name in _NAMED_PAIRS:
                conv = _last_conv(getattr(module, conv_name, None))
                bn = getattr(module, bn_name, None)
                if _foldable(conv, bn):
                    _fold_into(conv, bn)
                    setattr(module, bn_name, nn.Identity())
    return folded
