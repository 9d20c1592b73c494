"""Exact resume: a training run killed with SIGKILL and rerun ends with the weights of an uninterrupted run."""

import json
import signal
import subprocess
import time

import pytest
import torch
from tiny_training import env_one_thread, mcibi_cmd, run, tiny_dataset, tiny_params

from mcibi.models.checkpoint import load_checkpoint
from mcibi.spec.params import load_params


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data_root_15(tmp_path_factory):
    """15 training images: not a multiple of the replicas or the batch, so the distributed layout pads."""
    return tiny_dataset(tmp_path_factory.mktemp("tiny15"), train_images=15)


def _train_cmd(params, data_root, out):
    return mcibi_cmd("train", str(params), "--data-root", str(data_root), "--out", str(out), "--threads", "1",
                     "--no-mlflow")


def _kill_when(cmd, folder, iteration, timeout=300.0):
    """Start ``cmd``, SIGKILL it once a checkpoint of ``iteration`` or later exists under ``folder``; its log."""
    log = folder.parent.parent / f"killed_at_{iteration}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, env=env_one_thread())
        deadline = time.time() + timeout
        while proc.poll() is None and time.time() < deadline:
            if any(int(p.stem[5:]) >= iteration for p in folder.glob("iter_*.pt")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        code = proc.wait()
    assert code == -signal.SIGKILL, f"exit code {code}; the run was not killed mid-way:\n{log.read_text()[-3000:]}"


def _weights(path):
    return load_checkpoint(path)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["loader", "distributed"])
def test_killed_run_resumes_to_the_uninterrupted_weights(data_root, data_root_15, tmp_path, layout):
    # MCIBI++ with dropout 0.1: the memory buffers, optimiser momentum and RNG states must all be restored.
    # loader: 16 images in batches of 4. distributed: 15 images as DistributedSampler over 2 replicas lays them
    # out (padded to 16, 8 per replica, 2 per replica per iteration): also 4 iterations per epoch (loader: 3).
    if layout == "distributed":
        data_root = data_root_15
        params = tiny_params(tmp_path / "params", sampler={"kind": "distributed", "replicas": 2})
    else:
        params = tiny_params(tmp_path / "params")
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    done = run(_train_cmd(params, data_root, straight))
    assert done.returncode == 0, done.stderr[-3000:]

    # Killed right after the mid-epoch checkpoint of iteration 2, then again after the epoch-end checkpoint of
    # iteration 4 (the two places where the data loader's seed draw sits differently), then run to the end.
    _kill_when(_train_cmd(params, data_root, cut), cut / "checkpoints", 2)
    assert not (cut / "model.pt").exists()
    _kill_when(_train_cmd(params, data_root, cut), cut / "checkpoints", 4)
    again = run(_train_cmd(params, data_root, cut))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming demo/tiny from" in again.stderr
    assert json.loads((cut / "run.json").read_text())["resumed_from"] >= 4
    assert json.loads((straight / "run.json").read_text())["iterations"] == 8  # 2 epochs x 4

    a, b = _weights(straight / "model.pt"), _weights(cut / "model.pt")
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert any("memory_module.memory" in k for k in a)
    assert (straight / "loss.csv").read_text() == (cut / "loss.csv").read_text()
    # retention: the newest two resumable checkpoints are kept beside the final weights
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["iter_00000006.pt", "iter_00000008.pt"]
    state = load_checkpoint(straight / "checkpoints" / "iter_00000008.pt")
    assert state["iteration"] == 8 and state["optimizer"]["state"] and set(state["rng"]) >= {"python", "numpy",
                                                                                           "torch"}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    from mcibi.engine import step
    from mcibi.engine import train as loop

    params = load_params(tiny_params(tmp_path / "params", memory="none", epochs=1))
    calls = {"n": 0}
    real = step.compute_losses

    def poisoned(out, labels, p):
        calls["n"] += 1
        losses = real(out, labels, p)
        if calls["n"] == 3:  # the third iteration's loss is NaN
            losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(step, "compute_losses", poisoned)
    out = tmp_path / "run"
    with pytest.raises(step.NonFiniteLossError, match=r"iteration 2 .*iter_00000002\.pt"):
        loop.train(params, data_root, out, threads=1)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_00000002.pt"]
    assert not (out / "model.pt").exists()


def test_resume_ignores_execution_settings_and_refuses_other_params(data_root, tmp_path):
    import dataclasses

    from mcibi.engine.resume import ResumeConflictError
    from mcibi.engine.train import train

    params = load_params(tiny_params(tmp_path / "params", memory="none", epochs=1))
    out = tmp_path / "run"
    assert train(params, data_root, out, threads=1).resumed_from == 0
    # more wall time, another checkpoint interval, another memory layout: the finished run's last checkpoint is
    # picked up (no iterations)
    execution = dataclasses.replace(params.train, checkpoint_every=3, channels_last=not params.train.channels_last,
                                    resources=dataclasses.replace(params.train.resources, runtime=600))
    again = train(dataclasses.replace(params, train=execution), data_root, out, threads=1)
    assert again.resumed_from == 4 and again.iterations == 4
    # another learning rate is another run: refused, naming the key, and nothing is deleted
    other = dataclasses.replace(params, train=dataclasses.replace(
        params.train, optimizer=dataclasses.replace(params.train.optimizer, lr=0.02)))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ResumeConflictError, match=r"train\.optimizer\.lr: 0\.01 -> 0\.02.*--restart"):
        train(other, data_root, out, threads=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # --restart (resume=False) archives the old checkpoints and starts afresh
    fresh = train(other, data_root, out, threads=1, resume=False)
    assert fresh.resumed_from == 0 and fresh.iterations == 4
    assert load_checkpoint(out / "checkpoints" / "iter_00000004.pt")["params"]["train"]["optimizer"]["lr"] == 0.02
    archived = [p for p in out.iterdir() if p.name.startswith("checkpoints.archived-")]
    assert len(archived) == 1 and sorted(p.name for p in archived[0].iterdir()) == before


def _verify(folder):
    """What `mcibi verify-data` does (the workflow reruns it when the folder's fingerprint changes): record the
    fingerprint of the files it checked in verified.json (the tiny splits are not the documented sizes)."""
    from mcibi.data.fingerprint import RECORD_KEY, fingerprint
    from mcibi.data.prepare import verify_prepared
    from mcibi.files import write_json

    before = fingerprint(folder)
    summary = verify_prepared("demo", folder, expected={"train": 16, "val": 4})
    write_json(folder / "verified.json", summary | {RECORD_KEY: before})
    return before


def _repaint(folder, split):
    """Overwrite the first image of ``split`` with other pixels of the same size (a re-prepared image)."""
    import cv2
    import numpy as np

    image_id = (folder / "splits" / f"{split}.txt").read_text().split()[0]
    file = folder / "images" / f"{image_id}.png"
    shape = cv2.imread(str(file)).shape
    cv2.imwrite(str(file), np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8))


def test_changed_training_data_is_a_resume_conflict_and_restart_trains_afresh(data_root, tmp_path, monkeypatch):
    """A prepared training image changes and is verified again (the workflow then reruns training): the finished
    run's checkpoints were trained on the old data, so resuming (zero iterations, the old weights) is refused,
    naming both data versions, and nothing is deleted; --restart trains afresh, recording the new data version
    in its checkpoints, model.pt, run.json and a new MLflow run. A change to evaluation images only resumes."""
    import shutil

    from mlflow import MlflowClient

    from mcibi.engine.resume import ResumeConflictError, data_version
    from mcibi.engine.train import train
    from mcibi.evaluation import serving

    monkeypatch.setattr(serving, "log_model", lambda *a, **k: None)  # the logged MLflow model: not needed here
    root = tmp_path / "data"
    shutil.copytree(data_root / "demo", root / "demo")
    folder = root / "demo"
    params = load_params(tiny_params(tmp_path / "params", memory="none", epochs=1))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_ids = (folder / "splits" / "train.txt").read_text().split()

    _verify(folder)
    first = train(params, root, tmp_path / "run", tracking_uri=uri, threads=1)
    out = tmp_path / "run"
    old = data_version(folder, "train", train_ids, ".png")
    assert load_checkpoint(out / "model.pt")["data_version"] == old
    assert load_checkpoint(out / "checkpoints" / "iter_00000004.pt")["data_version"] == old
    assert json.loads((out / "run.json").read_text())["data_version"] == old
    tags = MlflowClient(uri).get_run(first.run_id).data.tags
    assert (tags["data_fingerprint"], tags["train_data_fingerprint"]) == (old["fingerprint"], old["train_files"])

    _repaint(folder, "train")
    assert _verify(folder) != old["fingerprint"]
    new = data_version(folder, "train", train_ids, ".png")
    assert new["train_files"] != old["train_files"]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    weights = (out / "model.pt").read_bytes()
    with pytest.raises(ResumeConflictError, match=(
            rf"checkpoint\(s\) \(newest iter_00000004\.pt\) were trained on other data than demo/train holds now: "
            rf"data version training files {old['train_files']} \(dataset fingerprint {old['fingerprint']}\) -> "
            rf"training files {new['train_files']} \(dataset fingerprint {new['fingerprint']}\).*Nothing was "
            r"deleted.*--restart")):
        train(params, root, out, tracking_uri=uri, threads=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "model.pt").read_bytes() == weights

    fresh = train(params, root, out, tracking_uri=uri, threads=1, resume=False)  # mcibi train --restart
    assert fresh.resumed_from == 0 and fresh.iterations == 4 and fresh.run_id != first.run_id
    assert load_checkpoint(out / "model.pt")["data_version"] == new
    assert load_checkpoint(out / "checkpoints" / "iter_00000004.pt")["data_version"] == new
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoints.archived-")]
    tags = MlflowClient(uri).get_run(fresh.run_id).data.tags
    assert (tags["data_fingerprint"], tags["train_data_fingerprint"]) == (new["fingerprint"], new["train_files"])

    _repaint(folder, "val")  # evaluation images only: the weights stay valid, the workflow re-evaluates them
    _verify(folder)
    again = train(params, root, out, tracking_uri=uri, threads=1)
    assert again.resumed_from == 4 and again.run_id == fresh.run_id
    assert load_checkpoint(out / "model.pt")["data_version"]["train_files"] == new["train_files"]
