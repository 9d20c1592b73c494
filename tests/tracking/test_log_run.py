"""Training without tracking, logging later: `mcibi train --no-tracking`, then `mcibi log-run <run folder>` gives
the MLflow run training would have logged (params, tags, loss curve, model, input dataset) plus the evaluations,
records it in run.json, and a second `log-run` logs nothing twice."""

from __future__ import annotations

import csv
import json
import logging

from mlflow import MlflowClient
from tiny_training import tiny_dataset, tiny_params

from mcibi.cli import main


def test_train_without_tracking_then_log_the_run(tmp_path, monkeypatch, caplog):
    root = tiny_dataset(tmp_path, train_images=8, val_images=2)
    params = tiny_params(tmp_path / "params", epochs=1)
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in the temporary folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    common = ["--data-root", str(root), "--device", "cpu", "--threads", "1", "--no-tracking"]
    with caplog.at_level(logging.INFO):
        assert main(["train", str(params), "--out", str(run_dir), *common]) == 0, caplog.text[-3000:]
        assert main(["evaluate", str(params), "--checkpoint", str(run_dir / "model.pt"), "--protocol", "ss",
                     "--limit", "2", *common]) == 0, caplog.text[-3000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing was tracked
    assert json.loads((run_dir / "run.json").read_text())["mlflow_run_id"] is None

    with caplog.at_level(logging.INFO):
        assert main(["log-run", str(run_dir), "--data-root", str(root)]) == 0, caplog.text[-3000:]
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "demo/tiny" and run.info.status == "FINISHED"
    assert run.data.tags["memory"] == "mcibi++" and run.data.tags["logged_later"] == "mcibi log-run"
    assert run.data.tags["batch.effective"] == "4" and run.data.params["iterations"] == "2"
    with (run_dir / "loss.csv").open() as fh:
        curve = list(csv.DictReader(fh))
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss_total"))
    assert logged == [(int(r["iteration"]), float(r["loss_total"])) for r in curve]
    assert "train_seconds" in run.data.metrics and any(k.startswith("memory.mu.") for k in run.data.metrics)
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"demo/train", "demo/val"}
    assert [m.model_id for m in run.outputs.model_outputs]  # the MLflow model
    result = json.loads((run_dir / "eval" / "ss.json").read_text())
    assert run.data.metrics["mIoU.ss"] == result["mIoU"]

    with caplog.at_level(logging.INFO):
        assert main(["log-run", str(run_dir), "--data-root", str(root)]) == 0  # again: nothing new
    runs = client.search_runs([run.info.experiment_id])
    assert sorted(r.data.tags.get("protocol", "-") for r in runs) == ["-", "ss"]  # the run and its evaluation
    assert "already" in caplog.text
