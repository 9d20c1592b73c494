"""Per-run figures and MLflow comparison tags, from fabricated evaluation files and a throwaway MLflow store."""

import json
from pathlib import Path

import numpy as np
import pytest
from checkout import ROOT

from mcibi.evaluation.protocols import write_result
from mcibi.reports.figures import data_version, make_figures, palette, params_hash, per_class_table
from mcibi.spec.params import load_params
from mcibi.tracking.runs import RunLogger, log_evaluation, memory_history, metric_key

PARAMS = ROOT / "params"


def _fake_eval(run_dir: Path, proto: str, classes: list[str], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 50, size=(len(classes), len(classes))) + np.eye(len(classes), dtype=int) * 400
    iou = {c: float(conf[i, i] / (conf[i].sum() + conf[:, i].sum() - conf[i, i])) for i, c in enumerate(classes)}
    res = {"mIoU": float(np.mean(list(iou.values()))), "aAcc": 0.9, "mAcc": 0.8, "IoU": iou, "Acc": iou,
           "confusion": conf.tolist(), "protocol": {"flip": proto != "ss"}, "checkpoint": "model.pt",
           "hardware": "test-box"}
    write_result(res, run_dir / "eval" / f"{proto}.json", run_dir / "eval" / f"{proto}_per_class.csv")
    return res


def test_figures_from_evaluation_files_without_mlflow(tmp_path):
    params = load_params(PARAMS / "demo" / "upernet_mcibipp.yaml")
    from mcibi.data.lookup import get_spec

    classes = list(get_spec("demo").classes)
    run = tmp_path / "run"
    ss = _fake_eval(run, "ss", classes, 0)
    _fake_eval(run, "msflip", classes, 1)
    files = make_figures(params, run, tmp_path / "data", run / "figures", tracking_uri=None, num_images=0)
    names = {f.name for f in files}
    assert {"per_class_iou.csv", "per_class_iou.md", "confusion_ss.png", "iou_ss.png", "confusion_msflip.png",
            "iou_msflip.png", "tags.json"} == names  # no checkpoint: no overlays; no MLflow: no trajectories
    for f in files:
        assert f.stat().st_size > 0
    assert (run / "figures" / "confusion_ss.png").read_bytes()[:4] == b"\x89PNG"
    table = (run / "figures" / "per_class_iou.csv").read_text().splitlines()
    assert table[0] == "class,IoU mIoU,IoU mIoU (ms+flip)"
    assert table[1] == f"{classes[0]},{100 * ss['IoU'][classes[0]]:.2f}," + table[1].split(",")[2]
    tags = json.loads((run / "figures" / "tags.json").read_text())
    assert tags["params_hash"] == params_hash(params) and tags["protocols"] == "ss flip msflip"
    assert tags["data_version"] == "dvc:unknown manifest:unknown"


def test_params_hash_and_data_version(tmp_path):
    a = load_params(PARAMS / "demo" / "upernet_mcibipp.yaml")
    b = load_params(PARAMS / "demo" / "upernet_baseline.yaml")
    assert params_hash(a) != params_hash(b) and len(params_hash(a)) == 12
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "manifest.json").write_text("{}")
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: data\n")
    assert data_version(tmp_path / "data", "demo").startswith("dvc:0123abcd.dir manifest:")
    assert palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


def test_per_class_table_keeps_absent_classes_empty():
    df = per_class_table({"ss": {"IoU": {"a": 0.5, "b": None}}})
    assert df["IoU mIoU"].iloc[0] == 50.0 and np.isnan(df["IoU mIoU"].iloc[1])


@pytest.mark.slow
def test_mlflow_artifacts_tags_and_trajectories_with_ade20k_class_names(tmp_path):
    """Memory metrics named after ADE20k classes ('building, edifice') are accepted (commas replaced), read back
    as trajectories, and every figure lands in the run's artifacts with the comparison tags."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = load_params(PARAMS / "ade20k" / "upernet_r101_mcibipp.yaml")
    from mcibi.data.lookup import get_spec

    classes = list(get_spec("ade20k").classes)
    from mcibi.spec.params import flatten, to_dict
    from mcibi.spec.runs import with_seed

    flat = flatten(to_dict(params)) | {"iterations": 9}
    run = RunLogger.start(uri, "ade20k", params.name, {"memory": "mcibi++"}, flat)
    for step in (50, 100):
        run.metrics({f"memory.mu.{c}": step * 0.01 + i for i, c in enumerate(classes[:3])}
                    | {f"memory.sigma.{c}": 1.0 for c in classes[:3]}, step=step)
    assert metric_key("memory.mu.building, edifice") == "memory.mu.building_ edifice"
    history = memory_history(uri, run.run_id, classes)
    assert history["mu"]["building, edifice"] == [(50, 1.5), (100, 2.0)] and len(history["sigma"]) == 3

    run_dir = tmp_path / "runs" / "upernet_r101_mcibipp"
    res = _fake_eval(run_dir, "ss", classes, 0)
    flip = _fake_eval(run_dir, "msflip", classes, 1)
    child = log_evaluation(uri, run.run_id, "ss", res, run_dir / "eval" / "ss_per_class.csv", {})  # by hand
    (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": run.run_id}))
    make_figures(params, run_dir, tmp_path / "data", run_dir / "figures", tracking_uri=uri, num_images=0,
                 section="SOTA Results")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    # the figures job logged the evaluation not yet logged and kept the one logged by hand
    exp = client.get_run(run.run_id).info.experiment_id
    children = {r.data.tags["protocol"]: r for r in client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'")}
    assert sorted(children) == ["msflip", "ss"] and children["ss"].info.run_id == child
    assert children["msflip"].data.metrics["mIoU"] == flip["mIoU"]
    assert client.get_run(run.run_id).data.metrics["mIoU.msflip"] == flip["mIoU"]
    assert children["msflip"].data.tags["hardware"] == "test-box"  # where it was evaluated, from the file
    assert children["msflip"].data.tags["memory"] == "mcibi++"
    logged = {a.path for a in client.list_artifacts(run.run_id, "figures")}
    assert {"figures/memory_trajectories.png", "figures/confusion_ss.png", "figures/iou_ss.png",
            "figures/per_class_iou.csv"} <= logged
    tags = client.get_run(run.run_id).data.tags
    assert tags["params_hash"] == params_hash(params) and tags["table_section"] == "SOTA Results"
    child_tags = client.get_run(child).data.tags
    assert child_tags["params_hash"] == params_hash(params) and child_tags["protocol"] == "ss"
    assert child_tags["data_version"] == tags["data_version"] and child_tags["table_section"] == "SOTA Results"
    # seeds of one experiment share the hash; another experiment does not
    assert params_hash(with_seed(params, 3)) == params_hash(params)
    assert params_hash(load_params(PARAMS / "ade20k" / "upernet_s101_mcibipp.yaml")) != params_hash(params)


def test_overlays_come_from_the_evaluation_samples_and_figures_never_import_torch(tmp_path):
    """The figures job draws the overlays from the samples the first protocol's evaluation kept: it needs neither
    the model nor torch (whose import costs each job seconds)."""
    import subprocess
    import sys

    from mcibi.data.lookup import get_spec
    from mcibi.evaluation.samples import read_samples, write_samples

    classes = list(get_spec("demo").classes)
    run = tmp_path / "run"
    for proto in ("ss", "flip", "msflip"):
        _fake_eval(run, proto, classes, 0)
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, len(classes), (12, 16)) for _ in range(3)]
    images = [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(3)]
    write_samples(run / "eval" / "ss_samples.npz", ["a", "b", "c"], images, labels, [x[::-1] for x in labels])
    ids, back_images, back_labels, back_preds = read_samples(run / "eval" / "ss_samples.npz")
    assert ids == ["a", "b", "c"] and all(np.array_equal(x, y) for x, y in zip(back_images, images, strict=True))
    assert all(np.array_equal(p, x[::-1]) for p, x in zip(back_preds, labels, strict=True))

    code = ("import sys\nfrom mcibi.cli import main\nsys.argv = ['mcibi', 'figures', sys.argv[1], '--run-dir', "
            "sys.argv[2], '--images', '2', '--no-mlflow']\nmain()\n"
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(PARAMS / "demo" / "upernet_mcibipp.yaml"), str(run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (run / "figures" / "predictions.png").read_bytes()[:4] == b"\x89PNG"
