# The authors' released weights and logs of the SOTA rows (mcibi.released):
#   snakemake --cores all results/<dataset>/official
# downloads each row's .pth and .log (resumable; sha256 recorded, then verified), converts the checkpoint, evaluates
# it under the row's protocols on the prepared data (CityScapes test rows: exported for the server), turns the log
# into an MLflow run (tag source=official) whose child runs hold the evaluations, and writes the dataset's table
# with the column "Official weights (our evaluation)". Everything lives under runs/<dataset>/official/<experiment>/.
from mcibi.released import releases

OFFICIAL = f"{RUNS}/{{dataset}}/official/{{experiment}}"
_OFFICIAL_PARAMS = {}


def official_params(dataset, experiment):
    """Validated params of a released SOTA row (whatever workflow/config.yaml selects for training)."""
    key = (dataset, experiment)
    if key not in _OFFICIAL_PARAMS:
        _OFFICIAL_PARAMS[key] = load_params(Path(PARAMS) / dataset / f"{experiment}.yaml")
    return _OFFICIAL_PARAMS[key]


def official_rows(dataset):
    """The dataset's released rows that have a params file."""
    stems = {f.stem for f in experiment_files(PARAMS, dataset)}
    return [stem for stem in releases(dataset) if stem in stems]


def official_params_files(wildcards):
    files = [f"{PARAMS}/{wildcards.dataset}/{wildcards.experiment}.yaml"]
    defaults = Path(PARAMS) / wildcards.dataset / "defaults.yaml"
    return files + ([str(defaults)] if defaults.is_file() else [])


def official_results(wildcards):
    out = []
    for stem in official_rows(wildcards.dataset):
        p = official_params(wildcards.dataset, stem)
        base = f"{RUNS}/{wildcards.dataset}/official/{stem}"
        server = p.data.eval_split in get_spec(p.data.name).unlabelled_splits
        out += [f"{base}/{'test_' if server else 'eval/'}{proto}{'' if server else '.json'}"
                for proto in p.evaluate.protocols]
        out.append(f"{base}/run.json")
    return out


def _eval_resources(wc):
    return official_params(wc.dataset, wc.experiment).evaluate.resources


rule official_download:
    output:
        f"{OFFICIAL}/release/release.json",
    log:
        "logs/official/{dataset}/{experiment}/download.log",
    resources:
        downloads=1,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi released download {wildcards.dataset}/{wildcards.experiment}"
        " --release-dir $(dirname {output}) > {log} 2>&1"


rule official_convert:
    input:
        record=rules.official_download.output,
        params=official_params_files,
    output:
        f"{OFFICIAL}/model.pt",
    log:
        "logs/official/{dataset}/{experiment}/convert.log",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi released convert {input.params[0]} --release-dir $(dirname {input.record}) --out {output} > {log} 2>&1"


rule official_log:
    input:
        record=rules.official_download.output,
        params=official_params_files,
        mlflow=ancient(rules.mlflow_experiment.output),
    output:
        f"{OFFICIAL}/run.json",
    log:
        "logs/official/{dataset}/{experiment}/log.log",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi released log {input.params[0]} --release-dir $(dirname {input.record}) --out {output} > {log} 2>&1"


rule official_evaluate:
    input:
        data=rules.verify_data.output,
        checkpoint=rules.official_convert.output,
        run=rules.official_log.output,
        params=official_params_files,
    output:
        metrics=f"{OFFICIAL}/eval/{{protocol}}.json",
        per_class=f"{OFFICIAL}/eval/{{protocol}}_per_class.csv",
    log:
        "logs/official/{dataset}/{experiment}/evaluate_{protocol}.log",
    threads: lambda wc: job_threads(_eval_resources(wc))
    resources:
        mem_mb=lambda wc: _eval_resources(wc).mem_mb,
        runtime=lambda wc: _eval_resources(wc).runtime,
        gpu=lambda wc: _eval_resources(wc).gpus,
        cpus_per_task=lambda wc: job_threads(_eval_resources(wc)),
    params:
        data=lambda wc, input: os.path.dirname(os.path.dirname(input.data[0])),
        launcher=lambda wc: launcher(_eval_resources(wc)),
        torch_threads=lambda wc: _eval_resources(wc).cpus_per_gpu,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "{params.launcher} evaluate {input.params[0]} --checkpoint {input.checkpoint} --protocol {wildcards.protocol}"
        " --data-root {params.data} --out-json {output.metrics} --out-csv {output.per_class}"
        " --threads {params.torch_threads} > {log} 2>&1"


rule official_export:
    input:
        data=rules.verify_data.output,
        checkpoint=rules.official_convert.output,
        params=official_params_files,
    output:
        directory(f"{OFFICIAL}/test_{{protocol}}"),
    log:
        "logs/official/{dataset}/{experiment}/export_{protocol}.log",
    threads: lambda wc: job_threads(_eval_resources(wc))
    resources:
        mem_mb=lambda wc: _eval_resources(wc).mem_mb,
        runtime=lambda wc: _eval_resources(wc).runtime,
        gpu=lambda wc: _eval_resources(wc).gpus,
    params:
        data=lambda wc, input: os.path.dirname(os.path.dirname(input.data[0])),
        launcher=lambda wc: launcher(_eval_resources(wc)),
        torch_threads=lambda wc: _eval_resources(wc).cpus_per_gpu,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "{params.launcher} export {input.params[0]} --checkpoint {input.checkpoint} --protocol {wildcards.protocol}"
        " --split test --data-root {params.data} --out {output} --threads {params.torch_threads} > {log} 2>&1"


rule official_table:
    input:
        official_results,
        experiment_id=ancient(rules.mlflow_experiment.output),
    output:
        directory("results/{dataset}/official"),
    log:
        "logs/official/{dataset}/table.log",
    params:
        params_root=PARAMS,
        runs=RUNS,
        experiments=lambda wc: " ".join(official_rows(wc.dataset)),
        ui=config["mlflow_ui"],
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi table {wildcards.dataset} --params-root {params.params_root} --runs {params.runs} --out {output}"
        " --experiments {params.experiments} --mlflow-ui {params.ui} --experiment-id-file {input.experiment_id}"
        " > {log} 2>&1"
