# Parse-time setup: validate the workflow config and every selected params file before any job starts, and the
# named functions the rules use (inputs, paths, resources). The parse step imports neither torch nor pandas
# (tests/workflow/test_workflow.py). Every path a shell command takes comes from the rule's files or from these
# functions, and every one is quoted there ({input:q}, {params.x:q}): roots may be absolute, with spaces.
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from snakemake.utils import validate

from mcibi.catalogue.rows import select
from mcibi.data.custom import registered_datasets
from mcibi.data.fingerprint import change_stamp
from mcibi.data.lookup import get_spec
from mcibi.official.released import release_params, release_params_files, released_outputs, released_rows
from mcibi.spec.params import PROTOCOL_NAMES, Untracked, experiment_files, load_params, protocol_hash, trajectory_hash
from mcibi.spec.runs import job_threads, launcher, seed_runs, with_seed

validate(config, "../schemas/config.schema.yaml")


envvars:
    "PATH",


# Jobs inherit an absolute tracking URI: relative SQLite paths would follow each job's working directory.
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + os.path.abspath("mlflow.db"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# Jobs find the `mcibi` command of the environment running Snakemake even when it is not activated.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
DATA = config["data_root"]
DOWNLOADS = config["downloads_root"]
PARAMS = config["params_root"]
RUNS = config["runs_root"]
BENCHMARKS = "benchmarks"  # per-job wall time, memory and CPU of train, evaluate and prepare (Snakemake benchmark:)
# Custom datasets: every description registered as datasets/<name>.yaml (`mcibi new-dataset`; custom.smk).
CUSTOM_DATASETS = registered_datasets()


wildcard_constraints:
    dataset=r"[a-z0-9]+",
    experiment=r"[A-Za-z0-9_\-]+",
    protocol="|".join(PROTOCOL_NAMES),


def seeds_of(dataset):
    """Runs per experiment of a dataset (workflow/config.yaml seeds)."""
    seeds = config["seeds"]
    return seeds.get(dataset, 1) if isinstance(seeds, dict) else seeds


def _selected(dataset):
    """Run name -> validated params of every selected experiment and seed (mcibi.catalogue.rows.select)."""
    files = experiment_files(PARAMS, dataset)
    if not files:
        raise ValueError(f"{PARAMS}/{dataset}/: no experiment files. Add params/{dataset}/<name>.yaml.")
    stems = select(dataset, [f.stem for f in files], config["experiments"].get(dataset, "all"))
    runs = {}
    for stem in stems:
        params = load_params(Path(PARAMS) / dataset / f"{stem}.yaml")
        for run, seed in seed_runs(stem, params.train.seed, seeds_of(dataset)):
            runs[run] = with_seed(params, seed)
    return runs


def selected_runs():
    """Dataset -> run name -> validated params, for the datasets workflow/config.yaml names (experiments,
    default_datasets) and every registered custom dataset. Every params file is loaded and strictly validated here,
    at DAG-build time."""
    datasets = set(config["experiments"]) | set(config["default_datasets"]) | set(CUSTOM_DATASETS)
    return {dataset: _selected(dataset) for dataset in sorted(datasets)}


EXPERIMENTS = selected_runs()


def _runs(dataset):
    runs = EXPERIMENTS.get(dataset)
    if runs is None:
        raise ValueError(f"dataset '{dataset}' is not configured in workflow/config.yaml (experiments).")
    return runs


def params_of_run(dataset, run):
    """The validated params of one run; a run that is not selected (a typo in a target) is an error that names the
    runs there are."""
    runs = _runs(dataset)
    if run not in runs:
        stem = Path(PARAMS) / dataset / f"{run}.yaml"
        why = (
            f"{stem} exists but workflow/config.yaml experiments.{dataset} does not select it"
            if stem.is_file()
            else f"no {stem}"
        )
        raise ValueError(
            f"{RUNS}/{dataset}/{run}/: unknown experiment '{run}' of dataset '{dataset}' ({why}). The experiments "
            f"of {dataset} (params files in {PARAMS}/{dataset}/ selected by workflow/config.yaml, "
            f"{seeds_of(dataset)} seed(s) each): {', '.join(sorted(runs))}."
        )
    return runs[run]


def experiment_stem_of(dataset, run):
    """The params file stem of a run (``<stem>`` or ``<stem>-seed<k>``)."""
    return Path(params_of_run(dataset, run).path).stem


# Folders the shell commands take, derived from the rule's files (so that they follow the files' paths).
def dataset_downloads(wildcards):
    return f"{DOWNLOADS}/{wildcards.dataset}"


def dataset_data(wildcards):
    return f"{DATA}/{wildcards.dataset}"


def data_root(wildcards, input):
    """The data root holding ``<dataset>/``, from the verify_data record."""
    return os.path.dirname(os.path.dirname(input.data[0]))


def train_run_dir(wildcards, output):
    return os.path.dirname(output.checkpoint)


def checkpoint_run_dir(wildcards, input):
    return os.path.dirname(input.checkpoint)


def release_dir_out(wildcards, output):
    """The folder of a released row's download record (its .pth and .log beside it)."""
    return os.path.dirname(output.record)


def release_dir(wildcards, input):
    return os.path.dirname(input.record)


def run_params(wildcards):
    """The validated params of one run (``{dataset}``, ``{experiment}``)."""
    return params_of_run(wildcards.dataset, wildcards.experiment)


def official_params(wildcards):
    """The validated params of one released row (``{dataset}``, ``{experiment}``: runs/<dataset>/official/...)."""
    return release_params(PARAMS, wildcards.dataset, wildcards.experiment)


def official_params_files(wildcards):
    """A released row's params file and its dataset's defaults layer (inputs: editing them reruns its jobs)."""
    return release_params_files(PARAMS, wildcards.dataset, wildcards.experiment)


def experiment_stem(wildcards):
    return experiment_stem_of(wildcards.dataset, wildcards.experiment)


def run_seed(wildcards):
    return run_params(wildcards).train.seed


# ------------------------------------------------------------------------------------------------------ resources
def job_resources(step, params_of=run_params, **fixed):
    """What a job of ``step`` ("train" or "evaluate") asks for, from its params' ``<step>.resources`` (gpus,
    cpus_per_gpu, mem_mb, runtime), as functions of the job's wildcards:

    - ``threads``: gpus x cpus_per_gpu (cpus_per_gpu for a CPU job);
    - ``resources``: mem_mb, runtime, gpu and cpus_per_task (= threads), for ``resources: **job.resources``;
      ``fixed`` values replace some of them;
    - ``launcher`` (``mcibi``, or ``torchrun --standalone --nproc_per_node=<gpus> -m mcibi``) and
      ``torch_threads`` (per process: cpus_per_gpu), for ``params:``; they say how a job runs, not what it
      computes, so editing them reruns nothing (Untracked).

    ``params_of``: wildcards -> the job's params (a run's, or a released row's: official_params).
    """

    def requested(wildcards):
        return getattr(params_of(wildcards), step).resources

    def threads(wildcards):
        return job_threads(requested(wildcards))

    resources = {
        "mem_mb": lambda wildcards: requested(wildcards).mem_mb,
        "runtime": lambda wildcards: requested(wildcards).runtime,
        "gpu": lambda wildcards: requested(wildcards).gpus,
        "cpus_per_task": threads,
    }
    return SimpleNamespace(
        threads=threads,
        resources=resources | fixed,
        launcher=lambda wildcards: Untracked(launcher(requested(wildcards))),
        torch_threads=lambda wildcards: Untracked(requested(wildcards).cpus_per_gpu),
    )


TRAIN_JOB = job_resources("train")
EVAL_JOB = job_resources("evaluate")  # evaluations, test-set exports
OFFICIAL_EVAL_JOB = job_resources("evaluate", official_params)  # the released rows' evaluations and exports
FIGURES_JOB = job_resources("evaluate", runtime=30, gpu=0, cpus_per_task=1)  # files only: no model, no GPU


def eval_priority(wildcards):
    """Longest evaluations first: forward passes per image (scales x flips). A multi-scale evaluation started last
    would keep the run's figures job, and the table, waiting after everything else is done."""
    protocol = run_params(wildcards).evaluate.protocols[wildcards.protocol]
    return len(protocol.scales) * (2 if protocol.flip else 1)


# ---------------------------------------------------------------------------------------------- files of a dataset
def experiment_params(wildcards):
    """The params file of one run plus its dataset's defaults layer (both trigger reruns when edited)."""
    files = [f"{PARAMS}/{wildcards.dataset}/{experiment_stem(wildcards)}.yaml"]
    defaults = Path(PARAMS) / wildcards.dataset / "defaults.yaml"
    if defaults.is_file():
        files.append(str(defaults))
    return files


def run_results(dataset, run, params):
    """What one run contributes to its table: an evaluation JSON per protocol, or, where the evaluation split's
    labels are private (CityScapes test), the exported predictions to submit to the benchmark's server."""
    server = params.data.eval_split in get_spec(params.data.name).unlabelled_splits
    if server:
        return [f"{RUNS}/{dataset}/{run}/test_{protocol}" for protocol in params.evaluate.protocols]
    return [f"{RUNS}/{dataset}/{run}/eval/{protocol}.json" for protocol in params.evaluate.protocols]


def run_evaluations(wildcards):
    """The evaluation outputs of one run (inputs of its figures job)."""
    return run_results(wildcards.dataset, wildcards.experiment, run_params(wildcards))


def evaluations(wildcards):
    """Everything the dataset's table reports: each run's evaluations and its figures folder."""
    out = []
    for run, params in _runs(wildcards.dataset).items():
        out += run_results(wildcards.dataset, run, params)
        out.append(f"{RUNS}/{wildcards.dataset}/{run}/figures")
    return out


def report_experiments(wildcards):
    """The params file stems of the dataset's selected runs (``mcibi table --experiments``, one argument each)."""
    return sorted({experiment_stem_of(wildcards.dataset, run) for run in _runs(wildcards.dataset)})


def report_seeds(wildcards):
    return seeds_of(wildcards.dataset)


def official_outputs(wildcards):
    """What results/<dataset>/official needs: each released row's evaluations (or exports) and MLflow run record."""
    return released_outputs(RUNS, PARAMS, wildcards.dataset)


def official_experiments(wildcards):
    """The dataset's released rows (``mcibi table --experiments``, one argument each)."""
    return released_rows(PARAMS, wildcards.dataset)


# ------------------------------------------------------------------------------------------------- rerun triggers
# Training reruns only when the params that change its weights change, an evaluation only when its protocol does
# (both as `params:` hashes; the params files are not inputs), and verify_data whenever the prepared files change.


def params_file(wildcards):
    """The run's params file, passed to the CLI (a `params:` value: editing it triggers nothing by itself)."""
    return experiment_params(wildcards)[0]


def trajectory_of(wildcards):
    """Hash of the params that change a run's weights (mcibi.params.trajectory_hash)."""
    return trajectory_hash(run_params(wildcards))


def protocol_of(wildcards):
    """Hash of what evaluating this protocol reads besides the checkpoint (mcibi.params.protocol_hash)."""
    return protocol_hash(run_params(wildcards), wildcards.protocol)


def data_change_stamp(wildcards):
    """A stamp rewritten at DAG-build time when data/<dataset>/ changed since verify_data checked it."""
    return change_stamp(
        f"{DATA}/{wildcards.dataset}",
        f"{DATA}/{wildcards.dataset}/verified.json",
        f"logs/verify_data/{wildcards.dataset}.changed",
    )
