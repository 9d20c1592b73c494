# download -> verify archives -> prepare -> verify prepared data, for any dataset of mcibi.data.specs (demo: the
# archive is generated locally). The archive check record lives in data/ (DVC-tracked) next to the prepared
# folder and prepare takes it as ancient(): after `dvc pull` on another machine nothing is downloaded or prepared
# again, whatever timestamps the checkout gave the files (at most verify_data re-reads the prepared files).
# A new download therefore does not re-prepare by itself: `snakemake -R prepare ...` does.
# verify_data reruns whenever the prepared files differ from those it verified (mcibi.data.fingerprint), and a
# failed verification leaves no verified.json, so nothing downstream starts. dvc_commit then commits data/ to the
# DVC cache (linked, not copied), so `dvc status data.dvc` is clean and `dvc push` works after the chain.
# data/{dataset}.checksums.json (DVC-tracked, no rule's output) keeps the sha256 of archives without a published
# checksum as first verified: download and verify_archives refuse a different file (mcibi.data.download.FirstSeen).


rule download:
    output:
        record=f"{DOWNLOADS}/{{dataset}}/downloaded.json",
    log:
        "logs/download/{dataset}.log",
    conda:
        "../envs/mcibi.yaml"
    resources:
        downloads=1,
    params:
        dest=dataset_downloads,
        checksums=lambda wc: f"{DATA}/{wc.dataset}.checksums.json",
    shell:
        "mcibi download {wildcards.dataset} --dest {params.dest:q} --record {output.record:q}"
        " --checksums {params.checksums:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"


rule verify_archives:
    input:
        rules.download.output.record,
    output:
        f"{DATA}/{{dataset}}.archives.json",
    log:
        "logs/verify_archives/{dataset}.log",
    conda:
        "../envs/mcibi.yaml"
    params:
        dest=dataset_downloads,
    shell:
        "mcibi verify-archives {wildcards.dataset} --dest {params.dest:q} --report {output:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"


rule prepare:
    input:
        ancient(rules.verify_archives.output),
    output:
        f"{DATA}/{{dataset}}/manifest.json",
    log:
        "logs/prepare/{dataset}.log",
    benchmark:
        f"{BENCHMARKS}/prepare/{{dataset}}.tsv"
    conda:
        "../envs/mcibi.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        archives=dataset_downloads,
        out=dataset_data,
    shell:
        "mcibi prepare {wildcards.dataset} --archives {params.archives:q} --out {params.out:q}"
        " --archive-record {input:q} --workers {threads} 2>&1 | tee -a {log:q}.attempts > {log:q}"


rule verify_data:
    input:
        manifest=rules.prepare.output[0],
        changed=data_change_stamp,
    output:
        f"{DATA}/{{dataset}}/verified.json",
    log:
        "logs/verify_data/{dataset}.log",
    conda:
        "../envs/mcibi.yaml"
    params:
        data=dataset_data,
    shell:
        "mcibi verify-data {wildcards.dataset} --data {params.data:q} --report {output:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"


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
        "mcibi dvc-commit --record {output:q} 2>&1 | tee -a {log:q}.attempts > {log:q}"
