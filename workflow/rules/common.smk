# Parse-time setup: validate the workflow config and every selected params file before any job starts, and the
# named input functions the rules use. The parse step imports neither torch nor pandas (tests/workflow/test_workflow.py).
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from mcibi.catalogue.rows import select
from mcibi.data.lookup import get_spec
from mcibi.data.fingerprint import change_stamp
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


# Every params file of every configured dataset is loaded and strictly validated here, at DAG-build time.
EXPERIMENTS = {ds: _selected(ds) for ds in sorted(set(config["experiments"]) | set(config["default_datasets"]))}


def _runs(dataset):
    runs = EXPERIMENTS.get(dataset)
    if runs is None:
        raise ValueError(f"dataset '{dataset}' is not configured in workflow/config.yaml (experiments).")
    return runs


def experiment_stem_of(dataset, run):
    """The params file stem of a run (``<stem>`` or ``<stem>-seed<k>``)."""
    return Path(_runs(dataset)[run].path).stem


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


def run_params(wildcards):
    """The validated params of one run (``{dataset}``, ``{experiment}``)."""
    return _runs(wildcards.dataset)[wildcards.experiment]


def experiment_stem(wildcards):
    return experiment_stem_of(wildcards.dataset, wildcards.experiment)


def run_seed(wildcards):
    return run_params(wildcards).train.seed


# What a training job asks for: its params' train.resources.
def train_threads(wildcards):
    return job_threads(run_params(wildcards).train.resources)


def train_mem_mb(wildcards):
    return run_params(wildcards).train.resources.mem_mb


def train_runtime(wildcards):
    return run_params(wildcards).train.resources.runtime


def train_gpus(wildcards):
    return run_params(wildcards).train.resources.gpus


def train_launcher(wildcards):
    return Untracked(launcher(run_params(wildcards).train.resources))


def train_torch_threads(wildcards):
    """Torch threads per process: cpus_per_gpu."""
    return Untracked(run_params(wildcards).train.resources.cpus_per_gpu)


# What an evaluation (or export, figures) job asks for: its params' evaluate.resources.
def eval_threads(wildcards):
    return job_threads(run_params(wildcards).evaluate.resources)


def eval_priority(wildcards):
    """Longest evaluations first: forward passes per image (scales x flips). A multi-scale evaluation started last
    would keep the run's figures job, and the table, waiting after everything else is done."""
    protocol = run_params(wildcards).evaluate.protocols[wildcards.protocol]
    return len(protocol.scales) * (2 if protocol.flip else 1)


def eval_mem_mb(wildcards):
    return run_params(wildcards).evaluate.resources.mem_mb


def eval_runtime(wildcards):
    return run_params(wildcards).evaluate.resources.runtime


def eval_gpus(wildcards):
    return run_params(wildcards).evaluate.resources.gpus


def eval_launcher(wildcards):
    return Untracked(launcher(run_params(wildcards).evaluate.resources))


def eval_torch_threads(wildcards):
    return Untracked(run_params(wildcards).evaluate.resources.cpus_per_gpu)


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
    """The params file stems of the dataset's selected runs (``mcibi table --experiments``)."""
    return " ".join(sorted({experiment_stem_of(wildcards.dataset, run) for run in _runs(wildcards.dataset)}))


def report_seeds(wildcards):
    return seeds_of(wildcards.dataset)


# ------------------------------------------------------------------------------------------------- rerun triggers
# Training reruns only when the params that change its weights change, an evaluation only when its protocol does
# (both as `params:` hashes; the params files are not inputs), and verify_data whenever the prepared files change.


def params_file(wildcards):
    """The run's params file, passed to the CLI (a `params:` value: editing it triggers nothing by itself)."""
    return experiment_params(wildcards)[0]


def trajectory_of(wildcards):
    """Hash of the params that change a run's weights (mcibi.params.trajectory_hash)."""
    return trajectory_hash(_runs(wildcards.dataset)[wildcards.experiment])


def protocol_of(wildcards):
    """Hash of what evaluating this protocol reads besides the checkpoint (mcibi.params.protocol_hash)."""
    return protocol_hash(_runs(wildcards.dataset)[wildcards.experiment], wildcards.protocol)


def data_change_stamp(wildcards):
    """A stamp rewritten at DAG-build time when data/<dataset>/ changed since verify_data checked it."""
    return change_stamp(
        f"{DATA}/{wildcards.dataset}",
        f"{DATA}/{wildcards.dataset}/verified.json",
        f"logs/verify_data/{wildcards.dataset}.changed",
    )
