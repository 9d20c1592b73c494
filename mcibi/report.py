"""Results tables in the seed model zoo's layout, built from the evaluation JSON files of our own runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mcibi.files import write_text
from mcibi.params import PROTOCOL_NAMES, PROTOCOL_TITLES, ExperimentParams

FRAMEWORK_NAMES = {"fcn": "FCN", "psnet": "PSNet", "upernet": "UperNet", "deeplabv3": "DeepLabV3"}
BACKBONE_NAMES = {
    "resnet50c": "R-50-D{os}",
    "resnet101c": "R-101-D{os}",
    "resnest101e": "S-101-D{os}",
    "hrnet_w48": "HRNetV2p-W48",
    "swin_large_patch4_window12_384": "Swin-Large",
}
MEMORY_NAMES = {"none": "-", "mcibi++": "MCIBI++", "mcibi": "MCIBI"}
NOT_RUN = "not run"


def backbone_title(name: str, output_stride: int) -> str:
    """The seed's backbone notation (R-50-D8, ...); other timm names as '<name>-D<os>'."""
    return BACKBONE_NAMES.get(name, f"{name}-D{{os}}").format(os=output_stride)


def schedule_title(params: ExperimentParams) -> str:
    """'LR/POLICY/BS/EPOCH: lr/poly/batch/epochs' as in the seed tables."""
    t = params.train
    return f"LR/POLICY/BS/EPOCH: {t.optimizer.lr:g}/poly/{t.total_batch_size}/{t.epochs}"


def build_table(experiments: list[ExperimentParams], runs_dir: str | Path) -> pd.DataFrame:
    """One row per experiment; mIoU per protocol read from ``<runs_dir>/<exp>/eval/<protocol>.json`` (NaN if absent)."""
    rows = []
    for p in experiments:
        stem = p.name.split("/")[-1]
        row = {
            "Experiment": stem,
            "Segmentor": FRAMEWORK_NAMES[p.model.framework],
            "Memory": MEMORY_NAMES[p.model.memory.kind],
            "Backbone": backbone_title(p.model.backbone.name, p.model.backbone.output_stride),
            "Crop Size": "x".join(map(str, p.data.crop_size)),
            "Schedule": schedule_title(p),
            "Train/Eval Set": f"{p.data.train_split}/{p.data.eval_split}",
        }
        run_id = ""
        for proto in PROTOCOL_NAMES:
            file = Path(runs_dir) / stem / "eval" / f"{proto}.json"
            value = float("nan")
            if proto in p.evaluate.protocols and file.is_file():
                result = json.loads(file.read_text())
                value = 100.0 * result["mIoU"]
                run_id = run_id or result.get("mlflow_run_id") or ""
            row[PROTOCOL_TITLES[proto]] = value
        row["MLflow run"] = run_id
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame, title: str) -> str:
    """Markdown table with centred columns like the seed page; missing results read 'not run'."""
    headers = [c for c in df.columns if c != "Experiment"]
    lines = [f"#### {title}", "", "| " + " | ".join(headers) + " |", "| " + " | ".join(":-:" for _ in headers) + " |"]
    for _, row in df.iterrows():
        cells = []
        for h in headers:
            v = row[h]
            if h in PROTOCOL_TITLES.values():
                cells.append(NOT_RUN if pd.isna(v) else f"{v:.2f}%")
            else:
                cells.append(str(v) if v != "" else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(df: pd.DataFrame, out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """Write ``table.md`` and ``table.csv`` atomically."""
    out = Path(out_dir)
    md, csv_path = out / "table.md", out / "table.csv"
    write_text(md, to_markdown(df, title))
    write_text(csv_path, df.to_csv(index=False, float_format="%.4f"))
    return md, csv_path
