"""Log a run trained without tracking (``mcibi train --no-tracking``) to MLflow afterwards, from its folder.

A finished run folder holds everything training logs: ``model.pt`` (weights and params), ``loss.csv`` (the loss
curve and lr at every logged iteration), ``run.json`` (iterations, seconds, batch plan) and ``eval/<protocol>.json``
with ``eval/<protocol>_per_class.csv`` (evaluations). :func:`log_finished_run` creates the MLflow run training
would have created (params, tags, params file, input dataset, loss curve, the MLflow model, ``train_seconds``)
and logs the evaluations as child runs, then records the run id in ``run.json``, where ``mcibi figures``,
``evaluate``, ``register`` and the results table find it. The memory statistics (``memory.mu.<class>``, ...) are
those of the final weights, at the last iteration: the trajectory over training is logged only while training.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from mcibi.files import write_json
from mcibi.spec.params import ExperimentParams, flatten, to_dict

log = logging.getLogger(__name__)


def log_finished_run(run_dir: str | Path, tracking_uri: str, data_root: str | Path = "data") -> tuple[str, bool]:
    """Log the finished run in ``run_dir`` to the store at ``tracking_uri``; returns (MLflow run id, whether the
    run was created now). A run whose ``run.json`` already names a run of that store is not logged again: only
    its evaluations are (idempotent, see :func:`mcibi.tracking.runs.log_evaluation`)."""
    from mcibi.models.build import checkpoint_params
    from mcibi.models.checkpoint import load_checkpoint
    from mcibi.tracking.runs import run_exists

    folder = Path(run_dir)
    info_file = folder / "run.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{info_file}: missing. `mcibi log-run` logs a finished run: its folder holds "
                                "run.json, loss.csv and model.pt, written when `mcibi train` completes. Finish the "
                                "training first (rerunning `mcibi train` resumes it).")
    info = json.loads(info_file.read_text())
    checkpoint = folder / "model.pt"
    state = load_checkpoint(checkpoint)
    params = checkpoint_params(state, checkpoint)
    run_id = info.get("mlflow_run_id") or ""
    created = not (run_id and run_exists(tracking_uri, run_id))
    if created:
        if run_id:
            log.warning("%s: MLflow run %s is not in %s; logging the run to a new MLflow run", info_file, run_id,
                        tracking_uri)
        run_id = _log_training(folder, info, state, params, tracking_uri, Path(data_root))
        write_json(info_file, info | {"mlflow_run_id": run_id, "tracking_uri": tracking_uri})
    _log_evaluations(folder, params, tracking_uri, run_id)
    return run_id, created


def _log_training(folder: Path, info: dict, state: dict, params: ExperimentParams, uri: str, data_root: Path) -> str:
    """What :func:`mcibi.engine.train.train` logs while training, from the run's files."""
    from mcibi.data.lookup import get_spec
    from mcibi.evaluation.serving import log_model
    from mcibi.tracking.runs import RunLogger, run_tags

    checkpoint, curve_file = folder / "model.pt", folder / "loss.csv"
    if not curve_file.is_file():
        raise FileNotFoundError(f"{curve_file}: missing; a finished run folder holds it. Nothing was logged.")
    with curve_file.open(newline="") as fh:
        curve = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
    iterations = int(info.get("iterations") or (curve[-1]["iteration"] if curve else 0))
    finished = int(checkpoint.stat().st_mtime * 1000)
    started = finished - int(float(info.get("seconds") or 0) * 1000)
    tags = run_tags(params, machine=info.get("hardware") or "not recorded") | {"logged_later": "mcibi log-run"}
    tags |= {f"batch.{tag}": str(info[key]) for tag, key in (("effective", "effective_batch"),
                                                              ("world_size", "world_size"),
                                                              ("accumulation", "accumulation"),
                                                              ("micro_batch", "micro_batch")) if key in info}
    flat = flatten(to_dict(params)) | {"iterations": iterations,
                                       "iters_per_epoch": iterations // max(params.train.epochs, 1)}
    run = RunLogger.start(uri, params.data.name, params.name, tags, flat, description=params.description,
                          start_time=started)
    try:
        if params.path and Path(params.path).is_file():
            run.artifact(params.path, "params")
        data = data_root / params.data.name
        if (data / "manifest.json").is_file():
            run.inputs(data, {"train": params.data.train_split, "eval": params.data.eval_split})
        else:
            log.warning("%s: no prepared dataset (manifest.json), so the run records no input dataset; pass "
                        "--data-root to record it", data)
        run.history([(int(row["iteration"]), {k: v for k, v in row.items() if k != "iteration"}) for row in curve])
        run.metrics(_final_memory(state, params, checkpoint, get_spec(params.data.name)) |
                    {"train_seconds": float(info.get("seconds") or 0)}, step=iterations)
        run.artifact(curve_file, "training")
        log_model(uri, run.run_id, checkpoint, params.data.name)
        run.finish(end_time=finished)
    except BaseException:
        run.finish("FAILED")
        raise
    log.info("logged the training of %s as MLflow run %s", folder, run.run_id)
    return run.run_id


def _final_memory(state: dict, params: ExperimentParams, checkpoint: Path, spec) -> dict[str, float]:
    """The memory statistics of the final weights (empty for a baseline)."""
    if params.model.memory.kind == "none":
        return {}
    from mcibi.engine.step import memory_metrics
    from mcibi.models import build_for_weights
    from mcibi.models.checkpoint import load_weights

    model = build_for_weights(params.model)
    load_weights(model, state, checkpoint)
    return memory_metrics(model, spec)


def _log_evaluations(folder: Path, params: ExperimentParams, uri: str, run_id: str) -> None:
    from mcibi.tracking.runs import log_evaluation, run_tags

    common = run_tags(params, machine="not recorded")  # each evaluation's own `hardware` record wins
    for protocol in params.evaluate.protocols:
        result_file, per_class = folder / "eval" / f"{protocol}.json", folder / "eval" / f"{protocol}_per_class.csv"
        if result_file.is_file() and per_class.is_file():
            log_evaluation(uri, run_id, protocol, json.loads(result_file.read_text()), per_class, common)
            log.info("logged the %s evaluation of %s", protocol, folder)
