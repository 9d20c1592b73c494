"""A few DDP training iterations with SyncBatchNorm, a checkpoint, and a resume that must continue exactly; run it
under ``torchrun`` (one process is enough: ``torchrun --standalone --nproc_per_node=1 bench/ddp_resume.py ...``).

NCCL on CUDA, gloo on CPU (SyncBatchNorm then stays plain BatchNorm: it needs an accelerator). The run trains
``--iters`` iterations of ``mcibi.training.train_step`` on fixed random batches through
``DistributedDataParallel``, writes a checkpoint with ``mcibi.checkpoint.save_checkpoint`` (weights, memory,
optimiser, RNG states), trains ``--more`` iterations; then a fresh model, wrapped the same way, loads the
checkpoint and trains the same ``--more`` iterations. It prints one JSON object with the largest difference
between the two final weights (0 on CPU; CUDA kernels may differ by rounding), the losses and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from benchlib import override
from torch import nn

from mcibi.engine.step import build_optimizer, train_step
from mcibi.models import build_segmentor
from mcibi.models.build import save_checkpoint
from mcibi.models.checkpoint import load_checkpoint, load_weights
from mcibi.spec.params import load_params


def build(params, device: torch.device) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, bool]:
    """Model (SyncBatchNorm on CUDA), its DDP wrapper and optimiser; whether SyncBatchNorm is in use."""
    torch.manual_seed(0)
    model = build_segmentor(params.model).to(device)
    sync_bn = device.type == "cuda"
    if sync_bn:
        from timm.layers import convert_sync_batchnorm  # keeps timm's fused BatchNorm+activation layers

        model = convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp, build_optimizer(model, params), sync_bn


def batches(params, count: int, start: int, device: torch.device, batch: int, crop: tuple[int, int]):
    """Fixed random batch ``i`` for every iteration ``i`` (the same wherever the run starts)."""
    for i in range(start, start + count):
        gen = torch.Generator().manual_seed(1000 + i)
        images = torch.randn(batch, 3, *crop, generator=gen).to(device)
        labels = torch.randint(0, params.model.num_classes, (batch, *crop), generator=gen).to(device)
        yield images, labels


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params", type=Path)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--crop", type=int, nargs=2, default=[64, 64])
    ap.add_argument("--iters", type=int, default=3, help="iterations before the checkpoint")
    ap.add_argument("--more", type=int, default=2, help="iterations after it (both runs)")
    ap.add_argument("--out", type=Path, help="checkpoint folder (default: a temporary one)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("bench/ddp_resume.py: run it under torchrun (torchrun --standalone --nproc_per_node=1 ...)")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        params = override(load_params(args.params), args.set)
        crop = tuple(args.crop)
        lr = params.train.optimizer.lr
        start = time.perf_counter()
        model, ddp, optimizer, sync_bn = build(params, device)
        losses = [train_step(ddp, x, y, optimizer, lr, params, epoch=0)["total"]
                  for x, y in batches(params, args.iters, 0, device, args.batch, crop)]
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = (args.out or Path(tmp)) / f"iter_{args.iters}.pt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            if dist.get_rank() == 0:
                save_checkpoint(ckpt, model, params, optimizer=optimizer.state_dict(), iteration=args.iters,
                                rng=rng_state(device))
            dist.barrier()
            tail = [train_step(ddp, x, y, optimizer, lr, params, epoch=0)["total"]
                    for x, y in batches(params, args.more, args.iters, device, args.batch, crop)]
            straight = {k: v.detach().clone() for k, v in model.state_dict().items()}

            resumed_model, resumed_ddp, resumed_opt, _ = build(params, device)
            state = load_checkpoint(ckpt)
            load_weights(resumed_model, state, ckpt)
            resumed_opt.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"], device)
            resumed_tail = [train_step(resumed_ddp, x, y, resumed_opt, lr, params, epoch=0)["total"]
                            for x, y in batches(params, args.more, int(state["iteration"]), device, args.batch,
                                                crop)]
            size_mb = ckpt.stat().st_size / 2**20
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        diff = max(float((straight[k].float() - v.float()).abs().max())
                   for k, v in resumed_model.state_dict().items() if v.is_floating_point())
        report = {"bench": "ddp_resume", "backend": backend, "world_size": dist.get_world_size(),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "sync_batchnorm": sync_bn and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()),
                  "iterations": args.iters + args.more, "checkpoint_mb": round(size_mb, 1),
                  "losses": [round(v, 5) for v in losses + tail],
                  "resumed_losses": [round(v, 5) for v in resumed_tail],
                  "max_weight_diff_after_resume": diff,
                  "resume_matches": diff <= (0.0 if device.type == "cpu" else 1e-3),
                  "seconds": round(time.perf_counter() - start, 2)}
        if dist.get_rank() == 0:
            print(json.dumps(report, indent=2))
        return report
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(0 if main()["resume_matches"] else 1)
