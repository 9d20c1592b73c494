"""The training loop: optimiser + schedule, the weighted losses, the per-iteration memory update, DDP, resume.

The model only computes (``forward``); this module owns losses, the memory update (under ``no_grad``, in fp32,
with the configured momentum, every iteration) and the learning-rate schedule. A run is resumable: every
``train.checkpoint_every`` iterations it writes a checkpoint (weights, memory, optimiser, scaler, RNG states,
iteration) atomically under ``<out>/checkpoints/``, and a rerun continues from the newest one bit-exactly.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mcibi.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from mcibi.data.dataset import SegmentationDataset
from mcibi.data.specs import IGNORE_INDEX, get_spec
from mcibi.data.transforms import build_train_transform
from mcibi.distributed import BatchPlan, DistEnv, any_rank, barrier, batch_plan, setup, teardown
from mcibi.files import atomic_open, write_json
from mcibi.models import build_segmentor
from mcibi.optim import build_optimizer as _build_optimizer
from mcibi.optim import poly_lr, scheduled_lr, set_lr
from mcibi.params import ExperimentParams, flatten, to_dict

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "TrainResult", "build_optimizer", "compute_losses", "poly_lr", "train",
           "train_step"]

V1_MEMORY_LOSS_FROM_EPOCH = 1  # 0-based; the official MCIBI adds it when epoch > 1 (1-based)
CHECKPOINT_DIR = "checkpoints"
_CKPT_NAME = re.compile(r"^iter_(\d{8})\.pt$")
# Params that say how a run executes, not what it computes: a checkpoint resumes across changes of these
# (more wall time, another GPU count, a different checkpoint interval).
RESUME_FREE_KEYS = ("train.checkpoint_every", "train.keep_checkpoints", "train.resources", "train.num_workers",
                    "train.log_every", "train.batch_per_device", "train.compile", "evaluate", "description")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError, RuntimeError):
    """A loss became NaN or infinite; training stopped before the optimiser step applied it."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (data augmentation draws from per-sample generators of its own)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def memory_momentum(params: ExperimentParams, lr: float) -> float:
    """Momentum of the memory update; scaled by lr / base_lr when ``adjust_momentum_by_lr`` is set."""
    mem = params.model.memory
    if mem.adjust_momentum_by_lr:
        return mem.momentum * lr / params.train.optimizer.lr
    return mem.momentum


def upsampled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` bilinearly upsampled to the label size, ignoring 255.

    The same value as ``F.cross_entropy(F.interpolate(logits, ...), labels)``, computed class-innermost: the
    upsampling runs channels-last and the softmax over contiguous rows, about 1.6x faster on CPU at 150 classes
    than over the strided class axis of NCHW.
    """
    k = logits.shape[1]
    up = F.interpolate(logits.contiguous(memory_format=torch.channels_last), size=labels.shape[-2:],
                       mode="bilinear", align_corners=align_corners)
    rows = up.float().permute(0, 2, 3, 1).reshape(-1, k)  # a view: channels-last is (B, H, W, K) in memory
    return F.cross_entropy(rows, labels.reshape(-1), ignore_index=IGNORE_INDEX)


def compute_losses(out, labels: torch.Tensor, params: ExperimentParams) -> dict[str, torch.Tensor]:
    """Weighted cross-entropy terms on logits upsampled to the label size; ``total`` is their sum."""
    w = params.train.loss_weights
    align = params.model.align_corners
    terms = {"cls": (out.logits, w.cls), "cwi": (out.logits_cwi, w.cwi), "pr": (out.logits_pr, w.pr),
             "aux": (out.logits_aux, w.aux)}
    losses: dict[str, torch.Tensor] = {}
    for name, (logits, weight) in terms.items():
        if logits is None or weight == 0:
            continue
        losses[name] = weight * upsampled_cross_entropy(logits, labels, align)
    if out.logits_memory is not None and w.memory != 0:  # MCIBI v1: stored vector k must classify as k
        targets = torch.arange(out.logits_memory.shape[0], device=out.logits_memory.device)
        losses["memory"] = w.memory * F.cross_entropy(out.logits_memory.float(), targets)
    losses["total"] = sum(losses.values())
    return losses


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (fp32: none); losses are taken in fp32 inside it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def _unwrap(model: nn.Module) -> nn.Module:
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
    core = _unwrap(model)
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
                              resolution=params.model.memory.update_resolution, ignore_index=IGNORE_INDEX)
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
    memory = getattr(_unwrap(model), "memory_module", None)
    if memory is None:
        return {}
    return {f"memory.{stat}.{name}": value for stat, values in memory.summary().items()
            for name, value in zip(spec.classes, values.detach().cpu().tolist(), strict=True)}


def build_optimizer(model: nn.Module, params: ExperimentParams) -> torch.optim.Optimizer:
    """The optimiser ``train.optimizer`` describes, with its parameter rules (see :mod:`mcibi.optim`)."""
    return _build_optimizer(model, params.train.optimizer)


@dataclass
class TrainResult:
    """What a finished training run leaves behind."""

    checkpoint: Path
    loss_curve: Path
    run_id: str | None
    iterations: int
    seconds: float
    resumed_from: int = 0  # iteration of the checkpoint the run continued from (0 = from scratch)


def _epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=gen).tolist()


def epoch_batches(num_samples: int, seed: int, epoch: int, plan: BatchPlan, rank: int, first: int,
                  iters_per_epoch: int) -> list[list[int]]:
    """This rank's image indices for iterations ``first`` .. end of ``epoch`` (DistributedSampler's role).

    Iteration i of an epoch uses images [i * total, (i + 1) * total) of the epoch's seeded permutation on every
    GPU count; rank r takes the r-th contiguous slice, which it splits into its accumulation micro-batches, so
    rank r of N GPUs sees what micro-batch r of one GPU accumulating N steps sees.
    """
    order = _epoch_order(num_samples, seed, epoch)
    n = plan.per_process
    return [order[i * plan.total + rank * n : i * plan.total + (rank + 1) * n] for i in range(first, iters_per_epoch)]


def run_tags(params: ExperimentParams) -> dict[str, str]:
    """Tags that make runs filterable and comparable in the MLflow UI."""
    from mcibi.tracking import git_commit, hardware

    return {
        "dataset": params.data.name,
        "experiment": params.name,
        "framework": params.model.framework,
        "backbone": params.model.backbone.name,
        "memory": params.model.memory.kind,
        "seed": str(params.train.seed),
        "crop": "x".join(map(str, params.data.crop_size)),
        "schedule": f"{params.train.optimizer.lr}/poly/{params.train.total_batch_size}/{params.train.epochs}",
        "precision": params.train.precision,
        "git_commit": git_commit(Path(params.path).parent if params.path else "."),
        "hardware": hardware(),
    }


# ----------------------------------------------------------------------------------------- resumable checkpoints
def _trajectory(params: ExperimentParams) -> dict[str, Any]:
    """The params that decide the weights a run ends with (everything but :data:`RESUME_FREE_KEYS`)."""
    flat = flatten({k: v for k, v in to_dict(params).items() if k not in ("name", "path")})
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)}


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


def resumable_checkpoints(folder: Path) -> list[Path]:
    """The folder's ``iter_<n>.pt`` files, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _CKPT_NAME.match(p.name)), key=lambda p: p.name)


def find_resume_state(folder: Path, params: ExperimentParams) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint under ``folder`` trained with the same trajectory params, or None.

    Checkpoints of other params (the experiment was edited) are deleted with a warning: they belong to a run
    that can no longer be continued, and keeping them would let retention delete the new run's checkpoints.
    """
    want = _trajectory(params)
    found = None
    for path in reversed(resumable_checkpoints(folder)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping unreadable checkpoint %s (%s)", path, exc)
            continue
        from mcibi.params import params_from_dict

        try:
            same = _trajectory(params_from_dict(state["params"], path)) == want
        except ValueError:
            same = False
        if not same:
            log.warning("%s was trained with other params than %s; deleting it and starting afresh", path,
                        params.path)
            path.unlink(missing_ok=True)
            continue
        if found is None:
            found = (state, path)
    return found


def save_resumable(folder: Path, core: nn.Module, params: ExperimentParams, keep: int, **extra: Any) -> Path:
    """Write ``iter_<n>.pt`` atomically and delete all but the newest ``keep`` resumable checkpoints."""
    path = folder / f"iter_{extra['iteration']:08d}.pt"
    save_checkpoint(path, core, params, **extra)
    for old in resumable_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """SyncBatchNorm in place of every BatchNorm (timm's converter keeps its fused BatchNorm+activation layers)."""
    try:
        from timm.layers import convert_sync_batchnorm
    except ImportError:  # pragma: no cover - timm is a dependency; torch's converter handles plain BatchNorm
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_sync_batchnorm(model)


def _reduce_sums(sums: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Loss sums averaged over ranks, for the logged curve."""
    if not env.distributed or not sums:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                     device=env.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def train(
    params: ExperimentParams,
    data_root: str | Path,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train one experiment and write ``model.pt``, ``loss.csv`` and ``run.json`` to ``out_dir``.

    Resumes from the newest checkpoint under ``<out_dir>/checkpoints/`` made with the same params (unless
    ``resume`` is false). Under ``torchrun`` every rank trains its share of each batch; rank 0 alone writes
    files and logs to MLflow (the run, its params, tags, loss curve; a resumed run continues its MLflow run).
    """
    start = time.time()
    out = Path(out_dir)
    env = setup(device)
    try:
        return _train(params, data_root, out, tracking_uri, env, threads, resume, start)
    finally:
        teardown(env)


def _train(params: ExperimentParams, data_root: str | Path, out: Path, tracking_uri: str | None, env: DistEnv,
           threads: int | None, resume: bool, start: float) -> TrainResult:
    tp = params.train
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    dev = env.device
    seed_everything(tp.seed)
    spec = get_spec(params.data.name)
    dataset = SegmentationDataset(Path(data_root) / params.data.name, params.data.train_split,
                                  build_train_transform(params.data, spec.flip_pairs), seed=tp.seed,
                                  frame_per_video=params.data.train_sampling == "frame_per_video")
    plan = batch_plan(tp.total_batch_size, tp.batch_per_device, env.world_size, params.path or "params")
    iters_per_epoch = len(dataset) // tp.total_batch_size
    if iters_per_epoch == 0:
        raise ValueError(f"{params.path}: train.total_batch_size {tp.total_batch_size} exceeds the "
                         f"{len(dataset)} training images.")
    max_iters = iters_per_epoch * tp.epochs
    core = build_segmentor(params.model).to(dev)
    if params.model.init_from:  # ---- fine-tuning hook: every weight from a checkpoint (a resumed run overrides it)
        from mcibi.released import initialise_from

        initialise_from(core, params.model.init_from, params.model)
    layout = torch.channels_last if tp.channels_last else torch.contiguous_format
    core = core.to(memory_format=layout)
    if env.distributed and tp.sync_batchnorm:
        if dev.type == "cuda":
            core = _convert_sync_batchnorm(core)
        else:
            log.warning("train.sync_batchnorm: SyncBatchNorm needs CUDA; this %s run keeps per-process BatchNorm",
                        dev.type)
    optimizer = build_optimizer(core, params)
    scaler = torch.amp.GradScaler(dev.type) if tp.precision == "fp16" else None

    ckpt_dir = out / CHECKPOINT_DIR
    it, curve_rows, sums, run_id, rng, resumed_from = 0, [], {}, "", None, 0
    found = find_resume_state(ckpt_dir, params) if resume and env.is_main else None
    if env.distributed:  # every rank continues from the checkpoint rank 0 chose
        box = [str(found[1]) if found else ""]
        dist.broadcast_object_list(box, src=0)
        found = (load_checkpoint(box[0]), Path(box[0])) if box[0] and not env.is_main else found
    if found:
        state, path = found
        load_weights(core, state, path)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        it = resumed_from = int(state["iteration"])
        curve_rows, sums = list(state["curve"]), dict(state["loss_sums"])
        run_id, rng = state.get("mlflow_run_id", ""), state["rng"]
        log.info("resuming %s from %s (iteration %d of %d)", params.name, path, it, max_iters)

    runner: nn.Module = core
    if env.distributed:
        runner = nn.parallel.DistributedDataParallel(core, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                     broadcast_buffers=False)  # the memory syncs itself
    if tp.compile:
        runner = torch.compile(runner)

    run = None
    if tracking_uri and env.is_main:
        from mcibi.tracking import RunLogger

        if run_id:
            run = RunLogger.resume(tracking_uri, run_id)
        else:
            run = RunLogger.start(tracking_uri, params.data.name, params.name, run_tags(params),
                                  flatten(to_dict(params)) | {"iterations": max_iters,
                                                              "iters_per_epoch": iters_per_epoch},
                                  description=params.description)
            if params.path:
                run.artifact(params.path, "params")
        run.tags({"batch.effective": str(plan.total), "batch.world_size": str(plan.world_size),
                  "batch.accumulation": str(plan.accumulation), "batch.micro_batch": str(plan.micro_batch)})
    log.info("training %s: %d images, %d iterations (%d epochs x %d), effective batch %d = %d process(es) x %d "
             "accumulation step(s) x %d images, %s on %s", params.name, len(dataset), max_iters, tp.epochs,
             iters_per_epoch, plan.total, plan.world_size, plan.accumulation, plan.micro_batch, tp.precision, dev)

    def checkpoint_extra() -> dict[str, Any]:
        return {"iteration": it, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state(),
                "curve": curve_rows, "loss_sums": sums, "mlflow_run_id": run.run_id if run else run_id,
                "scheduler": {"name": "poly", "iteration": it, "max_iters": max_iters},
                "batch_plan": {"total": plan.total, "world_size": plan.world_size,
                               "accumulation": plan.accumulation, "micro_batch": plan.micro_batch}}

    last_good = None
    bar = tqdm(total=max_iters, initial=it, desc=f"train {params.name}", unit="it", mininterval=5.0,
               disable=not env.is_main)
    try:
        for epoch in range(it // iters_per_epoch, tp.epochs):
            dataset.set_epoch(epoch)
            first = it - epoch * iters_per_epoch
            batches = epoch_batches(len(dataset), tp.seed, epoch, plan, env.rank, first, iters_per_epoch)
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=tp.num_workers,
                                persistent_workers=False, pin_memory=dev.type == "cuda")
            # Creating the iterator draws the workers' base seed from the global generator. A checkpoint taken
            # mid-epoch holds the states after that draw (restore them after it); one taken at an epoch's end
            # holds those before it (restore them first).
            if rng is not None and first == 0:
                set_rng_state(rng)
                rng = None
            batch_iter = iter(loader)
            if rng is not None:
                set_rng_state(rng)
                rng = None
            for sample in batch_iter:
                lr = scheduled_lr(tp.optimizer.lr, tp.schedule, it, max_iters)
                images = sample["image"].to(dev, non_blocking=True).contiguous(memory_format=layout)
                labels = sample["label"].to(dev, non_blocking=True)
                try:
                    losses = train_step(runner, images, labels, optimizer, lr, params, epoch,
                                        accumulation=plan.accumulation, scaler=scaler, env=env)
                except NonFiniteLossError as exc:
                    where = f"the last good checkpoint is {last_good}" if last_good else (
                        "no checkpoint was written yet" if not resumed_from else
                        f"the run resumed from iteration {resumed_from}, whose checkpoint is kept")
                    raise NonFiniteLossError(
                        f"{params.path}: {exc.args[0]} at iteration {it} (epoch {epoch}); stopped before the "
                        f"optimiser step; {where}. Lower train.optimizer.lr, add warmup "
                        "(train.schedule.warmup_iters) or use precision fp32/bf16, then rerun.") from None
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                it += 1
                bar.update(1)
                if it % tp.log_every == 0 or it == max_iters:
                    n = tp.log_every if it % tp.log_every == 0 else it % tp.log_every
                    mean = _reduce_sums(sums, env)
                    row = {"iteration": it, "epoch": epoch, "lr": lr} | {f"loss_{k}": v / n for k, v in mean.items()}
                    sums = {}
                    curve_rows.append(row)
                    bar.set_postfix(loss=f"{row['loss_total']:.3f}")
                    if run:
                        run.metrics({k: v for k, v in row.items() if k != "iteration"}
                                    | memory_metrics(core, spec), step=it)
                if tp.checkpoint_every and it % tp.checkpoint_every == 0 and env.is_main:
                    last_good = save_resumable(ckpt_dir, core, params, tp.keep_checkpoints, **checkpoint_extra())
        bar.close()
        ckpt, curve = out / "model.pt", out / "loss.csv"
        seconds = time.time() - start
        if env.is_main:
            save_checkpoint(ckpt, core, params, iteration=it, mlflow_run_id=run.run_id if run else run_id)
            with atomic_open(curve) as fh:
                writer = csv.DictWriter(fh, fieldnames=list(curve_rows[0]))
                writer.writeheader()
                writer.writerows(curve_rows)
            write_json(out / "run.json", {"experiment": params.name,
                                          "mlflow_run_id": (run.run_id if run else run_id) or None,
                                          "tracking_uri": tracking_uri, "iterations": it,
                                          "seconds": round(seconds, 1), "resumed_from": resumed_from,
                                          "effective_batch": plan.total, "world_size": plan.world_size,
                                          "accumulation": plan.accumulation, "micro_batch": plan.micro_batch})
            if run:
                run.artifact(curve, "training")
                run.metrics({"train_seconds": seconds}, step=it)
                run.finish()
        barrier(env)
    except BaseException:
        if run:
            run.finish("FAILED")
        raise
    log.info("trained %s in %.1f s", params.name, seconds)
    return TrainResult(ckpt, curve, (run.run_id if run else run_id) or None, it, seconds, resumed_from)
