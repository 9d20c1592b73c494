"""The demo chain on a real single-node SLURM (no accounting storage) through `dvc repro` and profiles/slurm, with
one MLflow server for every job: each job goes through sbatch and completes; a training requeued mid-way and then
cut by its wall time resumes and ends with the weights of an uninterrupted run; an operator's scancel is retried.
The pre-flight's messages come from the same cluster. Run by `.ci/cluster` (root): see tests/cluster/conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from checkout import ROOT, copy_repo
from local_slurm import snakemake_latencies

pytestmark = pytest.mark.cluster

VENV_BIN = Path(sys.executable).parent
SITE = {"partitions": {"cpu": "debug", "gpu": "debug"}, "set-threads": {"prepare": 2}}
INTERRUPTED, TWIN = "upernet_mcibipp", "upernet_baseline"  # the twin trains the same trajectory, uninterrupted


def _tiny_demo(repo: Path) -> None:
    """The demo shrunk (48 px crops, 16 channels, one protocol) but long enough to be requeued and then cut by a
    one-minute wall time mid-way (600 iterations, a checkpoint every 15); upernet_baseline becomes an exact twin
    of upernet_mcibipp (same trajectory), the reference the interrupted run must equal."""
    defaults = repo / "params" / "demo" / "defaults.yaml"
    d = yaml.safe_load(defaults.read_text())
    d["data"]["crop_size"] = [48, 48]
    d["data"]["train_resize"]["size"] = [64, 64]
    d["data"]["test_resize"]["size"] = [64, 64]
    d["model"]["channels"] = {"feats": 16, "transform": 8, "decoder": 16, "aux": 16}
    d["model"]["pool_scales"] = [1, 2]
    d["train"].update({"epochs": 20, "checkpoint_every": 15, "keep_checkpoints": 2, "log_every": 15})
    d["train"]["resources"]["mem_mb"] = d["evaluate"]["resources"]["mem_mb"] = 2000
    d["evaluate"]["protocols"] = {"ss": d["evaluate"]["protocols"]["ss"]}
    defaults.write_text(yaml.safe_dump(d))
    twin = yaml.safe_load((repo / "params" / "demo" / f"{INTERRUPTED}.yaml").read_text())
    twin["description"] = f"the uninterrupted twin of {INTERRUPTED} (cluster test)"
    (repo / "params" / "demo" / f"{TWIN}.yaml").write_text(yaml.safe_dump(twin))
    (repo / "profiles" / "slurm" / "site.yaml").write_text(yaml.safe_dump(SITE))


def _env(slurm, **extra) -> dict[str, str]:
    return dict(slurm.env, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
                OMP_NUM_THREADS="1", **extra)


def test_preflight_says_which_rule_resource_and_file_to_change(slurm, tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = _env(slurm, PYTHONPATH=str(repo))
    check = [sys.executable, "-m", "mcibi.cluster", "check", "results/demo"]
    proc = subprocess.run(check, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "job states come from squeue, not sacct: sacct does not answer (Slurm accounting storage is disabled)" in out
    assert "partition 'gpu' does not exist (this cluster has debug), yet rule(s) " in out and "train (2 job(s))" in out
    assert "`partitions: {cpu: <partition>}` renames it for every rule" in out
    (repo / "profiles" / "slurm" / "site.yaml").write_text(yaml.safe_dump({"partitions": SITE["partitions"]}))
    proc = subprocess.run(check, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "rule prepare (demo): asks 8 CPUs (threads) per node, but the largest node of " \
        "partition 'debug'" in out and "set `set-threads: {prepare: " in out, out
    # GPUs on a cluster without any: said before sbatch refuses them
    defaults = repo / "params" / "demo" / "defaults.yaml"
    d = yaml.safe_load(defaults.read_text())
    d["train"]["resources"]["gpus"] = 1
    defaults.write_text(yaml.safe_dump(d))
    (repo / "profiles" / "slurm" / "site.yaml").write_text(yaml.safe_dump(SITE))
    proc = subprocess.run(check, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "asks 1 GPU(s), but this cluster has no GPUs configured" in out, out
    assert "set train.resources.gpus in the run's params file" in out
    d["train"]["resources"]["gpus"] = 0
    defaults.write_text(yaml.safe_dump(d))
    proc = subprocess.run(check, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "mcibi SLURM pre-flight passed: 15 job(s)" in proc.stdout, proc.stdout


class _Watcher:
    """Follows the run's SLURM jobs (squeue) and plays the operator: requeues the interrupted training once it has
    a checkpoint and gives its second attempt a one-minute wall time, and cancels the twin's evaluation."""

    def __init__(self, slurm, repo: Path):
        self.slurm, self.repo = slurm, repo
        self.seen: dict[str, dict[str, str]] = {}
        self.requeued = self.released = self.cancelled = None

    def _checkpoints(self, run: str) -> list[Path]:
        return sorted((self.repo / "runs" / "demo" / run / "checkpoints").glob("iter_*.pt"))

    def poll(self) -> None:
        for job in self.slurm.jobs():
            self.seen[job["id"]] = job
            comment, state = job["comment"], job["state"]
            if (self.requeued is None and comment == f"rule_train_wildcards_demo_{INTERRUPTED}"
                    and state == "RUNNING" and self._checkpoints(INTERRUPTED)):
                self.slurm.scontrol("requeue", job["id"])
                self.requeued = job["id"]
            elif job["id"] == self.requeued and self.released is None and state == "PENDING":
                # requeued jobs wait two minutes (BeginTime); the second attempt gets one minute of wall time
                self.slurm.scontrol("update", f"JobId={job['id']}", "StartTime=now", "TimeLimit=1")
                self.released = time.time()
            elif (self.cancelled is None and comment == f"rule_evaluate_wildcards_demo_{TWIN}_ss"
                  and state in ("PENDING", "RUNNING")):
                self.slurm._run("scancel", job["id"])
                self.cancelled = job["id"]


def test_demo_chain_through_dvc_repro_on_slurm(slurm, mlflow_server, tmp_path):
    started = time.time()
    repo = copy_repo(tmp_path / "repo")
    _tiny_demo(repo)
    dvc = str(VENV_BIN / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True)
    for f in (".dvc/config", ".dvcignore"):
        (repo / f).write_text((ROOT / f).read_text())
    uri = mlflow_server.wait()
    env = _env(slurm, PYTHONPATH=str(repo), SNAKEMAKE_PROFILE="profiles/slurm", MLFLOW_TRACKING_URI=uri)
    log_file = tmp_path / "dvc_repro.log"
    watcher = _Watcher(slurm, repo)
    with open(log_file, "w") as log:
        proc = subprocess.Popen([dvc, "repro", "results@demo"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 1500
        while proc.poll() is None and time.time() < deadline:
            watcher.poll()
            time.sleep(1)
        if proc.poll() is None:
            proc.kill()
    watcher.poll()
    out = log_file.read_text()
    assert proc.returncode == 0, out[-6000:] + "\n" + slurm.logs()
    seconds = time.time() - started

    # every non-local job went through sbatch, and every SLURM job completed but the two the test interrupted
    submissions = re.findall(r"Job (\S+) has been submitted with SLURM jobid (\d+)", out)
    rules = {m for m in re.findall(r"\n(?:rule|group job) (\w+)", out)}
    assert {"download", "train", "evaluate", "figures", "report"} <= rules and "Group job data" in out
    states = {i: j["state"] for i, j in watcher.seen.items()}
    assert {sid for _, sid in submissions} == set(states), (submissions, states)
    assert states.pop(watcher.requeued) == "TIMEOUT" and states.pop(watcher.cancelled) == "CANCELLED"
    assert set(states.values()) == {"COMPLETED"}, states
    assert len(submissions) == 11  # download, data group, 2 train + retry, 2 evaluate + retry, 2 figures, report

    # the requeued, then timed-out training resumed each time and ends with the uninterrupted twin's weights
    assert "SLURM status is: 'TIMEOUT'" in out and "SLURM status is: 'CANCELLED'" in out
    logs = repo / "logs" / "train" / "demo"
    attempts = (logs / f"{INTERRUPTED}.log.attempts").read_text()  # every attempt; the .log: the last one
    assert attempts.count("===== attempt") == 3 and attempts.count(f"resuming demo/{INTERRUPTED} from") == 2
    assert f"(SLURM job {watcher.requeued} restart 1," in attempts  # the requeued attempt: SLURM_RESTART_COUNT=1
    last = (logs / f"{INTERRUPTED}.log").read_text()
    assert last.count("===== attempt") == 1 and attempts.endswith(last)
    slurm_log = repo / "logs" / "slurm" / "rule_train" / f"demo_{INTERRUPTED}" / f"{watcher.requeued}.log"
    text = slurm_log.read_text()  # both attempts of the requeued job, appended (--open-mode=append)
    assert "DUE TO JOB REQUEUE" in text and "DUE TO TIME LIMIT" in text, text[-3000:]
    import torch

    from mcibi.models.checkpoint import load_checkpoint

    a = load_checkpoint(repo / "runs" / "demo" / INTERRUPTED / "model.pt")["state_dict"]
    b = load_checkpoint(repo / "runs" / "demo" / TWIN / "model.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]
    # the cancelled evaluation was submitted again and completed
    assert json.loads((repo / "runs" / "demo" / TWIN / "eval" / "ss.json").read_text())["mIoU"] > 0

    # one tracking server: every job's runs, metrics and models are there, and the table links to it
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mcibi-demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and len(runs) == 4  # one resumed run per training (not one per attempt) + ss children
    for r in parents:
        assert {"mIoU.ss", "loss_total"} <= set(r.data.metrics)
        assert len(client.get_metric_history(r.info.run_id, "loss_total")) >= 600 // 15
    assert len(client.search_logged_models([exp.experiment_id])) == 2
    table = (repo / "results" / "demo" / "table.md").read_text()
    assert table.count(f"{uri}/#/experiments/{exp.experiment_id}/runs/") == 2, table

    # DVC ran it: the stage is recorded and a second repro does nothing
    assert "results@demo" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    again = subprocess.run([dvc, "repro", "results@demo"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout + again.stderr

    latency = snakemake_latencies(out, watcher.seen)
    report = {"seconds": round(seconds), "jobs": len(submissions),
              "latency_s": {"median": statistics.median(latency.values()), "max": max(latency.values()),
                            "per_job": latency}}
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
    print(f"SLURM demo chain: {report['seconds']} s, {report['jobs']} submissions, job end -> Snakemake noticed: "
          f"median {report['latency_s']['median']:.0f} s, max {report['latency_s']['max']:.0f} s")


def test_too_short_min_job_age_without_accounting_stops_with_what_to_set(slurm, tmp_path):
    """Last (it changes the cluster): squeue would forget finished jobs between two polls."""
    conf = slurm.conf.read_text()
    slurm.conf.write_text(re.sub(r"MinJobAge=\d+", "MinJobAge=60", conf))
    try:
        slurm.scontrol("reconfigure")
        repo = copy_repo(tmp_path / "repo")
        (repo / "profiles" / "slurm" / "site.yaml").write_text(yaml.safe_dump(SITE))
        proc = subprocess.run([sys.executable, "-m", "mcibi.cluster", "check", "results/demo"], cwd=repo,
                              env=_env(slurm, PYTHONPATH=str(repo)), capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "squeue forgets a finished job after MinJobAge=60 s" in out, out
        assert "MinJobAge=300 (or more) in slurm.conf" in out
        assert "AccountingStorageType=accounting_storage/slurmdbd" in out
    finally:
        slurm.conf.write_text(conf)
        slurm.scontrol("reconfigure")
