# download -> verify archives -> prepare -> verify prepared data, for any dataset of mcibi.data.specs (demo: the
# archive is generated locally). The archive check record lives in data/ (DVC-tracked) next to the prepared
# folder and prepare takes it as ancient(): after `dvc pull` on another machine nothing is downloaded or prepared
# again, whatever timestamps the checkout gave the files (at most verify_data re-reads the prepared files).
# A new download therefore does not re-prepare by itself: `snakemake -R prepare ...` does.
# verify_data reruns whenever the prepared files differ from those it verified (mcibi.data.fingerprint), and a
# failed verification leaves no verified.json, so nothing downstream starts. dvc_commit then commits data/ to the
# DVC cache (linked, not copied), so `dvc status data.dvc` is clean and `dvc push` works after the chain.


rule download:
    output:
        record=f"{DOWNLOADS}/{{dataset}}/downloaded.json",
    log:
        "logs/download/{dataset}.log",
    params:
        dest=dataset_downloads,
    resources:
        downloads=1,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi download {wildcards.dataset} --dest {params.dest} --record {output.record}"
        " 2>&1 | tee -a {log}.attempts > {log}"


rule verify_archives:
    input:
        rules.download.output.record,
    output:
        f"{DATA}/{{dataset}}.archives.json",
    log:
        "logs/verify_archives/{dataset}.log",
    params:
        dest=dataset_downloads,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi verify-archives {wildcards.dataset} --dest {params.dest} --report {output}"
        " 2>&1 | tee -a {log}.attempts > {log}"


rule prepare:
    input:
        ancient(rules.verify_archives.output),
    output:
        f"{DATA}/{{dataset}}/manifest.json",
    log:
        "logs/prepare/{dataset}.log",
    params:
        archives=dataset_downloads,
        out=dataset_data,
    threads: 8
    resources:
        mem_mb=8000,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi prepare {wildcards.dataset} --archives {params.archives} --out {params.out}"
        " --archive-record {input} --workers {threads} 2>&1 | tee -a {log}.attempts > {log}"


rule verify_data:
    input:
        manifest=rules.prepare.output[0],
        changed=data_change_stamp,
    output:
        f"{DATA}/{{dataset}}/verified.json",
    log:
        "logs/verify_data/{dataset}.log",
    params:
        data=dataset_data,
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi verify-data {wildcards.dataset} --data {params.data} --report {output}"
        " 2>&1 | tee -a {log}.attempts > {log}"


localrules:
    dvc_commit,


rule dvc_commit:
    input:
        rules.verify_data.output,
    output:
        "logs/dvc/{dataset}.committed",
    log:
        "logs/dvc/{dataset}.log",
    conda:
        "../envs/mcibi.yaml"
    shell:
        "mcibi dvc-commit --record {output} 2>&1 | tee -a {log}.attempts > {log}"
