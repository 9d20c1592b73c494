"""Under DDP (2 CPU processes, gloo) the memory is averaged after each update and confusion matrices are summed."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mcibi.metrics import ConfusionMatrix
from mcibi.models.memory import DistributionMemory


def _worker(rank: int, world: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        mem = DistributionMemory(4, 8, 4)
        gen = torch.Generator().manual_seed(rank)
        feats = torch.randn(1, 8, 4, 4, generator=gen)
        labels = torch.full((1, 4, 4), rank, dtype=torch.long)  # rank 0 sees class 0, rank 1 class 1
        mem.update(feats, labels, momentum=0.5, resolution="feature")
        local = mem.memory.clone()
        mem.sync()
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([rank]), torch.tensor([rank]))
        cm.all_reduce()
        out[rank] = (local, mem.memory.clone(), cm.matrix.clone())
    finally:
        dist.destroy_process_group()


def test_memory_sync_averages_and_confusion_sums(tmp_path):
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    local0, synced0, cm0 = out[0]
    local1, synced1, cm1 = out[1]
    assert torch.allclose(synced0, (local0 + local1) / 2) and torch.equal(synced0, synced1)
    assert torch.equal(synced0[2:], torch.tensor([[0.0, 1.0]] * 2))  # classes no rank saw stay at init
    assert torch.equal(cm0, torch.diag(torch.tensor([1, 1, 0]))) and torch.equal(cm0, cm1)
