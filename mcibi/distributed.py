"""Process-group setup for ``torchrun`` (DDP) and the batch arithmetic that makes runs GPU-count independent.

``torchrun --nproc_per_node=N -m mcibi train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them a
run is a single process. The params state the *total* batch; :func:`batch_plan` derives the per-process
micro-batch and the number of accumulation steps, so that every GPU count sees the same images per step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, result files and MLflow records."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is running."""
        return self.world_size > 1


def setup(device: str | None = None) -> DistEnv:
    """Join the process group ``torchrun`` describes (nccl on CUDA, gloo on CPU), or describe a single process.

    An already initialised group (tests that spawn workers themselves) is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    wants_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if wants_cuda:
        dev = torch.device(device if device and ":" in device and world == 1 else f"cuda:{local_rank}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device or "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        log.info("joined process group: rank %d of %d on %s", rank, world, dev)
    return DistEnv(rank, world, local_rank, dev)


def teardown(env: DistEnv) -> None:
    """Leave the process group when this module created one (``torchrun`` runs)."""
    if env.distributed and dist.is_initialized() and "TORCHELASTIC_RUN_ID" in os.environ:
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op for one process)."""
    if env.distributed:
        dist.barrier()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True if ``flag`` is true on any rank (so that every rank stops together, e.g. on a non-finite loss)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@dataclass(frozen=True)
class BatchPlan:
    """How the total batch of one optimiser step is split: world size x accumulation steps x micro-batch."""

    total: int
    world_size: int
    accumulation: int
    micro_batch: int

    @property
    def per_process(self) -> int:
        """Images one process loads per optimiser step."""
        return self.micro_batch * self.accumulation


def batch_plan(total: int, per_device: int, world_size: int, source: str = "params") -> BatchPlan:
    """Fewest accumulation steps with a micro-batch of at most ``per_device`` that cover ``total`` exactly.

    Raises ValueError naming ``source`` when the total cannot be split evenly over ``world_size`` processes.
    """
    if total % world_size:
        raise ValueError(f"{source}: train.total_batch_size {total} cannot be split over {world_size} processes; "
                         f"use a GPU count that divides it.")
    per_process = total // world_size
    for accumulation in range(1, per_process + 1):
        if per_process % accumulation == 0 and per_process // accumulation <= per_device:
            return BatchPlan(total, world_size, accumulation, per_process // accumulation)
    raise AssertionError("unreachable: accumulation = per_process always fits")

