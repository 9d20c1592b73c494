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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mcibi.checkpoint import CheckpointError, load_checkpoint, load_weights, non_finite_tensors, save_checkpoint
from mcibi.data.dataset import SegmentationDataset
from mcibi.data.lookup import get_spec
from mcibi.data.specs import IGNORE_INDEX
from mcibi.data.transforms import build_train_transform
from mcibi.distributed import BatchPlan, DistEnv, any_rank, barrier, batch_plan, setup, teardown
from mcibi.files import WriteError, atomic_open, write_json
from mcibi.models import build_for_weights, build_segmentor
from mcibi.optim import build_optimizer as _build_optimizer
from mcibi.optim import load_optimizer_state, poly_lr, scheduled_lr, set_lr
from mcibi.params import ExperimentParams, SamplerParams, TrainParams, flatten, params_from_dict, to_dict, trajectory
from mcibi.sampler import epoch_steps, iterations_per_epoch

log = logging.getLogger(__name__)

__all__ = ["DivergedError", "NonFiniteLossError", "ResumeConflictError", "TrainResult", "build_optimizer",
           "compute_losses", "poly_lr", "train", "train_step"]

V1_MEMORY_LOSS_FROM_EPOCH = 1  # 0-based; the official MCIBI adds it when epoch > 1 (1-based)
CHECKPOINT_DIR = "checkpoints"
_CKPT_NAME = re.compile(r"^iter_(\d{8})\.pt$")
NON_FINITE_SUFFIX = ".nonfinite"  # renamed aside: a checkpoint with NaN/inf weights (older versions wrote them)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError, RuntimeError):
    """A loss became NaN or infinite; training stopped before the optimiser step applied it."""


class DivergedError(NonFiniteLossError):
    """Weights, memory or optimiser state became NaN/inf although the loss was finite; nothing was written."""


class ResumeConflictError(ValueError):
    """The run folder holds checkpoints of other params; nothing is deleted without ``--restart``."""


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


# floats per SIMD register of ATen's CPU kernels: its softmax over contiguous rows is vectorised only for rows at
# least this long (shorter ones run a scalar loop, about 5x slower than the strided NCHW softmax)
CPU_VECTOR_FLOATS = {"AVX512": 16, "AVX2": 8}


def class_rows_are_fast(num_classes: int, device: torch.device) -> bool:
    """Whether the cross-entropy should run class-innermost (rows of ``num_classes``) rather than over NCHW."""
    if device.type != "cpu":
        return True
    return num_classes >= CPU_VECTOR_FLOATS.get(torch.backends.cpu.get_cpu_capability(), 10**9)


def nhwc_trains_fast(device: torch.device) -> bool:
    """Whether channels-last convolutions train faster than NCHW here: on CUDA (tensor cores) and on AVX-512 CPUs
    (demo step 0.54 vs 0.60 s), not on AVX2 CPUs, whose NHWC backward is slower (1.09x demo, 1.42x R-50-D8)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def train_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``train.channels_last`` resolved for ``device``: true and false as they are, ``auto`` where NHWC is faster."""
    return nhwc_trains_fast(device) if setting == "auto" else bool(setting)


def upsampled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` bilinearly upsampled to the label size, ignoring 255.

    The value of ``F.cross_entropy(F.interpolate(logits, ...), labels)``. With enough classes it is computed
    class-innermost: the upsampling runs channels-last and the softmax over contiguous rows, about 1.6x faster on
    CPU at 150 classes than over the strided class axis of NCHW. Rows shorter than a SIMD register (the demo's 8
    classes under AVX-512) are slower than NCHW instead (21 vs 8 ms forward + backward at 8x8x96x96), so those
    stay NCHW.
    """
    k = logits.shape[1]
    if not class_rows_are_fast(k, logits.device):
        up = F.interpolate(logits.contiguous(), size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
        return F.cross_entropy(up.float(), labels, ignore_index=IGNORE_INDEX)
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
                              resolution=params.model.memory.update_resolution)
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
    return _build_optimizer(model, params.train.optimizer, grad_scaling=params.train.precision == "fp16")


@dataclass
class TrainResult:
    """What a finished training run leaves behind."""

    checkpoint: Path
    loss_curve: Path
    run_id: str | None
    iterations: int
    seconds: float
    resumed_from: int = 0  # iteration of the checkpoint the run continued from (0 = from scratch)


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


def resumable_checkpoints(folder: Path) -> list[Path]:
    """The folder's ``iter_<n>.pt`` files, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _CKPT_NAME.match(p.name)), key=lambda p: p.name)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys if old.get(k) != new.get(k)]


def find_resume_state(folder: Path, params: ExperimentParams) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint under ``folder``, or None when there is none.

    Nothing is deleted here: a checkpoint of other trajectory params (the params file was edited) stops the run
    with :class:`ResumeConflictError` naming the differing keys and the ways out; one holding NaN/inf weights,
    memory or optimiser state is renamed ``*.nonfinite`` and an older one is used; an unreadable one is skipped.
    """
    want = trajectory(params)
    found, conflicts = None, []
    for path in reversed(resumable_checkpoints(folder)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping unreadable checkpoint %s (%s)", path, exc)
            continue
        try:
            diff = _differences(trajectory(params_from_dict(state["params"], path)), want)
        except ValueError as exc:
            diff = [f"(its params cannot be read by this version: {exc})"]
        if diff:
            conflicts.append((path, diff))
            continue
        bad = non_finite_tensors(state)
        if bad:
            aside = path.with_name(path.name + NON_FINITE_SUFFIX)
            path.rename(aside)
            log.warning("%s holds non-finite values (%s%s); renamed to %s, not resumed from", path,
                        ", ".join(bad[:3]), " ..." if len(bad) > 3 else "", aside.name)
            continue
        if found is None:
            found = (state, path)
    if conflicts:
        path, diff = conflicts[0]
        raise ResumeConflictError(
            f"{folder}: {len(conflicts)} checkpoint(s) (newest {path.name}) were trained with other params than "
            f"{params.path or params.name}; differing keys: {'; '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}. "
            "Nothing was deleted. Either restore those values in the params file (training then resumes), move the "
            f"run folder {folder.parent} away, or rerun `mcibi train` with --restart, which moves the old checkpoints "
            f"to {folder.name}.archived-<time>/ and starts afresh.")
    return found


def archive_checkpoints(folder: Path) -> Path | None:
    """Move ``folder`` (a run's checkpoints) to ``<folder>.archived-<UTC time>`` (``--restart``); None if empty."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    target = folder.with_name(f"{folder.name}.archived-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('~')[0]}~{n}")
        n += 1
    folder.rename(target)
    log.warning("--restart: moved the previous checkpoints %s to %s", folder, target)
    return target


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


@dataclass
class LoopState:
    """What a resumable checkpoint saves and restores besides the weights, optimiser and scaler.

    ``iteration`` fixes the epoch, the sampler position and the lr; ``rng`` holds generator states still to be
    restored (at the point of the data loader's seed draw, see :func:`_train_epoch`).
    """

    iteration: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)  # logged loss rows so far
    loss_sums: dict[str, float] = field(default_factory=dict)  # losses summed since the last logged row
    mlflow_run_id: str = ""
    rng: dict[str, Any] | None = None
    resumed_from: int = 0  # iteration of the checkpoint the run continued from (0 = from scratch)
    last_good: Path | None = None  # the newest checkpoint written (or resumed from)

    def to_checkpoint(self, max_iters: int, plan: BatchPlan) -> dict[str, Any]:
        """The loop's part of a resumable checkpoint (plain data, loadable with ``weights_only``)."""
        return {"iteration": self.iteration, "rng": rng_state(), "curve": self.curve, "loss_sums": self.loss_sums,
                "mlflow_run_id": self.mlflow_run_id,
                "scheduler": {"name": "poly", "iteration": self.iteration, "max_iters": max_iters},
                "batch_plan": {"total": plan.total, "world_size": plan.world_size,
                               "accumulation": plan.accumulation, "micro_batch": plan.micro_batch}}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], path: Path) -> LoopState:
        """The loop state a checkpoint holds."""
        it = int(state["iteration"])
        return cls(iteration=it, curve=list(state["curve"]), loss_sums=dict(state["loss_sums"]),
                   mlflow_run_id=state.get("mlflow_run_id", ""), rng=state["rng"], resumed_from=it, last_good=path)


@dataclass
class _Trainer:
    """The objects one training run works with (built once by :func:`_build`)."""

    params: ExperimentParams
    env: DistEnv
    dataset: SegmentationDataset
    plan: BatchPlan
    iters_per_epoch: int
    max_iters: int
    core: nn.Module  # the plain segmentor (checkpoints, memory metrics)
    runner: nn.Module  # what the step calls: core, or core inside DDP / torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    layout: torch.memory_format
    ckpt_dir: Path
    run: Any = None  # mcibi.tracking.RunLogger on rank 0 when tracking, else None

    def checkpoint_extra(self, state: LoopState) -> dict[str, Any]:
        """Everything a resumable checkpoint holds besides the weights and params."""
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}
                } | state.to_checkpoint(self.max_iters, self.plan)


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

    Resumes from the newest checkpoint under ``<out_dir>/checkpoints/`` made with the same params; checkpoints of
    other params stop the run (:class:`ResumeConflictError`). ``resume=False`` (``--restart``) moves existing
    checkpoints to ``checkpoints.archived-<time>/`` and starts afresh: nothing is ever deleted implicitly. Under
    ``torchrun`` every rank trains its share of each batch; rank 0 alone writes files and logs to MLflow (the run,
    its params, tags, loss curve; a resumed run continues its MLflow run).
    """
    start = time.time()
    out = Path(out_dir)
    env = setup(device)
    try:
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        if threads:
            torch.set_num_threads(threads)
        seed_everything(params.train.seed)
        t = _build(params, data_root, out, env)
        if not resume and env.is_main:
            archive_checkpoints(t.ckpt_dir)
        state = _resume(t, resume)
        t.run = _open_run(t, tracking_uri, state, data_root)
        log.info("training %s: %d images, %d iterations (%d epochs x %d, %s layout over %d replica(s)), effective "
                 "batch %d = %d process(es) x %d accumulation step(s) x %d images, %s on %s", params.name,
                 len(t.dataset), t.max_iters, params.train.epochs, t.iters_per_epoch, params.train.sampler.kind,
                 params.train.sampler.replicas, t.plan.total, t.plan.world_size, t.plan.accumulation,
                 t.plan.micro_batch, params.train.precision, env.device)
        try:
            bar = tqdm(total=t.max_iters, initial=state.iteration, desc=f"train {params.name}", unit="it",
                       mininterval=5.0, disable=not env.is_main)
            for epoch in range(state.iteration // t.iters_per_epoch, params.train.epochs):
                _train_epoch(t, state, epoch, bar)
            bar.close()
            result = _final_outputs(t, state, out, tracking_uri, start)
            barrier(env)
        except BaseException:
            if t.run:
                t.run.finish("FAILED")
            raise
    finally:
        teardown(env)
    log.info("trained %s in %.1f s", params.name, result.seconds)
    return result


def _build(params: ExperimentParams, data_root: str | Path, out: Path, env: DistEnv) -> _Trainer:
    """Dataset, batch plan, model (SyncBatchNorm, DDP, compile as the params say), optimiser and scaler."""
    tp = params.train
    dev = env.device
    spec = get_spec(params.data.name)
    dataset = SegmentationDataset(Path(data_root) / params.data.name, params.data.train_split,
                                  build_train_transform(params.data, spec.flip_pairs), seed=tp.seed,
                                  frame_per_video=params.data.train_sampling == "frame_per_video")
    plan = batch_plan(tp.total_batch_size, tp.batch_per_device, env.world_size, params.path or "params")
    iters_per_epoch = iterations_per_epoch(len(dataset), tp.total_batch_size, tp.sampler)
    if iters_per_epoch == 0:
        raise ValueError(f"{params.path}: train.total_batch_size {tp.total_batch_size} exceeds the "
                         f"{len(dataset)} training samples (train.sampler: {tp.sampler.kind}, "
                         f"{tp.sampler.replicas} replica(s)): an epoch would have no iteration. Lower the batch.")
    nhwc = train_channels_last(tp.channels_last, dev)
    layout = torch.channels_last if nhwc else torch.contiguous_format
    log.info("%s: training %s (train.channels_last: %s)", params.path, "NHWC" if nhwc else "NCHW",
             str(tp.channels_last).lower())
    if tp.channels_last is True and dev.type == "cpu" and not nhwc_trains_fast(dev):
        log.warning("%s: train.channels_last on a CPU without AVX-512 makes the convolutions' backward pass slower "
                    "(measured: training step 1.42x slower on AVX2, bench/step.py); set train.channels_last: auto "
                    "(or false) for CPU training here (the result is the same up to rounding).", params.path)
    if params.model.init_from:  # fine-tuning: every weight from a checkpoint (a resumed run overrides them)
        from mcibi.released import initialise_from

        core = build_for_weights(params.model)
        initialise_from(core, params.model.init_from, params.model)
    else:
        core = build_segmentor(params.model)
    core = core.to(dev).to(memory_format=layout)
    if env.distributed and tp.sync_batchnorm:
        if dev.type == "cuda":
            core = _convert_sync_batchnorm(core)
        else:
            log.warning("train.sync_batchnorm: SyncBatchNorm needs CUDA; this %s run keeps per-process BatchNorm",
                        dev.type)
    optimizer = build_optimizer(core, params)
    scaler = torch.amp.GradScaler(dev.type) if tp.precision == "fp16" else None
    runner: nn.Module = core
    if env.distributed:
        runner = nn.parallel.DistributedDataParallel(core, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                     broadcast_buffers=False)  # the memory syncs itself
    if tp.compile:
        runner = torch.compile(runner)
    return _Trainer(params, env, dataset, plan, iters_per_epoch, iters_per_epoch * tp.epochs, core, runner,
                    optimizer, scaler, layout, out / CHECKPOINT_DIR)


def _resume(t: _Trainer, resume: bool) -> LoopState:
    """Load the newest resumable checkpoint rank 0 finds (every rank loads the same one); a fresh state if none."""
    env = t.env
    found = find_resume_state(t.ckpt_dir, t.params) if resume and env.is_main else None
    if env.distributed:  # every rank continues from the checkpoint rank 0 chose
        box = [str(found[1]) if found else ""]
        dist.broadcast_object_list(box, src=0)
        found = (load_checkpoint(box[0]), Path(box[0])) if box[0] and not env.is_main else found
    if not found:
        return LoopState()
    ckpt, path = found
    load_weights(t.core, ckpt, path)
    load_optimizer_state(t.optimizer, ckpt["optimizer"])
    if t.scaler is not None and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    state = LoopState.from_checkpoint(ckpt, path)
    log.info("resuming %s from %s (iteration %d of %d)", t.params.name, path, state.iteration, t.max_iters)
    return state


def _open_run(t: _Trainer, tracking_uri: str | None, state: LoopState, data_root: str | Path):
    """Rank 0's MLflow run: the checkpoint's run continued, or a new one with the params, tags, params file and
    the prepared dataset as its input."""
    if not tracking_uri or not t.env.is_main:
        return None
    from mcibi.tracking import RunLogger, run_tags

    params, plan = t.params, t.plan
    run = None
    if state.mlflow_run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = RunLogger.resume(tracking_uri, state.mlflow_run_id)
        except MlflowException as exc:  # a store without that run (deleted, or another machine's store)
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s of the checkpoint is not in %s (%s); logging to a new run", state.mlflow_run_id,
                        tracking_uri, str(exc).splitlines()[0][:200])
    if run is None:
        run = RunLogger.start(tracking_uri, params.data.name, params.name, run_tags(params),
                              flatten(to_dict(params)) | {"iterations": t.max_iters,
                                                          "iters_per_epoch": t.iters_per_epoch},
                              description=params.description)
        if params.path:
            run.artifact(params.path, "params")
        run.inputs(Path(data_root) / params.data.name,
                   {"train": params.data.train_split, "eval": params.data.eval_split})
        state.mlflow_run_id = run.run_id
    run.tags({"batch.effective": str(plan.total), "batch.world_size": str(plan.world_size),
              "batch.accumulation": str(plan.accumulation), "batch.micro_batch": str(plan.micro_batch)})
    return run


def _train_epoch(t: _Trainer, state: LoopState, epoch: int, bar: tqdm) -> None:
    """The iterations of ``epoch`` from ``state.iteration`` on: step, interval logging, resumable checkpoints."""
    params, env, tp = t.params, t.env, t.params.train
    dev = env.device
    t.dataset.set_epoch(epoch)
    first = state.iteration - epoch * t.iters_per_epoch
    batches = epoch_batches(len(t.dataset), tp, epoch, t.plan, env.rank, first)
    loader = DataLoader(t.dataset, batch_sampler=batches, num_workers=tp.num_workers, persistent_workers=False,
                        pin_memory=dev.type == "cuda")
    # Creating the iterator draws the workers' base seed from the global generator. A checkpoint taken mid-epoch
    # holds the states after that draw (restore them after it); one taken at an epoch's end holds those before it
    # (restore them first).
    if state.rng is not None and first == 0:
        set_rng_state(state.rng)
        state.rng = None
    batch_iter = iter(loader)
    if state.rng is not None:
        set_rng_state(state.rng)
        state.rng = None
    for sample in batch_iter:
        lr = scheduled_lr(tp.optimizer.lr, tp.schedule, state.iteration, t.max_iters)
        images = sample["image"].to(dev, non_blocking=True).contiguous(memory_format=t.layout)
        labels = sample["label"].to(dev, non_blocking=True)
        try:
            losses = train_step(t.runner, images, labels, t.optimizer, lr, params, epoch,
                                accumulation=t.plan.accumulation, scaler=t.scaler, env=env)
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{params.path}: {exc.args[0]} at iteration {state.iteration} (epoch {epoch}); "
                                     f"stopped before the optimiser step. {_divergence_advice(state)}") from None
        for k, v in losses.items():
            state.loss_sums[k] = state.loss_sums.get(k, 0.0) + v
        state.iteration += 1
        bar.update(1)
        if state.iteration % tp.log_every == 0 or state.iteration == t.max_iters:
            _log_interval(t, state, epoch, lr, bar)
        if tp.checkpoint_every and state.iteration % tp.checkpoint_every == 0:
            _require_finite(t, state, "a resumable checkpoint")  # every rank: they hold the same weights
        if tp.checkpoint_every and state.iteration % tp.checkpoint_every == 0 and env.is_main:
            with _say_how_to_resume(state):
                state.last_good = save_resumable(t.ckpt_dir, t.core, params, tp.keep_checkpoints,
                                                 **t.checkpoint_extra(state))


def _divergence_advice(state: LoopState) -> str:
    """Which checkpoint is really the last good one, and what to change (a rerun as-is diverges again)."""
    where = (f"The last good checkpoint is {state.last_good} (iteration {_iteration_of(state.last_good)}); rerunning "
             "with the same params resumes from it and diverges again at the same iteration"
             if state.last_good else "No checkpoint was written")
    return (f"{where}. Lower train.optimizer.lr, add warmup (train.schedule.warmup_iters) or use precision fp32/bf16 "
            "(or clean the data), then rerun with `mcibi train --restart`, which archives this run's checkpoints.")


def _iteration_of(path: Path | None) -> int:
    m = _CKPT_NAME.match(path.name) if path else None
    return int(m.group(1)) if m else 0


def _require_finite(t: _Trainer, state: LoopState, what: str) -> None:
    """Raise :class:`DivergedError` (writing nothing) when weights, memory or optimiser state hold NaN/inf."""
    bad = non_finite_tensors({"state_dict": t.core.state_dict(), "optimizer": t.optimizer.state_dict(),
                              "scaler": t.scaler.state_dict() if t.scaler is not None else {}})
    if bad:
        raise DivergedError(
            f"{t.params.path}: training diverged: after iteration {state.iteration} the loss was finite but "
            f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} hold NaN/inf ({len(bad)} tensors); {what} was not "
            f"written. {_divergence_advice(state)}")


@contextlib.contextmanager
def _say_how_to_resume(state: LoopState):
    """Add to a failed write (full disk, permissions) which checkpoint is intact and how to continue."""
    try:
        yield
    except WriteError as exc:
        intact = (f"The last complete checkpoint {state.last_good} (iteration {_iteration_of(state.last_good)}) is "
                  "intact: rerunning the same command resumes from it" if state.last_good else
                  "No earlier checkpoint of this run exists: a rerun starts from the beginning")
        raise WriteError(f"{exc} {intact}.", exc.errno) from exc


def _log_interval(t: _Trainer, state: LoopState, epoch: int, lr: float, bar: tqdm) -> None:
    """Append the mean losses since the last row to the curve (all ranks' mean) and log them with the memory."""
    it, log_every = state.iteration, t.params.train.log_every
    n = log_every if it % log_every == 0 else it % log_every
    mean = _reduce_sums(state.loss_sums, t.env)
    row = {"iteration": it, "epoch": epoch, "lr": lr} | {f"loss_{k}": v / n for k, v in mean.items()}
    state.loss_sums = {}
    state.curve.append(row)
    bar.set_postfix(loss=f"{row['loss_total']:.3f}")
    if t.run:
        t.run.metrics({k: v for k, v in row.items() if k != "iteration"}
                      | memory_metrics(t.core, get_spec(t.params.data.name)), step=it)


def _final_outputs(t: _Trainer, state: LoopState, out: Path, tracking_uri: str | None, start: float) -> TrainResult:
    """Rank 0 writes ``model.pt``, ``loss.csv`` and ``run.json`` and closes the MLflow run."""
    ckpt, curve = out / "model.pt", out / "loss.csv"
    seconds = time.time() - start
    plan, run, it = t.plan, t.run, state.iteration
    _require_finite(t, state, "model.pt")
    if t.env.is_main:
        with _say_how_to_resume(state):
            save_checkpoint(ckpt, t.core, t.params, iteration=it, mlflow_run_id=state.mlflow_run_id)
            with atomic_open(curve) as fh:
                writer = csv.DictWriter(fh, fieldnames=list(state.curve[0]))
                writer.writeheader()
                writer.writerows(state.curve)
            write_json(out / "run.json", {"experiment": t.params.name,
                                          "mlflow_run_id": state.mlflow_run_id or None, "tracking_uri": tracking_uri,
                                          "iterations": it, "seconds": round(seconds, 1),
                                          "resumed_from": state.resumed_from, "effective_batch": plan.total,
                                          "world_size": plan.world_size, "accumulation": plan.accumulation,
                                          "micro_batch": plan.micro_batch})
        if run:
            from mcibi.mlflow_model import log_model

            run.artifact(curve, "training")
            log_model(run.uri, run.run_id, ckpt, t.params.data.name)  # the MLflow model (pyfunc + pytorch)
            run.metrics({"train_seconds": seconds}, step=it)
            run.finish()
    return TrainResult(ckpt, curve, state.mlflow_run_id or None, it, seconds, state.resumed_from)
