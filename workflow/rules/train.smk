# One training job per experiment; the dataset's MLflow experiment is created once, before any job logs to it.
# Jobs ask for the resources their params state (train.resources: gpus, cpus_per_gpu, mem_mb, runtime); more than
# one GPU launches `torchrun --nproc_per_node=<gpus>`. `mcibi train` resumes from the newest checkpoint under
# runs/<dataset>/<experiment>/checkpoints/ (not a declared output, so Snakemake never deletes it): a job cut by a
# wall-time limit continues when it is resubmitted (the SLURM profile retries failed jobs).


from mcibi.distributed import job_threads, launcher


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
        dvc=ancient(rules.dvc_commit.output),  # the verified data is versioned before any run records it
        mlflow=ancient(rules.mlflow_experiment.output),  # orders jobs; its timestamp never retrains
    output:
        checkpoint=f"{RUNS}/{{dataset}}/{{experiment}}/model.pt",
        curve=f"{RUNS}/{{dataset}}/{{experiment}}/loss.csv",
        run=f"{RUNS}/{{dataset}}/{{experiment}}/run.json",
    log:
        "logs/train/{dataset}/{experiment}.log",
    threads: lambda wc: job_threads(EXPERIMENTS[wc.dataset][wc.experiment].train.resources)
    resources:
        mem_mb=lambda wc: EXPERIMENTS[wc.dataset][wc.experiment].train.resources.mem_mb,
        runtime=lambda wc: EXPERIMENTS[wc.dataset][wc.experiment].train.resources.runtime,
        gpu=lambda wc: EXPERIMENTS[wc.dataset][wc.experiment].train.resources.gpus,
        cpus_per_task=lambda wc: job_threads(EXPERIMENTS[wc.dataset][wc.experiment].train.resources),
    params:
        data=lambda wc, input: os.path.dirname(os.path.dirname(input.data[0])),
        out=lambda wc, output: os.path.dirname(output.checkpoint),
        launcher=lambda wc: Untracked(launcher(EXPERIMENTS[wc.dataset][wc.experiment].train.resources)),
        torch_threads=lambda wc: Untracked(EXPERIMENTS[wc.dataset][wc.experiment].train.resources.cpus_per_gpu),
        seed=run_seed,
        file=params_file,
        trajectory=trajectory_of,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "{params.launcher} train {params.file} --data-root {params.data} --out {params.out}"
        " --threads {params.torch_threads} --seed {params.seed} >> {log} 2>&1"
