"""How long the demo chain waits on SLURM between its stages: the profile's settings against the plugin's defaults
(first status poll 40 s after a submission, the data steps as three jobs). Not a test (root, minutes):

    sudo .venv/bin/python tests/cluster/measure_latency.py [--epochs 2]

Starts a local single-node SLURM (tests/support/local_slurm.py), runs the shrunk demo chain once per setting in a
fresh copy and prints, per setting, the wall time, the SLURM submissions and the seconds from each SLURM job's end
to Snakemake noticing it (docs/scaling.md quotes the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from checkout import copy_repo  # noqa: E402
from local_slurm import LocalSlurm, snakemake_latencies  # noqa: E402

SITE = {"partitions": {"cpu": "debug", "gpu": "debug"}, "set-threads": {"prepare": 2}}
SETTINGS = {
    "plugin defaults (40 s first poll, data steps as 3 jobs)": {"slurm-init-seconds-before-status-checks": 40,
                                                               "groups": None},
    "profile (5 s first poll, data steps grouped)": {},
}


def shrink(repo: Path, epochs: int) -> None:
    defaults = repo / "params" / "demo" / "defaults.yaml"
    d = yaml.safe_load(defaults.read_text())
    d["data"]["crop_size"] = [48, 48]
    d["data"]["train_resize"]["size"] = d["data"]["test_resize"]["size"] = [64, 64]
    d["model"]["channels"] = {"feats": 16, "transform": 8, "decoder": 16, "aux": 16}
    d["model"]["pool_scales"] = [1, 2]
    d["train"]["epochs"] = epochs
    d["train"]["resources"]["mem_mb"] = d["evaluate"]["resources"]["mem_mb"] = 2000
    d["evaluate"]["protocols"] = {"ss": d["evaluate"]["protocols"]["ss"]}
    defaults.write_text(yaml.safe_dump(d))


def measure(slurm: LocalSlurm, folder: Path, site: dict, epochs: int) -> dict:
    repo = copy_repo(folder / "repo")
    shrink(repo, epochs)
    (repo / "profiles" / "slurm" / "site.yaml").write_text(yaml.safe_dump({**SITE, **site}))
    env = dict(slurm.env, PYTHONPATH=str(repo), MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    before = {j["id"] for j in slurm.jobs()}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm", "results/demo"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.time() - start
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(log[-4000:])
    jobs = {j["id"]: j for j in slurm.jobs() if j["id"] not in before}
    waits = snakemake_latencies(log, jobs)
    return {"seconds": round(seconds), "submissions": len(jobs), "wait_total_s": sum(waits.values()),
            "wait_median_s": statistics.median(waits.values()), "wait_max_s": max(waits.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalSlurm(Path(tmp) / "slurm", min_job_age=3600) as slurm:
        results = {name: measure(slurm, Path(tmp) / f"run{i}", site, args.epochs)
                   for i, (name, site) in enumerate(SETTINGS.items())}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
