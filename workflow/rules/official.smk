# The authors' released weights and logs of the SOTA rows (mcibi.official.released):
#   snakemake --cores all results/<dataset>/official
# downloads each row's .pth and .log (resumable; sha256 recorded, then verified), converts the checkpoint, evaluates
# it under the row's protocols on the prepared data (CityScapes test rows: exported for the server), turns the log
# into an MLflow run (tag source=official) whose child runs hold the evaluations, and writes the dataset's table
# with the column "Official weights (our evaluation)". Everything lives under runs/<dataset>/official/<experiment>/.
from mcibi.official.released import release_params, release_params_files, released_outputs, released_rows

OFFICIAL = f"{RUNS}/{{dataset}}/official/{{experiment}}"


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
        " --release-dir $(dirname {output}) 2>&1 | tee -a {log}.attempts > {log}"


rule official_convert:
    input:
        record=rules.official_download.output,
        params=lambda wc: release_params_files(PARAMS, wc.dataset, wc.experiment),
    output:
        f"{OFFICIAL}/model.pt",
    log:
        "logs/official/{dataset}/{experiment}/convert.log",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi released convert {input.params[0]} --release-dir $(dirname {input.record}) --out {output}"
        " 2>&1 | tee -a {log}.attempts > {log}"


rule official_log:
    input:
        record=rules.official_download.output,
        params=lambda wc: release_params_files(PARAMS, wc.dataset, wc.experiment),
        mlflow=ancient(rules.mlflow_experiment.output),
    output:
        f"{OFFICIAL}/run.json",
    log:
        "logs/official/{dataset}/{experiment}/log.log",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi released log {input.params[0]} --release-dir $(dirname {input.record}) --out {output}"
        " 2>&1 | tee -a {log}.attempts > {log}"


rule official_evaluate:
    input:
        data=rules.verify_data.output,
        checkpoint=rules.official_convert.output,
        run=rules.official_log.output,
        params=lambda wc: release_params_files(PARAMS, wc.dataset, wc.experiment),
    output:
        metrics=f"{OFFICIAL}/eval/{{protocol}}.json",
        per_class=f"{OFFICIAL}/eval/{{protocol}}_per_class.csv",
    log:
        "logs/official/{dataset}/{experiment}/evaluate_{protocol}.log",
    threads: lambda wc: job_threads(release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources)
    resources:
        mem_mb=lambda wc: release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources.mem_mb,
        runtime=lambda wc: release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources.runtime,
        gpu=lambda wc: release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources.gpus,
        cpus_per_task=lambda wc: job_threads(release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources),
    params:
        data=lambda wc, input: os.path.dirname(os.path.dirname(input.data[0])),
        launcher=lambda wc: launcher(release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources),
        torch_threads=lambda wc: release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources.cpus_per_gpu,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "{params.launcher} evaluate {input.params[0]} --checkpoint {input.checkpoint} --protocol {wildcards.protocol}"
        " --data-root {params.data} --out-json {output.metrics} --out-csv {output.per_class}"
        " --threads {params.torch_threads} 2>&1 | tee -a {log}.attempts > {log}"


rule official_export:
    input:
        data=rules.verify_data.output,
        checkpoint=rules.official_convert.output,
        params=lambda wc: release_params_files(PARAMS, wc.dataset, wc.experiment),
    output:
        directory(f"{OFFICIAL}/test_{{protocol}}"),
    log:
        "logs/official/{dataset}/{experiment}/export_{protocol}.log",
    threads: lambda wc: job_threads(release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources)
    resources:
        mem_mb=lambda wc: release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources.mem_mb,
        runtime=lambda wc: release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources.runtime,
        gpu=lambda wc: release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources.gpus,
    params:
        data=lambda wc, input: os.path.dirname(os.path.dirname(input.data[0])),
        launcher=lambda wc: launcher(release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources),
        torch_threads=lambda wc: release_params(PARAMS, wc.dataset, wc.experiment).evaluate.resources.cpus_per_gpu,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "{params.launcher} export {input.params[0]} --checkpoint {input.checkpoint} --protocol {wildcards.protocol}"
        " --split test --data-root {params.data} --out {output} --threads {params.torch_threads}"
        " 2>&1 | tee -a {log}.attempts > {log}"


rule official_table:
    input:
        lambda wc: released_outputs(RUNS, PARAMS, wc.dataset),
        experiment_id=ancient(rules.mlflow_experiment.output),
    output:
        directory("results/{dataset}/official"),
    log:
        "logs/official/{dataset}/table.log",
    params:
        params_root=PARAMS,
        runs=RUNS,
        experiments=lambda wc: " ".join(released_rows(PARAMS, wc.dataset)),
        ui=config["mlflow_ui"],
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi table {wildcards.dataset} --params-root {params.params_root} --runs {params.runs} --out {output}"
        " --experiments {params.experiments} --mlflow-ui {params.ui} --experiment-id-file {input.experiment_id}"
        " 2>&1 | tee -a {log}.attempts > {log}"
