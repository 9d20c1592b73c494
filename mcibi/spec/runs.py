"""The runs of an experiment and what a workflow job asks for: seed runs, job threads, the launcher.

The workflow imports this module when it builds its DAG, so it reads params only (no torch, no pandas).
"""

from __future__ import annotations

import dataclasses

from mcibi.spec.params import ExperimentParams, ResourceParams


def seed_runs(stem: str, base_seed: int, seeds: int) -> list[tuple[str, int]]:
    """(run folder name, seed) of the ``seeds`` runs of one experiment: the params' own seed keeps the plain
    name (so a single-seed run is unchanged), seed ``base + k`` runs as ``<stem>-seed<base + k>``."""
    return [(stem, base_seed)] + [(f"{stem}-seed{base_seed + k}", base_seed + k) for k in range(1, seeds)]


def with_seed(params: ExperimentParams, seed: int | None) -> ExperimentParams:
    """``params`` trained with another seed: ``train.seed`` replaced and the name (MLflow run name, run folder)
    suffixed ``-seed<k>`` as :func:`seed_runs` names it; the params' own seed (or None) changes nothing."""
    if seed is None or seed == params.train.seed:
        return params
    return dataclasses.replace(params, train=dataclasses.replace(params.train, seed=seed),
                               name=f"{params.name}-seed{seed}")


def job_threads(resources: ResourceParams) -> int:
    """CPU cores a job asks for: ``cpus_per_gpu`` per GPU, or ``cpus_per_gpu`` for a CPU job."""
    return resources.cpus_per_gpu * max(resources.gpus, 1)


def launcher(resources: ResourceParams) -> str:
    """The command prefix of a job: ``mcibi``, or ``torchrun --standalone --nproc_per_node=<gpus> -m mcibi``."""
    if resources.gpus > 1:
        return f"torchrun --standalone --nproc_per_node={resources.gpus} -m mcibi"
    return "mcibi"
