"""The epoch's layout (``train.sampler``): iterations per epoch and each rank's images, against torch's own
DistributedSampler + DataLoader (the official trainer's), and the official counts of the model-zoo rows."""

import dataclasses
import math

import pytest
import torch
from checkout import ROOT
from torch.utils.data import DataLoader, DistributedSampler

from mcibi.catalogue.official import load_official_configs
from mcibi.catalogue.rows import DATASETS, catalogue_entry
from mcibi.data.lookup import get_spec
from mcibi.distributed import batch_plan
from mcibi.engine.order import SEED_STRIDE, epoch_batches, epoch_order
from mcibi.spec.params import SamplerParams, experiment_files, load_params
from mcibi.spec.sampler import epoch_steps, iterations_per_epoch, padded_order

PARAMS = ROOT / "params"
DISTRIBUTED = SamplerParams("distributed", 8)
LOADER = SamplerParams("loader", 1)


def _train(total: int, sampler: SamplerParams, seed: int = 0):
    """The demo's train params with another batch, layout and seed."""
    demo = load_params(PARAMS / "demo" / "upernet_mcibipp.yaml").train
    return dataclasses.replace(demo, seed=seed, total_batch_size=total, batch_per_device=total, sampler=sampler)


def _official_batches(num_samples: int, replicas: int, per_replica: int, rank: int, seed: int, epoch: int):
    """What the official trainer's rank ``rank`` takes in (our 0-based) ``epoch``: its DistributedSampler (shuffle,
    no drop_last, the seed we map train.seed to) after ``set_epoch(epoch + 1)`` under a DataLoader with drop_last."""
    sampler = DistributedSampler(list(range(num_samples)), num_replicas=replicas, rank=rank, shuffle=True,
                                 seed=SEED_STRIDE * seed)
    sampler.set_epoch(epoch + 1)
    loader = DataLoader(list(range(num_samples)), batch_size=per_replica, sampler=sampler, drop_last=True)
    return [batch.tolist() for batch in loader]


# (dataset size, replicas = GPUs, per-GPU batch): a multiple, non-multiples whose padding repeats the start of
# the order, a padding longer than the dataset (the order repeated), per-replica remainders that drop_last drops
CASES = [(16, 2, 2), (15, 4, 2), (30, 8, 1), (23, 4, 3), (3, 8, 1), (101, 8, 4)]


@pytest.mark.parametrize(("num_samples", "replicas", "per_replica"), CASES,
                         ids=[f"N{n}-R{r}-b{b}" for n, r, b in CASES])
@pytest.mark.parametrize("seed", [0, 3])
def test_each_rank_takes_what_distributed_sampler_and_dataloader_give(num_samples, replicas, per_replica, seed):
    sampler = SamplerParams("distributed", replicas)
    total = replicas * per_replica
    train = _train(total, sampler, seed)
    plan = batch_plan(total, per_replica, replicas)  # our run on the official GPU count: rank r = replica r
    for epoch in (0, 1, 4):
        official = [_official_batches(num_samples, replicas, per_replica, r, seed, epoch) for r in range(replicas)]
        assert iterations_per_epoch(num_samples, total, sampler) == len(official[0])
        for rank in range(replicas):
            assert epoch_batches(num_samples, train, epoch, plan, rank, first=0) == official[rank]
            # resuming at iteration `first` of the epoch continues with the same images
            assert epoch_batches(num_samples, train, epoch, plan, rank, first=1) == official[rank][1:]


def test_the_layout_does_not_depend_on_our_gpu_count():
    """One process accumulating, or 2 ranks: each step holds the 4 official replicas' batches, in replica order."""
    num_samples, replicas, per_replica = 23, 4, 2
    sampler = SamplerParams("distributed", replicas)
    train = _train(replicas * per_replica, sampler)
    official = [_official_batches(num_samples, replicas, per_replica, r, 0, 0) for r in range(replicas)]
    steps = [[i for r in range(replicas) for i in official[r][k]] for k in range(len(official[0]))]
    one = epoch_batches(num_samples, train, 0, batch_plan(8, 2, 1), 0, first=0)
    assert one == steps  # its 4 micro-batches of 2 are the 4 replicas' batches
    two = [epoch_batches(num_samples, train, 0, batch_plan(8, 2, 2), r, first=0) for r in range(2)]
    assert [a + b for a, b in zip(*two, strict=True)] == steps


def test_padding_repeats_the_start_of_the_order_as_distributed_sampler_does():
    assert padded_order([5, 3, 9, 1, 7], 4) == [5, 3, 9, 1, 7, 5, 3, 9]
    assert padded_order([2, 0], 8) == [2, 0, 2, 0, 2, 0, 2, 0]
    assert padded_order([4, 1, 3, 0], 4) == [4, 1, 3, 0]
    # a non-multiple: 15 images over 4 replicas of batch 2 = 16 slots, 2 iterations; the loader layout drops to 1
    assert iterations_per_epoch(15, 8, SamplerParams("distributed", 4)) == 2
    assert iterations_per_epoch(15, 8, LOADER) == 1
    assert sorted(i for step in epoch_steps(list(range(15)), 8, SamplerParams("distributed", 4)) for i in step) \
        == sorted([*range(15), 0])


def test_loader_layout_is_the_previous_one():
    """``loader`` cuts the seeded order into global batches (N // total) as before, so runs on it (the demo) keep
    their iterations and images: the demo's 240 images in batches of 8, 30 iterations per epoch."""
    demo = load_params(PARAMS / "demo" / "upernet_mcibipp.yaml").train
    assert demo.sampler == LOADER
    n, total = get_spec("demo").splits["train"], demo.total_batch_size
    plan = batch_plan(total, demo.batch_per_device, 1)
    for epoch in (0, 7):
        gen = torch.Generator().manual_seed(demo.seed * 100_003 + epoch)  # the order before train.sampler existed
        order = torch.randperm(n, generator=gen).tolist()
        before = [order[i * total : (i + 1) * total] for i in range(n // total)]
        assert epoch_batches(n, demo, epoch, plan, 0, first=0) == before
    assert iterations_per_epoch(n, total, demo.sampler) == 30


def test_distributed_order_is_the_official_one_for_seed_0():
    """The official trainer leaves DistributedSampler's seed at 0 and counts epochs from 1."""
    for epoch in (0, 5):
        gen = torch.Generator().manual_seed(epoch + 1)
        assert epoch_order(50, 0, epoch, DISTRIBUTED) == torch.randperm(50, generator=gen).tolist()


def test_lip_row_runs_the_official_952_iterations_per_epoch():
    p = load_params(PARAMS / "lip" / "upernet_r50_mcibipp.yaml")
    n = get_spec("lip").splits[p.data.train_split]
    assert (n, p.train.total_batch_size, p.train.sampler) == (30462, 32, DISTRIBUTED)
    assert iterations_per_epoch(n, p.train.total_batch_size, p.train.sampler) == 952  # the loader layout: 951
    assert iterations_per_epoch(n, 32, LOADER) == 951
    # what torch gives the official trainer: 8 GPUs of 4 images (ceil(30462 / 8) = 3808 samples each)
    official = DataLoader(range(n), batch_size=4, drop_last=True, sampler=DistributedSampler(range(n), 8, 0))
    assert len(official) == 952


def _rows():
    return [f for ds in DATASETS for f in experiment_files(PARAMS, ds)]


@pytest.fixture(scope="module")
def official_configs():
    return load_official_configs()


@pytest.mark.parametrize("file", _rows(), ids=lambda f: f"{f.parent.name}/{f.stem}")
def test_every_model_zoo_row_counts_iterations_as_the_official_8_gpus(file, official_configs):
    p = load_params(file)
    n = get_spec(p.data.name).splits[p.data.train_split]  # VSPW: videos, one frame of each per epoch
    assert p.train.sampler == DISTRIBUTED
    per_gpu = p.train.total_batch_size // 8
    official = DataLoader(range(n), batch_size=per_gpu, drop_last=True, sampler=DistributedSampler(range(n), 8, 0))
    assert iterations_per_epoch(n, p.train.total_batch_size, p.train.sampler) == len(official)
    assert len(official) == math.ceil(n / 8) // per_gpu
    # where the model-zoo row's batch is the official config's, so is the per-GPU batch (train.py: total // world size)
    cfg = official_configs[catalogue_entry(p.data.name, file.stem)[0].official_name]["dataloader"]
    if cfg["expected_total_train_bs_for_assert"] == p.train.total_batch_size:
        assert cfg["train"]["batch_size_per_gpu"] == per_gpu and cfg["train"]["drop_last"]


def test_custom_dataset_params_take_the_loader_layout():
    """A custom dataset has no official run to follow, and its capped batch (9 here) need not split over 8."""
    from mcibi.catalogue.custom import experiment_params

    row = load_params(PARAMS / "lip" / "upernet_r50_mcibipp.yaml")
    d, note = experiment_params(row, "shapes", 3, 18, (100, 100), epochs=3)
    assert d["train"]["total_batch_size"] == 9 and d["train"]["sampler"] == {"kind": "loader", "replicas": 1}
    assert "3 epochs = 6 iterations" in note
