"""No traceback for an expected error: `mcibi` logs one message naming the file or program and what to do, and
exits 1 (130 when interrupted); an unexpected error (a bug) keeps its traceback."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from checkout import ROOT

from mcibi import cli


def _error(caplog) -> str:
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is None
    return record.getMessage()


def test_dvc_commit_without_dvc_says_what_to_install(tmp_path, monkeypatch, caplog):
    """No dvc beside the interpreter nor on PATH: formerly `ERROR mcibi: 2`."""
    (tmp_path / "repo" / ".dvc").mkdir(parents=True)
    (tmp_path / "repo" / "data.dvc").write_text("outs:\n- md5: 0\n  path: data\n")
    (tmp_path / "bin").mkdir()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "elsewhere" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert cli.main(["dvc-commit", "--repo", str(tmp_path / "repo")]) == 1
    message = _error(caplog)
    assert message.startswith("dvc: no dvc program") and "on PATH" in message and "Install DVC" in message
    assert str(tmp_path / "repo") in message


def test_a_program_or_file_the_os_cannot_find_is_named(tmp_path, monkeypatch, caplog):
    def missing_program(a):
        subprocess.run(["no-such-program-here", "--version"], check=False)

    monkeypatch.setattr(cli, "_cmd_verify_data", missing_program)
    assert cli.main(["verify-data", "demo"]) == 1
    assert _error(caplog).startswith("no-such-program-here: no such file, folder or program")
    caplog.clear()
    record = tmp_path / "missing.json"
    assert cli.main(["prepare", "demo", "--archive-record", str(record)]) == 1  # read by open(): formerly "2"
    assert _error(caplog) == f"{record}: no such file or directory: check the path, then rerun."


@pytest.mark.parametrize(("argv", "says"), [
    (["train", "nowhere/x.yaml"], "nowhere/x.yaml: no such params file"),  # ParamsError
    (["convert", "official.pth", str(ROOT / "params" / "demo" / "upernet_mcibipp.yaml"), "--out", "m.pt"],
     "official.pth: no such file"),  # CheckpointError
])
def test_mcibi_errors_name_the_file(argv, says, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, *(["--no-tracking"] if argv[0] == "train" else [])]) == 1
    assert says in _error(caplog)


def test_mlflow_errors_name_the_store(tmp_path, monkeypatch, caplog):
    from mlflow.exceptions import MlflowException

    def unknown_run(a):
        raise MlflowException("Run with id=0123 not found\nmore detail", error_code="RESOURCE_DOES_NOT_EXIST")

    monkeypatch.setattr(cli, "_cmd_register", unknown_run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cli.main(["register", "0123", "--name", "x"]) == 1
    message = _error(caplog)
    assert message.startswith(f"MLflow, tracking store sqlite:///{tmp_path / 'mlflow.db'}: Run with id=0123 not "
                              "found. Check") and "more detail" not in message


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), KeyError("state_dict"), AttributeError("x")])
def test_unexpected_errors_keep_their_traceback(bug, monkeypatch):
    def broken(a):
        raise bug

    monkeypatch.setattr(cli, "_cmd_validate", broken)
    with pytest.raises(type(bug)):
        cli.main(["validate", "x.yaml"])


def test_interrupted(monkeypatch, caplog):
    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_validate", interrupted)
    assert cli.main(["validate", "x.yaml"]) == 130
    assert "interrupted" in _error(caplog)


def test_the_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mcibi", "train", "missing.yaml"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("missing.yaml: no such params file. Experiments live in "
                                        "params/<dataset>/<name>.yaml."), proc.stderr
