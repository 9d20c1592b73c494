# One training job per experiment; the dataset's MLflow experiment is created once, before any job logs to it.
# Jobs ask for the resources their params state (train.resources: gpus, cpus_per_gpu, mem_mb, runtime); more than
# one GPU launches `torchrun --nproc_per_node=<gpus>`. `mcibi train` resumes from the newest checkpoint under
# runs/<dataset>/<experiment>/checkpoints/ (not a declared output, so Snakemake never deletes it): a job cut by a
# wall-time limit continues when it is resubmitted (the SLURM profile retries failed jobs).
# Logs, in every rule: Snakemake deletes a job's log before each run, so the log holds the last attempt and
# <log>.attempts every attempt, appended (each opens with an "===== attempt" line).


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
        "mcibi mlflow-init {wildcards.dataset} --out {output:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"


rule train:
    input:
        data=rules.verify_data.output,
        dvc=ancient(rules.dvc_commit.output),  # the verified data is versioned before any run records it
        mlflow=ancient(rules.mlflow_experiment.output),  # orders jobs; its timestamp never retrains
    output:
        checkpoint=f"{RUNS}/{{dataset}}/{{experiment}}/model.pt",
        curve=f"{RUNS}/{{dataset}}/{{experiment}}/loss.csv",
        run=f"{RUNS}/{{dataset}}/{{experiment}}/run.json",
    log:
        "logs/train/{dataset}/{experiment}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{dataset}}/{{experiment}}.tsv"
    conda:
        "../envs/mcibi.yaml"
    threads: TRAIN_JOB.threads
    resources:
        **TRAIN_JOB.resources,
    params:
        data=data_root,
        out=train_run_dir,
        launcher=TRAIN_JOB.launcher,
        torch_threads=TRAIN_JOB.torch_threads,
        seed=run_seed,
        file=params_file,
        trajectory=trajectory_of,
    shell:
        "{params.launcher} train {params.file:q} --data-root {params.data:q} --out {params.out:q}"
        " --threads {params.torch_threads} --seed {params.seed} 2>&1 | tee -a {log:q}.attempts > {log:q}"
