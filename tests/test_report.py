"""Results tables: numbers land in the right cells, missing runs say so."""

import json
from pathlib import Path

from mcibi.params import load_params
from mcibi.report import build_table, to_markdown, write_tables

DEMO = Path(__file__).resolve().parents[1] / "params" / "demo"


def test_table_cells_and_missing_runs(tmp_path):
    exps = [load_params(DEMO / "upernet_baseline.yaml"), load_params(DEMO / "upernet_mcibipp.yaml")]
    runs = tmp_path / "runs"
    for proto, miou in (("ss", 0.5), ("msflip", 0.625)):
        f = runs / "upernet_mcibipp" / "eval" / f"{proto}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"mIoU": miou, "mlflow_run_id": "abc123"}))
    df = build_table(exps, runs)
    base, mem = df.iloc[0], df.iloc[1]
    assert base["Memory"] == "-" and mem["Memory"] == "MCIBI++"
    assert mem["mIoU"] == 50.0 and mem["mIoU (ms+flip)"] == 62.5 and mem["MLflow run"] == "abc123"
    md = to_markdown(df, "demo")
    mem_line = next(line for line in md.splitlines() if "MCIBI++" in line)
    assert "| 50.00% | not run | 62.50% | abc123 |" in mem_line
    base_line = next(line for line in md.splitlines() if "| UperNet | - |" in line)
    assert base_line.count("not run") == 3
    assert "| UperNet | MCIBI++ | resnet10t-D8 | 96x96 | LR/POLICY/BS/EPOCH: 0.01/poly/8/8 | train/val |" in mem_line
    md_path, csv_path = write_tables(df, tmp_path / "results", "demo")
    assert md_path.read_text() == md
    assert csv_path.read_text().splitlines()[2].startswith("upernet_mcibipp,UperNet,MCIBI++")
