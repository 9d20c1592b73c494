# results/<dataset>/: table.md and table.csv in the MCIBI++ model zoo's layout (our mIoU per protocol, published,
# delta, paired baseline, gain, MLflow links), after every selected run is evaluated and has its figures.


rule figures:
    input:
        evaluations=run_evaluations,
        checkpoint=rules.train.output.checkpoint,
        run=rules.train.output.run,
        data=rules.verify_data.output,
    output:
        report(
            directory(f"{RUNS}/{{dataset}}/{{experiment}}/figures"),
            patterns=["{figure}.png", "{figure}.csv"],
            caption="../report/figures.rst",
            category="{dataset}",
            subcategory="{experiment}",
            labels={"run": "{experiment}", "figure": "{figure}"},
        ),
    log:
        "logs/figures/{dataset}/{experiment}.log",
    threads: 1  # files only: no model, no GPU (the overlays come from the evaluations' samples)
    resources:
        mem_mb=eval_mem_mb,
        runtime=30,
        gpu=0,
        cpus_per_task=1,
    params:
        data=data_root,
        run_dir=checkpoint_run_dir,
        seed=run_seed,
        images=config["overlay_images"],
        file=params_file,  # the run's params file: its protocols reach the figures through the evaluations
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi figures {params.file} --run-dir {params.run_dir} --data-root {params.data} --seed {params.seed}"
        " --images {params.images} --out {output} 2>&1 | tee -a {log}.attempts > {log}"


rule report:
    input:
        evaluations,
        experiment_id=ancient(rules.mlflow_experiment.output),
    output:
        report(
            directory("results/{dataset}"),
            patterns=["{table}.csv"],
            caption="../report/table.rst",
            category="{dataset}",
            subcategory="results table",
            labels={"dataset": "{dataset}", "table": "{table}"},
        ),
    log:
        "logs/report/{dataset}.log",
    params:
        params_root=PARAMS,
        runs=RUNS,
        experiments=report_experiments,
        seeds=report_seeds,
        ui=config["mlflow_ui"],
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi table {wildcards.dataset} --params-root {params.params_root} --runs {params.runs}"
        " --out {output} --experiments {params.experiments} --seeds {params.seeds} --mlflow-ui {params.ui}"
        " --experiment-id-file {input.experiment_id} 2>&1 | tee -a {log}.attempts > {log}"
