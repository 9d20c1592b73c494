"""The released weights and logs through the real rules: a loopback server serves a checkpoint in the official
file format (the official MCIBI++ UperNet R-50-D8 VOC model with random weights, saved as its trainer saves) and a
log written by the official logging code; `snakemake results/pascalvoc/official` downloads, records the sha256,
converts, evaluates on a miniature PASCAL-VOC, logs the run to MLflow and writes the table column."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from checkout import ROOT, copy_repo
from miniature_datasets import BUILDERS, Server, local_path, mini_spec

from mcibi.catalogue.official import load_official_configs
from mcibi.official.released import ReleaseError, parse_official_log, release_of, released_file

ssseg = pytest.importorskip("ssseg", reason="the official sssegmentation package is not installed")

NAME = "mcibiplusplus_upernet_resnet50os8_voc"


def _official_checkpoint(path: Path) -> None:
    """The official model with random weights (BN statistics and memory too), saved like its trainer does."""
    from ssseg.modules.models.segmentors.mcibiplusplus.mcibiplusplus import MCIBIPlusPlus
    from ssseg.modules.utils.io import saveckpts

    cfg = copy.deepcopy(load_official_configs()[NAME])
    cfg["backbone"]["pretrained"] = False
    cfg["norm_cfg"] = {"type": "BatchNorm2d"}
    torch.manual_seed(0)
    model = MCIBIPlusPlus(cfg, mode="TRAIN")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.memory_module.memory.data.copy_(torch.rand_like(model.memory_module.memory))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    saveckpts({"cur_epoch": 60, "cur_iter": 39660, "optimizer": optimizer.state_dict(), "model": model.state_dict()},
              str(path), make_soft_link=False)


def _official_log(path: Path) -> None:
    """A training log written by the official logger (LocalLoggerHandle + TrainingLoggingManager) as its trainer
    calls them: a record every 2 iterations, an evaluation after each epoch."""
    from ssseg.modules.utils.logger import LocalLoggerHandle, TrainingLoggingManager

    handle = LocalLoggerHandle(str(path))
    manager = TrainingLoggingManager(log_interval_iters=2, logger_handle=handle)
    it = 0
    for epoch in (1, 2):
        for batch in range(4):
            it += 1
            lr = 0.01 * (1 - it / 8) ** 0.9
            manager.update({"cur_epoch": epoch, "max_epochs": 2, "cur_iter": it, "max_iters": 8,
                            "cur_iter_in_cur_epoch": batch + 1, "max_iters_in_cur_epoch": 4,
                            "segmentor": "MCIBIPlusPlus",
                            "backbone": "resnet50conv3x3stem", "dataset": "VOCDataset", "learning_rate": lr,
                            "ema": False, "fp16": False},
                           {"loss_aux": 0.4 / it, "loss_pr": 0.3 / it, "loss_cwi": 1.0 / it, "loss_cls": 1.1 / it,
                            "loss_total": 2.8 / it})
            manager.autolog()
        handle.info(f"Evaluate MCIBIPlusPlus at epoch {epoch}")
        handle.info({"iou": {"background": np.float64(0.9), "aeroplane": np.float64(0.5)},
                     "miou": np.float64(0.40 + 0.1 * epoch)})


def test_official_log_is_parsed(tmp_path):
    _official_log(tmp_path / "train.log")
    parsed = parse_official_log((tmp_path / "train.log").read_text())
    assert [r["iteration"] for r in parsed["train"]] == [2, 4, 6, 8]
    assert parsed["train"][0]["loss_total"] == pytest.approx((2.8 + 1.4) / 2)  # the mean since the last record
    assert parsed["eval"] == [{"epoch": 1, "mIoU": pytest.approx(0.5)}, {"epoch": 2, "mIoU": pytest.approx(0.6)}]


def _prepared_voc(repo: Path, server: Server) -> None:
    """The miniature PASCAL-VOC downloaded, verified and prepared into the repo copy as the data rules would."""
    from mcibi.data.download import download, verify_archives
    from mcibi.data.prepare import prepare
    from mcibi.files import write_json

    mini = BUILDERS["pascalvoc"]()
    server.serve(mini)
    spec = mini_spec("pascalvoc", mini)
    paths = download(spec, repo / "downloads" / "pascalvoc", url_map=server.url_map, retry_delay=0)
    write_json(repo / "downloads" / "pascalvoc" / "downloaded.json",
               {"dataset": "pascalvoc", "archives": {p.name: p.stat().st_size for p in paths}})
    record = verify_archives(spec, repo / "downloads" / "pascalvoc")
    write_json(repo / "data" / "pascalvoc.archives.json", record)
    prepare(spec, repo / "downloads" / "pascalvoc", repo / "data" / "pascalvoc", archive_record=record, workers=1)
    write_json(repo / "data" / "pascalvoc" / "verified.json", {"dataset": "pascalvoc", "miniature": True})


@pytest.mark.slow
@pytest.mark.workflow
def test_released_row_through_the_rules(tmp_path):

    repo = copy_repo(tmp_path / "repo")
    folder = repo / "params" / "pascalvoc"
    for file in folder.glob("*.yaml"):  # small and offline: no ImageNet download, tiny test images, one core
        data = yaml.safe_load(file.read_text())
        if file.name == "defaults.yaml":
            data["data"]["test_resize"]["size"] = [32, 32]
            data["evaluate"]["resources"] = {"gpus": 0, "cpus_per_gpu": 1, "mem_mb": 2000, "runtime": 10}
        else:
            data["model"]["backbone"]["pretrained"] = False
        file.write_text(yaml.safe_dump(data, sort_keys=False))
    (folder / "upernet_r101_mcibipp.yaml").unlink()  # one released row (R-50-D8) keeps the test small
    release = release_of("pascalvoc", "upernet_r50_mcibipp")
    pth, log = tmp_path / "released.pth", tmp_path / "released.log"
    _official_checkpoint(pth)
    _official_log(log)
    server = Server().start()
    try:
        _prepared_voc(repo, server)
        server.files[local_path(release.checkpoint_urls[0])] = pth.read_bytes()
        server.files[local_path(release.log_urls[0])] = log.read_bytes()
        server.truncate_once.add(local_path(release.checkpoint_urls[0]))  # the transfer breaks off once: resumed
        env = {**os.environ, "MCIBI_RELEASE_MIRROR": f"http://127.0.0.1:{server.port}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "PYTHONPATH": str(repo)}
        run = [sys.executable, "-m", "snakemake", "--cores", "1"]
        subprocess.run([*run, "--touch", "data/pascalvoc/verified.json"], cwd=repo, env=env, check=True,
                       capture_output=True)
        proc = subprocess.run([*run, "results/pascalvoc/official", "--config", "experiments={pascalvoc: sota}",
                               "default_datasets=[pascalvoc]"], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=1200)
        logs = "\n".join(p.read_text() for p in (repo / "logs" / "official").rglob("*.log"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    finally:
        server.stop()
    official = repo / "runs" / "pascalvoc" / "official"
    assert {p.name for p in official.iterdir()} == {"upernet_r50_mcibipp"}
    base = official / "upernet_r50_mcibipp"
    record = json.loads((base / "release" / "release.json").read_text())
    import hashlib

    sums = {f["kind"]: f["sha256"] for f in record["files"].values()}
    assert sums == {"checkpoint": hashlib.sha256(pth.read_bytes()).hexdigest(),
                    "log": hashlib.sha256(log.read_bytes()).hexdigest()}
    miou = json.loads((base / "eval" / "ss.json").read_text())["mIoU"]
    table = (repo / "results" / "pascalvoc" / "official" / "table.md").read_text()
    assert "Official weights (our evaluation)" in table and f"{100 * miou:.2f}%" in table

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((base / "run.json").read_text())["mlflow_run_id"]
    logged = client.get_run(run_id)
    assert logged.data.tags["source"] == "official"
    assert [m.step for m in client.get_metric_history(run_id, "loss_total")] == [2, 4, 6, 8]
    assert [m.value for m in client.get_metric_history(run_id, "mIoU.reported")] == pytest.approx([0.5, 0.6])
    assert len(client.get_metric_history(run_id, "lr")) == 4
    children = client.search_runs([logged.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert [c.data.metrics["mIoU"] for c in children] == pytest.approx([miou])

    # the recorded checksum is verified at every later use
    (base / "release" / release.checkpoint_urls[0].rsplit("/", 1)[1]).write_bytes(b"tampered")
    with pytest.raises(ReleaseError, match="differs"):
        released_file(base / "release", "checkpoint")


@pytest.mark.slow
def test_init_from_loads_a_converted_release(tmp_path):
    """model.init_from: every weight of the model comes from the checkpoint (here an official .pth, converted)."""
    import dataclasses

    from mcibi.models import build_segmentor
    from mcibi.official.released import initialise_from
    from mcibi.spec.params import load_params

    pth = tmp_path / "released.pth"
    _official_checkpoint(pth)
    params = load_params(ROOT / "params" / "pascalvoc" / "upernet_r50_mcibipp.yaml")
    model_params = dataclasses.replace(params.model, backbone=dataclasses.replace(params.model.backbone,
                                                                                  pretrained=False))
    model = build_segmentor(model_params)
    initialise_from(model, pth, model_params)
    from mcibi.official.checkpoints import convert_official_checkpoint, load_official_file

    expected = convert_official_checkpoint(load_official_file(pth), model_params)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    with pytest.raises(ReleaseError, match="does not exist"):
        initialise_from(model, tmp_path / "missing.pth", model_params)


def test_table_shows_the_released_weights_beside_published(tmp_path):
    from mcibi.files import write_json
    from mcibi.reports.table import OFFICIAL_TITLE, build_table, to_markdown
    from mcibi.spec.params import load_params

    exps = [load_params(ROOT / "params" / "pascalvoc" / f"upernet_{b}_mcibipp.yaml") for b in ("r50", "r101")]
    write_json(tmp_path / "official" / "upernet_r50_mcibipp" / "eval" / "ss.json", {"mIoU": 0.7941})
    md = to_markdown(build_table(exps, tmp_path), "pascalvoc")
    header = next(line for line in md.splitlines() if line.startswith("| Segmentor"))
    assert header.index("Published") < header.index(OFFICIAL_TITLE) < header.index("Δ")
    assert "| not run | 79.48% | 79.41% | - |" in next(line for line in md.splitlines() if "| R-50-D8 |" in line)
    assert "| not run | 80.42% | not run | - |" in next(line for line in md.splitlines() if "| R-101-D8 |" in line)
