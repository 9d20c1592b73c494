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
    # a site file renames the profile's partitions (profiles/slurm/site.yaml, merged by the profile)
    (repo / "profiles" / "slurm" / "site.yaml").write_text("partitions: {cpu: short, gpu: a100}\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--workflow-profile",
                           "profiles/slurm", "results/demo"], cwd=repo, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "torchrun --standalone --nproc_per_node=4 -m mcibi train params/demo/upernet_mcibipp.yaml" in out
    assert "mcibi evaluate params/demo/upernet_mcibipp.yaml" in out and "torchrun" not in out.split(
        "rule evaluate:")[1].split("rule ")[0]
    train_job = out.split("rule train:")[1].split("Shell command")[0]
    for item in ("mem_mb=64000", "runtime=1440", "gpu=4", "cpus_per_task=32", "slurm_partition=a100"):
        assert item in train_job, (item, train_job)
    figures_job = out.split("rule figures:")[1].split("Shell command")[0]
    assert "slurm_partition=short" in figures_job and "gpu=0" in figures_job  # no GPU partition for figures
    assert "--threads 8" in out  # torch threads per process = cpus_per_gpu


# ------------------------------------------------------------------------------ the SLURM checks (no SLURM needed)
# recorded from the tests' local SLURM 22.05 (tests/support/local_slurm.py) and edited into a two-partition site
CONFIG = """Configuration data as of 2026-12-06T16:27:51
AccountingStorageType   = accounting_storage/none
GresTypes               = (null)
MinJobAge               = 300 sec
PreemptMode             = OFF
SLURM_VERSION           = 22.05.8
"""
NODES = """NodeName=cpu1 CPUTot=4 Gres=(null) OS=Linux 6.1 #1 SMP RealMemory=16000 State=IDLE Partitions=short
NodeName=gpu1 CPUTot=32 Gres=gpu:a100:4(S:0-1) RealMemory=256000 State=MIXED Partitions=a100
"""
PARTITIONS = """PartitionName=short Default=YES MaxNodes=UNLIMITED MaxTime=02:00:00 Nodes=cpu1 State=UP
PartitionName=a100 Default=NO MaxNodes=1 MaxTime=1-00:00:00 Nodes=gpu1 State=UP MaxCPUsPerNode=UNLIMITED
"""


def test_status_command_follows_accounting_and_min_job_age():
    from mcibi.cluster.slurm import ClusterError, choose_status_command, parse_config

    config = parse_config(CONFIG)
    assert not config.accounting_enabled and config.min_job_age == 300 and not config.has_gpus
    # the plugin's default (sacct) fails every poll without accounting storage: squeue keeps jobs 300 s, enough
    command, why = choose_status_command("sacct", config, "Slurm accounting storage is disabled", 5)
    assert command == "squeue" and "accounting storage is disabled" in why
    assert choose_status_command("sacct", config, None, 5)[0] == "sacct"
    short = parse_config(CONFIG.replace("300 sec", "60 sec"))
    with pytest.raises(ClusterError) as err:
        choose_status_command("sacct", short, "Slurm accounting storage is disabled", 5)
    assert "MinJobAge=300" in str(err.value) and "AccountingStorageType=accounting_storage/slurmdbd" in str(err.value)


def test_cancelled_by_an_operator_and_unrequeued_preemption_read_as_failures():
    from mcibi.cluster.slurm import StateTracker, normalise_state

    assert normalise_state("CANCELLED by 0") == "CANCELLED" and normalise_state("RUNNING") == "RUNNING"
    no_requeue = StateTracker(requeue=True, preempt_mode="CANCEL")
    assert no_requeue({"7": "PREEMPTED", "8": "CANCELLED by 1000"}) == {"7": "FAILED", "8": "CANCELLED"}
    assert "preempted" in no_requeue.reported[0]
    requeue = StateTracker(requeue=True, preempt_mode="REQUEUE", grace=60)
    assert requeue({"7": "PREEMPTED"}, now=0) == {"7": "PREEMPTED"}  # SLURM puts it back in the queue
    assert requeue({"7": "PREEMPTED"}, now=61) == {"7": "FAILED"}  # ... unless it does not


def test_requests_are_checked_against_what_the_partitions_offer():
    from mcibi.cluster.slurm import (
        Request,
        check_group_runtimes,
        check_requests,
        parse_config,
        parse_partitions,
        slurm_minutes,
    )

    assert [slurm_minutes(v) for v in ("UNLIMITED", "02:00:00", "1-00:00:00", "30", "5:30")] == [None, 120, 1440,
                                                                                                  30, 6]
    parts = parse_partitions(PARTITIONS, NODES)
    assert parts["a100"].nodes[0].gpus == 4 and parts["short"].default and parts["short"].max_time == 120
    gpu_config = parse_config(CONFIG.replace("(null)", "gpu"))
    requests = [
        Request("prepare", "lip", "short", 8, 8000, 0, 720),  # 8 threads on 4-CPU nodes, 12 h on a 2 h partition
        Request("train", "lip/upernet_r50", "a100", 16, 64000, 8, 1440, cpus_from="cpus_per_task"),  # 8 GPUs > 4
        Request("figures", "lip/upernet_r50", "a100", 1, 4000, 0, 30),  # no GPU, on the GPU partition
        Request("evaluate", "lip/upernet_r50/ss", "gpu", 8, 16000, 1, 120),  # no such partition
    ]
    errors, warnings = check_requests(requests, parts, gpu_config, overridden={"prepare": {"runtime"}})
    text = "\n".join(errors)
    assert "rule prepare (lip): asks 8 CPUs (threads) per node" in text and "set `set-threads: {prepare: 4}`" in text
    assert "asks 720 min (runtime), over MaxTime=120 min" in text and "{prepare: {runtime: 120}}" in text
    assert "asks 8 GPUs (gpu) per node" in text and "set train.resources.gpus in the run's params file" in text
    assert "partition 'gpu' does not exist (this cluster has a100, short), yet rule(s) evaluate (1 job(s))" in text
    assert len(errors) == 4
    assert warnings == ["rule figures (lip/upernet_r50): asks no GPU but goes to partition 'a100', whose nodes all "
                        "have GPUs; partitions without GPUs: short"]
    # the data steps of one dataset run as one group job: their runtimes add up
    group = [Request(rule, "lip", "short", 4, 8000, 0, minutes)
             for rule, minutes in (("verify_archives", 30), ("prepare", 90), ("verify_data", 30))]
    assert check_group_runtimes([group], parts) == [
        "group job of lip (verify_archives 30, prepare 90, verify_data 30 min) asks 150 min in total, over MaxTime="
        "120 min of partition 'short': lower their runtime in profiles/slurm/site.yaml (set-resources), or set "
        "`groups: null` there to submit them one by one"]
    # GPUs asked of a cluster that has none configured: sbatch would refuse them, say so first
    errors, _ = check_requests([Request("train", "demo/x", "short", 1, 4000, 1, 60)], parts, parse_config(CONFIG))
    assert "no GPUs configured (GresTypes=(null))" in errors[0] and "Invalid generic resource (gres)" in errors[0]


def _render_profile(repo, monkeypatch, site: str | None):
    from snakemake.profiles import ProfileConfigFileParser

    monkeypatch.chdir(repo)
    if site is not None:
        (repo / "profiles" / "slurm" / "site.yaml").write_text(site)
    with open(repo / "profiles" / "slurm" / "profile.yaml") as f:
        return ProfileConfigFileParser().parse(f)


def test_site_file_is_merged_rule_by_rule_and_resource_by_resource(tmp_path, monkeypatch):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    repo = copy_repo(tmp_path / "repo")
    plain = _render_profile(repo, monkeypatch, None)
    assert "prepare:runtime=720" in plain["set-resources"] and "train:slurm_partition=gpu" in plain["set-resources"]
    assert "figures:slurm_partition=gpu" not in plain["set-resources"]  # figures need no GPU: default (cpu)
    assert "slurm_partition=cpu" in plain["default-resources"] and plain["slurm-keep-successful-logs"]
    site = yaml.safe_dump({"partitions": {"cpu": "short", "gpu": "a100"}, "set-threads": {"prepare": 4},
                           "set-resources": {"prepare": {"mem_mb": 16000}, "train": {"qos": "long"}}, "jobs": 9})
    merged = _render_profile(repo, monkeypatch, site)
    resources = merged["set-resources"]
    assert {"prepare:runtime=720", "prepare:mem_mb=16000", "train:slurm_partition=a100", "train:qos=long",
            "evaluate:slurm_partition=a100", "download:runtime=720"} <= set(resources), resources
    assert "slurm_partition=short" in merged["default-resources"] and merged["set-threads"] == ["prepare=4"]
    assert merged["jobs"] == "9" and merged["executor"] == "slurm"
    from mcibi.cluster.profile import LOADED

    assert LOADED["site"].endswith("site.yaml") and LOADED["profile"]["set-resources"]["prepare"]["mem_mb"] == 16000
    assert "groups" in merged and "groups" not in _render_profile(repo, monkeypatch, "groups: null\n")  # removed


def test_adapters_normalise_the_states_the_plugin_reads():
    pytest.importorskip("snakemake_executor_plugin_slurm")
    import asyncio
    import logging

    import snakemake_executor_plugin_slurm as plugin

    from mcibi.cluster import profile
    from mcibi.cluster.slurm import StateTracker

    assert profile.install_adapters() and profile.install_adapters()  # once, however often the profile is read
    assert plugin.query_job_status.__wrapped__.__module__.endswith("job_status_query")
    profile._TRACKER = StateTracker(requeue=True, preempt_mode="OFF")
    try:
        statuses, _ = asyncio.run(plugin.query_job_status("printf '11|CANCELLED by 0\\n12|PREEMPTED\\n13|RUNNING\\n'",
                                                          logging.getLogger("test")))
    finally:
        profile._TRACKER = None
    assert statuses == {"11": "CANCELLED", "12": "FAILED", "13": "RUNNING"}


def test_table_links_open_the_tracking_server_the_runs_went_to(tmp_path):
    import json

    from mcibi.reports.table import LOCAL_UI, build_table, ui_base
    from mcibi.spec.params import load_params

    assert ui_base("auto", "http://mlflow.cluster:5000") == "http://mlflow.cluster:5000"
    assert ui_base("auto", "sqlite:////x/mlflow.db") == LOCAL_UI and ui_base("https://ui", "http://a:1") == "https://ui"
    runs = tmp_path / "runs"
    for stem, uri in (("upernet_mcibipp", "http://10.0.0.5:5000"), ("upernet_baseline", "sqlite:////x/mlflow.db")):
        (runs / stem / "eval").mkdir(parents=True)
        (runs / stem / "run.json").write_text(json.dumps({"mlflow_run_id": f"id-{stem}", "tracking_uri": uri}))
        (runs / stem / "eval" / "ss.json").write_text(json.dumps({"mIoU": 0.5}))
    exps = [load_params(f) for f in sorted((copy_repo(tmp_path / "repo") / "params" / "demo").glob("upernet_*.yaml"))]
    table = build_table(exps, runs, mlflow_ui="auto", experiment_id="4")
    links = dict(zip(table["Experiment"], table["MLflow link"], strict=True))
    assert links["upernet_mcibipp"] == "http://10.0.0.5:5000/#/experiments/4/runs/id-upernet_mcibipp"
    assert links["upernet_baseline"] == f"{LOCAL_UI}/#/experiments/4/runs/id-upernet_baseline"


def test_command_line_set_resources_that_replaced_the_profiles_are_named(monkeypatch):
    from types import SimpleNamespace

    from mcibi.cluster import profile

    monkeypatch.setattr(profile, "LOADED", {"site": None, "profile": {"set-resources": {
        "download": {"runtime": 720}, "train": {"slurm_partition": "gpu"}, "report": {"runtime": 30}}}})
    # `--set-resources train:mem_mb=1000 report:runtime=30` on the command line: the profile's set-resources is gone
    settings = SimpleNamespace(overwrite_resources={"train": {"mem_mb": 1000}, "report": {"runtime": 30}},
                               overwrite_threads={})
    dropped = profile.dropped_profile_entries(SimpleNamespace(resource_settings=settings))
    assert dropped == ["download (runtime)", "train (slurm_partition)"]
