"""The SLURM cluster tests: they start a single-node SLURM (root, the distribution's packages) and an MLflow
server, so the normal suite leaves them out; `.ci/cluster` runs them as CI's own step after the suite:
``pytest tests/cluster -m cluster -n 0`` (docs/scaling.md, "Testing on a real SLURM").

A test marked ``cluster`` is deselected (and the run's summary says so) unless the ``-m`` expression names
``cluster``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from local_slurm import LocalSlurm


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cluster: needs root and a local SLURM (.ci/cluster runs these)")


def pytest_collection_modifyitems(config, items) -> None:
    if "cluster" in (config.option.markexpr or ""):
        return
    cluster = [item for item in items if item.get_closest_marker("cluster")]
    if cluster:
        config.hook.pytest_deselected(items=cluster)
        items[:] = [item for item in items if not item.get_closest_marker("cluster")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-node cluster without accounting storage (the plugin's sacct then fails: squeue must be used);
    MinJobAge one hour so that squeue still lists every job of the run at its end."""
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), min_job_age=3600) as cluster:
        yield cluster


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and served artifacts, as a site runs it."""

    def __init__(self, folder: Path):
        self.folder = folder
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("mlflow")
        self.log = open(folder / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [str(exe if exe.is_file() else shutil.which("mlflow")), "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))

    def wait(self, timeout: float = 180) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                time.sleep(1)
        raise RuntimeError("mlflow server did not answer /health")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn workers (its own session)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()
