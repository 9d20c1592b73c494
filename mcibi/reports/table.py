"""Results tables in the model-zoo page's layout, built from the evaluation JSON files of our own runs.

One row per experiment: our mIoU per protocol (mean ± sd over the seeds run), the published mIoU of its model-zoo row
(``mcibi/published.csv``), the difference, the paired baseline's mIoU (``<x>_baseline`` beside ``<x>_mcibipp``)
and the gain MCIBI++ brings over it, and links to the MLflow runs. Nothing is filled in that was not measured:
a run without its evaluation file reads "not run".
"""

from __future__ import annotations

import json
import math
import statistics
from decimal import Decimal
from pathlib import Path

import pandas as pd

from mcibi.catalogue.published import published_miou
from mcibi.catalogue.rows import ROWS, SECTIONS, backbone_title, baseline_of, catalogue_entry
from mcibi.files import write_text
from mcibi.spec.params import PROTOCOL_NAMES, PROTOCOL_TITLES, ExperimentParams
from mcibi.spec.runs import seed_runs

FRAMEWORK_NAMES = {"fcn": "FCN", "psnet": "PSNet", "upernet": "UperNet", "deeplabv3": "DeepLabV3"}
MEMORY_NAMES = {"none": "-", "mcibi++": "MCIBI++", "mcibi": "MCIBI"}
NOT_RUN = "not run"
SERVER = "test server"  # the eval split's labels are private: the number comes from the benchmark's server
OTHER_SECTION = "Other experiments"
OFFICIAL_DIR = "official"  # runs/<dataset>/official/<experiment>/: the released weights, converted and evaluated
OFFICIAL_COLUMN = "official weights"  # table.csv: '<protocol title> official weights'
OFFICIAL_TITLE = "Official weights (our evaluation)"


def lr_title(lr: float) -> str:
    """A learning rate as the model-zoo page writes it: positional decimals (0.00006, not 6e-05)."""
    return format(Decimal(repr(lr)).normalize(), "f")


def schedule_title(params: ExperimentParams) -> str:
    """'LR/POLICY/BS/EPOCH: lr/poly/batch/epochs' as on the model-zoo page."""
    t = params.train
    return f"LR/POLICY/BS/EPOCH: {lr_title(t.optimizer.lr)}/poly/{t.total_batch_size}/{t.epochs}"


def _read(file: Path) -> dict | None:
    return json.loads(file.read_text()) if file.is_file() else None


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


LOCAL_UI = "http://127.0.0.1:5000"  # `mlflow ui` over a local SQLite store (docs/tracking.md)


def ui_base(mlflow_ui: str | None, tracking_uri: str | None) -> str | None:
    """The MLflow UI a run's link opens: ``mlflow_ui`` when it names one; with ``auto``, the tracking server the
    run was logged to (an http(s) tracking URI serves the UI too), else :data:`LOCAL_UI` for a local store."""
    if not mlflow_ui or mlflow_ui != "auto":
        return mlflow_ui or None
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    return LOCAL_UI


def build_table(experiments: list[ExperimentParams], runs_dir: str | Path, seeds: int = 1,
                mlflow_ui: str | None = None, experiment_id: str | None = None) -> pd.DataFrame:
    """One row per experiment with, per protocol, our mean/sd/count over the seed runs that have an evaluation
    file ``<runs_dir>/<run>/eval/<protocol>.json``, the published value, delta, paired baseline and gain.

    ``mlflow_ui``: base URL of the runs' links, or ``auto`` for the tracking server each run's ``run.json``
    names (:func:`ui_base`)."""
    from mcibi.data.lookup import get_spec

    runs_dir = Path(runs_dir)
    by_stem = {p.name.split("/")[-1]: p for p in experiments}
    ours: dict[str, dict[str, list[float]]] = {}
    run_ids: dict[str, list[str]] = {}
    run_uis: dict[str, str | None] = {}  # run id -> UI base of its link
    for stem, p in by_stem.items():
        ours[stem] = {proto: [] for proto in PROTOCOL_NAMES}
        run_ids[stem] = []
        for run, _seed in seed_runs(stem, p.train.seed, seeds):
            run_id = ""
            for proto in p.evaluate.protocols:
                result = _read(runs_dir / run / "eval" / f"{proto}.json")
                if result is not None:
                    ours[stem][proto].append(100.0 * result["mIoU"])
                    run_id = run_id or result.get("mlflow_run_id") or ""
            record = _read(runs_dir / run / "run.json") or {}
            run_id = run_id or record.get("mlflow_run_id") or ""
            if run_id:
                run_ids[stem].append(run_id)
                run_uis[run_id] = ui_base(mlflow_ui, record.get("tracking_uri"))

    rows = []
    for stem, p in by_stem.items():
        entry = catalogue_entry(p.data.name, stem)
        base = baseline_of(stem)
        base = base if base in by_stem else None
        server = p.data.eval_split in get_spec(p.data.name).unlabelled_splits
        row = {
            "Experiment": stem,
            "Section": SECTIONS[entry[0].section] if entry else OTHER_SECTION,
            "Segmentor": FRAMEWORK_NAMES[p.model.framework],
            "Memory": MEMORY_NAMES[p.model.memory.kind],
            "Backbone": backbone_title(p.model.backbone.name, p.model.backbone.output_stride),
            "Crop Size": "x".join(map(str, p.data.crop_size)),
            "Schedule": schedule_title(p),
            "Train/Eval Set": f"{p.data.train_split}/{p.data.eval_split}",
            "Protocols": " ".join(p.evaluate.protocols),
            "Seeds": seeds,
            "Baseline": base or "",
        }
        for proto in PROTOCOL_NAMES:
            title = PROTOCOL_TITLES[proto]
            mean, sd = _stats(ours[stem][proto])
            pub, source = math.nan, ""
            if entry and not entry[1] and proto in p.evaluate.protocols:
                for src in ("model_zoo", "official"):
                    value = published_miou(p.data.name, stem, proto, src)
                    if value is not None:
                        pub, source = value, src
                        break
            b_mean = _stats(ours[base][proto])[0] if base else math.nan
            row |= {title: mean, f"{title} sd": sd, f"{title} n": len(ours[stem][proto]),
                    f"{title} published": pub, f"{title} published source": source,
                    f"{title} delta": mean - pub, f"{title} baseline": b_mean, f"{title} gain": mean - b_mean}
        # the authors' released weights evaluated by us (runs/<dataset>/official/<stem>, mcibi.official.released)
        row["Released"] = _released(p.data.name, stem)
        for proto in PROTOCOL_NAMES:
            result = _read(runs_dir / OFFICIAL_DIR / stem / "eval" / f"{proto}.json")
            row[f"{PROTOCOL_TITLES[proto]} {OFFICIAL_COLUMN}"] = 100.0 * result["mIoU"] if result else math.nan
        row["Official exported"] = server and any((runs_dir / OFFICIAL_DIR / stem / f"test_{proto}").is_dir()
                                                  for proto in p.evaluate.protocols)
        exported = server and any((runs_dir / run / f"test_{proto}").is_dir()
                                  for run, _ in seed_runs(stem, p.train.seed, seeds) for proto in p.evaluate.protocols)
        row["Status"] = (f"{SERVER}: predictions exported" if exported else SERVER) if server else ""
        row["MLflow run"] = " ".join(run_ids[stem])
        row["MLflow link"] = " ".join(f"{run_uis[r].rstrip('/')}/#/experiments/{experiment_id}/runs/{r}"
                                      for r in run_ids[stem] if run_uis[r]) if experiment_id else ""
        rows.append(row)
    # the model-zoo page's order: its sections, its rows, each memory row followed by its paired baseline; experiments
    # outside the catalogue (the demo, ablations) keep their file order after them
    sections = [*SECTIONS.values(), OTHER_SECTION]

    def position(row: dict) -> tuple[int, int, int]:
        entry = catalogue_entry(by_stem[row["Experiment"]].data.name, row["Experiment"])
        if entry is None:
            return (sections.index(OTHER_SECTION), len(ROWS), 0)
        return (sections.index(row["Section"]), ROWS.index(entry[0]), int(entry[1]))

    return pd.DataFrame(sorted(rows, key=position))


def _released(dataset: str, stem: str) -> bool:
    from mcibi.official.released import releases

    return stem in releases(dataset)


def _official_cell(row: pd.Series, protos: list[str]) -> str:
    """Our mIoU of the authors' released weights, joined with '/' like Published."""
    if not row["Released"]:
        return "-"
    mine = row["Protocols"].split()
    values = [row[f"{PROTOCOL_TITLES[p]} {OFFICIAL_COLUMN}"] for p in protos if p in mine]
    if all(pd.isna(v) for v in values):
        return "exported, submit to the server" if row["Official exported"] else NOT_RUN
    return "/".join(_pct(v) for v in values)


def _pct(v: float) -> str:
    return "-" if pd.isna(v) else f"{v:.2f}%"


def _signed(v: float) -> str:
    return "-" if pd.isna(v) else f"{v:+.2f}"


def _ours(row: pd.Series, proto: str, in_params: bool) -> str:
    title = PROTOCOL_TITLES[proto]
    if not in_params:
        return "-"
    n, seeds = int(row[f"{title} n"]), int(row["Seeds"])
    if n == 0:
        if row["Status"].startswith(SERVER):
            return "exported, submit to the server" if "exported" in row["Status"] else f"{NOT_RUN} ({SERVER})"
        return NOT_RUN
    if seeds == 1:
        return f"{row[title]:.2f}%"
    spread = f" ± {row[f'{title} sd']:.2f}" if n > 1 else ""
    return f"{row[title]:.2f}{spread}% (n={n}/{seeds})"


def to_markdown(df: pd.DataFrame, title: str) -> str:
    """Markdown tables, one per section, with centred columns like the model-zoo page. Our mIoU has a column per
    protocol the section reports; published / delta / baseline / gain are joined with '/' over those protocols
    as the model-zoo page writes 'mIoU/mIoU (ms+flip)'. Missing results read 'not run'."""
    lines = [f"### {title}", ""]
    if df.empty:
        return "\n".join([*lines, "No experiments selected.", ""])
    official_used = False
    for section, part in df.groupby("Section", sort=False):
        protos = [p for p in PROTOCOL_NAMES if any(p in s.split() for s in part["Protocols"])]
        joined = "/".join(PROTOCOL_TITLES[p] for p in protos)
        headers = ["Segmentor", "Memory", "Backbone", "Crop Size", "Schedule", "Train/Eval Set",
                   *(PROTOCOL_TITLES[p] for p in protos), f"Published {joined}",
                   *([OFFICIAL_TITLE] if part["Released"].any() else []), "Δ", "Baseline", "Gain", "MLflow run"]
        lines += [f"#### {section}", "", "| " + " | ".join(headers) + " |",
                  "| " + " | ".join(":-:" for _ in headers) + " |"]
        for _, row in part.iterrows():
            mine = row["Protocols"].split()
            cells = [str(row[h]) for h in headers[:6]]
            cells += [_ours(row, p, p in mine) for p in protos]
            pubs = []
            for p in protos:
                t = PROTOCOL_TITLES[p]
                mark = "†" if row[f"{t} published source"] == "official" else ""
                official_used |= bool(mark)
                pubs.append(_pct(row[f"{t} published"]) + mark)
            has_pub = any(not pd.isna(row[f"{PROTOCOL_TITLES[p]} published"]) for p in protos)
            cells.append("/".join(pubs) if has_pub else "-")
            if OFFICIAL_TITLE in headers:
                cells.append(_official_cell(row, protos))
            cells.append("/".join(_signed(row[f"{PROTOCOL_TITLES[p]} delta"]) for p in protos) if has_pub else "-")
            if row["Baseline"]:
                cells.append("/".join(_pct(row[f"{PROTOCOL_TITLES[p]} baseline"]) for p in protos))
                cells.append("/".join(_signed(row[f"{PROTOCOL_TITLES[p]} gain"]) for p in protos))
            else:
                cells += ["-", "-"]
            links = row["MLflow link"].split() if row["MLflow link"] else []
            ids = row["MLflow run"].split() if row["MLflow run"] else []
            cells.append(", ".join(f"[{i[:8]}]({u})" for i, u in zip(ids, links, strict=True)) if links
                         else (", ".join(ids) or "-"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if official_used:
        lines += ["† the model-zoo page leaves this cell empty; the value is the official model-zoo page's "
                  "(mcibi/published.csv, source=official).", ""]
    if "Released" in df and df["Released"].any():
        lines += [f"{OFFICIAL_TITLE}: the authors' released checkpoint, converted and evaluated here under the row's "
                  "protocols (`snakemake --cores all results/<dataset>/official`).", ""]
    lines.append("Δ = ours − published; Gain = ours − the paired baseline without memory (same params otherwise); "
                 "in percentage points.")
    return "\n".join(lines) + "\n"


def write_tables(df: pd.DataFrame, out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """Write ``table.md`` and ``table.csv`` atomically."""
    out = Path(out_dir)
    md, csv_path = out / "table.md", out / "table.csv"
    write_text(md, to_markdown(df, title))
    write_text(csv_path, df.to_csv(index=False, float_format="%.4f"))
    return md, csv_path
