# download -> verify archives -> prepare -> verify prepared data (demo: the archive is generated locally).


rule download:
    output:
        record=f"{DOWNLOADS}/{{dataset}}/downloaded.json",
    log:
        "logs/download/{dataset}.log",
    params:
        dest=lambda wc: f"{DOWNLOADS}/{wc.dataset}",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi download {wildcards.dataset} --dest {params.dest} --record {output.record} > {log} 2>&1"


rule verify_archives:
    input:
        rules.download.output.record,
    output:
        f"{DOWNLOADS}/{{dataset}}/verified.json",
    log:
        "logs/verify_archives/{dataset}.log",
    params:
        dest=lambda wc: f"{DOWNLOADS}/{wc.dataset}",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi verify-archives {wildcards.dataset} --dest {params.dest} --report {output} > {log} 2>&1"


rule prepare:
    input:
        rules.verify_archives.output,
    output:
        f"{DATA}/{{dataset}}/manifest.json",
    log:
        "logs/prepare/{dataset}.log",
    params:
        archives=lambda wc: f"{DOWNLOADS}/{wc.dataset}",
        out=lambda wc: f"{DATA}/{wc.dataset}",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi prepare {wildcards.dataset} --archives {params.archives} --out {params.out} > {log} 2>&1"


rule verify_data:
    input:
        rules.prepare.output,
    output:
        f"{DATA}/{{dataset}}/verified.json",
    log:
        "logs/verify_data/{dataset}.log",
    params:
        data=lambda wc: f"{DATA}/{wc.dataset}",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi verify-data {wildcards.dataset} --data {params.data} --report {output} > {log} 2>&1"
