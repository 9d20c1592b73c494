"""The SLURM profile's site file and the adapters the profile installs into Snakemake's SLURM executor plugin.

``profiles/slurm/profile.yaml`` is a YTE template (Snakemake reads profiles through YTE when they start with
``__use_yte__: true``); it calls, in the process that runs Snakemake:

- :func:`install_adapters` once: before the first job is submitted the plugin's executor then
  (1) chooses the job-status command that works on this cluster (``sacct`` with accounting storage, else
  ``squeue`` when MinJobAge allows it, else stops with what to set), (2) checks every job's request against what
  its partition offers and stops naming the rule, the resource and where to change it, and (3) normalises the
  job states it reads ('CANCELLED by <uid>' -> CANCELLED, a PREEMPTED job SLURM does not requeue -> FAILED), so
  that a cancelled or preempted job is retried instead of waited for;
- :func:`with_site` last: ``profiles/slurm/site.yaml`` (or the file ``$MCIBI_SLURM_SITE`` names) merged over
  the profile, rule by rule and resource by resource.

Snakemake itself merges nothing: a ``--set-resources`` on the command line replaces the profile's whole
``set-resources`` (and so on for every key); the site file is the place for site changes that keep the rest.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from mcibi.cluster.slurm import (
    ClusterError,
    Request,
    StateTracker,
    check_group_runtimes,
    check_requests,
    choose_status_command,
    cluster_facts,
    gres_gpus,
)

log = logging.getLogger(__name__)

SITE_ENV = "MCIBI_SLURM_SITE"  # another site file than profiles/slurm/site.yaml
PREFLIGHT_ENV = "MCIBI_SLURM_PREFLIGHT"  # "off": no request check; "only": check, then stop before submitting
PREFLIGHT_PASSED = "mcibi SLURM pre-flight passed"
DEFAULT_SLURM_CONF = Path("/etc/slurm/slurm.conf")
# profile keys merged one level down (rule or resource); every other key of the site file replaces the profile's
MAPPINGS = ("default-resources", "set-threads")
NESTED = ("set-resources",)

# the merged profile read in this process (None: the SLURM profile was not read here)
LOADED: dict[str, Any] | None = None
_TRACKER: StateTracker | None = None


def _plain(value: Any) -> Any:
    """YTE's rendered document (Subdocument objects) as plain dicts and lists."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def merge_site(profile: dict, site: dict, source: str = "site file") -> dict:
    """``profile`` with ``site`` merged over it: ``default-resources`` and ``set-threads`` key by key,
    ``set-resources`` rule by rule and resource by resource, any other key replaced (``null`` removes it);
    ``partitions: {old: new}`` renames the partitions the profile names (``slurm_partition`` values)."""
    if not isinstance(site, dict):
        raise ClusterError(f"{source}: expected a mapping of profile keys, got {type(site).__name__}")
    out = copy.deepcopy(profile)
    site = dict(site)
    renames = site.pop("partitions", None) or {}
    if not isinstance(renames, dict) or not all(isinstance(v, str) for v in renames.values()):
        raise ClusterError(f"{source}: partitions must map the profile's partition names to this site's, "
                           f"e.g. {{cpu: short, gpu: a100}}; got {renames!r}")
    for key, value in site.items():
        if value is None:  # `key: null` drops the profile's setting (e.g. groups): Snakemake skips null keys
            out[key] = None
            continue
        if key in MAPPINGS + NESTED and not isinstance(value, dict):
            raise ClusterError(f"{source}: {key} must be a mapping, got {value!r}")
        if key in MAPPINGS:
            out[key] = {**(out.get(key) or {}), **value}
        elif key in NESTED:
            merged = copy.deepcopy(out.get(key) or {})
            for rule, resources in value.items():
                if not isinstance(resources, dict):
                    raise ClusterError(f"{source}: {key}.{rule} must map resources to values, got {resources!r}")
                merged[rule] = {**(merged.get(rule) or {}), **resources}
            out[key] = merged
        else:
            out[key] = value
    for table in [out.get("default-resources") or {}, *(out.get("set-resources") or {}).values()]:
        if table.get("slurm_partition") in renames:
            table["slurm_partition"] = renames[table["slurm_partition"]]
    return out


def site_path(default: str | Path) -> Path:
    return Path(os.environ.get(SITE_ENV) or default)


def with_site(doc: Any, default_site: str | Path = "profiles/slurm/site.yaml") -> dict:
    """The profile rendered so far (YTE's ``doc``) with the site file merged over it (nothing when absent)."""
    global LOADED
    profile = _plain(doc)
    path = site_path(default_site)
    site = {}
    if path.is_file():
        site = yaml.safe_load(path.read_text()) or {}
    elif os.environ.get(SITE_ENV):
        raise ClusterError(f"{SITE_ENV}={path}: no such file")
    merged = merge_site(profile, site, str(path))
    LOADED = {"profile": merged, "site": str(path) if path.is_file() else None}
    return merged


# ------------------------------------------------------------------------------------------ executor adapters
def job_request(job) -> Request:
    """What a Snakemake job will ask ``sbatch`` for, as the plugin computes it (per node)."""
    res = job.resources

    def get(name, default=None):
        value = res.get(name, default)
        return default if value is None or isinstance(value, str) and not value.strip() else value

    gpus = int(get("gpu", 0) or 0) or gres_gpus(str(get("gres", "")))
    nodes = int(get("nodes", 1) or 1)
    cpus_per_task, cpus_per_gpu = get("cpus_per_task"), get("cpus_per_gpu")
    if isinstance(cpus_per_task, int) and cpus_per_task > 0:
        cpus, source = cpus_per_task, "cpus_per_task"
    elif gpus and isinstance(cpus_per_gpu, int) and cpus_per_gpu > 0:
        cpus, source = cpus_per_gpu * gpus, "cpus_per_gpu"
    else:
        cpus, source = int(job.threads), "threads"
    tasks = int(get("tasks", 1) or 1)
    cpus *= max(1, -(-tasks // nodes))
    mem = get("mem_mb")
    if get("mem_mb_per_cpu"):
        mem = int(get("mem_mb_per_cpu")) * cpus
    runtime = get("runtime")
    label = "/".join(str(v) for v in dict(job.wildcards_dict).values())
    return Request(job.rule.name, label, get("slurm_partition"), cpus,
                   int(mem) if isinstance(mem, int | float) else None, gpus,
                   int(runtime) if isinstance(runtime, int | float) else None, nodes, source)


def group_members(dag, requests: dict) -> list[list[Request]]:
    """The requests of each group job to be: jobs of one group connected by dependencies (Snakemake submits each
    such set as one SLURM job)."""
    parent = {job: job for job in requests if job.group}

    def root(job):
        while parent[job] is not job:
            job = parent[job]
        return job

    for job in parent:
        for dep in dag.dependencies.get(job, {}):
            if dep in parent and dep.group == job.group:
                parent[root(dep)] = root(job)
    sets: dict = {}
    for job in parent:
        sets.setdefault(root(job), []).append(requests[job])
    return [members for members in sets.values() if len(members) > 1]


def _overridden(workflow) -> dict[str, set[str]]:
    """Rule -> the resources (and 'threads') that set-resources / set-threads entries give it."""
    settings = workflow.resource_settings
    out: dict[str, set[str]] = {}
    for rule, resources in dict(settings.overwrite_resources or {}).items():
        out.setdefault(rule, set()).update(dict(resources).keys() if hasattr(resources, "keys") else resources)
    for rule in dict(settings.overwrite_threads or {}):
        out.setdefault(rule, set()).add("threads")
    return out


def dropped_profile_entries(workflow) -> list[str]:
    """Rules whose profile set-resources entries are missing from this run (a command-line --set-resources
    replaced the profile's whole set-resources)."""
    if not LOADED:
        return []
    given = _overridden(workflow)
    wanted = LOADED["profile"].get("set-resources") or {}
    return sorted(f"{rule} ({', '.join(sorted(set(res) - given.get(rule, set())))})" for rule, res in wanted.items()
                  if set(res) - given.get(rule, set()))


def preflight(executor) -> None:
    """Run by the executor before its first submission (see the module's docstring)."""
    global _TRACKER
    from snakemake_interface_common.exceptions import WorkflowError

    mode = os.environ.get(PREFLIGHT_ENV, "on")
    facts = cluster_facts()
    if facts is None:  # no SLURM commands here: the plugin reports that itself
        return
    settings = executor.workflow.executor_settings
    try:
        command, why = choose_status_command(settings.status_command, facts.config, facts.sacct_error,
                                             int(settings.init_seconds_before_status_checks or 0))
    except ClusterError as exc:
        raise WorkflowError(str(exc)) from None
    if command != settings.status_command:
        executor.logger.warning(f"mcibi: job states come from {command}, not {settings.status_command}: {why}")
        settings.status_command = command
    else:
        executor.logger.info(f"mcibi: job states come from {command} ({why})")
    _TRACKER = StateTracker(bool(settings.requeue), facts.config.preempt_mode)
    if mode == "off":
        return
    workflow = executor.workflow
    jobs = [j for j in workflow.dag.needrun_jobs() if not j.is_local and not j.is_group()]
    requests = {j: job_request(j) for j in jobs}
    errors, warnings = check_requests(requests.values(), facts.partitions, facts.config, _overridden(workflow))
    errors += check_group_runtimes(group_members(workflow.dag, requests), facts.partitions)
    conf = os.environ.get("SLURM_CONF")
    if conf and Path(conf).resolve() != DEFAULT_SLURM_CONF.resolve() and not DEFAULT_SLURM_CONF.exists():
        warnings.append(f"SLURM_CONF={conf}, and {DEFAULT_SLURM_CONF} does not exist: the plugin's job step starts "
                        "`srun` inside every job with SLURM_* variables removed (SLURM_CONF too), so that srun will "
                        "not find the configuration ('Could not establish a configuration source') unless the nodes "
                        f"have {DEFAULT_SLURM_CONF} or configless slurmd")
    dropped = dropped_profile_entries(workflow)
    if dropped:
        warnings.append("the command line's --set-resources/--set-threads replaced the profile's, so these "
                        f"profile settings are not used: {'; '.join(dropped)}. Put command-line changes in "
                        f"{(LOADED or {}).get('site') or 'profiles/slurm/site.yaml'} instead: it is merged "
                        "rule by rule and resource by resource")
    for text in warnings:
        executor.logger.warning(f"mcibi SLURM pre-flight: {text}")
    if errors:
        raise WorkflowError(f"mcibi SLURM pre-flight: {len(errors)} problem(s) with job requests this cluster "
                            "cannot satisfy, nothing submitted:\n" + "\n".join(f"  - {e}" for e in errors)
                            + "\n" + facts.summary())
    executor.logger.info(f"{PREFLIGHT_PASSED}: {len(jobs)} job(s) fit their partitions\n{facts.summary()}")
    if mode == "only":
        raise WorkflowError(f"{PREFLIGHT_PASSED} ({PREFLIGHT_ENV}=only: nothing submitted)")


def _normalised_query(original):
    async def query_job_status(command, logger):
        statuses, duration = await original(command, logger)
        if statuses is not None and _TRACKER is not None:
            statuses = _TRACKER(statuses)
            while _TRACKER.reported:
                logger.warning("mcibi: " + _TRACKER.reported.pop(0))
        return statuses, duration

    query_job_status.__wrapped__ = original
    return query_job_status


def install_adapters() -> bool:
    """Install the adapters into the SLURM executor plugin of this process (once); False when the plugin is
    not installed or not a version they fit (2.x)."""
    try:
        from importlib.metadata import version

        import snakemake_executor_plugin_slurm as plugin
    except ImportError:
        return False
    if getattr(plugin, "_mcibi_adapters", False):
        return True
    major = version("snakemake-executor-plugin-slurm").split(".")[0]
    if major != "2" or not hasattr(plugin, "query_job_status") or not hasattr(plugin.Executor, "__post_init__"):
        log.warning("mcibi: snakemake-executor-plugin-slurm %s is not a 2.x release; its job states and requests "
                    "are not checked (docs/scaling.md)", version("snakemake-executor-plugin-slurm"))
        return False
    original_post_init = plugin.Executor.__post_init__

    def __post_init__(self, *args, **kwargs):
        original_post_init(self, *args, **kwargs)
        if not getattr(self, "test_mode", False):
            preflight(self)

    plugin.Executor.__post_init__ = __post_init__
    plugin.query_job_status = _normalised_query(plugin.query_job_status)
    plugin._mcibi_adapters = True
    return True
