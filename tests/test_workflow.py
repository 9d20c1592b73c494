"""The Snakemake chain on the demo dataset: lint, dry run, and a reduced real run through every rule."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", ".snakemake", "runs", "results", "data", "downloads", "logs", "mlflow.db", "mlruns",
        ".pytest_cache", ".ruff_cache", "__pycache__", ".dvc"}


def _copy_repo(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    return dest


def _snakemake(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=1200)


def test_lint_is_clean(tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    proc = _snakemake(repo, "--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_plans_the_whole_chain(tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    proc = _snakemake(repo, "-n", "--cores", "1", "results/demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for rule in ("download", "verify_archives", "prepare", "verify_data", "mlflow_experiment", "train", "evaluate",
                 "report"):
        assert rule in out, f"rule {rule} missing from the dry run"


def test_invalid_params_fail_at_dag_build(tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    bad = repo / "params" / "demo" / "broken.yaml"
    bad.write_text("description: x\nmodel: {framework: upernet, memroy: {kind: none}}\n")
    proc = _snakemake(repo, "-n", "--cores", "1", "results/demo")
    assert proc.returncode != 0
    assert "broken.yaml: unknown key 'model.memroy'" in proc.stdout + proc.stderr


@pytest.mark.workflow
def test_reduced_demo_chain_runs_end_to_end(tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    defaults = repo / "params" / "demo" / "defaults.yaml"
    data = yaml.safe_load(defaults.read_text())
    data["train"]["epochs"] = 1  # 30 iterations instead of the demo's full schedule
    defaults.write_text(yaml.safe_dump(data))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = _snakemake(repo, "--cores", "2", "results/demo", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    table = (repo / "results" / "demo" / "table.md").read_text()
    assert "| UperNet | MCIBI++ |" in table and "| UperNet | - |" in table
    assert "not run" not in table
    csv = (repo / "results" / "demo" / "table.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("Experiment,Segmentor")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("mcibi-demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 6
    assert {r.data.tags["memory"] for r in parents} == {"none", "mcibi++"}
    assert {r.data.tags["protocol"] for r in children} == {"ss", "flip", "msflip"}
    for r in parents:
        assert {"mIoU.ss", "mIoU.flip", "mIoU.msflip", "loss_total"} <= set(r.data.metrics)
        assert r.data.params["model.framework"] == "upernet"
        assert len(client.get_metric_history(r.info.run_id, "loss_total")) >= 2

    again = _snakemake(repo, "-n", "--cores", "2", "results/demo", env=env)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
