"""Optimisers with the model zoo's parameter rules, and the learning-rate schedule (poly + linear warmup).

The schedule is a pure function of the iteration, so resuming needs only the iteration number; parameter groups
carry an ``lr_mult`` that the training step multiplies into the scheduled lr (the backbone multiplier).
"""

from __future__ import annotations

import torch
from torch import nn

from mcibi.spec.params import OptimizerParams, ScheduleParams

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def poly_lr(base_lr: float, min_lr: float, power: float, iteration: int, max_iters: int) -> float:
    """Poly decay per iteration, as the official PolyScheduler: (base - min)(1 - it/max)^power + min."""
    return (base_lr - min_lr) * (1.0 - iteration / max_iters) ** power + min_lr


def scheduled_lr(base_lr: float, schedule: ScheduleParams, iteration: int, max_iters: int) -> float:
    """The base learning rate at ``iteration`` (0-based): poly decay, scaled by the linear warmup factor.

    The warmup factor rises linearly from ``warmup_ratio`` at iteration 0 to 1 at ``warmup_iters`` (mmseg's
    ``1 - (1 - it / warmup_iters) (1 - ratio)``), applied on top of the poly value.
    """
    lr = poly_lr(base_lr, schedule.min_lr, schedule.power, iteration, max_iters)
    if iteration < schedule.warmup_iters:
        lr *= 1.0 - (1.0 - iteration / schedule.warmup_iters) * (1.0 - schedule.warmup_ratio)
    return lr


def _is_backbone(name: str) -> bool:
    return name.startswith("backbone.")


def parameter_groups(model: nn.Module, opt: OptimizerParams) -> list[dict]:
    """Trainable parameters split by the rules: no weight decay on norms / named keys, backbone lr multiplier.

    Groups hold ``params``, ``weight_decay`` and ``lr_mult``; parameters that no rule touches stay in one group
    in model order (so SGD without rules is the plain single-group optimiser). Empty groups are dropped.
    """
    norm_params = set()
    if opt.no_decay_norms:
        for module in model.modules():
            if isinstance(module, _NORMS) or type(module).__name__.lower().endswith(("norm", "norm2d", "normact2d")):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    keys = opt.no_decay_keys or ()
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = id(param) in norm_params or any(k in name for k in keys)
        mult = opt.backbone_lr_mult if _is_backbone(name) else 1.0
        groups.setdefault((no_decay, mult), []).append(param)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else opt.weight_decay, "lr_mult": mult}
            for (no_decay, mult), ps in groups.items() if ps]


def build_optimizer(model: nn.Module, opt: OptimizerParams, grad_scaling: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or AdamW (betas, decoupled weight decay) over :func:`parameter_groups`;
    ``grad_scaling``: a GradScaler will drive the steps (fp16)."""
    groups = parameter_groups(model, opt)
    # one fused kernel per step instead of a Python loop over tensors (less optimiser time on CPU):
    # SGD gives the same values bit for bit, AdamW up to the last bit (tests/engine/test_fused_optimizer.py)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if opt.name == "sgd":
        # not under a GradScaler: when the first step overflows, fused SGD skips its kernel but keeps the momentum
        # buffers it allocated uninitialised, and the next step adds that garbage (PyTorch 2.14, tested)
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                               fused=(fused and not grad_scaling) or None)
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay,
                                 fused=fused or None)
    raise ValueError(f"unknown optimizer {opt.name!r} (valid: sgd, adamw)")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimiser state, each per-parameter tensor in its parameter's memory layout.

    The fused kernels walk a state tensor with its parameter's strides: a momentum buffer saved NCHW and loaded for
    a channels-last parameter (a run resumed under another ``train.channels_last``, or ``auto`` on another kind of
    machine) would be updated element-misaligned, silently (2.5 off after one step of a 3x3 convolution).
    """
    optimizer.load_state_dict(state)
    for param, slots in optimizer.state.items():
        for key, value in slots.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                slots[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every group ``lr`` times its ``lr_mult``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
