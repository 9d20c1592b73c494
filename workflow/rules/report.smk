# results/<dataset>/: table.md and table.csv in the seed model zoo's layout.


rule report:
    input:
        evaluations,
    output:
        directory("results/{dataset}"),
    log:
        "logs/report/{dataset}.log",
    params:
        params_root=PARAMS,
        runs=RUNS,
        experiments=lambda wc: " ".join(EXPERIMENTS[wc.dataset]),
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi table {wildcards.dataset} --params-root {params.params_root} --runs {params.runs}"
        " --out {output} --experiments {params.experiments} > {log} 2>&1"
