"""The authors' released checkpoints and training logs of the SOTA rows, in the pipeline.

For each SOTA row, the trained ``.pth`` and the training ``.log`` are downloaded (resumable; no checksum is
published, so the sha256 of each file is recorded at download and verified at every later use), the checkpoint is
converted to ours (:func:`mcibi.official.checkpoints.convert_official_checkpoint`) and evaluated under the row's
protocols, and the log becomes an MLflow run (tag ``source=official``) with the authors' loss curves, lr and reported
mIoU. ``model.init_from`` fine-tunes from a released (or any mcibi) checkpoint. The files come through
:mod:`mcibi.official.mirrors` (``$MCIBI_RELEASE_MIRROR``).

Sources, tried in order: the official model zoo's file for the config our params translate
(``ssseg_mcibiplusplus/<official config>.{pth,log}``, sssegmentation 1.7.0's docs), then the model-zoo page's
link (``ssseg_memorynetv2/memorynetv2_*``) where that page gives a correct one.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcibi.files import write_json
from mcibi.official.mirrors import RELEASE_MIRROR_ENV, fetch_first, mirror_from_env
from mcibi.spec.params import (
    DEFAULTS_FILE,
    ExperimentParams,
    ModelParams,
    experiment_files,
    flatten,
    load_params,
    to_dict,
)

if TYPE_CHECKING:  # the workflow's parse step imports this module: no torch at import time
    from torch import nn

log = logging.getLogger(__name__)

STORE = "https://github.com/SegmentationBLWX/modelstore/releases/download"
RECORD = "release.json"
# model-zoo rows whose model-zoo page links ssseg_memorynetv2 files; the page's two wrong links (VOC R-101 'log' ->
# the .pth, COCO-Stuff Swin-L 'model' -> the VSPW checkpoint) are left out
_ZOO_PAGE_LINKED = {
    ("vspw", "upernet_resnet101os8"): ("pth", "log"), ("vspw", "upernet_swinlarge"): ("pth", "log"),
    ("voc", "upernet_resnet50os8"): ("pth", "log"), ("voc", "upernet_resnet101os8"): ("pth",),
    ("lip", "upernet_resnet101os8"): ("pth", "log"), ("lip", "upernet_resnest101os8"): ("pth", "log"),
    ("lip", "upernet_swinlarge"): ("pth", "log"), ("lip", "aspp_hrnetv2w48"): ("pth", "log"),
    ("cocostuff10k", "upernet_resnet101os8"): ("pth", "log"),
    ("cocostuff10k", "upernet_resnest101os8"): ("pth", "log"), ("cocostuff10k", "upernet_swinlarge"): ("log",),
}
# released files the official model zoo does not list (its VOC R-101 'log' link points at the checkpoint too)
_NO_OFFICIAL = {("mcibiplusplus_upernet_resnet101os8_voc", "log")}


class ReleaseError(RuntimeError):
    """A released file cannot be fetched, does not match its recorded checksum, or cannot be used."""


@dataclass(frozen=True)
class Release:
    """The released files of one SOTA row."""

    dataset: str
    experiment: str  # our params stem
    official_name: str  # the official config (mcibiplusplus_<layout>_<dataset>)
    checkpoint_urls: tuple[str, ...]
    log_urls: tuple[str, ...]  # empty: no log was released


def _urls(official_name: str, ext: str) -> tuple[str, ...]:
    urls = [] if (official_name, ext) in _NO_OFFICIAL else [f"{STORE}/ssseg_mcibiplusplus/{official_name}.{ext}"]
    layout, dataset = official_name.removeprefix("mcibiplusplus_").rsplit("_", 1)
    if ext in _ZOO_PAGE_LINKED.get((dataset, layout), ()):
        urls.append(f"{STORE}/ssseg_memorynetv2/memorynetv2_{layout}_{dataset}.{ext}")
    return tuple(urls)


def releases(dataset: str) -> dict[str, Release]:
    """The released files of every SOTA row of ``dataset``, keyed by our experiment stem."""
    from mcibi.catalogue.rows import rows_of

    out = {}
    for row in rows_of(dataset):
        if row.section == "sota":
            name = row.official_name
            out[row.stem] = Release(dataset, row.stem, name, _urls(name, "pth"), _urls(name, "log"))
    return out


def release_of(dataset: str, experiment: str) -> Release:
    found = releases(dataset).get(experiment)
    if found is None:
        raise ReleaseError(f"{dataset}/{experiment}: no released checkpoint (the SOTA rows have one: "
                           f"{', '.join(releases(dataset)) or 'none for this dataset'}).")
    return found


# ---------------------------------------------------------------------------------------- workflow (parse time)
@cache
def release_params(params_root: str, dataset: str, experiment: str) -> ExperimentParams:
    """Validated params of a released row (cached: the workflow asks for them per job and resource)."""
    return load_params(Path(params_root) / dataset / f"{experiment}.yaml")


def released_rows(params_root: str, dataset: str) -> list[str]:
    """The dataset's released rows that have a params file."""
    stems = {f.stem for f in experiment_files(params_root, dataset)}
    return [stem for stem in releases(dataset) if stem in stems]


def release_params_files(params_root: str, dataset: str, experiment: str) -> list[str]:
    """The row's params file and its dataset's defaults layer (both trigger reruns when edited)."""
    defaults = Path(params_root) / dataset / DEFAULTS_FILE
    return [str(Path(params_root) / dataset / f"{experiment}.yaml")] + ([str(defaults)] if defaults.is_file() else [])


def released_outputs(runs_root: str, params_root: str, dataset: str) -> list[str]:
    """What results/<dataset>/official needs: per row its evaluation JSONs (CityScapes test rows: the exported
    predictions) and its MLflow run record."""
    from mcibi.data.lookup import get_spec

    out = []
    for stem in released_rows(params_root, dataset):
        p = release_params(params_root, dataset, stem)
        base = f"{runs_root}/{dataset}/official/{stem}"
        server = p.data.eval_split in get_spec(p.data.name).unlabelled_splits
        out += [f"{base}/test_{proto}" if server else f"{base}/eval/{proto}.json" for proto in p.evaluate.protocols]
        out.append(f"{base}/run.json")
    return out


# ---------------------------------------------------------------------------------------------------- download
def _get(urls: tuple[str, ...], target: Path, url_map) -> str:
    """Fetch ``target`` from the first URL that delivers it; return that URL."""
    from mcibi.data.download import ArchiveError

    try:
        url, part = fetch_first(urls, target, url_map)
    except ArchiveError as exc:
        raise ReleaseError(f"{target.name}: no source delivered it ({exc}). Place the file in {target.parent}/ by "
                           "hand and run again.") from exc
    part.replace(target)
    return url


def download_release(release: Release, dest: str | Path, url_map=None) -> dict[str, Any]:
    """Make the row's checkpoint (and log, if released) present in ``dest``; record and verify their sha256.

    A file already recorded is checked against its record; a file present without a record (placed by hand) is
    recorded. The record ``release.json`` says which URL each file came from. ``url_map`` (default: through the
    mirror ``$MCIBI_RELEASE_MIRROR`` names, if set) gives the URL each file is fetched from.
    """
    from mcibi.data.download import checksums

    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    url_map = url_map or mirror_from_env(RELEASE_MIRROR_ENV)
    record_file = folder / RECORD
    old = json.loads(record_file.read_text()).get("files", {}) if record_file.is_file() else {}
    files = {}
    for kind, urls in (("checkpoint", release.checkpoint_urls), ("log", release.log_urls)):
        if not urls:
            continue
        name = urls[0].rsplit("/", 1)[1]
        target = folder / name
        source = old.get(name, {}).get("url", "placed by hand")
        if not target.is_file():
            source = _get(urls, target, url_map)
        sha = checksums(target)["sha256"]
        recorded = old.get(name, {}).get("sha256")
        if recorded and recorded != sha:
            raise ReleaseError(f"{target}: sha256 {sha} differs from the recorded {recorded}: the file changed or "
                               "is corrupt. Delete it (and release.json) and run again.")
        files[name] = {"kind": kind, "url": source, "sha256": sha, "size": target.stat().st_size,
                       "verified": bool(recorded), "checked_with": "sha256 recorded at download" if recorded
                       else "none published; sha256 recorded now"}
    record = {"dataset": release.dataset, "experiment": release.experiment, "official_config": release.official_name,
              "files": files}
    write_json(record_file, record)
    return record


def released_file(folder: str | Path, kind: str) -> Path | None:
    """The downloaded checkpoint or log of a release folder, verified against ``release.json``; None if the row
    has no such file."""
    from mcibi.data.download import checksums

    folder = Path(folder)
    record_file = folder / RECORD
    if not record_file.is_file():
        raise ReleaseError(f"{record_file}: missing. Run `mcibi released download` first.")
    for name, entry in json.loads(record_file.read_text())["files"].items():
        if entry["kind"] == kind:
            sha = checksums(folder / name)["sha256"]
            if sha != entry["sha256"]:
                raise ReleaseError(f"{folder / name}: sha256 {sha} differs from {entry['sha256']} in {record_file}. "
                                   "Delete both and download again.")
            return folder / name
    return None


# ------------------------------------------------------------------------------------------------------ convert
def convert_release(checkpoint: str | Path, params: ExperimentParams, out: str | Path, **extra: Any) -> None:
    """An official checkpoint as an mcibi checkpoint of ``params`` (strict conversion, then saved atomically)."""
    from mcibi.models import build_for_weights
    from mcibi.models.build import save_checkpoint
    from mcibi.official.checkpoints import convert_official_checkpoint, load_official_file

    model = build_for_weights(params.model)
    model.load_state_dict(convert_official_checkpoint(load_official_file(checkpoint), params.model), strict=True)
    save_checkpoint(out, model, params, source="official", **extra)


def initialise_from(model: nn.Module, path: str | Path, model_params: ModelParams) -> None:
    """``model.init_from``: load every weight (memory included) from an mcibi checkpoint or an official ``.pth``
    (converted), strictly. Only the weights: the optimiser and schedule start afresh (fine-tuning)."""
    from mcibi.models.checkpoint import CheckpointError, CorruptCheckpointError, load_checkpoint, load_weights
    from mcibi.official.checkpoints import convert_official_checkpoint, load_official_file

    file = Path(path)
    if not file.is_file():
        raise ReleaseError(f"model.init_from: {file} does not exist. Download it (snakemake ... results/<dataset>/"
                           "official) or fix the path.")
    try:
        state = load_checkpoint(file)
    except CorruptCheckpointError:
        raise  # an mcibi checkpoint whose bytes changed: never read it as an official file
    except CheckpointError:
        state = {"state_dict": convert_official_checkpoint(load_official_file(file), model_params)}
    load_weights(model, state, file)
    log.info("initialised all %d tensors from %s", len(state["state_dict"]), file)


# ----------------------------------------------------------------------------------------------------------- log
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (INFO|WARNING|DEBUG|ERROR)\s+(\{.*\})\s*$")
_NUMPY_SCALAR = re.compile(r"\bnp\.\w+\(([^()]*)\)")  # numpy >= 2 reprs: np.float64(0.5)
_ARRAY = re.compile(r"\barray\((\[[^()]*\])(?:, dtype=\w+)?\)")


def parse_official_log(text: str) -> dict[str, list[dict[str, Any]]]:
    """The records of an official training log (``<date> <time> INFO  {python dict}`` lines, as its
    ``LocalLoggerHandle`` writes them): ``train`` (iteration, epoch, learning rate, mean losses since the previous
    record) and ``eval`` (the mIoU it reported after an epoch, with the epoch it followed)."""
    train, evals, epoch = [], [], 0
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            if (e := re.search(r"Evaluate \w+ at epoch (\d+)", line)) is not None:
                epoch = int(e[1])
            continue
        body = _ARRAY.sub(r"\1", _NUMPY_SCALAR.sub(r"\1", m[3])).replace("nan", "None")
        try:
            record = ast.literal_eval(body)
        except (ValueError, SyntaxError):
            continue
        if "cur_iter" in record and "learning_rate" in record:
            losses = {k: float(v) for k, v in record.items() if k.startswith("loss_")}
            train.append({"iteration": int(record["cur_iter"]), "epoch": int(record["cur_epoch"]),
                          "lr": float(record["learning_rate"]), **losses})
        elif "miou" in record:
            evals.append({"epoch": epoch, "mIoU": float(record["miou"])})
    return {"train": train, "eval": evals}


def log_release_run(uri: str, params: ExperimentParams, log_file: Path | None, record: dict[str, Any]) -> str:
    """One MLflow run for a released row in the dataset's experiment: tag source=official, the params, and from
    the log the loss curves per iteration (our metric names), lr and the reported mIoU; return its id."""
    from mcibi.tracking.runs import RunLogger

    parsed = parse_official_log(log_file.read_text(errors="replace")) if log_file else {"train": [], "eval": []}
    tags = {"source": "official", "dataset": params.data.name, "experiment": params.name,
            "framework": params.model.framework, "backbone": params.model.backbone.name,
            "memory": params.model.memory.kind, "official_config": record["official_config"],
            "released_log": "yes" if log_file else "not released"}
    flat = flatten({k: v for k, v in to_dict(params).items() if k not in ("name", "path")})
    run = RunLogger.start(uri, params.data.name, f"{params.name}:official", tags, flat,
                          description=f"The authors' released weights and training log of {record['official_config']}")
    for entry in parsed["train"]:
        run.metrics({k: v for k, v in entry.items() if k not in ("iteration", "epoch")}, step=entry["iteration"])
    iters_per_epoch = {e["epoch"]: e["iteration"] for e in parsed["train"]}
    for entry in parsed["eval"]:
        run.metrics({"mIoU.reported": entry["mIoU"]}, step=iters_per_epoch.get(entry["epoch"], entry["epoch"]))
    if log_file:
        run.artifact(log_file, "official")
    run.finish()
    return run.run_id
