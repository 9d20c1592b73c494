"""Under DDP (2 CPU processes, gloo) the memory is averaged after each update and confusion matrices are summed;
torchrun training equals one process accumulating, and torchrun evaluation equals one process."""

import json
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_training import mcibi_cmd, run, tiny_dataset, tiny_params

from mcibi.evaluation.metrics import ConfusionMatrix
from mcibi.evaluation.protocols import evaluate
from mcibi.models import build_segmentor
from mcibi.models.checkpoint import load_checkpoint
from mcibi.models.memory import DistributionMemory
from mcibi.spec.params import load_params

pytestmark = pytest.mark.slow  # two processes per test (spawn, torchrun)


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


# ------------------------------------------------------------------------------- torchrun: training, evaluation
def _torchrun(*args):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mcibi",
                *args])


def test_two_process_training_equals_one_process_accumulating_and_evaluation_sums(tmp_path):
    data_root = tiny_dataset(tmp_path / "data")
    # no dropout: two ranks draw the same masks where one process accumulating draws two different ones
    # total 8 in micro-batches of 2: two ranks accumulate two each, one process accumulates four
    params = tiny_params(tmp_path / "params", dropout=0.0, epochs=1, total_batch_size=8, batch_per_device=2)
    common = ["--data-root", str(data_root), "--threads", "1", "--no-mlflow"]
    ddp = _torchrun("train", str(params), "--out", str(tmp_path / "ddp"), *common)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-4000:]
    assert "effective batch 8 = 2 process(es) x 2 accumulation step(s) x 2 images" in ddp.stderr
    single = run(mcibi_cmd("train", str(params), "--out", str(tmp_path / "one"), *common))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "effective batch 8 = 1 process(es) x 4 accumulation step(s) x 2 images" in single.stderr
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2

    a = load_checkpoint(tmp_path / "ddp" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "one" / "model.pt")["state_dict"]
    model = build_segmentor(load_params(params).model)
    trained = [n for n, _ in model.named_parameters()] + ["memory_module.memory"]
    for name in trained:  # BatchNorm running statistics differ: each rank keeps its own
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    assert not torch.equal(a["memory_module.memory"], model.memory_module.memory)  # the memory did move

    # evaluation: each rank scores half the images; the summed confusion equals one process's
    out = tmp_path / "ddp" / "eval.json"
    ev = _torchrun("evaluate", str(params), "--checkpoint", str(tmp_path / "ddp" / "model.pt"), "--protocol", "flip",
                   "--out-json", str(out), "--out-csv", str(tmp_path / "ddp" / "eval.csv"), *common)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-4000:]
    two = json.loads(out.read_text())
    one = evaluate(load_params(params), tmp_path / "ddp" / "model.pt", "flip", data_root, threads=1)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["confusion"] == one["confusion"] and two["num_images"] == 4
