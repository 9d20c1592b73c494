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
    conda:
        "../envs/mcibi.yaml"
    threads: 1  # files only: no model, no GPU (the overlays come from the evaluations' samples)
    resources:
        **FIGURES_JOB.resources,
    params:
        data=data_root,
        run_dir=checkpoint_run_dir,
        seed=run_seed,
        images=config["overlay_images"],
        file=params_file,  # the run's params file: its protocols reach the figures through the evaluations
    shell:
        "mcibi figures {params.file:q} --run-dir {params.run_dir:q} --data-root {params.data:q} --seed {params.seed}"
        " --images {params.images} --out {output:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"


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
    conda:
        "../envs/mcibi.yaml"
    params:
        params_root=PARAMS,
        runs=RUNS,
        experiments=report_experiments,
        seeds=report_seeds,
        ui=config["mlflow_ui"],
    shell:
        "mcibi table {wildcards.dataset} --params-root {params.params_root:q} --runs {params.runs:q}"
        " --out {output:q} --experiments {params.experiments:q} --seeds {params.seeds} --mlflow-ui {params.ui:q}"
        " --experiment-id-file {input.experiment_id:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"
