"""An unusable tracking store stops a command within seconds, before any work, with a message naming the URI and
the choices (start it, unset MLFLOW_TRACKING_URI, work without tracking and log later): a port that refuses, a
server that accepts but never answers (MLflow's own client retries those for minutes), a missing SQLite folder."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from checkout import ROOT

from mcibi.cli import main
from mcibi.tracking.store import TrackingStoreError, check_tracking_store

DEMO = ROOT / "params" / "demo" / "upernet_mcibipp.yaml"


def _refusing_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on leaving: nothing listens there


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers; yields its URI."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def answering_server():
    """An HTTP server answering /health with 200 and everything else with 404; yields its URI."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _fails_fast(argv, uri, monkeypatch, caplog, seconds: float) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="mcibi"):
        assert main(argv) == 1
    assert time.monotonic() - start < seconds
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is None  # one message, no traceback
    return record.getMessage()


def test_train_against_a_refusing_port_stops_at_once(tmp_path, monkeypatch, caplog):
    uri = f"http://127.0.0.1:{_refusing_port()}"
    message = _fails_fast(["train", str(DEMO), "--out", str(tmp_path / "run")], uri, monkeypatch, caplog, 3)
    assert f"{uri} (MLFLOW_TRACKING_URI)" in message and "connection refused" in message
    assert "start the server" in message and "unset MLFLOW_TRACKING_URI" in message
    assert "--no-tracking" in message and "mcibi log-run" in message
    assert not (tmp_path / "run").exists()  # nothing was done


def test_train_against_a_server_that_never_answers_stops_within_seconds(silent_server, tmp_path, monkeypatch,
                                                                        caplog):
    message = _fails_fast(["train", str(DEMO), "--out", str(tmp_path / "run")], silent_server, monkeypatch, caplog, 9)
    assert silent_server in message and "no answer within" in message and "--no-tracking" in message


def test_evaluate_figures_predict_register_check_the_store_first(tmp_path, monkeypatch, caplog):
    """Commands that use a tracking URI check it before working: evaluate and figures for a run logged to
    MLflow (the checkpoint need not even exist yet), predict for an MLflow run id, register, log-run."""
    uri = f"http://127.0.0.1:{_refusing_port()}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": "a" * 32}))
    for argv, offline in (
            (["evaluate", str(DEMO), "--checkpoint", str(run_dir / "model.pt"), "--protocol", "ss"], "--no-tracking"),
            (["figures", str(DEMO), "--run-dir", str(run_dir)], "--no-tracking"),
            (["predict", str(tmp_path), "--run", "a" * 32, "--out", str(tmp_path / "out")], "--checkpoint"),
            (["register", str(run_dir), "--name", "x"], ""),
            (["log-run", str(run_dir)], "")):
        caplog.clear()
        message = _fails_fast(argv, uri, monkeypatch, caplog, 3)
        assert uri in message and "connection refused" in message and offline in message, (argv, message)


def test_a_run_trained_without_tracking_is_evaluated_without_the_store(tmp_path, monkeypatch, caplog):
    """No MLflow run in run.json: evaluate and figures do not touch the store, so a dead one does not stop them
    (the failure is then the missing checkpoint, not the store)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": None}))
    message = _fails_fast(["evaluate", str(DEMO), "--checkpoint", str(run_dir / "model.pt"), "--protocol", "ss",
                           "--data-root", str(tmp_path / "data")], f"http://127.0.0.1:{_refusing_port()}",
                          monkeypatch, caplog, 60)
    assert "MLflow" not in message


def test_an_answering_server_passes(answering_server):
    check_tracking_store(answering_server)
    check_tracking_store(answering_server + "/no-health-route")  # a 404 is an answer too


def test_sqlite_and_file_stores_are_checked_for_a_usable_path(tmp_path):
    check_tracking_store(f"sqlite:///{tmp_path / 'mlflow.db'}")  # created by MLflow on first use
    check_tracking_store(str(tmp_path / "mlruns" / "deeper"))
    with pytest.raises(TrackingStoreError, match=r"the folder .*missing of mlflow.db does not exist.*fix the path"):
        check_tracking_store(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    (tmp_path / "notes.db").write_text("not a database")
    with pytest.raises(TrackingStoreError, match=r"notes.db is not an SQLite database"):
        check_tracking_store(f"sqlite:///{tmp_path / 'notes.db'}")
    (tmp_path / "file").write_text("")
    with pytest.raises(TrackingStoreError, match=r"file is not a folder"):
        check_tracking_store(f"file://{tmp_path / 'file' / 'mlruns'}")
