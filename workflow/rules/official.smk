# The authors' released weights and logs of the SOTA rows (mcibi.official.released):
#   snakemake --cores all results/<dataset>/official
# downloads each row's .pth and .log (resumable; sha256 recorded, then verified), converts the checkpoint, evaluates
# it under the row's protocols on the prepared data (CityScapes test rows: exported for the server), turns the log
# into an MLflow run (tag source=official) whose child runs hold the evaluations, and writes the dataset's table
# with the column "Official weights (our evaluation)". Everything lives under runs/<dataset>/official/<experiment>/.
# Evaluations and exports ask for the row's evaluate.resources (OFFICIAL_EVAL_JOB, common.smk).

OFFICIAL = f"{RUNS}/{{dataset}}/official/{{experiment}}"


rule official_download:
    output:
        record=f"{OFFICIAL}/release/release.json",
    log:
        "logs/official/{dataset}/{experiment}/download.log",
    conda:
        "../envs/mcibi.yaml"
    resources:
        downloads=1,
    params:
        release_dir=release_dir_out,
    shell:
        "mcibi released download {wildcards.dataset}/{wildcards.experiment}"
        " --release-dir {params.release_dir:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"


rule official_convert:
    input:
        record=rules.official_download.output.record,
        params=official_params_files,
    output:
        f"{OFFICIAL}/model.pt",
    log:
        "logs/official/{dataset}/{experiment}/convert.log",
    conda:
        "../envs/mcibi.yaml"
    params:
        release_dir=release_dir,
    shell:
        "mcibi released convert {input.params[0]:q} --release-dir {params.release_dir:q} --out {output:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"


rule official_log:
    input:
        record=rules.official_download.output.record,
        params=official_params_files,
        mlflow=ancient(rules.mlflow_experiment.output),
    output:
        f"{OFFICIAL}/run.json",
    log:
        "logs/official/{dataset}/{experiment}/log.log",
    conda:
        "../envs/mcibi.yaml"
    params:
        release_dir=release_dir,
    shell:
        "mcibi released log {input.params[0]:q} --release-dir {params.release_dir:q} --out {output:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"


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
    conda:
        "../envs/mcibi.yaml"
    threads: OFFICIAL_EVAL_JOB.threads
    resources:
        **OFFICIAL_EVAL_JOB.resources,
    params:
        data=data_root,
        launcher=OFFICIAL_EVAL_JOB.launcher,
        torch_threads=OFFICIAL_EVAL_JOB.torch_threads,
    shell:
        "{params.launcher} evaluate {input.params[0]:q} --checkpoint {input.checkpoint:q}"
        " --protocol {wildcards.protocol} --data-root {params.data:q} --out-json {output.metrics:q}"
        " --out-csv {output.per_class:q} --threads {params.torch_threads} 2>&1 | tee -a {log:q}.attempts > {log:q}"


rule official_export:
    input:
        data=rules.verify_data.output,
        checkpoint=rules.official_convert.output,
        params=official_params_files,
    output:
        directory(f"{OFFICIAL}/test_{{protocol}}"),
    log:
        "logs/official/{dataset}/{experiment}/export_{protocol}.log",
    conda:
        "../envs/mcibi.yaml"
    threads: OFFICIAL_EVAL_JOB.threads
    resources:
        **OFFICIAL_EVAL_JOB.resources,
    params:
        data=data_root,
        launcher=OFFICIAL_EVAL_JOB.launcher,
        torch_threads=OFFICIAL_EVAL_JOB.torch_threads,
    shell:
        "{params.launcher} export {input.params[0]:q} --checkpoint {input.checkpoint:q}"
        " --protocol {wildcards.protocol} --split test --data-root {params.data:q} --out {output:q}"
        " --threads {params.torch_threads} 2>&1 | tee -a {log:q}.attempts > {log:q}"


rule official_table:
    input:
        official_outputs,
        experiment_id=ancient(rules.mlflow_experiment.output),
    output:
        directory("results/{dataset}/official"),
    log:
        "logs/official/{dataset}/table.log",
    conda:
        "../envs/mcibi.yaml"
    params:
        params_root=PARAMS,
        runs=RUNS,
        experiments=official_experiments,
        ui=config["mlflow_ui"],
    shell:
        "mcibi table {wildcards.dataset} --params-root {params.params_root:q} --runs {params.runs:q} --out {output:q}"
        " --experiments {params.experiments:q} --mlflow-ui {params.ui:q}"
        " --experiment-id-file {input.experiment_id:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"
