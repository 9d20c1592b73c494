"""Cluster wiring: the SLURM profile plans GPU jobs with the resources the params state, launched by torchrun."""

import subprocess
import sys

import pytest
import yaml
from checkout import copy_repo


def test_launcher_and_threads_follow_the_resources():
    from mcibi.spec.params import ResourceParams
    from mcibi.spec.runs import job_threads, launcher

    cpu = ResourceParams(gpus=0, cpus_per_gpu=2, mem_mb=1000, runtime=10)
    one, four = ResourceParams(1, 8, 1000, 10), ResourceParams(4, 8, 1000, 10)
    assert launcher(cpu) == launcher(one) == "mcibi" and job_threads(cpu) == 2 and job_threads(one) == 8
    assert launcher(four) == "torchrun --standalone --nproc_per_node=4 -m mcibi" and job_threads(four) == 32


def test_slurm_profile_plans_torchrun_jobs_with_param_resources(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    repo = copy_repo(tmp_path / "repo")
    defaults = repo / "params" / "demo" / "defaults.yaml"
    data = yaml.safe_load(defaults.read_text())
    data["train"]["resources"] = {"gpus": 4, "cpus_per_gpu": 8, "mem_mb": 64000, "runtime": 1440}
    data["evaluate"]["resources"] = {"gpus": 1, "cpus_per_gpu": 4, "mem_mb": 16000, "runtime": 120}
    defaults.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--workflow-profile",
                           "profiles/slurm", "results/demo"], cwd=repo, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "torchrun --standalone --nproc_per_node=4 -m mcibi train params/demo/upernet_mcibipp.yaml" in out
    assert "mcibi evaluate params/demo/upernet_mcibipp.yaml" in out and "torchrun" not in out.split(
        "rule evaluate:")[1].split("rule ")[0]
    train_job = out.split("rule train:")[1].split("Shell command")[0]
    for item in ("mem_mb=64000", "runtime=1440", "gpu=4", "cpus_per_task=32", "slurm_partition=gpu"):
        assert item in train_job, (item, train_job)
    assert "--threads 8" in out  # torch threads per process = cpus_per_gpu
