"""`mcibi predict`, the Segmenter API and the run's MLflow model (pyfunc, pytorch flavour, registry, serving) on
one tiny trained demo model shared by the module."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from tiny_training import env_one_thread, tiny_dataset, tiny_params

from mcibi.cli import main


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny demo model trained for one epoch with MLflow tracking: (root, run folder, tracking URI, run id)."""
    from mcibi.engine.train import train
    from mcibi.spec.params import load_params

    root = tmp_path_factory.mktemp("predict")
    tiny_dataset(root)
    params = load_params(tiny_params(root / "params", epochs=1))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the temporary folder
    try:
        result = train(params, root, root / "run", tracking_uri=uri, device="cpu", threads=1)
    finally:
        os.chdir(cwd)
    return root, root / "run", uri, result.run_id


def _val_images(root: Path, n: int = 3) -> tuple[list[str], list[np.ndarray]]:
    ids = (root / "demo" / "splits" / "val.txt").read_text().split()[:n]
    files = [str(root / "demo" / "images" / f"{i}.png") for i in ids]
    return files, [cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB) for f in files]


def _env(uri: str) -> dict[str, str]:
    """One thread, the test's tracking store, and the venv's bin first on PATH (the MLflow server runs `uvicorn`)."""
    env = env_one_thread()
    return dict(env, MLFLOW_TRACKING_URI=uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")


def test_predict_cli_equals_segmenter_and_pyfunc(trained, tmp_path, caplog):
    import mlflow

    from mcibi.evaluation.predict import Segmenter

    root, run_dir, uri, run_id = trained
    files, images = _val_images(root)
    (tmp_path / "in").mkdir()
    for f in files:
        (tmp_path / "in" / Path(f).name).write_bytes(Path(f).read_bytes())
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, images[0].shape[1::-1])
    for im in images[:2]:
        writer.write(cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    writer.release()

    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):  # the CLI in-process (a subprocess would re-import torch and MLflow)
        code = main(["predict", str(tmp_path / "in"), str(video), str(tmp_path / "nothing*.jpg"), "--run",
                     str(run_dir), "--out", str(out), "--device", "cpu", "--batch", "2"])
    assert code == 1, caplog.text[-3000:]  # the broken file and the empty glob are reported...
    assert "broken.png: not a readable image" in caplog.text and "nothing*.jpg" in caplog.text
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}  # ...the rest is written
    assert {f"{Path(f).stem}.png" for f in files} | {f"{Path(f).stem}_overlay.png" for f in files} <= written
    assert {"clip/000000.png", "clip/000001.png", "clip/000001_overlay.png"} <= written

    seg = Segmenter.from_checkpoint(run_dir / "model.pt", device="cpu")
    ours = np.stack([seg.predict(im) for im in images])
    cli = np.stack([cv2.imread(str(out / f"{Path(f).stem}.png"), cv2.IMREAD_UNCHANGED) for f in files])
    assert cli.shape == ours.shape == (len(images), 128, 128) and (cli == ours).all()
    overlay = cv2.imread(str(out / f"{Path(files[0]).stem}_overlay.png"))
    assert overlay.shape[0] == 128 and overlay.shape[1] > 128  # the legend sits right of the image
    frames = []
    cap = cv2.VideoCapture(str(video))
    while (ok_frame := cap.read())[0]:
        frames.append(cv2.cvtColor(ok_frame[1], cv2.COLOR_BGR2RGB))
    assert (cv2.imread(str(out / "clip" / "000001.png"), cv2.IMREAD_UNCHANGED) == seg.predict(frames[1])).all()

    pred = seg.predict(images[0], probs=True)
    assert pred.probabilities.shape == (8, 128, 128)
    assert np.allclose(pred.probabilities.sum(axis=0), 1, atol=1e-4)
    assert (pred.probabilities.argmax(axis=0) == pred.classes).all()

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert (model.predict(np.stack(images)) == ours).all()
    flip = Segmenter.from_checkpoint(run_dir / "model.pt", protocol="flip", device="cpu")
    assert (model.predict(np.stack(images[:1]), params={"protocol": "flip"})[0] == flip.predict(images[0])).all()
    import mlflow.pytorch

    module = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert type(module).__name__ == "MemorySegmentor"


def test_run_records_dataset_model_and_registers(trained, caplog, monkeypatch):
    from mlflow import MlflowClient

    from mcibi.evaluation.predict import Segmenter
    from mcibi.tracking.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    root, run_dir, uri, run_id = trained
    client = MlflowClient(uri)
    r = client.get_run(run_id)
    assert client.get_experiment(r.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    inputs = {d.dataset.name: d for d in r.inputs.dataset_inputs}
    assert set(inputs) == {"demo/train", "demo/val"}
    manifest_sha = __import__("hashlib").sha256((root / "demo" / "manifest.json").read_bytes()).hexdigest()[:12]
    assert inputs["demo/train"].dataset.digest.endswith(manifest_sha)
    assert {t.key: t.value for t in inputs["demo/val"].tags}["mlflow.data.context"] == "eval"
    assert [m.model_id for m in r.outputs.model_outputs]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with caplog.at_level(logging.INFO):
        assert main(["register", str(run_dir), "--name", "tiny-demo"]) == 0, caplog.text[-3000:]
    assert "models:/tiny-demo/1" in caplog.text
    seg = Segmenter.from_run("models:/tiny-demo/1", device="cpu", tracking_uri=uri)
    _, images = _val_images(root, 1)
    direct = Segmenter.from_checkpoint(run_dir / "model.pt", device="cpu")
    assert seg.classes == direct.classes and (seg.predict(images[0]) == direct.predict(images[0])).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_served_model_answers_one_request(trained):
    """`mlflow models serve` on 127.0.0.1 (local environment) answers /invocations; bounded by `timeout`."""
    from mcibi.evaluation.predict import Segmenter

    root, run_dir, uri, run_id = trained
    port = _free_port()
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(["timeout", "240", mlflow_bin, "models", "serve", "-m", f"runs:/{run_id}/model",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              cwd=root, env=_env(uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            time.sleep(1)
        _, images = _val_images(root, 1)
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images[0][None].tolist()},
                               timeout=60)
        assert answer.status_code == 200, answer.text[:2000]
        served = np.asarray(json.loads(answer.text)["predictions"])
        expected = Segmenter.from_checkpoint(run_dir / "model.pt", device="cpu").predict(images[0])
        assert served.shape == (1, 128, 128) and (served[0] == expected).all()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
