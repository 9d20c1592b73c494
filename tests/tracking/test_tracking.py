"""MLflow reruns leave no duplicates: a resumed run skips logged (metric, step) rows, a re-evaluated protocol
replaces its child run, an evaluation logged twice (by hand, then by the figures job) is kept."""

import torch
from mlflow import MlflowClient

from mcibi.tracking.runs import RunLogger, hardware, log_evaluation


def _rows(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_resumed_run_and_rerun_protocol_log_no_duplicates(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = RunLogger.start(uri, "demo", "demo/x", {"memory": "none"}, {"train.seed": 0})
    for step in (1, 2, 3, 4):  # the job logged up to step 4, its last checkpoint was at step 2, then it was killed
        run.metrics({"loss_total": 1.0 / step}, step=step)
    resumed = RunLogger.resume(uri, run.run_id)
    for step in (3, 4, 5, 6):
        resumed.metrics({"loss_total": 1.0 / step, "lr": 0.1}, step=step)
    assert _rows(client, run.run_id, "loss_total") == [(s, 1.0 / s) for s in range(1, 7)]
    assert [s for s, _ in _rows(client, run.run_id, "lr")] == [3, 4, 5, 6]

    csv = tmp_path / "ss.csv"
    csv.write_text("class_id,class,IoU,Acc\n")
    result = {"mIoU": 0.5, "aAcc": 0.9, "mAcc": 0.7, "IoU": {"a": 0.5}, "Acc": {"a": 0.7},
              "protocol": {"flip": False}, "checkpoint": "model.pt"}
    first = log_evaluation(uri, run.run_id, "ss", result, csv, {})
    log_evaluation(uri, run.run_id, "flip", result, csv, {})
    assert log_evaluation(uri, run.run_id, "ss", result, csv, {}) == first  # the same file logged again: kept
    again = log_evaluation(uri, run.run_id, "ss", result | {"seconds": 2.0}, csv, {})  # evaluated again
    exp = client.get_run(run.run_id).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'")
    assert sorted(r.data.tags["protocol"] for r in children) == ["flip", "ss"]
    assert again != first and client.get_run(first).info.lifecycle_stage == "deleted"
    assert _rows(client, run.run_id, "mIoU.ss") == [(0, 0.5)]  # unchanged value: no second row
    log_evaluation(uri, run.run_id, "ss", result | {"mIoU": 0.6}, csv, {})
    assert client.get_run(run.run_id).data.metrics["mIoU.ss"] == 0.6


def test_two_jobs_logging_the_same_dataset_both_get_it_as_input(tmp_path):
    """Parallel training jobs log the same prepared dataset: the one that loses the race on the dataset's unique
    row (MLflow raises IntegrityError) retries and links the row the other job wrote."""
    import json

    from mcibi.tracking.runs import log_dataset_inputs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tmp_path / "demo"
    (data / "splits").mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"splits": {"train": 2, "val": 1}, "num_classes": 3}))
    first = RunLogger.start(uri, "demo", "demo/a", {}, {})
    second = RunLogger.start(uri, "demo", "demo/b", {}, {})
    client = MlflowClient(tracking_uri=uri)

    class RacedClient:  # the other job inserts the same rows between this job's lookup and its insert
        calls = 0

        def log_inputs(self, run_id, datasets):
            from mlflow.exceptions import MlflowException

            RacedClient.calls += 1
            if RacedClient.calls == 1:
                log_dataset_inputs(client, second.run_id, data, {"train": "train", "eval": "val"})
                raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                      "datasets.name, datasets.digest")  # what the store raised in the demo chain
            return client.log_inputs(run_id, datasets=datasets)

    log_dataset_inputs(RacedClient(), first.run_id, data, {"train": "train", "eval": "val"})
    for run in (first, second):
        inputs = client.get_run(run.run_id).inputs.dataset_inputs
        assert sorted(i.dataset.name for i in inputs) == ["demo/train", "demo/val"]


def test_cpu_hardware_names_the_kernels_instruction_set(monkeypatch):
    """CPU runs record which kernels ran: AVX2 and AVX-512 ones sum in different orders (and ``auto`` layouts
    differ), so two CPU runs with different digits are told apart in the MLflow UI."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert hardware().startswith("cpu (") and hardware().endswith(", AVX2)")
