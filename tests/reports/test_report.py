"""Results tables: numbers land in the right cells, missing runs say so, seeds average, baselines pair."""

import json
from pathlib import Path

import pandas as pd
from checkout import ROOT

from mcibi.reports.table import build_table, lr_title, to_markdown, write_tables
from mcibi.spec.params import experiment_files, load_params
from mcibi.spec.runs import seed_runs

PARAMS = ROOT / "params"
DEMO = PARAMS / "demo"


def _eval(runs: Path, run: str, proto: str, miou: float, run_id: str = "") -> None:
    f = runs / run / "eval" / f"{proto}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"mIoU": miou, "mlflow_run_id": run_id}))


def _line(md: str, *starts: str) -> str:
    return next(line for line in md.splitlines() if all(s in line for s in starts))


def test_demo_table_cells_and_missing_runs(tmp_path):
    exps = [load_params(DEMO / "upernet_baseline.yaml"), load_params(DEMO / "upernet_mcibipp.yaml")]
    runs = tmp_path / "runs"
    for proto, miou in (("ss", 0.5), ("msflip", 0.625)):
        _eval(runs, "upernet_mcibipp", proto, miou, "abc123")
    _eval(runs, "upernet_baseline", "ss", 0.45, "def456")
    df = build_table(exps, runs, mlflow_ui="http://127.0.0.1:5000", experiment_id="7")
    base, mem = df.set_index("Experiment").loc["upernet_baseline"], df.set_index("Experiment").loc["upernet_mcibipp"]
    assert base["Memory"] == "-" and mem["Memory"] == "MCIBI++"
    assert mem["mIoU"] == 50.0 and mem["mIoU (ms+flip)"] == 62.5 and mem["MLflow run"] == "abc123"
    assert mem["MLflow link"] == "http://127.0.0.1:5000/#/experiments/7/runs/abc123"
    assert mem["Baseline"] == "upernet_baseline" and base["Baseline"] == ""
    assert abs(mem["mIoU gain"] - 5.0) < 1e-9 and pd.isna(mem["mIoU (ms+flip) gain"])
    assert pd.isna(mem["mIoU published"])  # the demo has no published numbers

    md = to_markdown(df, "demo")
    mem_line = _line(md, "| UperNet | MCIBI++ |")
    # the README's demo columns come first, unchanged
    assert mem_line.startswith("| UperNet | MCIBI++ | resnet10t-D8 | 96x96 | LR/POLICY/BS/EPOCH: 0.01/poly/8/8 | "
                               "train/val | 50.00% | not run | 62.50% |")
    # published, delta, baseline (ss/flip/ms+flip), gain, run link
    assert mem_line.endswith("| - | - | 45.00%/-/- | +5.00/-/- | [abc123](http://127.0.0.1:5000/#/experiments/7/runs/"
                             "abc123) |")
    base_line = _line(md, "| UperNet | - |")
    assert base_line.count("not run") == 2 and "| 45.00% |" in base_line

    md_path, csv_path = write_tables(df, tmp_path / "results", "demo")
    assert md_path.read_text() == md
    back = pd.read_csv(csv_path)
    assert list(back["Experiment"]) == ["upernet_baseline", "upernet_mcibipp"]
    assert back.loc[1, "mIoU (ms+flip)"] == 62.5 and back.loc[1, "mIoU gain"] == 5.0


def test_catalogue_table_published_delta_sections_and_seeds(tmp_path):
    """LIP: framework rows (official numbers, the model-zoo page's cells are empty) and SOTA rows (its numbers);
    three seeds of one row give mean ± sd; a seed not evaluated yet counts as missing, not as zero."""
    exps = [load_params(f) for f in experiment_files(PARAMS, "lip")]
    runs = tmp_path / "runs"
    _eval(runs, "upernet_r50_mcibipp", "ss", 0.54, "r1")
    _eval(runs, "upernet_r50_mcibipp-seed1", "ss", 0.55, "r2")
    _eval(runs, "upernet_r50_baseline", "ss", 0.52)
    _eval(runs, "upernet_r50_baseline-seed1", "ss", 0.53)
    _eval(runs, "upernet_r101_mcibipp", "flip", 0.5626)  # only one protocol of three
    assert seed_runs("upernet_r50_mcibipp", 0, 3) == [("upernet_r50_mcibipp", 0), ("upernet_r50_mcibipp-seed1", 1),
                                                      ("upernet_r50_mcibipp-seed2", 2)]
    df = build_table(exps, runs, seeds=3)
    assert list(df["Section"].unique()) == ["Results of Different Frameworks", "SOTA Results"]
    assert list(df["Experiment"]) == [  # the model-zoo page's order, each row followed by its baseline
        "fcn_r50_mcibipp", "fcn_r50_baseline", "psnet_r50_mcibipp", "psnet_r50_baseline", "upernet_r50_mcibipp",
        "upernet_r50_baseline", "deeplabv3_r50_mcibipp", "deeplabv3_r50_baseline", "upernet_r101_mcibipp",
        "upernet_s101_mcibipp", "upernet_swinl_mcibipp", "deeplabv3_hr48_mcibipp"]
    t = df.set_index("Experiment")
    up = t.loc["upernet_r50_mcibipp"]
    assert abs(up["mIoU"] - 54.5) < 1e-9 and abs(up["mIoU sd"] - 0.7071067811865476) < 1e-9 and up["mIoU n"] == 2
    assert up["mIoU published"] == 53.92 and up["mIoU published source"] == "official"
    assert abs(up["mIoU delta"] - 0.58) < 1e-9 and abs(up["mIoU gain"] - 2.0) < 1e-9
    r101 = t.loc["upernet_r101_mcibipp"]
    assert r101["mIoU (flip) published"] == 56.26 and r101["mIoU (flip) published source"] == "model_zoo"
    assert abs(r101["mIoU (flip) delta"] - 0.0) < 1e-9 and r101["mIoU n"] == 0
    assert pd.isna(t.loc["upernet_r50_baseline", "mIoU published"])  # baselines have no published row

    md = to_markdown(df, "lip")
    assert md.index("#### Results of Different Frameworks") < md.index("#### SOTA Results")
    line = _line(md, "| UperNet | MCIBI++ | R-50-D8 |")
    assert "| 54.50 ± 0.71% (n=2/3) | 53.92%† | +0.58 | 52.50% | +2.00 |" in line
    assert _line(md, "| FCN | MCIBI++ |").count(NOT := "not run") == 1 and NOT
    sota = _line(md, "| UperNet | MCIBI++ | R-101-D8 |")
    assert "| not run | 56.26 (n=1/3)%" not in sota
    # the released weights not evaluated yet: the official-weights column says so
    assert "| not run | 56.26% (n=1/3) | not run | 55.87%/56.26%/56.32% | not run | -/+0.00/- | - | - |" in sota
    assert "† the model-zoo page leaves this cell empty" in md
    hr = _line(md, "| DeepLabV3 | MCIBI++ | HRNetV2p-W48 | 512x512 | LR/POLICY/BS/EPOCH: 0.007/poly/40/150 |")
    assert hr.count("not run") == 4  # three protocols and the released weights


def test_cityscapes_test_rows_point_at_the_server(tmp_path):
    exps = [load_params(PARAMS / "cityscapes" / f"{s}.yaml") for s in ("deeplabv3_r101_mcibipp",
                                                                       "deeplabv3_s101_mcibipp")]
    runs = tmp_path / "runs"
    (runs / "deeplabv3_s101_mcibipp" / "test_msflip").mkdir(parents=True)
    md = to_markdown(build_table(exps, runs), "cityscapes")
    assert "| not run (test server) | 82.20%† |" in _line(md, "R-101-D8")
    assert "| exported, submit to the server | 81.70% |" in _line(md, "S-101-D8")


def test_swin_schedule_reads_like_the_model_zoo_page():
    assert lr_title(6e-05) == "0.00006" and lr_title(0.01) == "0.01" and lr_title(0.007) == "0.007"


def test_table_and_validate_commands(tmp_path, capsys):
    from mcibi.cli import main

    runs = tmp_path / "runs" / "pascalvoc"
    _eval(runs, "upernet_r50_mcibipp", "ss", 0.8, "run9")
    (tmp_path / "exp.id").write_text("3\n")
    out = tmp_path / "results"
    assert main(["table", "pascalvoc", "--runs", str(tmp_path / "runs"), "--out", str(out), "--mlflow-ui",
                 "http://ui:5000/", "--experiment-id-file", str(tmp_path / "exp.id")]) == 0
    line = _line((out / "table.md").read_text(), "R-50-D8")
    assert ("| trainaug/val | 80.00% | 79.48% | not run | +0.52 | - | - | "
            "[run9](http://ui:5000/#/experiments/3/runs/run9) |" in line)
    assert "not run" in _line((out / "table.md").read_text(), "R-101-D8")
    assert main(["validate", str(PARAMS / "lip")]) == 0
    bad = tmp_path / "params" / "lip"
    bad.mkdir(parents=True)
    (bad / "x.yaml").write_text("description: x\n")
    assert main(["validate", str(bad)]) == 1
    assert main(["validate", str(tmp_path / "params" / "none")]) == 1
