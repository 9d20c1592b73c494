# Each checkpoint under each protocol its params define: ss (single scale), flip, msflip (multi-scale + flip).


rule evaluate:
    input:
        data=rules.verify_data.output,
        checkpoint=rules.train.output.checkpoint,
        run=rules.train.output.run,
        params=experiment_params,
    output:
        metrics=f"{RUNS}/{{dataset}}/{{experiment}}/eval/{{protocol}}.json",
        per_class=f"{RUNS}/{{dataset}}/{{experiment}}/eval/{{protocol}}_per_class.csv",
    log:
        "logs/evaluate/{dataset}/{experiment}/{protocol}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        data=lambda wc, input: os.path.dirname(os.path.dirname(input.data[0])),
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi evaluate {input.params[0]} --checkpoint {input.checkpoint} --protocol {wildcards.protocol}"
        " --data-root {params.data} --out-json {output.metrics} --out-csv {output.per_class} --threads {threads}"
        " > {log} 2>&1"
