"""One training iteration: forward, weighted losses, backward with accumulation, the memory update.

The model only computes; this step owns the losses, the memory update (under ``no_grad``, in fp32, with the
configured momentum) and where the learning rate enters."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from torch import nn

from mcibi.distributed import DistEnv, any_rank
from mcibi.engine.layout import autocast
from mcibi.engine.losses import compute_losses
from mcibi.engine.optim import build_optimizer as _build_optimizer
from mcibi.engine.optim import set_lr
from mcibi.spec.params import (
    ExperimentParams,
)

log = logging.getLogger(__name__)

V1_MEMORY_LOSS_FROM_EPOCH = 1  # 0-based; the official MCIBI adds it when epoch > 1 (1-based)


class NonFiniteLossError(FloatingPointError, RuntimeError):
    """A loss became NaN or infinite; training stopped before the optimiser step applied it."""


class DivergedError(NonFiniteLossError):
    """Weights, memory or optimiser state became NaN/inf although the loss was finite; nothing was written."""



def memory_momentum(params: ExperimentParams, lr: float) -> float:
    """Momentum of the memory update; scaled by lr / base_lr when ``adjust_momentum_by_lr`` is set."""
    mem = params.model.memory
    if mem.adjust_momentum_by_lr:
        return mem.momentum * lr / params.train.optimizer.lr
    return mem.momentum


def unwrap(model: nn.Module) -> nn.Module:
    """The plain segmentor inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    lr: float,
    params: ExperimentParams,
    epoch: int,
    *,
    accumulation: int = 1,
    scaler: torch.amp.GradScaler | None = None,
    env: DistEnv | None = None,
) -> dict[str, float]:
    """One iteration: set lr, forward/backward over ``accumulation`` micro-batches, step, memory update.

    The micro-batches behave like that many GPUs of a DDP run: gradients are averaged, and the memory update is
    the mean of the updates each micro-batch makes from the same starting memory (what ``memory.sync()`` gives
    across ranks), kept in fp32 outside autocast. A non-finite loss on any rank raises
    :class:`NonFiniteLossError` before the optimiser step, so the weights stay those of the last good step.
    Returns the loss values (means over the micro-batches of this process).
    """
    set_lr(optimizer, lr)
    model.train()
    core = unwrap(model)
    memory = getattr(core, "memory_module", None)
    warmup = memory is not None and epoch < params.model.memory.warmup_epochs
    # MCIBI v1's representation-consistency loss starts with the second epoch, as in the official code
    classify_memory = params.model.memory.kind == "mcibi" and epoch >= V1_MEMORY_LOSS_FROM_EPOCH
    precision = params.train.precision
    if images.shape[0] % accumulation:
        raise ValueError(f"batch of {images.shape[0]} images cannot be split into {accumulation} micro-batches")
    chunks = list(zip(images.chunk(accumulation), labels.chunk(accumulation), strict=True))
    start = memory.memory.clone() if memory is not None and accumulation > 1 else None
    updated = torch.zeros_like(start) if start is not None else None
    sums: dict[str, float] = {}
    ddp = getattr(model, "_orig_mod", model)  # DDP inside torch.compile's wrapper
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(chunks):
        last = i == len(chunks) - 1
        # gradients are all-reduced once per step, after the last micro-batch
        no_sync = ddp.no_sync() if isinstance(ddp, nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with no_sync:
            with autocast(x.device, precision):
                out = model(x, gather_labels=y if warmup else None,  # warmup: gather with one-hot ground truth
                            classify_memory=classify_memory)
                losses = compute_losses(out, y, params)
            values = {k: float(v.detach()) for k, v in losses.items()}
            if any_rank(not np.isfinite(values["total"]), env) if env else not np.isfinite(values["total"]):
                raise NonFiniteLossError(f"non-finite loss {values}")
            total = losses["total"] / accumulation if accumulation > 1 else losses["total"]
            (scaler.scale(total) if scaler is not None else total).backward()
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if memory is not None:
            with torch.no_grad():
                memory.update(out.representations.detach().float(), y, momentum=memory_momentum(params, lr),
                              resolution=params.model.memory.update_resolution)
                if start is not None:  # this micro-batch's update, then back to the shared starting memory
                    updated += memory.memory
                    memory.memory.copy_(start)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if memory is not None:
        with torch.no_grad():
            if updated is not None:
                memory.memory.copy_(updated / accumulation)
            memory.sync()
    return {k: v / len(chunks) for k, v in sums.items()}



def memory_metrics(model: nn.Module, spec) -> dict[str, float]:
    """The memory's per-class summary (MCIBI++: μ and σ; v1: norm and mean) as metrics, empty for baselines."""
    memory = getattr(unwrap(model), "memory_module", None)
    if memory is None:
        return {}
    return {f"memory.{stat}.{name}": value for stat, values in memory.summary().items()
            for name, value in zip(spec.classes, values.detach().cpu().tolist(), strict=True)}


def build_optimizer(model: nn.Module, params: ExperimentParams) -> torch.optim.Optimizer:
    """The optimiser ``train.optimizer`` describes, with its parameter rules (see :mod:`mcibi.engine.optim`)."""
    return _build_optimizer(model, params.train.optimizer, grad_scaling=params.train.precision == "fp16")
