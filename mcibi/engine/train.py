"""The training loop: optimiser + schedule, the weighted losses, the per-iteration memory update, DDP, resume.

The model only computes (``forward``); this module owns losses, the memory update (under ``no_grad``, in fp32,
with the configured momentum, every iteration) and the learning-rate schedule. A run is resumable: every
``train.checkpoint_every`` iterations it writes a checkpoint (weights, memory, optimiser, scaler, RNG states,
iteration, the data version) atomically under ``<out>/checkpoints/``, and a rerun continues from the newest one
bit-exactly, unless the params that change the weights or the training data changed since (a conflict).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mcibi.data.dataset import SegmentationDataset
from mcibi.data.lookup import get_spec
from mcibi.data.transforms import build_train_transform
from mcibi.distributed import BatchPlan, DistEnv, barrier, batch_plan, setup, teardown
from mcibi.engine.layout import nhwc_trains_fast, train_channels_last
from mcibi.engine.optim import load_optimizer_state, scheduled_lr
from mcibi.engine.order import epoch_batches, rng_state, seed_everything, set_rng_state
from mcibi.engine.resume import (
    CHECKPOINT_DIR,
    CHECKPOINT_NAME,
    archive_checkpoints,
    data_version,
    find_resume_state,
    save_resumable,
    unverified_change,
)
from mcibi.engine.step import DivergedError, NonFiniteLossError, build_optimizer, memory_metrics, train_step
from mcibi.files import WriteError, atomic_open, write_json
from mcibi.models import build_for_weights
from mcibi.models.build import save_checkpoint
from mcibi.models.checkpoint import load_checkpoint, load_weights, non_finite_tensors
from mcibi.official.pretrained import build_pretrained_segmentor
from mcibi.spec.params import (
    ExperimentParams,
    flatten,
    to_dict,
)
from mcibi.spec.sampler import iterations_per_epoch

log = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """What a finished training run leaves behind."""

    checkpoint: Path
    loss_curve: Path
    run_id: str | None
    iterations: int
    seconds: float
    resumed_from: int = 0  # iteration of the checkpoint the run continued from (0 = from scratch)


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
    data_version: dict[str, str] | None = None  # rank 0: what the run trains on (mcibi.engine.resume.data_version)

    def checkpoint_extra(self, state: LoopState) -> dict[str, Any]:
        """Everything a resumable checkpoint holds besides the weights and params."""
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "data_version": self.data_version,
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

    Resumes from the newest checkpoint under ``<out_dir>/checkpoints/`` made with the same params on the same
    training data; checkpoints of other params or data stop the run (:class:`ResumeConflictError`).
    ``resume=False`` (``--restart``) moves existing checkpoints to ``checkpoints.archived-<time>/`` and starts
    afresh: nothing is ever deleted implicitly. Under ``torchrun`` every rank trains its share of each batch; rank
    0 alone writes files and logs to MLflow (the run, its params, tags, loss curve, the data version; a resumed
    run continues its MLflow run). Checkpoints, ``model.pt`` and ``run.json`` record the data version
    (:func:`mcibi.engine.resume.data_version`).
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
        if env.is_main:
            ds = t.dataset
            t.data_version = data_version(ds.root, ds.split, ds.ids, ds.manifest["image_ext"])
            if (why := unverified_change(ds.root, t.data_version)) is not None:
                log.warning("%s", why)
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
                    "(bench/results/step_avx2_nhwc_upernet_resnet50os8_lip_20.json); set train.channels_last: auto "
                    "(or false) for CPU training here (the result is the same up to rounding).", params.path)
    if params.model.init_from:  # fine-tuning: every weight from a checkpoint (a resumed run overrides them)
        from mcibi.official.released import initialise_from

        core = build_for_weights(params.model)
        initialise_from(core, params.model.init_from, params.model)
    else:
        core = build_pretrained_segmentor(params.model)  # the ImageNet init: random, timm's or official
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
    found = find_resume_state(t.ckpt_dir, t.params, t.data_version) if resume and env.is_main else None
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
    from mcibi.tracking.runs import RunLogger, run_tags

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
              "batch.accumulation": str(plan.accumulation), "batch.micro_batch": str(plan.micro_batch)}
             | _data_tags(t.data_version))
    return run


def _data_tags(version: dict[str, str] | None) -> dict[str, str]:
    """The data version as MLflow tags: ``data_fingerprint`` (the prepared folder's, as ``verified.json`` records
    it) and ``train_data_fingerprint`` (the training files', what a resume checks)."""
    if not version:
        return {}
    return {"data_fingerprint": version["fingerprint"], "train_data_fingerprint": version["train_files"]}


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
    m = CHECKPOINT_NAME.match(path.name) if path else None
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
            save_checkpoint(ckpt, t.core, t.params, iteration=it, mlflow_run_id=state.mlflow_run_id,
                            data_version=t.data_version)
            with atomic_open(curve) as fh:
                writer = csv.DictWriter(fh, fieldnames=list(state.curve[0]))
                writer.writeheader()
                writer.writerows(state.curve)
            write_json(out / "run.json", {"experiment": t.params.name,
                                          "mlflow_run_id": state.mlflow_run_id or None, "tracking_uri": tracking_uri,
                                          "iterations": it, "seconds": round(seconds, 1),
                                          "resumed_from": state.resumed_from, "effective_batch": plan.total,
                                          "world_size": plan.world_size, "accumulation": plan.accumulation,
                                          "micro_batch": plan.micro_batch, "data_version": t.data_version})
        if run:
            from mcibi.evaluation.serving import log_model

            run.artifact(curve, "training")
            log_model(run.uri, run.run_id, ckpt, t.params.data.name)  # the MLflow model (pyfunc + pytorch)
            run.metrics({"train_seconds": seconds}, step=it)
            run.finish()
    return TrainResult(ckpt, curve, state.mlflow_run_id or None, it, seconds, state.resumed_from)
