# Custom datasets: every description registered as datasets/<name>.yaml (`mcibi new-dataset`) is a dataset of the
# workflow. Its data come from the user's folders instead of download -> verify_archives -> prepare: the
# prepare_custom rule validates and converts them (reruns when the description or any image/mask changes); then
# verify_data, train, evaluate, figures and the table run as for the built-in datasets.
from mcibi.data.custom import description_path, registered_datasets, source_files

CUSTOM_DATASETS = registered_datasets()
for _custom in CUSTOM_DATASETS:
    EXPERIMENTS.setdefault(_custom, _selected(_custom))


if CUSTOM_DATASETS:

    ruleorder: prepare_custom > prepare

    rule prepare_custom:
        input:
            lambda wc: source_files(wc.dataset),  # the description and every image and mask
        output:
            f"{DATA}/{{dataset}}/manifest.json",
        wildcard_constraints:
            dataset="|".join(CUSTOM_DATASETS),
        log:
            "logs/prepare/{dataset}.log",
        params:
            description=lambda wc: description_path(wc.dataset),
            out=lambda wc: f"{DATA}/{wc.dataset}",
        conda:
            "../envs/mcibi.yaml"
        shell:
            "mcibi prepare-custom {params.description} --out {params.out} 2>&1 | tee -a {log}.attempts > {log}"
