# Custom datasets: every description registered as datasets/<name>.yaml (`mcibi new-dataset`) is a dataset of the
# workflow (CUSTOM_DATASETS; common.smk selects and validates their experiments with the others). Its data come from
# the user's folders instead of download -> verify_archives -> prepare: the prepare_custom rule validates and
# converts them (reruns when the description or any image/mask changes); then verify_data, train, evaluate, figures
# and the table run as for the built-in datasets.
from mcibi.data.custom import description_path, source_files

if CUSTOM_DATASETS:

    ruleorder: prepare_custom > prepare

    rule prepare_custom:
        input:
            lambda wc: source_files(wc.dataset),  # the description and every image and mask
        output:
            f"{DATA}/{{dataset}}/manifest.json",
        log:
            "logs/prepare/{dataset}.log",
        benchmark:
            f"{BENCHMARKS}/prepare/{{dataset}}.tsv"
        wildcard_constraints:
            dataset="|".join(CUSTOM_DATASETS),
        conda:
            "../envs/mcibi.yaml"
        params:
            description=lambda wc: description_path(wc.dataset),
            out=dataset_data,
        shell:
            "mcibi prepare-custom {params.description:q} --out {params.out:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"
