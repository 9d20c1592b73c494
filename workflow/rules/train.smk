# One training job per experiment; the dataset's MLflow experiment is created once, before any job logs to it.


localrules:
    mlflow_experiment,


rule mlflow_experiment:
    output:
        "logs/mlflow/{dataset}.experiment",
    log:
        "logs/mlflow/{dataset}.log",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi mlflow-init {wildcards.dataset} --out {output} > {log} 2>&1"


rule train:
    input:
        data=rules.verify_data.output,
        params=experiment_params,
        mlflow=ancient(rules.mlflow_experiment.output),  # orders jobs; its timestamp never retrains
    output:
        checkpoint=f"{RUNS}/{{dataset}}/{{experiment}}/model.pt",
        curve=f"{RUNS}/{{dataset}}/{{experiment}}/loss.csv",
        run=f"{RUNS}/{{dataset}}/{{experiment}}/run.json",
    log:
        "logs/train/{dataset}/{experiment}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        data=lambda wc, input: os.path.dirname(os.path.dirname(input.data[0])),
        out=lambda wc, output: os.path.dirname(output.checkpoint),
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi train {input.params[0]} --data-root {params.data} --out {params.out}"
        " --threads {threads} > {log} 2>&1"
