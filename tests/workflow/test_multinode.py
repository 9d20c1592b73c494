"""Training over several nodes: one torchrun per node meeting at a c10d rendezvous (what `srun` starts on each node
of a multi-node SLURM job, docs/scaling.md "Several nodes") trains exactly what one torchrun with all the
processes trains. Two node processes on this machine over loopback, gloo."""

import socket
import subprocess
import sys

import pytest
import torch
from tiny_training import env_one_thread, tiny_dataset, tiny_params

from mcibi.models.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # four torchrun processes


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_a_rendezvous_train_what_one_node_with_two_processes_trains(tmp_path):
    data_root = tiny_dataset(tmp_path / "data")
    params = tiny_params(tmp_path / "params", dropout=0.0, epochs=1, total_batch_size=8, batch_per_device=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    train = ["-m", "mcibi", "train", str(params), "--data-root", str(data_root), "--threads", "1", "--no-mlflow"]
    # two "nodes": one process each, rank 0's node hosting the c10d store (the first node of the SLURM job)
    port = _port()
    node = [*torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "mn",
            "--rdzv-endpoint", f"127.0.0.1:{port}", *train, "--out", str(tmp_path / "nodes")]
    procs = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env_one_thread()) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(o[-3000:] for o in outs)
    assert sum("effective batch 8 = 2 process(es) x 2 accumulation step(s) x 2 images" in o for o in outs) >= 1
    one = subprocess.run([*torchrun, "--standalone", "--nproc_per_node", "2", *train, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env_one_thread(), timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    a = load_checkpoint(tmp_path / "nodes" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "one" / "model.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k],
                                                                                                              b[k])]
