"""The ``mcibi`` console script: every workflow step is one subcommand, also runnable by hand.

``mcibi --help`` lists the commands in groups (:data:`GROUPS`), what users run first and the workflow's plumbing
last; :func:`reference_markdown` renders the same parser as the command reference of docs/cli.md. :func:`main`
turns every expected error (a message naming the file or thing and what to do) into one log line and exit status
1; anything else keeps its traceback.

Plain argparse: the groups are the top-level description, generated from :data:`GROUPS`, and the subcommands'
own parsers are untouched, so every name, argument, default and parse rule the workflow's rules and the tests use
stays as it was, and no dependency is added (click is installed only as a dependency of MLflow, DVC and
Snakemake; typer is not installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("mcibi")
CHECKSUMS_HELP = ("sha256 record of archives without a published checksum: written on their first verification, "
                  "a different file is refused later")

_DATA_ROOT = "folder of the prepared datasets (default data)"

# how to do a command's work while the tracking store is unusable (the last choice of TrackingStoreError)
_OFFLINE = {
    "train": "train without tracking (`mcibi train ... --no-tracking`) and log the finished run later (`mcibi "
             "log-run <run folder>`)",
    "evaluate": "evaluate without tracking (`mcibi evaluate ... --no-tracking`); `mcibi log-run <run folder>` or "
                "`mcibi figures` logs the evaluation later",
    "figures": "draw the figures without tracking (`mcibi figures ... --no-tracking`) and run `mcibi figures` again "
               "once the store answers",
    "predict": "predict from the run folder or its checkpoint instead (`--run runs/<dataset>/<experiment>` or "
               "`--checkpoint model.pt`)",
}


def _tracking_uri(command: str = "") -> str:
    """The tracking URI (``MLFLOW_TRACKING_URI``, else the local ``mlflow.db``), checked within seconds before the
    command does any work (:class:`mcibi.tracking.store.TrackingStoreError` says what to do)."""
    from mcibi.tracking.runs import default_tracking_uri
    from mcibi.tracking.store import check_tracking_store

    uri = default_tracking_uri()
    check_tracking_store(uri, _OFFLINE.get(command, ""))
    return uri


def _logged_run_id(run_dir: Path) -> str:
    """The MLflow run id a run folder's ``run.json`` records ('' when trained without tracking)."""
    run_file = Path(run_dir) / "run.json"
    return (json.loads(run_file.read_text()).get("mlflow_run_id") or "") if run_file.is_file() else ""


def _cmd_download(a: argparse.Namespace) -> None:
    from mcibi.data.download import download
    from mcibi.files import write_json

    paths = download(a.dataset, a.dest or Path("downloads") / a.dataset,
                     checksums=a.checksums or Path("data") / f"{a.dataset}.checksums.json")
    for path in paths:
        log.info("have %s (%d bytes)", path, path.stat().st_size)
    if a.record:
        write_json(a.record, {"dataset": a.dataset, "archives": {p.name: p.stat().st_size for p in paths}})


def _cmd_verify_archives(a: argparse.Namespace) -> None:
    from mcibi.data.download import verify_archives
    from mcibi.files import write_json

    data_root = a.report.parent if a.report else Path("data")  # the workflow's report: data/<dataset>.archives.json
    record = verify_archives(a.dataset, a.dest or Path("downloads") / a.dataset,
                             a.checksums or data_root / f"{a.dataset}.checksums.json")
    for name, r in record["archives"].items():
        log.info("%s: %s (sha256 %s, %d bytes)", name, "verified with " + r["checked_with"] if r["verified"]
                 else "UNVERIFIED, " + r["checked_with"], r["sha256"], r["size"])
    if a.report:
        write_json(a.report, record)


def _cmd_prepare(a: argparse.Namespace) -> None:
    import json

    from mcibi.data.prepare import prepare

    record = json.loads(a.archive_record.read_text()) if a.archive_record else None
    out = a.out or Path("data") / a.dataset
    out = prepare(a.dataset, a.archives or Path("downloads") / a.dataset, out, archive_record=record,
                  workers=a.workers, checksums=a.checksums or out.parent / f"{a.dataset}.checksums.json")
    log.info("prepared %s", out)


def _cmd_verify_data(a: argparse.Namespace) -> None:
    from mcibi.data.fingerprint import RECORD_KEY, fingerprint
    from mcibi.data.prepare import verify_prepared
    from mcibi.files import write_json

    folder = a.data or Path("data") / a.dataset
    before = fingerprint(folder)  # the files as verified: a later change makes the workflow verify again
    summary = verify_prepared(a.dataset, folder)
    if a.report:
        write_json(a.report, summary | {RECORD_KEY: before})


def _cmd_dvc_commit(a: argparse.Namespace) -> None:
    from mcibi.data.versioning import commit_data
    from mcibi.files import write_text

    md5 = commit_data(a.repo, a.target)
    if a.record:
        write_text(a.record, f"{md5}\n")


def _cmd_validate(a: argparse.Namespace) -> None:
    from mcibi.spec.params import experiment_files, load_params

    files = [f for path in a.params for f in (experiment_files(path.parent, path.name) if path.is_dir() else [path])]
    if not files:
        raise ValueError(f"{' '.join(map(str, a.params))}: no experiment files to validate.")
    for file in files:
        p = load_params(file)
        log.info("ok: %s (%s, %s, memory %s)", file, p.model.framework, p.model.backbone.name, p.model.memory.kind)


def _cmd_mlflow_init(a: argparse.Namespace) -> None:
    from mcibi.files import write_text
    from mcibi.tracking.runs import ensure_experiment

    uri = _tracking_uri()
    exp_id = ensure_experiment(a.dataset, uri)
    log.info("MLflow experiment for %s: id %s at %s", a.dataset, exp_id, uri)
    if a.out:
        write_text(a.out, f"{exp_id}\n")


def _cmd_train(a: argparse.Namespace) -> None:
    from mcibi.spec.params import load_params
    from mcibi.spec.runs import with_seed

    params = with_seed(load_params(a.params), a.seed)
    out = a.out or Path("runs") / params.name
    uri = None if a.no_mlflow else _tracking_uri("train")
    from mcibi.engine.train import train

    train(params, a.data_root, out, tracking_uri=uri, device=a.device, threads=a.threads,
          resume=not (a.restart or a.no_resume))


def _cmd_evaluate(a: argparse.Namespace) -> None:
    from mcibi.spec.params import load_params
    from mcibi.spec.runs import with_seed

    params = with_seed(load_params(a.params), a.seed)
    run_dir = Path(a.checkpoint).parent
    main_rank = int(os.environ.get("RANK", "0")) == 0
    parent = _logged_run_id(run_dir)
    # the workflow passes --no-mlflow: its figures job logs every evaluation
    uri = _tracking_uri("evaluate") if parent and main_rank and not a.no_mlflow else None
    from mcibi.evaluation.protocols import evaluate, write_result
    from mcibi.tracking.runs import hardware

    out_json = a.out_json or run_dir / "eval" / f"{a.protocol}.json"
    out_csv = a.out_csv or run_dir / "eval" / f"{a.protocol}_per_class.csv"
    result = evaluate(params, a.checkpoint, a.protocol, a.data_root, device=a.device, threads=a.threads,
                      limit=a.limit, samples=a.samples, samples_out=a.samples_out)
    if not main_rank:  # under torchrun every rank has the all-reduced result; rank 0 writes
        return
    result["mlflow_run_id"] = parent
    result["hardware"] = hardware()
    write_result(result, out_json, out_csv)
    if uri:
        from mcibi.tracking.runs import log_evaluation, run_tags

        # the digest of this record equals that of the file written from it: the figures job will not log it again
        log_evaluation(uri, parent, a.protocol, result, out_csv, run_tags(params))


def _cmd_export(a: argparse.Namespace) -> None:
    from mcibi.evaluation.protocols import export_predictions
    from mcibi.spec.params import load_params

    params = load_params(a.params)
    n = export_predictions(params, a.checkpoint, a.protocol, a.data_root, a.out, split=a.split, device=a.device,
                           threads=a.threads, limit=a.limit)
    log.info("wrote %d PNGs to %s", n, a.out)


def _cmd_table(a: argparse.Namespace) -> None:
    from mcibi.reports.table import build_table, write_tables
    from mcibi.spec.params import experiment_files, load_params

    exps = [load_params(f) for f in experiment_files(a.params_root, a.dataset)]
    if a.experiments:
        wanted = set(a.experiments)
        exps = [e for e in exps if e.name.split("/")[-1] in wanted]
    id_file = a.experiment_id_file
    exp_id = id_file.read_text().strip() if id_file and id_file.is_file() else None
    df = build_table(exps, Path(a.runs) / a.dataset, seeds=a.seeds, mlflow_ui=a.mlflow_ui, experiment_id=exp_id)
    md, _ = write_tables(df, a.out or Path("results") / a.dataset, title=a.dataset)
    sys.stdout.write(md.read_text())


def _cmd_figures(a: argparse.Namespace) -> None:
    from mcibi.catalogue.rows import SECTIONS, baseline_of, catalogue_entry
    from mcibi.reports.figures import make_figures
    from mcibi.spec.params import load_params
    from mcibi.spec.runs import with_seed
    from mcibi.tracking.runs import default_tracking_uri

    params = with_seed(load_params(a.params), a.seed)
    stem = Path(a.params).stem
    entry = catalogue_entry(params.data.name, stem)
    section = SECTIONS[entry[0].section] if entry else ""
    # the store is used (and checked) only for a run that was logged to it
    uri = None if a.no_mlflow else _tracking_uri("figures") if _logged_run_id(a.run_dir) else default_tracking_uri()
    make_figures(params, a.run_dir, a.data_root, a.out or Path(a.run_dir) / "figures", tracking_uri=uri,
                 num_images=a.images, section=section, baseline=baseline_of(stem) or "")


def _cmd_catalogue(a: argparse.Namespace) -> None:
    from mcibi.catalogue.rows import DATASETS

    if a.action == "budget":
        from mcibi.catalogue.budget import budget_markdown

        for ds in DATASETS:
            sys.stdout.write(f"\n{ds}\n\n{budget_markdown(ds)}")
        return
    from mcibi.catalogue.generate import check_catalogue, write_catalogue
    from mcibi.catalogue.official import load_official_configs

    configs = load_official_configs(a.official)
    if a.action == "write":
        paths = write_catalogue(a.params_root, configs)
        log.info("wrote %d files under %s", len(paths), a.params_root)
        return
    bad = check_catalogue(a.params_root, configs)
    if bad:
        raise ValueError(f"{', '.join(bad)}: differ from the catalogue; run `mcibi catalogue write` (and edit "
                         "mcibi/catalogue/, not the params files).")
    log.info("params under %s are what the catalogue generates", a.params_root)


def _cmd_schema(a: argparse.Namespace) -> None:
    from mcibi.spec.schema import check_schema_files, write_schema_files

    if a.action == "write":
        for path in write_schema_files(a.root):
            log.info("wrote %s", path)
        return
    bad = check_schema_files(a.root)
    if bad:
        raise ValueError(f"{', '.join(bad)}: differ from what mcibi/spec/params.py generates; run `mcibi schema "
                         "write` (and edit the dataclasses and their field comments, not these files).")
    log.info("the params schemas and reference under %s are what mcibi/spec/params.py generates", a.root)


def _cmd_convert(a: argparse.Namespace) -> None:
    import torch

    from mcibi.models import build_for_weights
    from mcibi.models.build import save_checkpoint
    from mcibi.official.checkpoints import convert_official_checkpoint, load_official_file
    from mcibi.spec.params import load_params

    params = load_params(a.params)
    converted = convert_official_checkpoint(load_official_file(a.official), params.model)
    model = build_for_weights(params.model)
    model.load_state_dict(converted, strict=True)
    with torch.no_grad():
        save_checkpoint(a.out, model, params, iteration=0, source=str(a.official), mlflow_run_id="")
    log.info("converted %s -> %s", a.official, a.out)


def _cmd_predict(a: argparse.Namespace) -> None:
    from mcibi.evaluation.predict import Segmenter, predict_inputs

    if a.checkpoint:
        seg = Segmenter.from_checkpoint(a.checkpoint, params=a.params, protocol=a.protocol, device=a.device)
    elif a.run:
        folder = Path(a.run)
        local = folder.is_dir() and ((folder / "model.pt").is_file() or (folder / "MLmodel").is_file())
        seg = Segmenter.from_run(a.run, protocol=a.protocol, device=a.device,
                                 tracking_uri=None if local else _tracking_uri("predict"))
    else:
        raise ValueError("say which model: --checkpoint model.pt (with --params), or --run <run folder | MLflow run "
                         "id | models:/<name>/<version>>.")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    written, errors = predict_inputs(seg, a.inputs, a.out, batch_size=a.batch, overlays=not a.no_overlay,
                                     max_memory_mb=a.max_memory_mb)
    log.info("wrote %d predictions (class-index PNGs%s) to %s", written, " + overlays" if not a.no_overlay else "",
             a.out)
    if errors:
        raise RuntimeError(f"{len(errors)} input(s) could not be read: " + "; ".join(errors))


def _cmd_register(a: argparse.Namespace) -> None:
    uri = _tracking_uri()
    from mcibi.evaluation.serving import register

    name, version = register(a.run, a.name, tracking_uri=uri)
    log.info("registered %s as model '%s' version %s (models:/%s/%s)", a.run, name, version, name, version)


def _cmd_new_dataset(a: argparse.Namespace) -> None:
    from mcibi.catalogue.custom import new_dataset

    files = new_dataset(a.description, a.row, params_root=a.params_root, crop=a.crop, epochs=a.epochs,
                        batch=a.batch, gpus=a.gpus)
    for f in files:
        log.info("wrote %s", f)
    name = files[1].parent.name
    log.info("next: snakemake --cores all results/%s   (or: dvc repro %s)", name, name)


def _cmd_prepare_custom(a: argparse.Namespace) -> None:
    from mcibi.data.prepare import prepare_custom

    log.info("prepared %s", prepare_custom(a.description, a.out))


def _cmd_released(a: argparse.Namespace) -> None:
    """The authors' released files of a SOTA row: download (+ sha256 record), convert, or log to MLflow."""
    from mcibi.official import released

    if a.action == "download":
        dataset, experiment = a.target.split("/", 1)
        released.download_release(released.release_of(dataset, experiment), a.release_dir)
        return
    from mcibi.spec.params import load_params

    params = load_params(a.target)
    checkpoint = released.released_file(a.release_dir, "checkpoint")
    if a.action == "convert":
        released.convert_release(checkpoint, params, a.out, released_from=str(checkpoint))
        log.info("converted %s -> %s", checkpoint, a.out)
    else:
        from mcibi.files import write_json

        uri = _tracking_uri()
        record = json.loads((a.release_dir / released.RECORD).read_text())
        run_id = released.log_release_run(uri, params, released.released_file(a.release_dir, "log"),
                                          record)
        write_json(a.out, {"mlflow_run_id": run_id, "source": "official", **record})


def _cmd_log_run(a: argparse.Namespace) -> None:
    uri = _tracking_uri()
    from mcibi.engine.log_run import log_finished_run

    run_id, created = log_finished_run(a.run_dir, uri, a.data_root)
    if created:
        log.info("logged %s as MLflow run %s (%s); `mcibi figures <params> --run-dir %s` adds its figures",
                 a.run_dir, run_id, uri, a.run_dir)
    else:
        log.info("%s is MLflow run %s (%s) already; its evaluations are logged", a.run_dir, run_id, uri)


def _train_evaluate_predict(sub) -> None:
    for name, func, summary, description in (
            ("train", _cmd_train, "train one experiment (resumes from its newest checkpoint)",
             "Train one experiment; rerunning resumes from its newest checkpoint. Multi-GPU: torchrun "
             "--nproc_per_node=N -m mcibi train ..."),
            ("evaluate", _cmd_evaluate, "evaluate a checkpoint under one protocol (ss, flip, msflip)",
             "Evaluate a checkpoint under one protocol: mIoU, aAcc, mAcc and per-class IoU to "
             "<run>/eval/<protocol>.json and _per_class.csv.")):
        s = _command(sub, name, func, summary, description)
        s.add_argument("params", type=Path, help="the experiment's params file, params/<dataset>/<experiment>.yaml")
        s.add_argument("--data-root", type=Path, default=Path("data"), help=_DATA_ROOT)
        s.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
        s.add_argument("--threads", type=int, help="torch intra-op threads")
        s.add_argument("--no-mlflow", "--no-tracking", dest="no_mlflow", action="store_true",
                       help="do not log to MLflow (`mcibi log-run` logs a finished run later)")
        s.add_argument("--seed", type=int, help="train/evaluate the run of this seed (run name <experiment>-seed<k> "
                       "unless it is the params' own seed)")
        if name == "train":
            s.add_argument("--out", type=Path, help="run folder (default runs/<dataset>/<experiment>)")
            s.add_argument("--restart", action="store_true",
                           help="start from scratch: move <out>/checkpoints/ to <out>/checkpoints.archived-<time>/ "
                           "first (needed when the params changed since its checkpoints were written)")
            s.add_argument("--no-resume", action="store_true", help="the same as --restart")
        else:
            s.add_argument("--checkpoint", type=Path, required=True, help="runs/<dataset>/<experiment>/model.pt")
            s.add_argument("--protocol", required=True, help="ss, flip or msflip")
            s.add_argument("--out-json", type=Path, help="default <checkpoint folder>/eval/<protocol>.json")
            s.add_argument("--out-csv", type=Path, help="default <checkpoint folder>/eval/<protocol>_per_class.csv")
            s.add_argument("--limit", type=int, help="evaluate only the first N images (smoke tests)")
            s.add_argument("--samples-out", type=Path,
                           help="also write the first --samples (image, label, prediction) triples here (.npz), "
                           "for the figures' overlays")
            s.add_argument("--samples", type=int, default=4, help="how many (default 4)")

    s = _command(sub, "predict", _cmd_predict, "segment your images, folders, globs or videos with a trained model",
                 "Segment images, folders, globs or videos with a trained model: class-index PNGs and colour "
                 "overlays with a legend.")
    s.add_argument("inputs", nargs="+", help="image files, folders, globs ('photos/*.jpg') or video files")
    s.add_argument("--out", type=Path, required=True, help="output folder (<name>.png, <name>_overlay.png)")
    s.add_argument("--checkpoint", type=Path, help="a model.pt (its params are stored in it)")
    s.add_argument("--params", type=Path, help="params file of the checkpoint (default: the checkpoint's own)")
    s.add_argument("--run", help="a run folder (runs/<dataset>/<experiment>), an MLflow run id or a model URI "
                   "(models:/<name>/<version>)")
    s.add_argument("--protocol", default="ss", help="ss, flip or msflip, as the params define (default ss)")
    s.add_argument("--batch", type=int, default=4, help="images of one size per forward (default 4)")
    s.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    s.add_argument("--threads", type=int, help="torch intra-op threads")
    s.add_argument("--no-overlay", action="store_true", help="class-index PNGs only")
    s.add_argument("--max-memory-mb", type=int, help="memory budget per image (default: half the available memory): "
                   "larger images are predicted in tiles, those that cannot fit are refused before decoding")

    s = _command(sub, "export", _cmd_export, "write test-set predictions as PNGs for an evaluation server",
                 "Write test-set predictions as PNGs for an evaluation server (CityScapes: labelIds); under "
                 "torchrun each rank writes its share.")
    s.add_argument("params", type=Path, help="the experiment's params file, params/<dataset>/<experiment>.yaml")
    s.add_argument("--checkpoint", type=Path, required=True, help="the model.pt to predict with")
    s.add_argument("--protocol", default="msflip", help="ss, flip or msflip (default msflip)")
    s.add_argument("--split", default="test", help="the split to predict (default test)")
    s.add_argument("--out", type=Path, required=True, help="folder of <image id>.png files")
    s.add_argument("--data-root", type=Path, default=Path("data"), help=_DATA_ROOT)
    s.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    s.add_argument("--threads", type=int, help="torch intra-op threads")
    s.add_argument("--limit", type=int, help="only the first N images")


def _results_and_tracking(sub) -> None:
    s = _command(sub, "table", _cmd_table, "write the dataset's results table (results/<dataset>/table.md, .csv)",
                 "Write results/<dataset>/table.md and table.csv: published, reproduced and official-weights mIoU "
                 "per model-zoo row, with MLflow links.")
    s.add_argument("dataset", help="the dataset's name, e.g. lip")
    s.add_argument("--params-root", type=Path, default=Path("params"), help="folder of the params files (default "
                   "params)")
    s.add_argument("--runs", type=Path, default=Path("runs"), help="folder of the run folders (default runs)")
    s.add_argument("--out", type=Path, help="default results/<dataset>")
    s.add_argument("--experiments", nargs="*", help="only these experiment names (file stems)")
    s.add_argument("--seeds", type=int, default=1, help="runs per experiment (mean ± sd over those evaluated)")
    s.add_argument("--mlflow-ui", help="base URL of the MLflow UI, e.g. http://127.0.0.1:5000 (links in the table)")
    s.add_argument("--experiment-id-file", type=Path, help="file holding the dataset's MLflow experiment id")

    s = _command(sub, "figures", _cmd_figures, "draw a run's figures and log them (and its evaluations) to MLflow",
                 "Per-run figures (per-class IoU table, confusion heatmap, IoU bars, prediction overlays, memory "
                 "trajectories) logged as MLflow artifacts, with the run's evaluations and comparison tags.")
    s.add_argument("params", type=Path, help="the experiment's params file, params/<dataset>/<experiment>.yaml")
    s.add_argument("--run-dir", type=Path, required=True, help="runs/<dataset>/<run> (model.pt, run.json, eval/)")
    s.add_argument("--out", type=Path, help="default <run-dir>/figures")
    s.add_argument("--data-root", type=Path, default=Path("data"), help=_DATA_ROOT)
    s.add_argument("--seed", type=int, help="the run's seed (see train --seed)")
    s.add_argument("--images", type=int, default=4, help="most evaluation images with prediction overlays (from "
                   "<run-dir>/eval/<first protocol>_samples.npz, written by evaluate --samples-out)")
    s.add_argument("--no-mlflow", "--no-tracking", dest="no_mlflow", action="store_true",
                   help="do not log to MLflow")

    s = _command(sub, "log-run", _cmd_log_run, "log a run trained without tracking to MLflow",
                 "Log a finished run trained without tracking (train --no-tracking) to MLflow: params, tags, loss "
                 "curve, params file, input dataset, the MLflow model and the evaluations in eval/; the run id is "
                 "recorded in run.json. A run already logged to the store is not logged again.")
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="the run folder, runs/<dataset>/<experiment> (run.json, loss.csv, model.pt, eval/)")
    s.add_argument("--data-root", type=Path, default=Path("data"),
                   help="prepared data, recorded as the run's input dataset (default data)")

    s = _command(sub, "register", _cmd_register, "register a run's MLflow model in the Model Registry",
                 "Register a run's logged MLflow model in the Model Registry.")
    s.add_argument("run", help="run folder (runs/<dataset>/<experiment>), MLflow run id or runs:/ URI")
    s.add_argument("--name", required=True, help="registered model name")


def _data(sub) -> None:
    s = _command(sub, "download", _cmd_download, "fetch a dataset's archives",
                 "Fetch a dataset's archives: official source first, then the mirror (demo: generate them); "
                 "CityScapes reads CITYSCAPES_USERNAME/CITYSCAPES_PASSWORD or ~/.netrc.")
    s.add_argument("dataset", help="the dataset's name, e.g. demo or lip")
    s.add_argument("--dest", type=Path, help="archive folder (default downloads/<dataset>); archives placed here "
                   "by hand are used")
    s.add_argument("--record", type=Path, help="write the list of archives and sizes here")
    s.add_argument("--checksums", type=Path, help=CHECKSUMS_HELP + " (default data/<dataset>.checksums.json)")

    s = _command(sub, "verify-archives", _cmd_verify_archives, "check downloaded archives against their checksums",
                 "Check downloaded archives against recorded checksums.")
    s.add_argument("dataset", help="the dataset's name")
    s.add_argument("--dest", type=Path, help="archive folder (default downloads/<dataset>)")
    s.add_argument("--report", type=Path, help="write the checksum record here")
    s.add_argument("--checksums", type=Path, help=CHECKSUMS_HELP + " (default <dataset>.checksums.json beside "
                   "--report, else in data/)")

    s = _command(sub, "prepare", _cmd_prepare, "convert verified archives to the prepared format",
                 "Convert verified archives to the prepared on-disk format.")
    s.add_argument("dataset", help="the dataset's name")
    s.add_argument("--archives", type=Path, help="archive folder (default downloads/<dataset>)")
    s.add_argument("--out", type=Path, help="prepared folder (default data/<dataset>)")
    s.add_argument("--archive-record", type=Path, help="verify-archives report: skips re-hashing archives whose "
                   "sizes still match it")
    s.add_argument("--workers", type=int, help="parallel conversion threads (default min(8, CPUs))")
    s.add_argument("--checksums", type=Path, help=CHECKSUMS_HELP + " (default <dataset>.checksums.json beside "
                   "--out)")

    s = _command(sub, "verify-data", _cmd_verify_data, "check a prepared dataset (counts, label values, sizes)",
                 "Check a prepared dataset (counts, label values, sizes).")
    s.add_argument("dataset", help="the dataset's name")
    s.add_argument("--data", type=Path, help="prepared folder (default data/<dataset>)")
    s.add_argument("--report", type=Path, help="write the summary here")

    s = _command(sub, "new-dataset", _cmd_new_dataset, "add a custom dataset: check it, register it, write its params",
                 "Check a custom dataset's description file and every image/mask, register it as "
                 "datasets/<name>.yaml and write params/<name>/ from a model-zoo row (MCIBI++ + baseline).")
    s.add_argument("description", type=Path, help="the dataset description (YAML; see README, Custom datasets)")
    s.add_argument("--from", dest="row", metavar="ROW", required=True, help="model-zoo row: "
                   "<dataset>/<experiment> (e.g. lip/upernet_r50_mcibipp) or an MCIBI++ params file")
    s.add_argument("--params-root", type=Path, default=Path("params"), help="where params/<name>/ goes (default "
                   "params)")
    s.add_argument("--crop", type=int, help="square crop size (default: the row's, capped by the median image)")
    s.add_argument("--epochs", type=int, help="default: the row's, scaled up for smaller datasets")
    s.add_argument("--batch", type=int, help="total batch size (default: the row's, capped by half the images)")
    s.add_argument("--gpus", type=int, help="GPUs per training job (default: the row's)")


def _model_zoo(sub) -> None:
    s = _command(sub, "catalogue", _cmd_catalogue, "write or check the model-zoo rows' params files, or their budget",
                 "The model-zoo rows' params files: write them, check the committed ones, or print each run's "
                 "budget (iterations, images, GPU-hours, disk).")
    s.add_argument("action", choices=("write", "check", "budget"), help="write the params files, check the "
                   "committed ones against the catalogue, or print the budget")
    s.add_argument("--params-root", type=Path, default=Path("params"), help="folder of the params files (default "
                   "params)")
    s.add_argument("--official", type=Path, help="official configs dump (default: the copy shipped in mcibi)")

    s = _command(sub, "schema", _cmd_schema, "write or check the params JSON Schemas and the params reference",
                 "The params JSON Schemas (workflow/schemas/params*.schema.json) and the params reference "
                 "(docs/params-reference.md), generated from mcibi/spec/params.py: write them, or check the committed "
                 "ones.")
    s.add_argument("action", choices=("write", "check"), help="write the files, or check the committed ones")
    s.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: here)")

    s = _command(sub, "validate", _cmd_validate, "strictly validate params files",
                 "Strictly validate params files (or every experiment of params/<dataset>/).")
    s.add_argument("params", nargs="+", type=Path, help="params files or params/<dataset>/ folders")

    s = _command(sub, "convert", _cmd_convert, "convert an official MCIBI++ checkpoint to ours",
                 "Convert an official MCIBI++ checkpoint for a params file (strict: every tensor name and shape).")
    s.add_argument("official", type=Path, help="the official .pth (loaded with weights_only=True)")
    s.add_argument("params", type=Path, help="the params file describing the same model")
    s.add_argument("--out", type=Path, required=True, help="our checkpoint to write")

    s = _command(sub, "released", _cmd_released, "the authors' released weights and logs: download, convert, log",
                 "The authors' released checkpoint and log of a SOTA row: download (sha256 recorded, then "
                 "verified), convert to ours, or log the training log to MLflow (source=official).")
    s.add_argument("action", choices=["download", "convert", "log"], help="what to do")
    s.add_argument("target", help="download: <dataset>/<experiment>; convert, log: the experiment's params file")
    s.add_argument("--release-dir", type=Path, required=True, help="folder of the downloaded files and release.json")
    s.add_argument("--out", type=Path, help="convert: the mcibi checkpoint; log: the run.json to write")


def _plumbing(sub) -> None:
    s = _command(sub, "mlflow-init", _cmd_mlflow_init, "create the dataset's MLflow experiment",
                 "Create the dataset's MLflow experiment (once, before parallel jobs).")
    s.add_argument("dataset", help="the dataset's name")
    s.add_argument("--out", type=Path, help="write the experiment id here")

    s = _command(sub, "dvc-commit", _cmd_dvc_commit, "commit the prepared data to the DVC cache",
                 "Commit the prepared data to the DVC cache (linked, not copied) so that `dvc status` is clean and "
                 "`dvc push` works; nothing outside a DVC repository.")
    s.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default .)")
    s.add_argument("--target", default="data.dvc", help="the .dvc file to commit (default data.dvc)")
    s.add_argument("--record", type=Path, help="write the committed md5 here")

    s = _command(sub, "prepare-custom", _cmd_prepare_custom, "validate and convert a custom dataset",
                 "Validate and convert a custom dataset (the workflow's prepare step; new-dataset checks it first).")
    s.add_argument("description", type=Path, help="the dataset description (YAML)")
    s.add_argument("--out", type=Path, required=True, help="prepared folder, data/<name>")


# `mcibi --help` lists the commands in these groups, in this order: what users run first, the plumbing the
# workflow's rules call last
GROUPS = (
    ("Train, evaluate, predict", _train_evaluate_predict),
    ("Results and tracking", _results_and_tracking),
    ("Data", _data),
    ("Model zoo and released weights", _model_zoo),
    ("Workflow plumbing (the Snakemake rules run these)", _plumbing),
)
_EPILOG = "`mcibi <command> --help` describes a command's arguments."


def _command(sub, name: str, func, summary: str, description: str) -> argparse.ArgumentParser:
    """One subcommand: ``summary`` is its line in ``mcibi --help``, ``description`` heads ``mcibi <name> --help``."""
    s = sub.add_parser(name, help=summary, description=description)
    s.set_defaults(func=func)
    s.summary = summary
    return s


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; ``parser.command_groups`` holds ``(title, [subparser, ...])``."""
    parser = argparse.ArgumentParser(prog="mcibi", usage="mcibi [-h] [-v] <command> [<args>]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>", help=argparse.SUPPRESS,
                                prog="mcibi")
    groups = []
    for title, add in GROUPS:
        before = set(sub.choices)
        add(sub)
        groups.append((title, [p for name, p in sub.choices.items() if name not in before]))
    parser.command_groups = groups
    parser.description = _listing(groups)
    return parser


def _listing(groups) -> str:
    """The grouped command list of ``mcibi --help``: one line per command."""
    width = max(len(_name(p)) for _, parsers in groups for p in parsers) + 4
    lines = ["Reproduce the MCIBI++ model zoo, train and evaluate your own models, segment your images.", ""]
    for title, parsers in groups:
        lines.append(f"{title}:")
        lines += [f"  {_name(p):<{width}}{p.summary}" for p in parsers]
        lines.append("")
    return "\n".join(lines).rstrip()


def _name(parser: argparse.ArgumentParser) -> str:
    return parser.prog.rsplit(" ", 1)[-1]


REFERENCE_BEGIN = "<!-- command reference: generated from mcibi/cli.py by mcibi.cli.update_reference() -->"
REFERENCE_END = "<!-- end of the command reference -->"


def reference_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """docs/cli.md's command reference: a table of the groups' commands, then each command's usage, description
    and arguments, all read from the parser (so the page cannot drift from the code)."""
    parser = parser or build_parser()
    out = [REFERENCE_BEGIN, "", "| Command | What it does |", "| --- | --- |"]
    for title, parsers in parser.command_groups:
        out.append(f"| **{title}** | |")
        out += [f"| [`{_name(p)}`](#mcibi-{_name(p)}) | {_cell(p.summary)} |" for p in parsers]
    for title, parsers in parser.command_groups:
        out += ["", f"### {title}"]
        for p in parsers:
            out += ["", f"#### `mcibi {_name(p)}`", "", f"`{_usage(p)}`", "", _md(p.description), "",
                    "| Argument | Meaning |", "| --- | --- |"]
            out += [f"| `{_flag(a)}` | {_cell(_meaning(a))} |" for a in p._actions if a.help != argparse.SUPPRESS
                    and "-h" not in a.option_strings]
    return "\n".join([*out, "", REFERENCE_END]) + "\n"


def update_reference(page: str | Path | None = None) -> Path:
    """Replace the command reference in docs/cli.md (between :data:`REFERENCE_BEGIN` and :data:`REFERENCE_END`)
    with :func:`reference_markdown`."""
    page = Path(page) if page else Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    text = page.read_text()
    head, _, rest = text.partition(REFERENCE_BEGIN)
    _, _, tail = rest.partition(REFERENCE_END)
    page.write_text(head + reference_markdown().rstrip("\n") + tail)
    return page


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=10_000)  # one line, whatever the terminal
    formatter.add_usage(None, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _flag(action: argparse.Action) -> str:
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if action.choices and not action.metavar:
        metavar = "{" + ",".join(action.choices) + "}"
    if not action.option_strings:
        return f"{metavar} ..." if action.nargs in ("+", "*") else metavar
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} {metavar} ..." if action.nargs in ("+", "*") else f"{names} {metavar}"


def _meaning(action: argparse.Action) -> str:
    text = action.help or ""
    if action.required and action.option_strings:
        text = f"required; {text}" if text else "required"
    if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
        text = f"{text} (default {action.default})" if text else f"default {action.default}"
    return text


def _cell(text: str) -> str:
    return _md(text).replace("|", "\\|")


def _md(text: str) -> str:
    """``text`` as markdown: ``<dataset>`` outside code spans escaped (else it reads as an HTML tag)."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: 0 on success, 1 on an expected error (one log line saying what and
    what to do), 130 when interrupted; an unexpected error keeps its traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mcibi.cluster.slurm import attempt_header  # the workflow's logs are appended: one header per attempt

    if os.environ.get("RANK", "0") == "0":  # once per attempt, not once per torchrun process
        log.info("%s", attempt_header(" ".join((sys.argv[1:] if argv is None else argv)[:1])))
    try:
        args.func(args)
    except KeyboardInterrupt:
        log.error("interrupted; rerunning the same command starts again (training resumes from its newest "
                  "checkpoint)")
        return 130
    except Exception as exc:
        message = expected_error(exc)
        if message is None:
            raise
        log.error("%s", message)
        log.debug("the error in full", exc_info=True)
        return 1
    return 0


def expected_error(exc: BaseException) -> str | None:
    """The message of an expected error, or None for an unexpected one (a bug: it keeps its traceback).

    Expected: the errors mcibi raises with a sentence that names the file or thing and what to do
    (ParamsError, CheckpointError, ArchiveError, ResumeConflictError, WriteError, TrackingStoreError, ... and plain
    ValueError / KeyError / RuntimeError / FileNotFoundError raised so), errors the operating system reports for
    a file or program, MLflow's errors and network errors.
    """
    mlflow_errors = sys.modules.get("mlflow.exceptions")
    if mlflow_errors and isinstance(exc, mlflow_errors.MlflowException):
        from mcibi.tracking.runs import default_tracking_uri

        first = (str(exc.message).strip().splitlines() or ["(no message)"])[0][:400].rstrip(".")
        return (f"MLflow, tracking store {default_tracking_uri()}: {first}. Check the run, model or experiment "
                "named and that MLFLOW_TRACKING_URI names the store it was logged to (unset, the local mlflow.db "
                "is used), then rerun.")
    requests = sys.modules.get("requests")
    if requests and isinstance(exc, requests.RequestException):  # an OSError too: before the OS errors
        url = getattr(exc.request, "url", None) or ""
        return f"network error{' fetching ' + url if url else ''}: {exc}. Check the connection, then rerun."
    if isinstance(exc, OSError) and exc.errno is not None:
        return _os_error(exc)
    if isinstance(exc, ValueError | KeyError | RuntimeError | OSError) and exc.args and isinstance(exc.args[0], str) \
            and " " in exc.args[0].strip():  # mcibi's messages are sentences; a bare KeyError('x') is a bug
        return exc.args[0]
    return None


def _os_error(exc: OSError) -> str:
    """One sentence for an error the OS reported: which file or program, what happened, what to do."""
    import errno

    from mcibi.files import describe_write_error

    name = exc.filename
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # a full disk, quota, read-only file system
        return describe_write_error(exc, name or ".")
    why = (exc.strerror or str(exc)).lower()
    if name is None:
        return f"{why} (the operating system refused: {exc}). Fix the cause, then rerun."
    if exc.errno == errno.ENOENT and os.sep not in str(name) and not exc.filename2:
        return (f"{name}: no such file, folder or program: check the path, or install the program (on PATH, or "
                "beside this Python), then rerun.")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{name}: {why}: make it readable (and its folder writable) for you, or use another path, then rerun."
    return f"{name}: {why}: check the path, then rerun."


if __name__ == "__main__":
    sys.exit(main())
