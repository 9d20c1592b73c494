"""What a SLURM cluster offers, read from ``scontrol`` and ``sacct``, and what the workflow's jobs ask of it.

The parsers take the commands' text (tests feed them recorded outputs); :func:`cluster_facts` runs the commands.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

# The SLURM executor plugin (2.x) waits at most this long between two status polls of its jobs
# (snakemake_executor_plugin_slurm.Executor.check_active_jobs: max_sleep_time).
MAX_POLL_SECONDS = 180
# squeue forgets a finished job MinJobAge seconds after it ended: a poll must come before that, or the plugin
# never learns the job ended and waits for ever.
MIN_JOB_AGE_FOR_SQUEUE = 200
# A job still PREEMPTED after this long is not coming back by itself.
PREEMPTED_GRACE_SECONDS = 300


class ClusterError(RuntimeError):
    """The cluster cannot run the workflow as configured; the message says what to change."""


def run_command(cmd: list[str], timeout: float = 30) -> tuple[int, str]:
    """(exit status, stdout + stderr) of a SLURM command; 127 when it is not installed."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return 127, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(cmd)}: no answer within {timeout:.0f} s"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


# ------------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class SlurmConfig:
    """The slurm.conf settings that decide how the workflow must talk to the cluster."""

    accounting: str  # AccountingStorageType, e.g. accounting_storage/none, accounting_storage/slurmdbd
    min_job_age: int | None  # seconds a finished job stays visible to squeue / scontrol
    preempt_mode: str  # PreemptMode, e.g. OFF, REQUEUE, CANCEL, SUSPEND,GANG
    gres_types: tuple[str, ...]  # GresTypes, e.g. ("gpu",); () when none
    version: str

    @property
    def accounting_enabled(self) -> bool:
        return self.accounting not in ("", "accounting_storage/none", "(null)")

    @property
    def has_gpus(self) -> bool:
        return "gpu" in self.gres_types


def _seconds(value: str) -> int | None:
    """'300 sec', '5 min', '1 hour', '300' -> seconds."""
    m = re.match(r"^(\d+)\s*([a-zA-Z]*)", value.strip())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2).lower()
    if unit.startswith("h"):
        return n * 3600
    if unit.startswith("min") or unit == "m":
        return n * 60
    return n


def parse_config(text: str) -> SlurmConfig:
    """The settings of ``scontrol show config`` output that matter here."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    gres = values.get("GresTypes", "(null)")
    return SlurmConfig(
        accounting=values.get("AccountingStorageType", ""),
        min_job_age=_seconds(values["MinJobAge"]) if "MinJobAge" in values else None,
        preempt_mode=values.get("PreemptMode", "OFF"),
        gres_types=tuple(g.strip() for g in gres.split(",") if g.strip() and gres != "(null)"),
        version=values.get("SLURM_VERSION", ""),
    )


# ----------------------------------------------------------------------------------------- partitions and nodes
@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    partitions: tuple[str, ...]
    state: str

    @property
    def usable(self) -> bool:
        """Up and taking jobs (not DOWN, DRAINED, FAIL, ...)."""
        s = self.state.upper()
        return not any(bad in s for bad in ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "POWERED_DOWN", "FUTURE"))


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    max_time: int | None  # minutes; None = unlimited
    max_nodes: int | None
    max_mem_per_node: int | None  # MB
    state: str
    max_cpus_per_node: int | None = None
    nodes: tuple[Node, ...] = field(default=())

    def describe(self) -> str:
        sizes = sorted({(n.cpus, n.mem_mb, n.gpus) for n in self.nodes}, reverse=True)
        kinds = ", ".join(f"{c} CPUs {m} MB" + (f" {g} GPUs" if g else "") for c, m, g in sizes) or "no nodes"
        limit = "no time limit" if self.max_time is None else f"MaxTime {self.max_time} min"
        return f"partition '{self.name}' ({len(self.nodes)} node(s): {kinds}; {limit}; {self.state})"


def _fields(line: str) -> dict[str, str]:
    """KEY=VALUE pairs of one ``scontrol -o`` line (a value is cut at its first blank: OS= and the like)."""
    return {k: v for k, v in re.findall(r"(\w+)=(\S*)", line)}


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def gres_gpus(gres: str) -> int:
    """GPUs in a node's or a job's GRES string: 'gpu:4', 'gpu:a100:4(S:0-1)', 'gpu:2,gpu:v100:1' -> 4, 4, 3."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres or ""):
        item = re.sub(r"\(.*\)$", "", item.strip())
        if item.split(":")[0] != "gpu":
            continue
        last = item.split(":")[-1]
        total += int(last) if last.isdigit() else 1
    return total


def slurm_minutes(value: str) -> int | None:
    """A SLURM time limit ('UNLIMITED', 'INFINITE', 'mm', 'mm:ss', 'hh:mm:ss', 'd-hh', 'd-hh:mm', 'd-hh:mm:ss')
    in whole minutes (seconds round up); None when unlimited."""
    value = value.strip()
    if value.upper() in ("UNLIMITED", "INFINITE", "NONE", "") or value.upper().startswith("N/A"):
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = 0, parts[0], 0
    return int(days or 0) * 1440 + h * 60 + m + math.ceil(s / 60)


def parse_partitions(partition_text: str, node_text: str) -> dict[str, Partition]:
    """Partitions and their nodes from ``scontrol -o show partition`` and ``scontrol -o show node``."""
    nodes = []
    for line in node_text.splitlines():
        f = _fields(line)
        if "NodeName" not in f:
            continue
        nodes.append(Node(f["NodeName"], _int(f.get("CPUTot")) or 0, _int(f.get("RealMemory")) or 0,
                          gres_gpus(f.get("Gres", "")), tuple(p for p in f.get("Partitions", "").split(",") if p),
                          f.get("State", "UNKNOWN")))
    parts = {}
    for line in partition_text.splitlines():
        f = _fields(line)
        if "PartitionName" not in f:
            continue
        name = f["PartitionName"]
        max_nodes = f.get("MaxNodes", "UNLIMITED")
        parts[name] = Partition(
            name, f.get("Default") == "YES", slurm_minutes(f.get("MaxTime", "UNLIMITED")),
            None if max_nodes.upper() == "UNLIMITED" else _int(max_nodes),
            _int(f.get("MaxMemPerNode")), f.get("State", "UP"), _int(f.get("MaxCPUsPerNode")),
            tuple(n for n in nodes if name in n.partitions))
    return parts


# --------------------------------------------------------------------------------------------- job status query
def choose_status_command(requested: str | None, config: SlurmConfig, sacct_error: str | None,
                          init_seconds: int = 0) -> tuple[str, str]:
    """(status command, why) for the SLURM executor plugin: ``sacct`` where accounting answers, else ``squeue``
    where finished jobs stay visible long enough between polls; raises :class:`ClusterError` otherwise.

    ``sacct_error`` is what a trial ``sacct`` said when it failed (None: it answered). The plugin asked ``sacct``
    on a cluster without accounting storage fails every poll ("Slurm accounting storage is disabled", logged at
    debug level only) and waits for ever; asked ``squeue`` it misses every job that ended more than MinJobAge
    seconds before a poll.
    """
    needed = max(MIN_JOB_AGE_FOR_SQUEUE, 3 * init_seconds)
    age = config.min_job_age
    if requested != "squeue" and sacct_error is None:
        return "sacct", "sacct answers (accounting storage enabled)"
    if age is not None and age >= needed:
        why = ("slurm-status-command: squeue was asked" if requested == "squeue" else
               f"sacct does not answer ({sacct_error.splitlines()[0] if sacct_error else 'unknown'})")
        return "squeue", f"{why}; squeue keeps finished jobs MinJobAge={age} s >= {needed} s"
    reason = (f"sacct does not answer ({sacct_error.splitlines()[0]})" if sacct_error
              else "slurm-status-command is squeue")
    raise ClusterError(
        f"SLURM job states cannot be followed on this cluster: {reason}, and squeue forgets a finished job after "
        f"MinJobAge={age} s, less than the {needed} s the SLURM executor plugin may wait between two polls (its "
        "jobs would then never be seen to end and the run would hang). Ask the administrators for one of: "
        f"MinJobAge={max(needed, 300)} (or more) in slurm.conf, or job accounting "
        "(AccountingStorageType=accounting_storage/slurmdbd with slurmdbd) so that sacct answers.")


def normalise_state(state: str) -> str:
    """A job state as the plugin matches it: sacct writes 'CANCELLED by <uid>' for a job an operator cancelled,
    which the plugin (2.8) compares with 'CANCELLED' exactly and so treats as still running."""
    return state.split()[0] if state.strip() else state


class StateTracker:
    """Normalises the states of one workflow run's jobs and turns a PREEMPTED job that SLURM will not requeue
    into a failure (the plugin waits for such a job for ever); Snakemake's retries then resubmit it and training
    resumes from its last checkpoint."""

    def __init__(self, requeue: bool, preempt_mode: str, grace: float = PREEMPTED_GRACE_SECONDS):
        self.requeue_by_slurm = requeue and "REQUEUE" in preempt_mode.upper()
        self.grace = grace
        self.preempted_since: dict[str, float] = {}
        self.reported: list[str] = []  # messages for the log, one per decision

    def __call__(self, statuses: dict[str, str], now: float | None = None) -> dict[str, str]:
        now = time.time() if now is None else now
        out = {}
        for job, raw in statuses.items():
            state = normalise_state(raw)
            if state == "PREEMPTED":
                first = self.preempted_since.setdefault(job, now)
                if not self.requeue_by_slurm or now - first >= self.grace:
                    self.reported.append(
                        f"SLURM job {job} was preempted and SLURM does not requeue it "
                        f"({'waited ' + str(int(now - first)) + ' s' if self.requeue_by_slurm else 'PreemptMode'}"
                        "): reported as failed, so that Snakemake resubmits it (training resumes from its last "
                        "checkpoint)")
                    state = "FAILED"
            else:
                self.preempted_since.pop(job, None)
            out[job] = state
        return out


# ------------------------------------------------------------------------------------------------- job requests
@dataclass(frozen=True)
class Request:
    """What one Snakemake job asks SLURM for, per node."""

    rule: str
    label: str  # its wildcards, e.g. 'dataset=demo, experiment=upernet_mcibipp'
    partition: str | None  # None: the cluster's default partition
    cpus: int
    mem_mb: int | None
    gpus: int
    runtime: int | None  # minutes
    nodes: int = 1
    cpus_from: str = "threads"  # which resource gave the CPU count (threads, cpus_per_task, cpus_per_gpu)


# Where the workflow takes a rule's resources from when no set-resources entry replaces them.
PARAMS_RESOURCES = {"train": "train.resources", "evaluate": "evaluate.resources",
                    "export_test": "evaluate.resources", "figures": "evaluate.resources"}
PARAMS_KEYS = {"cpus": "cpus_per_gpu", "mem_mb": "mem_mb", "gpus": "gpus", "runtime": "runtime"}
SITE_FILE = "profiles/slurm/site.yaml"


def _how_to_change(req: Request, what: str, value: int, overridden: set[str]) -> str:
    """Where to change ``what`` (cpus, mem_mb, gpus, runtime, partition) of a job's request."""
    resource = {"cpus": req.cpus_from, "gpus": "gpu"}.get(what, what)
    if what == "partition":
        return (f"name another partition for rule {req.rule} in {SITE_FILE} (`partitions: {{cpu: ..., gpu: ...}}` "
                f"renames the profile's partitions, `set-resources: {{{req.rule}: {{slurm_partition: ...}}}}` "
                "moves one rule)")
    if req.rule in PARAMS_RESOURCES and resource not in overridden and not (what == "cpus" and
                                                                            req.rule == "figures"):
        key = f"{PARAMS_RESOURCES[req.rule]}.{PARAMS_KEYS[what]}"
        if what == "cpus":
            value //= max(req.gpus, 1)  # the params state CPUs per GPU
        return f"set {key} in the run's params file (params/<dataset>/...yaml or its defaults.yaml) to at most {value}"
    if what == "cpus" and resource == "threads":
        return (f"set `set-threads: {{{req.rule}: {value}}}` in {SITE_FILE}")
    return f"set `set-resources: {{{req.rule}: {{{resource}: {value}}}}}` in {SITE_FILE}"


def check_requests(requests: Iterable[Request], partitions: dict[str, Partition], config: SlurmConfig,
                   overridden: dict[str, set[str]] | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings): every request the cluster cannot satisfy (it would pend for ever, e.g. with reason
    PartitionConfig, or be refused at submission), naming the rule, the resource and where to change it; and
    requests that run but waste a GPU partition.

    ``overridden`` maps a rule to the resources a ``set-resources``/``set-threads`` entry gives it (then that
    entry is what to change, not the params file).
    """
    overridden = overridden or {}
    default = next((p.name for p in partitions.values() if p.default), None)
    errors: dict[tuple[str, str], list[str]] = {}
    missing: dict[str, dict[str, list[str]]] = {}  # partition -> rule -> jobs
    warnings: dict[tuple[str, str], list[str]] = {}

    def add(table, rule, text, label):
        table.setdefault((rule, text), []).append(label)

    for req in requests:
        name = req.partition or default
        over = overridden.get(req.rule, set())
        if name is None:
            add(errors, req.rule, f"asks no partition and the cluster has no default one; "
                                  f"{_how_to_change(req, 'partition', 0, over)}", req.label)
            continue
        part = partitions.get(name)
        if part is None:
            missing.setdefault(name, {}).setdefault(req.rule, []).append(req.label)
            continue
        if req.gpus and not config.has_gpus:
            add(errors, req.rule,
                f"asks {req.gpus} GPU(s), but this cluster has no GPUs configured (GresTypes="
                f"{','.join(config.gres_types) or '(null)'}): sbatch would refuse the job with 'Invalid generic "
                f"resource (gres) specification'; {_how_to_change(req, 'gpus', 0, over)} to train on CPUs, or use "
                "a cluster with GPUs", req.label)
            continue
        if part.state.upper() not in ("UP",):
            add(errors, req.rule, f"goes to partition '{name}', which is {part.state}: the job would pend; "
                                  f"{_how_to_change(req, 'partition', 0, over)}", req.label)
            continue
        if req.nodes > len(part.nodes) or (part.max_nodes is not None and req.nodes > part.max_nodes):
            most = min(len(part.nodes), part.max_nodes or len(part.nodes))
            add(errors, req.rule, f"asks {req.nodes} nodes, {part.describe()} allows {most}; set the nodes "
                                  f"resource to at most {most}", req.label)
            continue
        fits = [n for n in part.nodes if n.cpus >= req.cpus and (req.mem_mb is None or n.mem_mb >= req.mem_mb)
                and n.gpus >= req.gpus]
        if not fits:
            for what, asked, most in (("cpus", req.cpus, max((n.cpus for n in part.nodes), default=0)),
                                      ("mem_mb", req.mem_mb or 0, max((n.mem_mb for n in part.nodes), default=0)),
                                      ("gpus", req.gpus, max((n.gpus for n in part.nodes), default=0))):
                if asked > most:
                    unit = {"cpus": f"CPUs ({req.cpus_from})", "mem_mb": "MB of memory (mem_mb)",
                            "gpus": "GPUs (gpu)"}[what]
                    add(errors, req.rule, f"asks {asked} {unit} per node, but the largest node of "
                                          f"{part.describe()} has {most}: it would pend for ever (PartitionConfig)"
                                          f"; {_how_to_change(req, what, most, over)}", req.label)
            if not any(k[0] == req.rule for k in errors):
                add(errors, req.rule, f"asks {req.cpus} CPUs, {req.mem_mb} MB, {req.gpus} GPU(s) per node: no "
                                      f"single node of {part.describe()} has all of them", req.label)
        if part.max_cpus_per_node is not None and req.cpus > part.max_cpus_per_node:
            add(errors, req.rule, f"asks {req.cpus} CPUs ({req.cpus_from}) per node, over MaxCPUsPerNode="
                                  f"{part.max_cpus_per_node} of partition '{name}': it would pend for ever; "
                                  f"{_how_to_change(req, 'cpus', part.max_cpus_per_node, over)}", req.label)
        if part.max_mem_per_node is not None and req.mem_mb and req.mem_mb > part.max_mem_per_node:
            change = _how_to_change(req, "mem_mb", part.max_mem_per_node, over)
            add(errors, req.rule, f"asks {req.mem_mb} MB per node, over MaxMemPerNode={part.max_mem_per_node} "
                                  f"of partition '{name}'; {change}", req.label)
        if part.max_time is not None and req.runtime is not None and req.runtime > part.max_time:
            add(errors, req.rule, f"asks {req.runtime} min (runtime), over MaxTime={part.max_time} min of "
                                  f"partition '{name}': it would pend for ever (PartitionTimeLimit); "
                                  f"{_how_to_change(req, 'runtime', part.max_time, over)}"
                                  + (" (a training cut by its wall time resumes from its checkpoint when "
                                     "resubmitted)" if req.rule == "train" else ""), req.label)
        if fits and not any(n.usable for n in fits):
            add(warnings, req.rule, f"fits only nodes of partition '{name}' that are down or drained "
                                    f"({', '.join(n.name for n in fits)}): it will wait until one is back",
                req.label)
        if req.gpus == 0 and part.nodes and all(n.gpus for n in part.nodes):
            cpu_parts = [p.name for p in partitions.values() if p.nodes and not any(n.gpus for n in p.nodes)]
            add(warnings, req.rule, f"asks no GPU but goes to partition '{name}', whose nodes all have GPUs"
                + (f"; partitions without GPUs: {', '.join(cpu_parts)}" if cpu_parts else ""), req.label)

    def lines(table):
        return [f"rule {rule} ({_labels(labels)}): {text}" for (rule, text), labels in table.items()]

    absent = [f"partition '{name}' does not exist (this cluster has {', '.join(sorted(partitions)) or 'none'}), "
              f"yet rule(s) {', '.join(f'{r} ({len(jobs)} job(s))' for r, jobs in rules.items())} go there: in "
              f"{SITE_FILE}, `partitions: {{{name}: <partition>}}` renames it for every rule, `set-resources: "
              f"{{<rule>: {{slurm_partition: <partition>}}}}` moves one rule" for name, rules in missing.items()]
    return absent + lines(errors), lines(warnings)


def check_group_runtimes(groups: Iterable[list[Request]], partitions: dict[str, Partition]) -> list[str]:
    """Errors for group jobs (``groups:`` of the profile) whose members' runtimes, added up as Snakemake does for
    jobs that run one after the other in one SLURM job, exceed their partition's MaxTime (each member alone may
    fit)."""
    default = next((p.name for p in partitions.values() if p.default), None)
    errors = []
    for members in groups:
        part = partitions.get(members[0].partition or default or "")
        total = sum(r.runtime or 0 for r in members)
        if part is None or part.max_time is None or total <= part.max_time:
            continue
        rules = ", ".join(f"{r.rule} {r.runtime}" for r in members)
        errors.append(f"group job of {members[0].label} ({rules} min) asks {total} min in total, over MaxTime="
                      f"{part.max_time} min of partition '{part.name}': lower their runtime in {SITE_FILE} "
                      "(set-resources), or set `groups: null` there to submit them one by one")
    return errors


def _labels(labels: list[str]) -> str:
    labels = [x or "no wildcards" for x in labels]
    return ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")


# ----------------------------------------------------------------------------------------------- whole cluster
@dataclass(frozen=True)
class ClusterFacts:
    config: SlurmConfig
    partitions: dict[str, Partition]
    sacct_error: str | None  # None: sacct answers

    def summary(self) -> str:
        lines = [f"SLURM {self.config.version}: accounting {self.config.accounting or '?'} (sacct "
                 + ("answers" if self.sacct_error is None else f"fails: {self.sacct_error.splitlines()[0]}")
                 + f"), MinJobAge {self.config.min_job_age} s, PreemptMode {self.config.preempt_mode}, GresTypes "
                 + (",".join(self.config.gres_types) or "(null)")]
        lines += [("* " if p.default else "  ") + p.describe() for p in self.partitions.values()]
        return "\n".join(lines)


def sacct_error() -> str | None:
    """None when ``sacct`` answers, else what it said (e.g. 'Slurm accounting storage is disabled')."""
    code, out = run_command(["sacct", "-X", "--noheader", "--parsable2", "--format=JobIdRaw",
                             "--starttime", "now", "--endtime", "now"], timeout=20)
    return None if code == 0 else (out or f"sacct exited with status {code}")


def cluster_facts() -> ClusterFacts | None:
    """What the SLURM cluster reachable from here offers; None when there is no SLURM (no ``scontrol``)."""
    code, config = run_command(["scontrol", "show", "config"])
    if code == 127:
        return None
    if code != 0:
        raise ClusterError(f"`scontrol show config` failed: {config}")
    code_p, parts = run_command(["scontrol", "-o", "show", "partition"])
    code_n, nodes = run_command(["scontrol", "-o", "show", "node"])
    if code_p or code_n:
        raise ClusterError(f"`scontrol show partition/node` failed: {parts if code_p else nodes}")
    return ClusterFacts(parse_config(config), parse_partitions(parts, nodes), sacct_error())


# -------------------------------------------------------------------------------------------------- attempts
def attempt_header(command: str = "") -> str:
    """One line that starts each attempt's part of an appended log: when, where, which SLURM job and restart."""
    slurm = os.environ.get("SLURM_JOB_ID")
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    if slurm and restarts is None:  # the executor's job step starts srun without it: ask slurmctld
        code, out = run_command(["scontrol", "-o", "show", "job", slurm], timeout=5)
        restarts = _fields(out).get("Restarts", "?") if code == 0 else "?"
    where = f"SLURM job {slurm} restart {restarts}" if slurm else "outside SLURM"
    return (f"===== attempt {time.strftime('%Y-%m-%dT%H:%M:%S%z')} on {socket.gethostname()} ({where}, pid "
            f"{os.getpid()}){': ' + command if command else ''} =====")
