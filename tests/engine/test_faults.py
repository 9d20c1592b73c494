"""Injected faults end in a clear error and lose nothing: divergence, old, conflicting or corrupted checkpoints, write
errors."""

import errno
import re
import zipfile

import pytest
import torch
from tiny_training import tiny_dataset, tiny_params

from mcibi.engine import layout, step
from mcibi.engine import train as loop
from mcibi.files import WriteError, write_json
from mcibi.models.checkpoint import load_checkpoint
from mcibi.spec.params import load_params, params_from_dict


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"), train_images=8)


@pytest.fixture
def params(tmp_path):
    return load_params(tiny_params(tmp_path / "params", memory="mcibi++", epochs=2))


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _as_older_version(state):
    """A checkpoint as versions before the content digest and the data version wrote it (format 1)."""
    state = {k: v for k, v in state.items() if k not in ("digest", "data_version")}
    return state | {"format_version": 1}


def test_exploding_weights_with_a_finite_loss_write_no_checkpoint(data_root, params, tmp_path, monkeypatch):
    # the 4th optimiser step leaves NaN weights while its loss was finite: the checkpoint of iteration 4 is refused
    real, calls = loop.train_step, {"n": 0}

    def exploding(model, *args, **kw):
        losses = real(model, *args, **kw)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                next(step.unwrap(model).parameters()).mul_(float("inf")).mul_(0)
        return losses

    monkeypatch.setattr(loop, "train_step", exploding)
    out = tmp_path / "run"
    with pytest.raises(step.DivergedError, match=r"diverged.*after iteration 4.*last good checkpoint is "
                       r".*iter_00000002\.pt \(iteration 2\).*--restart"):
        loop.train(params, data_root, out, threads=1)
    assert _names(out / "checkpoints") == ["iter_00000002.pt"]
    assert not (out / "model.pt").exists()


def test_resume_sets_aside_a_non_finite_checkpoint_and_loads_an_old_version(data_root, params, tmp_path):
    out = tmp_path / "run"
    loop.train(params, data_root, out, threads=1)  # 4 iterations; checkpoints 2 and 4 kept
    (out / "model.pt").unlink()
    # iteration 4's checkpoint holds a NaN memory (as older versions could write); iteration 2's was written by an
    # older version whose params lack keys added since (they take their documented LEGACY_DEFAULTS). Both are
    # written as those versions wrote them: format 1, no content digest, no data version.
    newest, older = out / "checkpoints" / "iter_00000004.pt", out / "checkpoints" / "iter_00000002.pt"
    state = load_checkpoint(newest)
    key = next(k for k in state["state_dict"] if k.endswith("memory_module.memory"))
    state["state_dict"][key][0, 0] = float("nan")
    torch.save(_as_older_version(state), newest)
    state = load_checkpoint(older)
    del state["params"]["data"]["train_sampling"], state["params"]["model"]["context_module"]
    del state["params"]["train"]["sampler"]
    torch.save(_as_older_version(state), older)
    old = params_from_dict(state["params"], older)
    assert old.data.train_sampling == "image" and old.model.context_module == "ppm"
    assert (old.train.sampler.kind, old.train.sampler.replicas) == ("loader", 1)  # its N // batch iterations

    again = loop.train(params, data_root, out, threads=1)
    assert again.resumed_from == 2 and again.iterations == 4
    assert "iter_00000004.pt.nonfinite" in _names(out / "checkpoints")


def test_resume_skips_a_corrupted_checkpoint_for_an_older_intact_one(data_root, params, tmp_path, caplog):
    """Random bytes in the middle of the newest resumable checkpoint's tensor data (torch.load reads such a file
    without complaint): its digest does not match, so the rerun warns, skips it and resumes from the older one,
    reaching the weights of the run that was never disturbed."""
    out = tmp_path / "run"
    loop.train(params, data_root, out, threads=1)  # 4 iterations; checkpoints 2 and 4 kept
    intact = load_checkpoint(out / "model.pt")["state_dict"]
    (out / "model.pt").unlink()
    newest = out / "checkpoints" / "iter_00000004.pt"
    with zipfile.ZipFile(newest) as z:
        big = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    offset = big.header_offset + 30 + len(big.filename) + len(big.extra) + big.file_size // 2
    data = bytearray(newest.read_bytes())
    data[offset:offset + 4096] = bytes(b ^ 0xA5 for b in data[offset:offset + 4096])
    newest.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="mcibi.engine.resume"):
        again = loop.train(params, data_root, out, threads=1)
    assert again.resumed_from == 2 and again.iterations == 4
    assert re.search(r"skipping unreadable checkpoint .*iter_00000004\.pt .*corrupted checkpoint", caplog.text)
    resumed = load_checkpoint(out / "model.pt")["state_dict"]
    assert all(torch.equal(intact[k], resumed[k]) for k in intact)
    assert load_checkpoint(newest)["iteration"] == 4  # rewritten by the resumed run


@pytest.mark.parametrize("code", [errno.ENOSPC])  # the other errors: every atomic write, below
def test_a_failed_checkpoint_write_names_the_path_and_the_intact_checkpoint(data_root, params, tmp_path,
                                                                             monkeypatch, code):
    import mcibi.models.checkpoint as checkpoint

    real = checkpoint.torch.save

    def failing(obj, fh, *a, **kw):
        if obj.get("iteration") == 4:
            fh.write(b"partial")
            raise OSError(code, "injected")
        return real(obj, fh, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", failing)
    out = tmp_path / "run"
    words = {errno.ENOSPC: "no space left", errno.EACCES: "permission denied", errno.EROFS: "read-only"}[code]
    with pytest.raises(WriteError, match=rf"cannot write .*iter_00000004\.pt: {words}.*iter_00000002\.pt "
                       r"\(iteration 2\) is intact: rerunning the same command resumes from it"):
        loop.train(params, data_root, out, threads=1)
    assert _names(out / "checkpoints") == ["iter_00000002.pt"]  # no partial temporary file left behind
    assert load_checkpoint(out / "checkpoints" / "iter_00000002.pt")["iteration"] == 2


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_every_atomic_write_reports_os_errors_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    import mcibi.files as files

    target = tmp_path / "out" / "result.json"
    write_json(target, {"v": 1})

    def refuse(src, dst):
        raise OSError(code, "injected", str(dst))

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(WriteError, match=r"cannot write .*result\.json: .*nothing was replaced"):
        write_json(target, {"v": 2})
    assert target.read_text() == '{\n  "v": 1\n}\n' and _names(target.parent) == ["result.json"]


def test_cli_reports_os_errors_of_non_atomic_writes(tmp_path, monkeypatch, caplog):
    from mcibi import cli

    def full(a):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data" / "x.png"))

    monkeypatch.setattr(cli, "_cmd_prepare", full)
    assert cli.main(["prepare", "demo"]) == 1
    assert "cannot write" in caplog.text and "x.png" in caplog.text and "no space left" in caplog.text


@pytest.mark.slow
def test_resume_whose_mlflow_run_is_gone_logs_to_a_new_run(data_root, tmp_path):
    params = load_params(tiny_params(tmp_path / "params", memory="none", epochs=1))
    out = tmp_path / "run"
    first = loop.train(params, data_root, out, tracking_uri=f"sqlite:///{tmp_path / 'a.db'}", threads=1)
    (out / "model.pt").unlink()  # resumed from the last checkpoint, against another (empty) store
    again = loop.train(params, data_root, out, tracking_uri=f"sqlite:///{tmp_path / 'b.db'}", threads=1)
    assert again.resumed_from == first.iterations and again.run_id and again.run_id != first.run_id


def test_channels_last_training_on_an_avx2_cpu_warns(data_root, tmp_path, monkeypatch, caplog):
    """train.channels_last on a CPU without AVX-512 slows the convolutions' backward pass (bench/step.py): the
    run says so and what to set (it still trains: the result is the same up to rounding)."""
    params = load_params(tiny_params(tmp_path / "params", memory="none", epochs=1, channels_last=True))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with caplog.at_level("WARNING", logger="mcibi.engine.train"):
        loop.train(params, data_root, tmp_path / "run", threads=1)
    assert "set train.channels_last: auto" in caplog.text and str(params.path) in caplog.text


@pytest.mark.parametrize(("capability", "device", "expected"), [
    ("AVX2", "cpu", False), ("DEFAULT", "cpu", False), ("AVX512", "cpu", True), ("AVX2", "cuda", True),
])
def test_channels_last_auto_trains_nhwc_only_where_it_is_faster(monkeypatch, capability, device, expected):
    """``auto`` is NHWC on CUDA and AVX-512 CPUs and NCHW on AVX2 CPUs (bench/step.py); true and false are kept."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    dev = torch.device(device)
    assert layout.train_channels_last("auto", dev) is expected
    assert layout.train_channels_last(True, dev) is True and layout.train_channels_last(False, dev) is False
