"""The Snakemake chain on the demo dataset: lint, dry run, and a reduced real run through every rule."""

import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import yaml
from checkout import ROOT, copy_repo, load_script

from mcibi.catalogue.rows import DATASETS
from mcibi.spec.params import experiment_files, load_params


def _snakemake(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=1200)


def test_lint_is_clean(tmp_path):
    """`snakemake --lint` exits 1 on any lint (a rule without log or conda, an absolute path, a param hard-coding
    a file prefix, ...) and says so."""
    repo = copy_repo(tmp_path / "repo")
    proc = _snakemake(repo, "--lint")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in out, out
    assert "Congratulations, your workflow is in a good condition!" in out


def _smk_files() -> list[Path]:
    return [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]


def test_snakefmt_leaves_the_rules_as_they_are():
    """The Snakefile and every rule file are snakefmt-formatted (pyproject.toml [tool.snakefmt]: ruff's line length;
    shell strings formatted with the bundled shfmt, which sits beside this Python)."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=str(bindir) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([str(bindir / "snakefmt"), "--check", "--diff", *map(str, _smk_files())], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# placeholders of a shell command that are not paths: a command prefix (torchrun ...), numbers, wildcards
_UNQUOTED = {"params.launcher", "params.torch_threads", "params.seed", "params.seeds", "params.images", "threads",
             "wildcards.dataset", "wildcards.experiment", "wildcards.protocol"}


def test_every_path_in_a_shell_command_is_quoted():
    """Each {input}, {output}, {log} and path-valued {params.x} of every rule is shell-quoted ({...:q})."""
    unquoted = []
    for file in _smk_files():
        for name, spec in re.findall(r"\{([a-z_]+(?:\.[a-z_]+)?(?:\[\d+\])?)(:[^}]*)?\}", file.read_text()):
            if name.split(".")[0] in ("input", "output", "log", "params") and name not in _UNQUOTED and spec != ":q":
                unquoted.append(f"{file.name}: {{{name}{spec}}}")
    assert not unquoted, unquoted


def test_dvc_stages_run_each_dataset_target(tmp_path, monkeypatch):
    """dvc.yaml, as DVC resolves it: one stage per dataset target, results@<dataset> (one foreach stage), running
    its Snakemake target on the workflow, the package and the dataset's params, with persistent outputs."""
    from dvc.repo import Repo

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    stages = {s.name: s for s in Repo.init(tmp_path, no_scm=True).index.stages}
    assert list(stages) == [f"results@{d}" for d in ("demo", *DATASETS)]
    for dataset in ("demo", *DATASETS):
        stage = stages[f"results@{dataset}"]
        assert stage.cmd == f"python -m snakemake --cores all results/{dataset}"
        assert [d.def_path for d in stage.deps] == ["Snakefile", "workflow", "mcibi", f"params/{dataset}"]
        assert [(o.def_path, o.persist) for o in stage.outs] == [(f"runs/{dataset}", True),
                                                                  (f"results/{dataset}", True)]


def test_dry_run_plans_the_whole_chain(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    proc = _snakemake(repo, "-n", "--cores", "1", "results/demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for rule in ("download", "verify_archives", "prepare", "verify_data", "mlflow_experiment", "train", "evaluate",
                 "figures", "report"):
        assert rule in out, f"rule {rule} missing from the dry run"


def test_parsing_the_workflow_imports_neither_torch_nor_pandas(repo_copy):
    """Building the DAG (every params file of a dataset loaded and validated) stays fast: the rules' imports are
    torch- and pandas-free (mcibi.spec.params, mcibi.spec.runs, mcibi.catalogue.rows, mcibi.data.specs)."""
    # every import statement naming torch / pandas (cached or not) made by this repository's code (the Snakefile,
    # the rules, mcibi) is recorded; installed plugins may import pandas themselves (the SLURM executor plugin does)
    probe = """
import builtins, os, sys
heavy, real_import = set(), builtins.__import__
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if name.split(".")[0] in ("torch", "pandas"):
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(os.getcwd()) or caller.endswith((".smk", "Snakefile")):
            heavy.add(name + " from " + caller)
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = spy
from snakemake.cli import main
try:
    main(['-n', '--cores', '1', 'results/lip'])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print('heavy:', sorted(heavy), 'torch' in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=repo_copy, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "heavy: [] False" in proc.stdout, proc.stdout[-500:]  # and torch not at all


def test_dry_run_uses_the_local_profile(repo_copy):
    """Snakemake finds profiles/default beside the top-level Snakefile: its printshellcmds shows the commands
    although the dry run does not ask for them (-p)."""
    proc = _snakemake(repo_copy, "-n", "results/demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Using workflow specific profile profiles/default for setting default command line arguments." in out
    assert "mcibi download demo" in out  # a shell command, printed by the profile's printshellcmds


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("catalogue") / "repo")


def _plan(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts of a dry run's 'Job stats' table."""
    out = proc.stdout + proc.stderr
    stats = out[out.index("Job stats:"):]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}


@pytest.mark.parametrize("dataset", DATASETS)
def test_dry_run_plans_every_model_zoo_row_of_the_dataset(repo_copy, dataset):
    """`snakemake -n results/<dataset>` builds the full DAG in seconds: one training per params file, one
    evaluation per protocol (CityScapes test rows: an export for the server instead), figures per run."""
    start = time.time()
    proc = _snakemake(repo_copy, "-n", "--cores", "1", f"results/{dataset}")
    seconds = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    params = [load_params(f) for f in experiment_files(ROOT / "params", dataset)]
    server = [p for p in params if p.data.eval_split == "test" and dataset == "cityscapes"]
    plan = _plan(proc)
    assert plan["train"] == len(params) == plan["figures"]
    assert plan["evaluate"] == sum(len(p.evaluate.protocols) for p in params if p not in server)
    assert plan.get("export_test", 0) == sum(len(p.evaluate.protocols) for p in server)
    assert plan["report"] == 1 and plan["download"] == 1
    assert seconds < 30, f"dry run took {seconds:.1f} s"


def test_selection_and_seeds_from_the_config(repo_copy):
    proc = _snakemake(repo_copy, "-n", "-p", "--cores", "1", "results/lip", "--config", "seeds=2",
                      "experiments={lip: frameworks}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = _plan(proc)
    assert plan["train"] == 16 and plan["evaluate"] == 16  # 4 rows + 4 baselines, 2 seeds, ss only
    assert "--seed 1" in proc.stdout and "runs/lip/upernet_r50_baseline-seed1/model.pt" in proc.stdout
    assert "--seeds 2" in proc.stdout
    bad = _snakemake(repo_copy, "-n", "--cores", "1", "results/lip", "--config", "experiments={lip: [upernet_r18]}")
    assert bad.returncode != 0 and "experiments.lip names ['upernet_r18']" in bad.stdout + bad.stderr


def test_unknown_experiment_in_a_target_names_the_experiments_there_are(repo_copy):
    """A typo in a target's experiment stops the DAG build with the dataset's runs and the params folder, not a bare
    KeyError; so does a params file that the config does not select."""
    proc = _snakemake(repo_copy, "-n", "--cores", "1", "runs/demo/upernet_baselin/model.pt")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "KeyError" not in out
    assert ("unknown experiment 'upernet_baselin' of dataset 'demo' (no params/demo/upernet_baselin.yaml). The "
            "experiments of demo (params files in params/demo/ selected by workflow/config.yaml, 1 seed(s) each): "
            "upernet_baseline, upernet_mcibipp.") in " ".join(out.split()), out[-3000:]
    proc = _snakemake(repo_copy, "-n", "--cores", "1", "runs/lip/upernet_r50_baseline/eval/ss.json", "--config",
                      "experiments={lip: sota}")
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert ("unknown experiment 'upernet_r50_baseline' of dataset 'lip' (params/lip/upernet_r50_baseline.yaml exists "
            "but workflow/config.yaml experiments.lip does not select it)") in out, out[-3000:]
    assert "upernet_r101_mcibipp" in out and "upernet_r101_baseline" not in out  # the SOTA rows only


def _spaced_roots(repo: Path) -> list[str]:
    """--config with every root absolute inside ``repo`` (whose path holds a space and a non-ASCII character)."""
    return ["--config", *(f"{key}_root={repo / folder}" for key, folder in
                          (("data", "data"), ("downloads", "downloads"), ("params", "params"), ("runs", "runs")))]


def test_commands_quote_absolute_roots_with_spaces(tmp_path):
    """Roots with a space and an accent: every command of the demo chain, of the released weights (lip) and of the
    test-set exports (CityScapes) takes each path as one argument; then the data rules run for real there."""
    repo = copy_repo(tmp_path / "proj é")
    targets = ["results/demo", "results/lip/official", "results/cityscapes/official",
               str(repo / "runs" / "cityscapes" / "deeplabv3_hr48_mcibipp" / "test_msflip")]
    proc = _snakemake(repo, "-n", "-p", "--cores", "1", *targets, *_spaced_roots(repo))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    quoted = set()
    for rule, command in re.findall(r"^(?:local)?rule (\w+):\n.*?^Shell command: (.*?)$", proc.stdout, re.M | re.S):
        args = shlex.split(command)
        assert command.count(str(repo)) == sum(str(repo) in arg for arg in args), command  # one argument each
        assert not any(arg.endswith("proj") or arg.startswith("é/") for arg in args), command
        if str(repo) in command:
            quoted.add(rule)
    assert quoted == {"download", "verify_archives", "prepare", "verify_data", "train", "evaluate", "figures",
                      "report", "export_test", "official_download", "official_convert", "official_log",
                      "official_evaluate", "official_export", "official_table"}

    data = repo / "data" / "demo" / "verified.json"
    proc = _snakemake(repo, "--cores", "2", str(data), *_spaced_roots(repo))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data.is_file() and (repo / "data" / "demo" / "splits" / "val.txt").is_file()
    # the prepare job's benchmark (wall time, memory): beside the logs, not an output anything waits for
    bench = (repo / "benchmarks" / "prepare" / "demo.tsv").read_text().splitlines()
    assert bench[0].startswith("s\th:m:s\tmax_rss") and len(bench) == 2
    (repo / "benchmarks" / "prepare" / "demo.tsv").unlink()
    again = _snakemake(repo, "-n", "--cores", "2", str(data), *_spaced_roots(repo))
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_invalid_params_fail_at_dag_build(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    bad = repo / "params" / "demo" / "broken.yaml"
    bad.write_text("description: x\nmodel: {framework: upernet, memroy: {kind: none}}\n")
    proc = _snakemake(repo, "-n", "--cores", "1", "results/demo")
    assert proc.returncode != 0
    assert "broken.yaml: unknown key 'model.memroy'" in proc.stdout + proc.stderr


# How far the reduced demo's table may move on a kind of CPU without a recorded run: rounding alone (another
# instruction set or vendor sums in another order). Measured spread between the recorded kinds: 0.05 points
# (AVX-512 against AVX2 and the scalar kernels, bench/results/demo_reduced*.json); an OpenCV release that rounds the
# Normalize differently moved it by 0.28 (5.0 against 5.1), a broken transform or schedule moves it by points.
REDUCED_DEMO_TOLERANCE = 0.2


def _bench(module: str):
    """A module of bench/ (the scripts import their siblings by name, so bench/ goes on the path while it loads)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.pop(0)


def recorded_reduced_demos() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((ROOT / "bench" / "results").glob("demo_reduced*.json"))]


def check_reduced_demo_table(miou: dict[str, list[float]], recorded: list[dict]) -> str:
    """The reduced demo's figures against the recorded runs: the same digits where this CPU kind (model, torch
    kernel level, ISA cap) and the computing versions match a record, within REDUCED_DEMO_TOLERANCE otherwise.
    Returns which check applied."""
    from importlib.metadata import version

    import torch

    here = {"cpu": _bench("benchlib").cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "isa_cap": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}
    for run in recorded:
        m = run["machine"]
        same_kind = (m["cpu"], m["torch_cpu_capability"], m["isa_cap"]) == tuple(here.values())
        if same_kind and all(version(k) == v for k, v in run["versions"].items()):
            assert miou == run["miou"], f"reduced demo {miou} differs from {run['command']}'s {run['miou']}"
            return f"exact ({run['command']})"
    moved = min(max(abs(a - b) for k in miou for a, b in zip(miou[k], run["miou"][k], strict=True))
                for run in recorded)
    assert moved <= REDUCED_DEMO_TOLERANCE, (f"reduced demo {miou} moved {moved:.2f} points from every recorded run "
                                             f"(tolerance {REDUCED_DEMO_TOLERANCE}): {[r['miou'] for r in recorded]}")
    return f"within {REDUCED_DEMO_TOLERANCE} ({moved:.2f})"


def test_recorded_demo_figures_are_for_the_locked_versions():
    """bench/results/demo*.json (the README's demo table, the reduced demo the next test checks) were made with
    the versions the lock installs: after an upgrade of the lock, they are measured again."""
    pins = load_script(".ci/lock.py", "lock").read_pins((ROOT / "requirements.lock").read_text())
    runs = {p.name: json.loads(p.read_text()) for p in (ROOT / "bench" / "results").glob("demo*.json")}
    assert {"demo.json", "demo_avx2.json", "demo_reduced.json", "demo_reduced_avx2.json"} <= set(runs)
    for name, run in runs.items():
        for package, v in run["versions"].items():
            assert pins[package][0] == v.split("+")[0], (
                f"bench/results/{name} was made with {package} {v}, the lock has {pins[package][0]}: rerun "
                f"`{run['command']}`")


def test_reduced_demo_table_check_tells_exact_from_tolerance():
    run = recorded_reduced_demos()[0]
    with pytest.raises(AssertionError):
        check_reduced_demo_table({k: [x + 0.3 for x in v] for k, v in run["miou"].items()}, [run])
    shifted = {k: [x + 0.01 for x in v] for k, v in run["miou"].items()}
    elsewhere = dict(run, machine=dict(run["machine"], cpu="another CPU"))
    assert check_reduced_demo_table(shifted, [elsewhere]).startswith("within")


@pytest.mark.slow
@pytest.mark.workflow
def test_reduced_demo_chain_runs_end_to_end(tmp_path):
    """Every rule, in a folder whose path holds a space and an accent, every root absolute there."""
    repo = copy_repo(tmp_path / "proj é")
    roots = _spaced_roots(repo)
    defaults = repo / "params" / "demo" / "defaults.yaml"
    data = yaml.safe_load(defaults.read_text())
    data["train"]["epochs"] = 1  # 30 iterations instead of the demo's full schedule
    defaults.write_text(yaml.safe_dump(data))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = _snakemake(repo, "--cores", "2", "results/demo", *roots, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    for job in ("train/demo/upernet_mcibipp.tsv", "evaluate/demo/upernet_baseline/msflip.tsv", "prepare/demo.tsv"):
        assert (repo / "benchmarks" / job).is_file(), job  # wall time and memory of each job

    table = (repo / "results" / "demo" / "table.md").read_text()
    assert "| UperNet | MCIBI++ |" in table and "| UperNet | - |" in table
    assert "not run" not in table
    # the figures: those of the recorded run on this kind of CPU, or within rounding of them
    print("reduced demo table:", check_reduced_demo_table(_bench("demo").table_miou(table), recorded_reduced_demos()))
    mem_line = next(line for line in table.splitlines() if "| UperNet | MCIBI++ |" in line)
    assert "/#/experiments/" in mem_line and mem_line.count("%") >= 6  # ours x3, the baseline's x3, a run link
    csv = (repo / "results" / "demo" / "table.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("Experiment,Section,Segmentor")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("mcibi-demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 6
    assert {r.data.tags["memory"] for r in parents} == {"none", "mcibi++"}
    assert {r.data.tags["protocol"] for r in children} == {"ss", "flip", "msflip"}
    for r in parents:
        assert {"mIoU.ss", "mIoU.flip", "mIoU.msflip", "loss_total"} <= set(r.data.metrics)
        assert {"params_hash", "data_version", "framework", "backbone", "memory", "seed", "crop",
                "schedule"} <= set(r.data.tags)
        figures = {a.path for a in client.list_artifacts(r.info.run_id, "figures")}
        assert {"figures/confusion_ss.png", "figures/iou_ss.png", "figures/per_class_iou.csv",
                "figures/predictions.png"} <= figures
        assert ("figures/memory_trajectories.png" in figures) == (r.data.tags["memory"] != "none")
        assert r.data.params["model.framework"] == "upernet"
        assert len(client.get_metric_history(r.info.run_id, "loss_total")) >= 2

    again = _snakemake(repo, "-n", "--cores", "2", "results/demo", *roots, env=env)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    report = _snakemake(repo, "--report", "report.html", "results/demo", *roots, env=env)  # the Snakemake report
    assert report.returncode == 0, report.stderr[-3000:]
    categories = re.search(r"categories = (\{.*?\});", (repo / "report.html").read_text()).group(1)
    assert all(n in categories for n in ('"demo"', '"results table"', '"upernet_mcibipp"', "confusion_msflip.png"))

    # edits that change no trajectory and no protocol rerun nothing: description, resources, layout, window batch
    exp = repo / "params" / "demo" / "upernet_mcibipp.yaml"
    text = exp.read_text()
    data["train"]["resources"]["cpus_per_gpu"] += 1
    data["train"]["channels_last"] = {"auto": False, False: True, True: False}[data["train"]["channels_last"]]
    data["evaluate"]["window_batch"] += 1
    defaults.write_text(yaml.safe_dump(data))
    exp.write_text(text.replace("description:", "description: Edited.", 1))
    def plan() -> dict[str, int]:
        return _jobs(_snakemake(repo, "-n", "--cores", "2", "results/demo", *roots, env=env))

    assert plan() == {}
    # a changed protocol re-evaluates that protocol only (then the figures and the table); no training
    data["evaluate"]["protocols"]["msflip"]["scales"] = [0.75, 1.0]
    defaults.write_text(yaml.safe_dump(data))
    assert plan() == {"evaluate": 2, "figures": 2, "report": 1}
    # prepared files that changed since they were verified are verified again, and a failure stops everything
    label = sorted((repo / "data" / "demo" / "labels").glob("train_*.png"))[0]
    values = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    values[:2, :2] = 42
    cv2.imwrite(str(label), values)
    assert plan()["verify_data"] == 1
    proc = _snakemake(repo, "--cores", "2", "results/demo", *roots, env=env)
    assert proc.returncode != 0 and "verify_data" in proc.stdout + proc.stderr
    assert not (repo / "data" / "demo" / "verified.json").exists()
    assert f"{label.name}: label values [42]" in (repo / "logs" / "verify_data" / "demo.log").read_text()


def _jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts of a dry run (empty when nothing is to be done)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    return {r.split()[0]: int(r.split()[1]) for r in table if r.split() and r.split()[0] != "total"}
