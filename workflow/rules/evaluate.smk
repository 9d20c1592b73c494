# Each checkpoint under each protocol its params define: ss (single scale), flip, msflip (multi-scale + flip).
# Resources come from evaluate.resources; several GPUs split the images (torchrun) and sum confusion matrices.
# A job reruns when its checkpoint or what its protocol reads changes (mcibi.params.protocol_hash), not when another
# protocol, the description or the resources are edited. The figures job, which waits for every protocol of a run,
# logs the evaluations to MLflow (importing MLflow and opening its store would cost each job seconds) and draws the
# overlays from the samples the evaluations keep, so it never loads torch or the model.


rule evaluate:
    input:
        data=rules.verify_data.output,
        checkpoint=rules.train.output.checkpoint,
        run=rules.train.output.run,
    output:
        metrics=f"{RUNS}/{{dataset}}/{{experiment}}/eval/{{protocol}}.json",
        per_class=f"{RUNS}/{{dataset}}/{{experiment}}/eval/{{protocol}}_per_class.csv",
        samples=f"{RUNS}/{{dataset}}/{{experiment}}/eval/{{protocol}}_samples.npz",  # the figures' overlays
    log:
        "logs/evaluate/{dataset}/{experiment}/{protocol}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate/{{dataset}}/{{experiment}}/{{protocol}}.tsv"
    priority: eval_priority
    conda:
        "../envs/mcibi.yaml"
    threads: EVAL_JOB.threads
    resources:
        **EVAL_JOB.resources,
    params:
        data=data_root,
        launcher=EVAL_JOB.launcher,
        torch_threads=EVAL_JOB.torch_threads,
        seed=run_seed,
        file=params_file,
        protocol=protocol_of,
        images=config["overlay_images"],
    shell:
        "{params.launcher} evaluate {params.file:q} --checkpoint {input.checkpoint:q} --protocol {wildcards.protocol}"
        " --data-root {params.data:q} --out-json {output.metrics:q} --out-csv {output.per_class:q}"
        " --samples-out {output.samples:q} --samples {params.images}"
        " --threads {params.torch_threads} --seed {params.seed} --no-mlflow 2>&1 | tee -a {log:q}.attempts > {log:q}"


# Test-set predictions for an evaluation server (CityScapes: labelIds PNGs), built only on request, e.g.
#   snakemake --cores all runs/cityscapes/<experiment>/test_msflip
rule export_test:
    input:
        data=rules.verify_data.output,
        checkpoint=rules.train.output.checkpoint,
    output:
        directory(f"{RUNS}/{{dataset}}/{{experiment}}/test_{{protocol}}"),
    log:
        "logs/export_test/{dataset}/{experiment}/{protocol}.log",
    conda:
        "../envs/mcibi.yaml"
    threads: EVAL_JOB.threads
    resources:
        **EVAL_JOB.resources,
    params:
        data=data_root,
        launcher=EVAL_JOB.launcher,
        torch_threads=EVAL_JOB.torch_threads,
        file=params_file,
        protocol=protocol_of,
    shell:
        "{params.launcher} export {params.file:q} --checkpoint {input.checkpoint:q} --protocol {wildcards.protocol}"
        " --split test --data-root {params.data:q} --out {output:q} --threads {params.torch_threads} 2>&1 | tee -a {log:q}.attempts > {log:q}"
