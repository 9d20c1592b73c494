"""`mcibi predict`, the Segmenter API and the run's MLflow model (pyfunc, pytorch flavour, registry, serving) on
one tiny trained demo model shared by the module; images of any size (tiles, a memory budget, refusals)."""

from __future__ import annotations

import json
import logging
import os
import re
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


# ------------------------------------------------------------------------------------- images of any size
def _whole_scores(seg, image):
    import torch

    from mcibi.evaluation.protocols import protocol_scores

    batch = torch.stack([seg._tensor(image)]).contiguous(memory_format=seg.layout)
    with torch.inference_mode():
        return protocol_scores(seg.params, seg.model, batch, seg.protocol, seg.flip_permutation,
                               image.shape[:2])[0].numpy()


@pytest.mark.parametrize("protocol", ["ss", "flip", "msflip"])
def test_tiled_class_maps_equal_the_whole_ones(trained, protocol):
    """The tiled path forced on small images (any tile shape, up- and downsampled outputs) gives the whole
    path's class map: its scores agree to float rounding, so a pixel may differ only where the two best classes'
    scores are that close (none does here). Images that fit the budget take the whole path."""
    from mcibi.evaluation.predict import Segmenter

    root, run_dir, _, _ = trained
    _, images = _val_images(root, 2)
    images += [cv2.resize(images[0], (211, 300)), cv2.resize(images[1], (70, 90))]
    seg = Segmenter.from_checkpoint(run_dir / "model.pt", protocol=protocol, device="cpu")
    for image in images:
        h, w = image.shape[:2]
        assert seg.memory_plan(1, (h, w), outputs=True, overlays=True).tile is None
        whole = seg.predict(image)
        scores = np.sort(_whole_scores(seg, image), axis=0)
        near_tie = scores[-1] - scores[-2] < 1e-5
        for tile in ((7, 13), (1, w), (h, w), (64, 16)):
            tiled = seg.predict_batch([image], tile=tile)[0].classes
            assert tiled.dtype == np.uint8 and tiled.shape == (h, w)
            assert not ((tiled != whole) & ~near_tie).any(), (protocol, (h, w), tile)


_MEASURE = """
import json, sys
import numpy as np, torch
from mcibi.evaluation.predict import Segmenter, predict_inputs

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

checkpoint, image, out, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seg = Segmenter.from_checkpoint(checkpoint, protocol="msflip", device="cpu")
seg.predict(np.zeros((128, 128, 3), np.uint8))  # the kernels' own buffers, before measuring
plan = seg.memory_plan(1, (3000, 3000), outputs=True, overlays=True, budget_mb=budget)
whole = seg.memory_plan(1, (3000, 3000), outputs=True, overlays=True, budget_mb=10**6)
before = status("VmRSS")
written, errors = predict_inputs(seg, [image], out, show_progress=False, max_memory_mb=budget)
print(json.dumps({"written": written, "errors": errors, "rss_before": before, "peak": status("VmHWM"),
                  "tile": plan.tile, "whole_need": whole.need}))
"""


def test_a_large_image_is_predicted_within_the_memory_budget(trained, tmp_path):
    """3000x3000 px under a 150 MiB budget (ms+flip, overlays): the whole path would hold ~1 GB of scores, the
    tiled one stays within the budget, measured as the child process's peak resident memory over what it held
    before the image."""
    root, run_dir, _, _ = trained
    _, images = _val_images(root, 1)
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), cv2.cvtColor(cv2.resize(images[0], (3000, 3000)), cv2.COLOR_RGB2BGR))
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(run_dir / "model.pt"), str(big), str(tmp_path / "out"),
                           "150"], capture_output=True, text=True, env=env_one_thread(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["written"] == 1 and not record["errors"] and record["tile"] is not None
    assert record["whole_need"] > 400 * 2**20  # what the evaluation's path would have needed
    assert record["peak"] - record["rss_before"] <= 150 * 2**20, (record["peak"] - record["rss_before"]) / 2**20
    classes = cv2.imread(str(tmp_path / "out" / "big.png"), cv2.IMREAD_UNCHANGED)
    assert classes.shape == (3000, 3000) and classes.dtype == np.uint8 and classes.max() < 8
    assert cv2.imread(str(tmp_path / "out" / "big_overlay.png")).shape[0] == 3000


def test_images_beyond_the_budget_or_undecodable_are_refused_by_name(trained, tmp_path, monkeypatch, caplog):
    """A budget below even the class-index map of a 3000x3000 image: refused from its header, before decoding,
    naming the file, its size, the need and the budget and what to do; a file whose header is fine but whose
    pixels are truncated is named too; an allocation failure while predicting names the file; the other images
    are still written."""
    from mcibi.evaluation import predict

    root, run_dir, _, _ = trained
    files, images = _val_images(root, 1)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "small.png").write_bytes(Path(files[0]).read_bytes())
    cv2.imwrite(str(folder / "huge.png"), np.zeros((3000, 3000, 3), np.uint8))
    ok, png = cv2.imencode(".png", cv2.resize(images[0], (64, 64)))
    (folder / "truncated.png").write_bytes(png.tobytes()[: len(png) // 2])
    decoded = []
    real = predict.cv2.imread
    monkeypatch.setattr(predict.cv2, "imread", lambda f, *a: decoded.append(Path(f).name) or real(f, *a))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(["predict", str(folder), "--run", str(run_dir), "--out", str(out), "--device", "cpu",
                     "--max-memory-mb", "8"])
    assert code == 1
    assert re.search(r"huge\.png: 3000x3000 px image: predicting it needs about \d+ MiB \(decoded images: 26 MiB, "
                     r"decoding: 26 MiB, class-index PNG: 9 MiB, overlay: \d+ MiB, .*class maps: 9 MiB\), more than "
                     r"the memory budget of 8 MiB\. Raise the budget \(--max-memory-mb", caplog.text)
    assert "huge.png" not in decoded  # refused before any pixel was decoded
    assert ("truncated.png: not a readable image: its header says 64x64 px but OpenCV cannot decode the pixels "
            "(a truncated or damaged file)") in caplog.text
    assert sorted(p.name for p in out.glob("*.png")) == ["small.png", "small_overlay.png"]

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 12800000000 bytes.")

    seg = predict.Segmenter.from_checkpoint(run_dir / "model.pt", device="cpu")
    monkeypatch.setattr(seg, "_predict", exhausted)
    written, errors = predict.predict_inputs(seg, [str(folder / "small.png")], tmp_path / "out2", show_progress=False)
    assert written == 0 and len(errors) == 1
    assert errors[0].startswith(f"{folder / 'small.png'}: out of memory predicting 128x128 px")
    assert "lower --max-memory-mb" in errors[0]
