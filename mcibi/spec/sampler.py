"""How one epoch becomes iterations: how many there are and which images each takes (``train.sampler``).

Pure arithmetic on a shuffled order (no torch), so the catalogue's budgets count iterations as training does.

``loader``: the epoch's order cut into global batches of ``train.total_batch_size``, the last partial batch
dropped: ``N // total`` iterations, every image at most once.

``distributed``: the official training's layout, ``DistributedSampler(num_replicas=replicas, shuffle=True)`` under
a ``DataLoader(batch_size=total // replicas, drop_last=True)`` on each replica. The sampler pads the order to a
multiple of ``replicas`` with its first images (so a few images appear twice), replica r takes every
``replicas``-th image from position r, and each replica drops its own last partial batch:
``ceil(N / replicas) // (total / replicas)`` iterations. ``replicas`` is the process count the epoch is laid out
for (the official's 8 GPUs), not the processes of our run: iteration i takes the replicas' batches i, replica
after replica, and our ranks and accumulation steps cut that list into equal contiguous parts, so a run on
``replicas`` GPUs gives rank r exactly what DistributedSampler gives rank r.
"""

from __future__ import annotations

import math

from mcibi.spec.params import SamplerParams


def iterations_per_epoch(num_samples: int, total_batch: int, sampler: SamplerParams) -> int:
    """Optimiser steps in one epoch over ``num_samples`` samples (0 when even one batch does not fill)."""
    if sampler.kind == "loader":
        return num_samples // total_batch
    per_replica = math.ceil(num_samples / sampler.replicas)  # DistributedSampler.num_samples (drop_last=False)
    return per_replica // (total_batch // sampler.replicas)


def padded_order(order: list[int], replicas: int) -> list[int]:
    """``order`` padded to a multiple of ``replicas`` by repeating its start, as DistributedSampler pads."""
    total = math.ceil(len(order) / replicas) * replicas
    padding = total - len(order)
    return order + (order * math.ceil(padding / len(order)))[:padding] if padding else list(order)


def epoch_steps(order: list[int], total_batch: int, sampler: SamplerParams) -> list[list[int]]:
    """The sample indices of every iteration of the epoch whose shuffled order is ``order``.

    Each step lists the replicas' batches one after the other (replica r's at ``[r * b, (r + 1) * b)`` with
    ``b = total / replicas``); for ``loader`` the one replica's batch is the step.
    """
    replicas = sampler.replicas if sampler.kind == "distributed" else 1
    padded = padded_order(order, replicas)
    streams = [padded[r::replicas] for r in range(replicas)]  # what each replica's sampler yields
    b = total_batch // replicas
    return [[i for stream in streams for i in stream[k * b : (k + 1) * b]]
            for k in range(iterations_per_epoch(len(order), total_batch, sampler))]
