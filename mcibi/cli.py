"""The ``mcibi`` console script: every workflow step is one subcommand, also runnable by hand."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("mcibi")


def _cmd_download(a: argparse.Namespace) -> None:
    from mcibi.data.download import download
    from mcibi.files import write_json

    paths = download(a.dataset, a.dest or Path("downloads") / a.dataset)
    for path in paths:
        log.info("have %s (%d bytes)", path, path.stat().st_size)
    if a.record:
        write_json(a.record, {"dataset": a.dataset, "archives": {p.name: p.stat().st_size for p in paths}})


def _cmd_verify_archives(a: argparse.Namespace) -> None:
    from mcibi.data.download import verify_archives
    from mcibi.files import write_json

    record = verify_archives(a.dataset, a.dest or Path("downloads") / a.dataset)
    for name, r in record["archives"].items():
        log.info("%s: %s (sha256 %s, %d bytes)", name, "verified with " + r["checked_with"] if r["verified"]
                 else "UNVERIFIED, " + r["checked_with"], r["sha256"], r["size"])
    if a.report:
        write_json(a.report, record)


def _cmd_prepare(a: argparse.Namespace) -> None:
    import json

    from mcibi.data.prepare import prepare

    record = json.loads(a.archive_record.read_text()) if a.archive_record else None
    out = prepare(a.dataset, a.archives or Path("downloads") / a.dataset, a.out or Path("data") / a.dataset,
                  archive_record=record, workers=a.workers)
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
    from mcibi.tracking.runs import default_tracking_uri, ensure_experiment

    uri = default_tracking_uri()
    exp_id = ensure_experiment(a.dataset, uri)
    log.info("MLflow experiment for %s: id %s at %s", a.dataset, exp_id, uri)
    if a.out:
        write_text(a.out, f"{exp_id}\n")


def _cmd_train(a: argparse.Namespace) -> None:
    from mcibi.engine.train import train
    from mcibi.spec.params import load_params
    from mcibi.spec.runs import with_seed
    from mcibi.tracking.runs import default_tracking_uri

    params = with_seed(load_params(a.params), a.seed)
    out = a.out or Path("runs") / params.name
    uri = None if a.no_mlflow else default_tracking_uri()
    train(params, a.data_root, out, tracking_uri=uri, device=a.device, threads=a.threads,
          resume=not (a.restart or a.no_resume))


def _cmd_evaluate(a: argparse.Namespace) -> None:
    import json

    from mcibi.evaluation.protocols import evaluate, write_result
    from mcibi.spec.params import load_params
    from mcibi.spec.runs import with_seed
    from mcibi.tracking.runs import hardware

    params = with_seed(load_params(a.params), a.seed)
    run_dir = Path(a.checkpoint).parent
    out_json = a.out_json or run_dir / "eval" / f"{a.protocol}.json"
    out_csv = a.out_csv or run_dir / "eval" / f"{a.protocol}_per_class.csv"
    result = evaluate(params, a.checkpoint, a.protocol, a.data_root, device=a.device, threads=a.threads,
                      limit=a.limit, samples=a.samples, samples_out=a.samples_out)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank has the all-reduced result; rank 0 writes
        return
    run_file = run_dir / "run.json"
    parent = json.loads(run_file.read_text()).get("mlflow_run_id") if run_file.is_file() else None
    result["mlflow_run_id"] = parent or ""
    result["hardware"] = hardware()
    write_result(result, out_json, out_csv)
    if parent and not a.no_mlflow:  # the workflow passes --no-mlflow: its figures job logs every evaluation
        from mcibi.tracking.runs import default_tracking_uri, log_evaluation, run_tags

        # the digest of this record equals that of the file written from it: the figures job will not log it again
        log_evaluation(default_tracking_uri(), parent, a.protocol, result, out_csv, run_tags(params))


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
    uri = None if a.no_mlflow else default_tracking_uri()
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


def _cmd_convert(a: argparse.Namespace) -> None:
    import torch

    from mcibi.models import build_for_weights
    from mcibi.models.checkpoint import save_checkpoint
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
        seg = Segmenter.from_run(a.run, protocol=a.protocol, device=a.device)
    else:
        raise ValueError("say which model: --checkpoint model.pt (with --params), or --run <run folder | MLflow run "
                         "id | models:/<name>/<version>>.")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    written, errors = predict_inputs(seg, a.inputs, a.out, batch_size=a.batch, overlays=not a.no_overlay)
    log.info("wrote %d predictions (class-index PNGs%s) to %s", written, " + overlays" if not a.no_overlay else "",
             a.out)
    if errors:
        raise RuntimeError(f"{len(errors)} input(s) could not be read: " + "; ".join(errors))


def _cmd_register(a: argparse.Namespace) -> None:
    from mcibi.evaluation.serving import register

    name, version = register(a.run, a.name)
    log.info("registered %s as model '%s' version %s (models:/%s/%s)", a.run, name, version, name, version)


def _cmd_new_dataset(a: argparse.Namespace) -> None:
    from mcibi.catalogue.custom import new_dataset

    files = new_dataset(a.description, a.seed_row, params_root=a.params_root, crop=a.crop, epochs=a.epochs,
                        batch=a.batch, gpus=a.gpus)
    for f in files:
        log.info("wrote %s", f)
    name = files[1].parent.name
    log.info("next: snakemake --cores all results/%s   (or: dvc repro %s)", name, name)


def _cmd_prepare_custom(a: argparse.Namespace) -> None:
    from mcibi.data.custom import prepare_custom

    log.info("prepared %s", prepare_custom(a.description, a.out))


def _cmd_released(a: argparse.Namespace) -> None:
    """The authors' released files of a SOTA row: download (+ sha256 record), convert, or log to MLflow."""
    from mcibi.official import released

    if a.action == "download":
        dataset, experiment = a.target.split("/", 1)
        mirror = os.environ.get(released.MIRROR_ENV)
        url_map = None if not mirror else (lambda url: released.mirrored(url, mirror))
        released.download_release(released.release_of(dataset, experiment), a.release_dir, url_map)
        return
    from mcibi.spec.params import load_params

    params = load_params(a.target)
    checkpoint = released.released_file(a.release_dir, "checkpoint")
    if a.action == "convert":
        released.convert_release(checkpoint, params, a.out, released_from=str(checkpoint))
        log.info("converted %s -> %s", checkpoint, a.out)
    else:
        from mcibi.files import write_json
        from mcibi.tracking.runs import default_tracking_uri

        record = json.loads((a.release_dir / released.RECORD).read_text())
        run_id = released.log_release_run(default_tracking_uri(), params, released.released_file(a.release_dir, "log"),
                                          record)
        write_json(a.out, {"mlflow_run_id": run_id, "source": "official", **record})


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="mcibi", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("download", help="fetch a dataset's archives: official source first, then the mirror "
                       "(demo: generate them); CityScapes reads CITYSCAPES_USERNAME/CITYSCAPES_PASSWORD or ~/.netrc")
    s.add_argument("dataset")
    s.add_argument("--dest", type=Path, help="archive folder (default downloads/<dataset>); archives placed here "
                   "by hand are used")
    s.add_argument("--record", type=Path, help="write the list of archives and sizes here")
    s.set_defaults(func=_cmd_download)

    s = sub.add_parser("verify-archives", help="check downloaded archives against recorded checksums")
    s.add_argument("dataset")
    s.add_argument("--dest", type=Path)
    s.add_argument("--report", type=Path, help="write the checksum record here")
    s.set_defaults(func=_cmd_verify_archives)

    s = sub.add_parser("prepare", help="convert verified archives to the prepared on-disk format")
    s.add_argument("dataset")
    s.add_argument("--archives", type=Path, help="archive folder (default downloads/<dataset>)")
    s.add_argument("--out", type=Path, help="prepared folder (default data/<dataset>)")
    s.add_argument("--archive-record", type=Path, help="verify-archives report: skips re-hashing archives whose "
                   "sizes still match it")
    s.add_argument("--workers", type=int, help="parallel conversion threads (default min(8, CPUs))")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("verify-data", help="check a prepared dataset (counts, label values, sizes)")
    s.add_argument("dataset")
    s.add_argument("--data", type=Path)
    s.add_argument("--report", type=Path)
    s.set_defaults(func=_cmd_verify_data)

    s = sub.add_parser("dvc-commit", help="commit the prepared data to the DVC cache (linked, not copied) so that "
                       "`dvc status` is clean and `dvc push` works; nothing outside a DVC repository")
    s.add_argument("--repo", type=Path, default=Path("."))
    s.add_argument("--target", default="data.dvc")
    s.add_argument("--record", type=Path, help="write the committed md5 here")
    s.set_defaults(func=_cmd_dvc_commit)

    s = sub.add_parser("validate", help="strictly validate params files (or every experiment of params/<dataset>/)")
    s.add_argument("params", nargs="+", type=Path)
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser("mlflow-init", help="create the dataset's MLflow experiment (once, before parallel jobs)")
    s.add_argument("dataset")
    s.add_argument("--out", type=Path, help="write the experiment id here")
    s.set_defaults(func=_cmd_mlflow_init)

    for name, func, help_ in (("train", _cmd_train, "train one experiment (resumes from its last checkpoint; "
                               "multi-GPU: torchrun --nproc_per_node=N -m mcibi train ...)"),
                              ("evaluate", _cmd_evaluate, "evaluate a checkpoint under one protocol")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("params", type=Path)
        s.add_argument("--data-root", type=Path, default=Path("data"))
        s.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
        s.add_argument("--threads", type=int, help="torch intra-op threads")
        s.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
        s.add_argument("--seed", type=int, help="train/evaluate the run of this seed (run name <experiment>-seed<k> "
                       "unless it is the params' own seed)")
        s.set_defaults(func=func)
        if name == "train":
            s.add_argument("--out", type=Path, help="run folder (default runs/<dataset>/<experiment>)")
            s.add_argument("--restart", action="store_true",
                           help="start from scratch: move <out>/checkpoints/ to <out>/checkpoints.archived-<time>/ "
                           "first (needed when the params changed since its checkpoints were written)")
            s.add_argument("--no-resume", action="store_true", help="the same as --restart")
        else:
            s.add_argument("--checkpoint", type=Path, required=True)
            s.add_argument("--protocol", required=True, help="ss, flip or msflip")
            s.add_argument("--out-json", type=Path)
            s.add_argument("--out-csv", type=Path)
            s.add_argument("--limit", type=int, help="evaluate only the first N images (smoke tests)")
            s.add_argument("--samples-out", type=Path,
                           help="also write the first --samples (image, label, prediction) triples here (.npz), "
                           "for the figures' overlays")
            s.add_argument("--samples", type=int, default=4, help="how many (default 4)")

    s = sub.add_parser("export", help="write test-set predictions as PNGs for an evaluation server (CityScapes: "
                       "labelIds); under torchrun each rank writes its share")
    s.add_argument("params", type=Path)
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--protocol", default="msflip", help="ss, flip or msflip (default msflip)")
    s.add_argument("--split", default="test")
    s.add_argument("--out", type=Path, required=True, help="folder of <image id>.png files")
    s.add_argument("--data-root", type=Path, default=Path("data"))
    s.add_argument("--device")
    s.add_argument("--threads", type=int)
    s.add_argument("--limit", type=int, help="only the first N images")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("figures", help="per-run figures (per-class IoU table, confusion heatmap, IoU bars, prediction "
                       "overlays, memory trajectories) logged as MLflow artifacts, plus comparison tags")
    s.add_argument("params", type=Path)
    s.add_argument("--run-dir", type=Path, required=True, help="runs/<dataset>/<run> (model.pt, run.json, eval/)")
    s.add_argument("--out", type=Path, help="default <run-dir>/figures")
    s.add_argument("--data-root", type=Path, default=Path("data"))
    s.add_argument("--seed", type=int, help="the run's seed (see train --seed)")
    s.add_argument("--images", type=int, default=4, help="most evaluation images with prediction overlays (from "
                   "<run-dir>/eval/<first protocol>_samples.npz, written by evaluate --samples-out)")
    s.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    s.set_defaults(func=_cmd_figures)

    s = sub.add_parser("convert", help="convert an official MCIBI++ checkpoint for a params file")
    s.add_argument("official", type=Path, help="the official .pth (loaded with weights_only=True)")
    s.add_argument("params", type=Path, help="the params file describing the same model")
    s.add_argument("--out", type=Path, required=True, help="our checkpoint to write")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("released", help="the authors' released checkpoint and log of a SOTA row: download (sha256 "
                       "recorded, then verified), convert to ours, or log the training log to MLflow (source=official)")
    s.add_argument("action", choices=["download", "convert", "log"])
    s.add_argument("target", help="download: <dataset>/<experiment>; convert, log: the experiment's params file")
    s.add_argument("--release-dir", type=Path, required=True, help="folder of the downloaded files and release.json")
    s.add_argument("--out", type=Path, help="convert: the mcibi checkpoint; log: the run.json to write")
    s.set_defaults(func=_cmd_released)

    s = sub.add_parser("table", help="write results/<dataset>/table.md and table.csv")
    s.add_argument("dataset")
    s.add_argument("--params-root", type=Path, default=Path("params"))
    s.add_argument("--runs", type=Path, default=Path("runs"))
    s.add_argument("--out", type=Path)
    s.add_argument("--experiments", nargs="*", help="only these experiment names (file stems)")
    s.add_argument("--seeds", type=int, default=1, help="runs per experiment (mean ± sd over those evaluated)")
    s.add_argument("--mlflow-ui", help="base URL of the MLflow UI, e.g. http://127.0.0.1:5000 (links in the table)")
    s.add_argument("--experiment-id-file", type=Path, help="file holding the dataset's MLflow experiment id")
    s.set_defaults(func=_cmd_table)

    s = sub.add_parser("catalogue", help="the model-zoo rows' params files: write them, check the committed ones, or "
                                         "print each run's budget (iterations, images, GPU-hours, disk)")
    s.add_argument("action", choices=("write", "check", "budget"))
    s.add_argument("--params-root", type=Path, default=Path("params"))
    s.add_argument("--official", type=Path, help="official configs dump (default: the copy shipped in mcibi)")
    s.set_defaults(func=_cmd_catalogue)

    s = sub.add_parser("predict", help="segment images, folders, globs or videos with a trained model: class-index "
                       "PNGs and colour overlays with a legend")
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
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("new-dataset", help="check a custom dataset's description file and every image/mask, register "
                       "it as datasets/<name>.yaml and write params/<name>/ from a model-zoo row (MCIBI++ + baseline)")
    s.add_argument("description", type=Path, help="the dataset description (YAML; see README, Custom datasets)")
    s.add_argument("--from", dest="seed_row", required=True, help="model-zoo row: <dataset>/<experiment> (e.g. "
                   "lip/upernet_r50_mcibipp) or an MCIBI++ params file")
    s.add_argument("--params-root", type=Path, default=Path("params"))
    s.add_argument("--crop", type=int, help="square crop size (default: the seed's, capped by the median image)")
    s.add_argument("--epochs", type=int, help="default: the seed's, scaled up for smaller datasets")
    s.add_argument("--batch", type=int, help="total batch size (default: the seed's, capped by half the images)")
    s.add_argument("--gpus", type=int, help="GPUs per training job (default: the seed's)")
    s.set_defaults(func=_cmd_new_dataset)

    s = sub.add_parser("prepare-custom", help="validate and convert a custom dataset (the workflow's prepare step)")
    s.add_argument("description", type=Path)
    s.add_argument("--out", type=Path, required=True, help="prepared folder, data/<name>")
    s.set_defaults(func=_cmd_prepare_custom)

    s = sub.add_parser("register", help="register a run's logged MLflow model in the Model Registry")
    s.add_argument("run", help="run folder (runs/<dataset>/<experiment>), MLflow run id or runs:/ URI")
    s.add_argument("--name", required=True, help="registered model name")
    s.set_defaults(func=_cmd_register)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mcibi.cluster.slurm import attempt_header  # the workflow's logs are appended: one header per attempt

    if os.environ.get("RANK", "0") == "0":  # once per attempt, not once per torchrun process
        log.info("%s", attempt_header(" ".join((sys.argv[1:] if argv is None else argv)[:1])))
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc.args[0] if exc.args else exc)
        return 1
    except OSError as exc:  # a full disk, permissions, a read-only file system on a path not written atomically
        from mcibi.files import describe_write_error

        log.error("%s", describe_write_error(exc, exc.filename or ".") if exc.filename else exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
