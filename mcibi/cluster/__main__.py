"""``python -m mcibi.cluster``: what the SLURM cluster offers (partitions, node sizes, accounting, the job-status
command the workflow will use); ``python -m mcibi.cluster check TARGET... [SNAKEMAKE ARGS]``: the SLURM profile's
pre-flight alone. It builds the workflow's jobs as ``snakemake --workflow-profile profiles/slurm TARGET...`` would
and checks each one's request against its partition, submitting nothing; exit status 0 when every job fits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from mcibi.cluster.profile import PREFLIGHT_ENV, PREFLIGHT_PASSED
from mcibi.cluster.slurm import ClusterError, choose_status_command, cluster_facts


def _summary() -> int:
    facts = cluster_facts()
    if facts is None:
        print("no SLURM here: scontrol is not installed", file=sys.stderr)
        return 1
    print(facts.summary())
    try:
        command, why = choose_status_command("sacct", facts.config, facts.sacct_error, 5)
        print(f"job states: {command} ({why})")
    except ClusterError as exc:
        print(f"job states: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcibi.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=("summary", "check"), default="summary")
    parser.add_argument("--profile", default="profiles/slurm", help="the SLURM workflow profile (profiles/slurm)")
    args, snakemake_args = parser.parse_known_args(argv)
    if args.action == "summary":
        return _summary()
    # --forceall: every job of the targets is checked, also those whose outputs exist (nothing runs either way)
    cmd = [sys.executable, "-m", "snakemake", "--workflow-profile", args.profile, "--forceall", *snakemake_args]
    proc = subprocess.run(cmd, env=dict(os.environ, **{PREFLIGHT_ENV: "only"}), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    keep = [line for line in out.splitlines()
            if line.startswith(("mcibi", "  - ", "SLURM ", "* ", "  partition", "WorkflowError", "Error"))
            or "pre-flight" in line or "job states come from" in line]
    keep = [line for line in keep if not line.startswith("SLURM run ID")]
    passed = PREFLIGHT_PASSED in out
    if passed:
        keep = [line for line in keep if line != "WorkflowError:" and "nothing submitted)" not in line]
    print("\n".join(keep) if keep else out[-4000:])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
