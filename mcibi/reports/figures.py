"""Per-run figures and comparison tags: what the MLflow UI shows beside the numbers of one experiment run.

For a trained and evaluated run folder ``runs/<dataset>/<run>/`` :func:`make_figures` writes, under
``figures/``: the per-class IoU table of every protocol (CSV + markdown), the confusion-matrix heatmap and the
per-class IoU bar chart of each protocol, prediction overlays on a few evaluation images, and for memory runs
the per-class μ/σ trajectories over training (read back from the run's MLflow metric history). It then logs
them as artifacts of the run and sets the tags that make runs comparable across a dataset (params hash, data
version, section of the model-zoo page, paired baseline). Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mcibi.data.palette import palette  # noqa: E402
from mcibi.files import write_json, write_text  # noqa: E402
from mcibi.spec.params import PROTOCOL_TITLES, ExperimentParams, flatten, to_dict  # noqa: E402

log = logging.getLogger(__name__)

MANY_CLASSES = 40  # above this, heatmaps drop tick labels and legends are left out


def params_hash(params: ExperimentParams) -> str:
    """Short sha256 of the merged, validated params (name and path excluded): equal hashes = same experiment.
    The same value the training run was tagged with (:func:`mcibi.tracking.params_hash`)."""
    from mcibi.tracking.runs import params_hash as flat_hash

    return flat_hash(flatten(to_dict(params)))


def data_version(data_root: str | Path, dataset: str) -> str:
    """The prepared data's version: the md5 ``data.dvc`` records for ``data/`` when present (DVC's own hash),
    plus a short sha256 of the dataset's ``manifest.json``; 'unknown' parts when absent."""
    root = Path(data_root)
    dvc = root.parent / f"{root.name}.dvc"
    dvc_md5 = "unknown"
    if dvc.is_file():
        for line in dvc.read_text().splitlines():
            if line.strip().startswith("- md5:") or line.strip().startswith("md5:"):
                dvc_md5 = line.split(":", 1)[1].strip()
                break
    manifest = root / dataset / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.is_file() else "unknown"
    return f"dvc:{dvc_md5} manifest:{digest}"


# ------------------------------------------------------------------------------------------------------ plots
def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def confusion_heatmap(confusion: np.ndarray, classes: list[str], path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) as a heatmap."""
    conf = np.asarray(confusion, dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    k = len(classes)
    size = min(4 + 0.25 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the ground-truth class")
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if k <= MANY_CLASSES:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
    return _save(fig, Path(path))


def iou_bar_chart(iou: dict[str, float], path: str | Path, title: str) -> Path:
    """Per-class IoU (percent) as horizontal bars, worst class at the bottom; NaN (absent) classes left out."""
    items = sorted(((c, v) for c, v in iou.items() if v is not None and not math.isnan(v)), key=lambda x: x[1])
    height = max(3.0, 0.18 * len(items) + 1)
    fig, ax = plt.subplots(figsize=(7, height))
    ax.barh(range(len(items)), [100 * v for _, v in items], color="tab:blue")
    ax.set_yticks(range(len(items)), [c[:30] for c, _ in items], fontsize=6 if len(items) > MANY_CLASSES else 8)
    ax.set_xlabel("IoU (%)")
    ax.set_xlim(0, 100)
    ax.set_title(title)
    return _save(fig, Path(path))


def memory_trajectories(history: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path,
                        title: str) -> Path:
    """μ_k and σ_k of every class over the training iterations (``history[stat][class] = [(step, value)]``)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, stat in zip(axes, ("mu", "sigma"), strict=True):
        series = history.get(stat, {})
        for name, points in series.items():
            steps, values = zip(*sorted(points), strict=True) if points else ((), ())
            ax.plot(steps, values, linewidth=0.8, label=f" {name}" if name.startswith("_") else name)  # '_x' hides
        ax.set_xlabel("iteration")
        ax.set_ylabel("μ" if stat == "mu" else "σ")
        ax.set_title(f"{'μ' if stat == 'mu' else 'σ'} per class")
        if 0 < len(series) <= 24 and stat == "sigma":  # one legend for both panels, outside the axes
            ax.legend(fontsize=6, ncol=1, bbox_to_anchor=(1.01, 1.0), loc="upper left")
    fig.suptitle(title)
    return _save(fig, Path(path))


def prediction_overlays(images: list[np.ndarray], labels: list[np.ndarray], preds: list[np.ndarray],
                        num_classes: int, path: str | Path, title: str, alpha: float = 0.55) -> Path:
    """Rows of (image, ground truth over the image, prediction over the image); ignored pixels stay uncoloured."""
    colours = palette(num_classes + 1)

    def over(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        valid = mask < num_classes
        out = image.astype(np.float32).copy()
        out[valid] = (1 - alpha) * out[valid] + alpha * colours[mask[valid]]
        return out.clip(0, 255).astype(np.uint8)

    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(10, 3.2 * n), squeeze=False)
    for i, (img, lab, pred) in enumerate(zip(images, labels, preds, strict=True)):
        for j, (pic, name) in enumerate(((img, "image"), (over(img, lab), "ground truth"),
                                         (over(img, pred), "prediction"))):
            axes[i, j].imshow(pic)
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(name)
    fig.suptitle(title)
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------------------------- per run
def per_class_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Class x protocol IoU (percent) from evaluation records keyed by protocol name."""
    first = next(iter(results.values()))
    df = pd.DataFrame({"class": list(first["IoU"])})
    for proto, res in results.items():
        df[f"IoU {PROTOCOL_TITLES.get(proto, proto)}"] = [100 * v if v is not None else np.nan
                                                          for v in res["IoU"].values()]
    return df


def _markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    return head + "".join("| " + " | ".join(v if isinstance(v, str) else ("-" if pd.isna(v) else f"{v:.2f}")
                                            for v in row) + " |\n" for row in df.itertuples(index=False))


def make_figures(params: ExperimentParams, run_dir: str | Path, data_root: str | Path, out_dir: str | Path,
                 tracking_uri: str | None = None, num_images: int = 4, section: str = "",
                 baseline: str = "") -> list[Path]:
    """Write the run's figures and tables to ``out_dir``; with a tracking URI and an MLflow run id in
    ``run.json``, log its evaluation files (:func:`mcibi.tracking.log_evaluation`: the workflow's evaluate jobs
    stay clear of MLflow, whose import and store cost seconds per job) and the figures to that run and set its
    comparison tags. Returns the files written.

    Everything comes from files: the evaluations' JSON and the samples the first protocol's evaluation kept
    (``eval/<protocol>_samples.npz``), so this job never loads torch or the model (seconds per job)."""
    from mcibi.data.lookup import get_spec

    run_dir, out = Path(run_dir), Path(out_dir)
    spec = get_spec(params.data.name)
    results = {}
    for proto in params.evaluate.protocols:
        file = run_dir / "eval" / f"{proto}.json"
        if file.is_file():
            res = json.loads(file.read_text())
            for key in ("IoU", "Acc"):  # the file's keys are sorted by name: back to class-id order
                res[key] = {c: res[key][c] for c in spec.classes if c in res[key]}
            results[proto] = res
    files: list[Path] = []
    if results:
        table = per_class_table(results)
        write_text(out / "per_class_iou.csv", table.to_csv(index=False, float_format="%.2f"))
        write_text(out / "per_class_iou.md", _markdown(table))
        files += [out / "per_class_iou.csv", out / "per_class_iou.md"]
        for proto, res in results.items():
            title = f"{params.name} — {PROTOCOL_TITLES.get(proto, proto)}"
            files.append(confusion_heatmap(np.array(res["confusion"]), list(spec.classes),
                                           out / f"confusion_{proto}.png", title))
            files.append(iou_bar_chart(res["IoU"], out / f"iou_{proto}.png", title))

    first = next(iter(params.evaluate.protocols))
    samples = run_dir / "eval" / f"{first}_samples.npz"
    if num_images > 0 and samples.is_file():
        from mcibi.evaluation.samples import read_samples

        _, images, labels, preds = read_samples(samples)
        if images:
            files.append(prediction_overlays(images[:num_images], labels[:num_images], preds[:num_images],
                                             spec.num_classes, out / "predictions.png",
                                             f"{params.name} — {PROTOCOL_TITLES.get(first, first)}"))
    elif num_images > 0:
        log.info("%s: no %s, so no prediction overlays (mcibi evaluate --samples-out writes it)", params.name,
                 samples)

    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    run_id = run_info.get("mlflow_run_id")
    tags = {"params_hash": params_hash(params), "data_version": data_version(data_root, params.data.name),
            "protocols": " ".join(params.evaluate.protocols), "table_section": section or "-",
            "paired_baseline": baseline or "-", "run_folder": str(run_dir)}
    if tracking_uri and run_id and params.model.memory.kind != "none":
        from mcibi.tracking.runs import memory_history

        history = memory_history(tracking_uri, run_id, list(spec.classes))
        if any(history.values()):
            files.append(memory_trajectories(history, out / "memory_trajectories.png",
                                             f"{params.name} — memory per class over training"))
    write_json(out / "tags.json", tags)
    files.append(out / "tags.json")
    if tracking_uri and run_id:
        from mcibi.tracking.runs import RunLogger, log_evaluation, run_tags

        common = run_tags(params, machine="not recorded")  # each evaluation's own `hardware` record wins
        for proto, res in results.items():  # idempotent: evaluations logged before are left as they are
            log_evaluation(tracking_uri, run_id, proto, res, run_dir / "eval" / f"{proto}_per_class.csv", common)
        run = RunLogger(tracking_uri, run_id)
        run.tags(tags)
        for child in run.children():  # the evaluation runs carry the same comparison tags
            RunLogger(tracking_uri, child).tags(tags)
        for f in files:
            run.artifact(f, "figures")
    log.info("%s: %d figure/table files in %s%s", params.name, len(files), out,
             f", logged to MLflow run {run_id}" if tracking_uri and run_id else "")
    return files
