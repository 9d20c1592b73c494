# Parse-time setup: validate the workflow config and every selected params file before any job starts.
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from mcibi.params import PROTOCOL_NAMES, experiment_files, load_params


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


def _selected(dataset):
    files = experiment_files(PARAMS, dataset)
    if not files:
        raise ValueError(f"{PARAMS}/{dataset}/: no experiment files. Add params/{dataset}/<name>.yaml.")
    wanted = config["experiments"].get(dataset, "all")
    if wanted != "all":
        known = {f.stem for f in files}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ValueError(f"workflow/config.yaml: experiments.{dataset} names {unknown}, not in {PARAMS}/{dataset}/.")
        files = [f for f in files if f.stem in wanted]
    return {f.stem: load_params(f) for f in files}


# Every params file of every configured dataset is loaded and strictly validated here, at DAG-build time.
EXPERIMENTS = {ds: _selected(ds) for ds in sorted(set(config["experiments"]) | set(config["default_datasets"]))}


def experiment_params(wildcards):
    """The params file of one experiment plus its dataset's defaults layer (both trigger reruns when edited)."""
    files = [f"{PARAMS}/{wildcards.dataset}/{wildcards.experiment}.yaml"]
    defaults = Path(PARAMS) / wildcards.dataset / "defaults.yaml"
    if defaults.is_file():
        files.append(str(defaults))
    return files


def evaluations(wildcards):
    """Evaluation JSON files that the dataset's table reports: each experiment x each of its protocols."""
    exps = EXPERIMENTS.get(wildcards.dataset)
    if exps is None:
        raise ValueError(f"dataset '{wildcards.dataset}' is not configured in workflow/config.yaml (experiments).")
    return [
        f"{RUNS}/{wildcards.dataset}/{name}/eval/{protocol}.json"
        for name, p in exps.items()
        for protocol in p.evaluate.protocols
    ]
