# mcibi: download -> verify -> prepare -> train -> evaluate (ss, flip, ms+flip) -> results/<dataset> tables.
# Wiring only; every rule calls the `mcibi` CLI. Usage: snakemake --cores all results/<dataset> (demo, lip, ade20k,
# cityscapes, cocostuff10k, vspw, pascalvoc, pascalcontext); workflow/config.yaml selects experiments and seeds.
from snakemake.utils import min_version

min_version("9.19")


configfile: "workflow/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/custom.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/official.smk"


rule all:
    default_target: True
    input:
        expand("results/{dataset}", dataset=config["default_datasets"]),
