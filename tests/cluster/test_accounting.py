"""With accounting storage (slurmdbd + MariaDB) the plugin follows jobs with sacct, which writes an operator's
cancellation as 'CANCELLED by <uid>': the run reports the job as failed instead of waiting for it for ever, and
completes jobs as usual. Run by `.ci/cluster` (root): see tests/cluster/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from checkout import copy_repo
from local_slurm import LocalSlurm

pytestmark = pytest.mark.cluster
SITE = {"partitions": {"cpu": "debug", "gpu": "debug"}, "set-threads": {"prepare": 2}}


@pytest.fixture(scope="module")
def accounting_slurm(tmp_path_factory):
    with LocalSlurm(tmp_path_factory.mktemp("slurmdbd"), accounting=True) as cluster:
        yield cluster


def test_sacct_cancelled_by_an_operator_fails_the_job_instead_of_hanging(accounting_slurm, tmp_path):
    slurm = accounting_slurm
    repo = copy_repo(tmp_path / "repo")
    (repo / "profiles" / "slurm" / "site.yaml").write_text(yaml.safe_dump(SITE))
    env = dict(slurm.env, PYTHONPATH=str(repo), MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    summary = subprocess.run([sys.executable, "-m", "mcibi.cluster"], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=120)
    assert "accounting_storage/slurmdbd (sacct answers)" in summary.stdout and "job states: sacct" in summary.stdout

    blocker = slurm.sbatch("-c", str(slurm.cpus), "--mem", "100", "-o", "/dev/null", "--wrap", "sleep 600")
    cmd = [sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm", "--retries", "0",
           "downloads/demo/downloaded.json"]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cancelled, deadline = None, time.time() + 300
        while cancelled is None and time.time() < deadline and proc.poll() is None:
            for job in slurm.jobs():
                if job["comment"] == "rule_download_wildcards_demo" and job["state"] == "PENDING":
                    slurm._run("scancel", job["id"])
                    cancelled, at = job["id"], time.time()
            time.sleep(0.5)
        assert cancelled, "the download job never waited in the queue"
        out, _ = proc.communicate(timeout=240)  # it used to wait for ever
    finally:
        if proc.poll() is None:
            proc.kill()
        slurm._run("scancel", blocker, check=False)
    seconds = time.time() - at
    state = slurm._run("sacct", "-X", "-n", "-P", "-j", cancelled, "--format=State").stdout.strip()
    assert state.startswith("CANCELLED by "), state  # what the plugin alone compares with 'CANCELLED' and misses
    assert proc.returncode != 0 and f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in out, out
    assert "job states come from sacct" in out
    print(f"cancelled job reported as failed {seconds:.0f} s after scancel")

    # and jobs complete as usual through sacct (the data preparation, one group job)
    done = subprocess.run([sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm",
                           "data/demo/verified.json"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    states = {j["state"] for j in slurm.jobs() if j["id"] not in (blocker, cancelled)}
    assert states == {"COMPLETED"}, slurm.jobs()
