"""MLflow adapter: one run per experiment, a child run per evaluation protocol, race-free experiment creation.

The tracking store defaults to an SQLite file at the repository root (``sqlite:///<root>/mlflow.db``) and is
overridden by ``MLFLOW_TRACKING_URI``. Everything goes through :class:`mlflow.MlflowClient` with explicit
ids (no fluent ``set_experiment``, which silently files runs under "Default" when jobs race; tooling.md).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from mcibi.files import json_digest
from mcibi.spec.params import ExperimentParams

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # a run's logged MLflow model (mcibi.evaluation.serving): runs:/<run id>/model
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_PARAM_LEN = 500
_INVALID_KEY = re.compile(r"[^\w\-. /:]")  # MLflow accepts letters, digits, _ - . space / : in names


def metric_key(name: str) -> str:
    """A metric name MLflow accepts: class names such as ADE20k's 'building, edifice' carry commas, which the
    store rejects (the whole batch fails); every other character becomes '_'. Idempotent."""
    return _INVALID_KEY.sub("_", name)[:250]


# not part of what defines an experiment: names, derived counts, and the seed (runs of several seeds of one
# experiment share a hash; the `seed` tag tells them apart)
RUN_ONLY_PARAMS = ("name", "path", "iterations", "iters_per_epoch", "train.seed")


def params_hash(flat_params: dict[str, Any]) -> str:
    """Short sha256 of an experiment's flattened params (dotted keys; :data:`RUN_ONLY_PARAMS` excluded): runs
    with equal hashes ran the same experiment (possibly with different seeds), whatever they are called."""
    import hashlib
    import json

    data = {k: v for k, v in flat_params.items() if k not in RUN_ONLY_PARAMS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else :func:`local_tracking_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(root)


def local_tracking_uri(root: str | Path = ".") -> str:
    """The local store: an absolute SQLite URI for ``<root>/mlflow.db``."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def experiment_name(dataset: str) -> str:
    """One MLflow experiment per dataset."""
    return f"mcibi-{dataset}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn, attempts: int = 5):
    """Retry a store call a few times: concurrent SQLite writers may briefly see 'database is locked', and two jobs
    logging the same dataset entity race on its unique row (the retry finds the row the other job wrote)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - re-raised after the last attempt
            text = str(exc).lower()
            if i == attempts - 1 or not ("locked" in text or "unique constraint failed" in text):
                raise
            time.sleep(0.5 * (i + 1))
    return None


# MLflow 3's UI opens an experiment by its kind (tag ``mlflow.experimentKind``, the ``ExperimentKind`` enum of
# mlflow/server/js/src/experiment-tracking/constants.ts): without it, the GenAI traces overview; with
# ``custom_model_development`` ("Machine learning"), the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_NOTE = (
    "MCIBI++ runs of dataset `{dataset}`: one run per experiment and seed, a child run per evaluation protocol. "
    "Useful columns (Columns button): metrics `mIoU.ss`, `mIoU.flip`, `mIoU.msflip`; tags `framework`, "
    "`backbone`, `memory`, `seed`, `params_hash`, `data_version`. The trained model of each run is its logged "
    "model `model` (pyfunc: RGB images in, class maps out)."
)


def experiment_tags(dataset: str) -> dict[str, str]:
    """The tags of a dataset's experiment: dataset, the machine-learning kind, the note the UI shows."""
    return {"dataset": dataset, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
            "mlflow.note.content": EXPERIMENT_NOTE.format(dataset=dataset)}


def ensure_experiment(dataset: str, uri: str) -> str:
    """Get or create the dataset's experiment (creating the store's schema on first use); return its id.

    Run once before parallel jobs start (the workflow's ``mlflow_experiment`` rule); jobs call it again, which
    then only reads. A concurrent creator losing the race re-reads the winner's id. An experiment created
    before it was tagged as a machine-learning experiment gets the tags now.
    """
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    name = experiment_name(dataset)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            for key, value in experiment_tags(dataset).items():
                _retry(lambda k=key, v=value: client.set_experiment_tag(exp.experiment_id, k, v))
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags=experiment_tags(dataset))
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_exists(uri: str, run_id: str) -> bool:
    """Whether the store at ``uri`` holds the run ``run_id`` (deleted runs included)."""
    from mlflow.exceptions import MlflowException

    try:
        _retry(lambda: _client(uri).get_run(run_id))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return True


def git_commit(root: str | Path = ".") -> str:
    """The repository's HEAD commit (with ``-dirty`` when the work tree has changes), or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> str:
    """Short description of the device the job runs on; on CPU with the kernels' instruction set (AVX2 and AVX-512
    kernels sum in different orders, and ``train.channels_last: auto`` picks the layout by it)."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores, {platform.machine()}, {torch.backends.cpu.get_cpu_capability()})"


def run_tags(params: ExperimentParams, machine: str | None = None) -> dict[str, str]:
    """Tags that make runs filterable and comparable in the MLflow UI; the ``hardware`` tag is ``machine``, by
    default this machine's (:func:`hardware`, which imports torch)."""
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
        "hardware": machine or hardware(),
    }


class RunLogger:
    """Logs one experiment's training run: params, tags, the loss curve, artifacts."""

    def __init__(self, uri: str, run_id: str, resumed: bool = False) -> None:
        self.uri = uri
        self.run_id = run_id
        self.client = _client(uri)
        # a resumed run may already hold rows for steps after the checkpoint it resumed from (logged before the
        # job was killed): those (metric, step) rows are not logged again
        self._resumed = resumed
        self._logged_steps: dict[str, set[int]] = {}

    @classmethod
    def start(cls, uri: str, dataset: str, run_name: str, tags: dict[str, str], params: dict[str, Any],
              description: str = "", start_time: int | None = None) -> RunLogger:
        """Create the run in the dataset's experiment and log its params (flattened, dotted keys); the
        description becomes the run's note in the UI. ``start_time`` (ms since the epoch) defaults to now."""
        from mlflow.entities import Param, RunTag

        exp_id = ensure_experiment(dataset, uri)
        client = _client(uri)
        tags = {"params_hash": params_hash(params), **tags}
        run = _retry(lambda: client.create_run(exp_id, start_time=start_time, run_name=run_name, tags=tags))
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            _retry(lambda chunk=items[i : i + 100]: client.log_batch(run.info.run_id, params=chunk))
        if description:
            _retry(lambda: client.log_batch(run.info.run_id, tags=[RunTag("mlflow.note.content", description)]))
        return cls(uri, run.info.run_id)

    @classmethod
    def resume(cls, uri: str, run_id: str) -> RunLogger:
        """Continue a run that a killed job left behind (its status goes back to RUNNING).

        Steps the run already has a metric row for (logged after the checkpoint the job resumes from, before it
        was killed; a bit-exact resume recomputes the same values) are skipped, so no (metric, step) row repeats.
        """
        client = _client(uri)
        _retry(lambda: client.update_run(run_id, status="RUNNING"))
        return cls(uri, run_id, resumed=True)

    def _already_logged(self, key: str, step: int) -> bool:
        if not self._resumed:
            return False
        if key not in self._logged_steps:
            history = _retry(lambda: self.client.get_metric_history(self.run_id, key))
            self._logged_steps[key] = {m.step for m in history}
        return step in self._logged_steps[key]

    def tags(self, values: dict[str, str]) -> None:
        """Set (or overwrite) tags of the run."""
        from mlflow.entities import RunTag

        _retry(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()]))

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        """Log several metrics at one step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_key(k), float(v), now, step or 0) for k, v in values.items()
                 if not self._already_logged(metric_key(k), step or 0)]
        if batch:
            _retry(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def history(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Log many steps' metrics at once (``[(step, {name: value})]``, e.g. a finished run's loss curve), in
        batches of the 1000 metrics MLflow accepts per call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_key(k), float(v), now, step) for step, values in rows for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            _retry(lambda chunk=batch[i : i + 1000]: self.client.log_batch(self.run_id, metrics=chunk))

    def children(self) -> list[str]:
        """Ids of the run's child runs (one per evaluation protocol)."""
        run = self.client.get_run(self.run_id)
        found = _retry(lambda: self.client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'"))
        return [r.info.run_id for r in found]

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file."""
        _retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def inputs(self, data_dir: str | Path, splits: dict[str, str]) -> None:
        """Log the prepared dataset as the run's input datasets, one per role (``{"train": "train", "eval":
        "val"}``): name ``<dataset>/<split>``, digest = the data version (see :func:`dataset_digest`)."""
        log_dataset_inputs(self.client, self.run_id, data_dir, splits)

    def finish(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        """Mark the run as finished (or FAILED), at ``end_time`` (ms since the epoch; default now)."""
        _retry(lambda: self.client.set_terminated(self.run_id, status=status, end_time=end_time))


def dataset_digest(data_dir: str | Path) -> str:
    """The data version of a prepared dataset in the 36 characters MLflow stores: ``<dvc md5[:16]>-<manifest
    sha256[:12]>`` (``data.dvc``'s md5 of ``data/`` beside the data root, 'nodvc' without it), the two parts of
    the ``data_version`` tag the figures job sets."""
    import hashlib

    folder = Path(data_dir)
    dvc_file = folder.parent.parent / f"{folder.parent.name}.dvc"
    dvc_md5 = "nodvc"
    if dvc_file.is_file():
        found = re.search(r"md5:\s*([0-9a-f]+)", dvc_file.read_text())
        dvc_md5 = found.group(1)[:16] if found else dvc_md5
    manifest = folder / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.is_file() else "unknown"
    return f"{dvc_md5}-{digest}"


def log_dataset_inputs(client: Any, run_id: str, data_dir: str | Path, splits: dict[str, str]) -> None:
    """Record a prepared dataset's splits as the run's inputs (MLflow dataset entities; the UI's Datasets column)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    folder = Path(data_dir).resolve()
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    digest = dataset_digest(folder)
    inputs = []
    for role, split in splits.items():
        profile = {"images": manifest.get("splits", {}).get(split), "classes": manifest.get("num_classes"),
                   "split": split}
        entity = Dataset(name=f"{folder.name}/{split}", digest=digest, source_type="local",
                         source=json.dumps({"uri": folder.as_uri(), "split_list": f"splits/{split}.txt"}),
                         profile=json.dumps(profile))
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", role), InputTag("split", split)]))
    _retry(lambda: client.log_inputs(run_id, datasets=inputs))


def log_evaluation(
    uri: str,
    parent_run_id: str,
    protocol: str,
    result: dict[str, Any],
    per_class_csv: str | Path,
    tags: dict[str, str],
) -> str:
    """Record one protocol's evaluation: a child run tagged with the protocol, plus ``<metric>.<protocol>``
    metrics on the experiment's run so the UI's compare view lines protocols up across runs.

    Idempotent: an evaluation already logged (the same :func:`mcibi.files.json_digest` of its record) is left as
    it is, so the workflow's figures job can publish every evaluation file of a run each time it runs. A
    re-evaluated protocol replaces its child run (the previous one is deleted, i.e. moved to MLflow's trash), and
    a parent metric is logged only when its value changed, so reruns leave no duplicate runs or rows. The
    ``hardware`` the evaluation recorded, if any, overrides the one in ``tags`` (the job that logs may run
    elsewhere).
    """
    from mlflow.entities import Metric, Param

    client = _client(uri)
    parent = client.get_run(parent_run_id)
    run_name = f"{parent.info.run_name}:{protocol}"
    digest = json_digest(result)
    previous = _retry(lambda: client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.protocol = '{protocol}'"))
    if len(previous) == 1 and previous[0].data.tags.get("evaluation_digest") == digest:
        return previous[0].info.run_id
    for old in previous:
        _retry(lambda run_id=old.info.run_id: client.delete_run(run_id))
        log.info("replacing the MLflow child run %s of protocol %s", old.info.run_id, protocol)
    inherited = {k: v for k, v in parent.data.tags.items() if k in ("params_hash", "data_version")}
    recorded = {"hardware": result["hardware"]} if result.get("hardware") else {}
    child = _retry(lambda: client.create_run(
        parent.info.experiment_id, run_name=run_name,
        tags={**inherited, **tags, **recorded, "protocol": protocol, "mlflow.parentRunId": parent_run_id,
              "evaluation_digest": digest},
    ))
    now = int(time.time() * 1000)
    scalars = {k: float(result[k]) for k in ("mIoU", "aAcc", "mAcc")}
    proto = {f"protocol.{k}": str(v) for k, v in result["protocol"].items()}
    _retry(lambda: client.log_batch(
        child.info.run_id,
        metrics=[Metric(k, v, now, 0) for k, v in scalars.items()],
        params=[Param(k, v[:MAX_PARAM_LEN]) for k, v in sorted(proto.items())]
        + [Param("checkpoint", str(result["checkpoint"]))],
    ))
    _retry(lambda: client.log_artifact(child.info.run_id, str(per_class_csv), "evaluation"))
    table = {"class": list(result["IoU"]), "IoU": list(result["IoU"].values()), "Acc": list(result["Acc"].values())}
    _retry(lambda: client.log_table(child.info.run_id, data=table, artifact_file="evaluation/per_class_iou.json"))
    _retry(lambda: client.set_terminated(child.info.run_id))
    logged = parent.data.metrics  # the latest value of each metric
    changed = [Metric(f"{k}.{protocol}", v, now, 0) for k, v in scalars.items() if logged.get(f"{k}.{protocol}") != v]
    if changed:
        _retry(lambda: client.log_batch(parent_run_id, metrics=changed))
    _retry(lambda: client.log_artifact(parent_run_id, str(per_class_csv), f"evaluation/{protocol}"))
    return child.info.run_id


def memory_history(uri: str, run_id: str, classes: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The per-class memory statistics a training run logged (``memory.<stat>.<class>``, MCIBI++: mu and sigma)
    as ``{stat: {class: [(iteration, value), ...]}}``; classes never logged are left out."""
    client = _client(uri)
    logged = set(client.get_run(run_id).data.metrics)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for stat in ("mu", "sigma"):
        out[stat] = {}
        for name in classes:
            key = metric_key(f"memory.{stat}.{name}")
            if key in logged:
                out[stat][name] = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    return out


def model_uri(ref: str, runs_root: str | Path = "runs") -> str:
    """An MLflow model URI from a run id, a run folder (its ``run.json``), or a URI (returned as it is)."""
    if "://" in ref or ref.startswith(("models:/", "runs:/")):
        return ref
    if _RUN_ID.match(ref):
        return f"runs:/{ref}/{MODEL_NAME}"
    run_file = Path(ref) / "run.json"
    if not run_file.is_file():
        run_file = Path(runs_root) / ref / "run.json"
    if run_file.is_file():
        run_id = json.loads(run_file.read_text()).get("mlflow_run_id")
        if run_id:
            return f"runs:/{run_id}/{MODEL_NAME}"
        raise ValueError(f"{run_file}: the run was trained without MLflow (no mlflow_run_id); retrain with MLflow.")
    raise ValueError(f"{ref}: neither an MLflow run id, a model URI (models:/<name>/<version>) nor a run folder "
                     "with run.json.")


def download_model(ref: str, tracking_uri: str | None = None) -> Path:
    """A local copy of the MLflow model ``ref`` names (see :func:`model_uri`)."""
    import mlflow

    uri = model_uri(ref)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                    tracking_uri=tracking_uri or default_tracking_uri()))
