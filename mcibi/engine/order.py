"""Sample order, per-rank batches and generator state: what makes runs repeatable and resumable bit-exactly."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from mcibi.distributed import BatchPlan
from mcibi.spec.params import (
    SamplerParams,
    TrainParams,
)
from mcibi.spec.sampler import epoch_steps

log = logging.getLogger(__name__)

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (data augmentation draws from per-sample generators of its own)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



SEED_STRIDE = 100_003  # apart per train.seed: the orders of seeds k and k + 1 never meet within 100k epochs


def epoch_order(num_samples: int, seed: int, epoch: int, sampler: SamplerParams) -> list[int]:
    """The shuffled sample order of ``epoch`` (0-based), before :func:`mcibi.sampler.epoch_steps` lays it out.

    ``torch.randperm`` seeded with ``SEED_STRIDE x seed + epoch``; for ``distributed`` with ``epoch + 1``, which is
    what ``DistributedSampler(seed=SEED_STRIDE x seed)`` draws after ``set_epoch(epoch + 1)``: the official trainer
    counts epochs from 1 and leaves the sampler's seed at 0, so seed 0 gives its orders (and its images where our
    split list is in the official dataset's order).
    """
    offset = 1 if sampler.kind == "distributed" else 0
    gen = torch.Generator().manual_seed(seed * SEED_STRIDE + epoch + offset)
    return torch.randperm(num_samples, generator=gen).tolist()


def epoch_batches(num_samples: int, train_params: TrainParams, epoch: int, plan: BatchPlan, rank: int,
                  first: int) -> list[list[int]]:
    """This rank's image indices for iterations ``first`` .. end of ``epoch`` (DistributedSampler's role).

    Iteration i takes the images of step i of :func:`mcibi.sampler.epoch_steps` on every GPU count; rank r takes
    the r-th contiguous slice, which it splits into its accumulation micro-batches, so rank r of N GPUs sees what
    micro-batch r of one GPU accumulating N steps sees, and a run on ``train.sampler.replicas`` GPUs gives each
    rank what the official DistributedSampler + DataLoader give it.
    """
    order = epoch_order(num_samples, train_params.seed, epoch, train_params.sampler)
    n = plan.per_process
    steps = epoch_steps(order, train_params.total_batch_size, train_params.sampler)
    return [step[rank * n : (rank + 1) * n] for step in steps[first:]]



# ----------------------------------------------------------------------------------------- resumable checkpoints
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as plain data (loadable with ``weights_only``)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x

