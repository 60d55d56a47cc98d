# mmfewshot's released models (`snakemake released`): download -> import -> novel features -> meta-test ->
# table, and the published training log's validation curve beside ours. URLs, the published numbers and
# their sources are in the config (datasets.<name>.released, .references); the logic in
# negmargin.pipeline.plan. A file placed by hand under data/raw/mmfewshot/<dataset>/ is not downloaded
# again; the import checks its sha256 against the prefix in its name either way.


rule released:
    input:
        P.released_outputs(),


rule released_download:
    output:
        file=RELEASED_DOWNLOAD,
    log:
        LOG("released/download/{dataset}/{filename}.log"),
    benchmark:
        BENCHMARK("released/download/{dataset}/{filename}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        **P.resources("prepare"),
    params:
        args=P.released_download_args,
    shell:
        "python -m negmargin download {params.args} --out {output.file} > {log} 2>&1"


rule released_import:
    input:
        checkpoint=P.released_checkpoint_file,
    output:
        checkpoint=RELEASED_CHECKPOINT,
        provenance=RELEASED_PROVENANCE,
    log:
        LOG("released/import/{dataset}/{arch}.log"),
    benchmark:
        BENCHMARK("released/import/{dataset}/{arch}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: P.threads("analyze")
    resources:
        **P.resources("analyze"),
    shell:
        "python -m negmargin import-mmfewshot {input.checkpoint} --arch {wildcards.arch}"
        " --dataset {wildcards.dataset} --out {output.checkpoint} > {log} 2>&1"


rule released_features:
    input:
        checkpoint=RELEASED_CHECKPOINT,
        prepared=PREPARED,
    output:
        features=RELEASED_FEATURES,
    log:
        LOG("released/features/{dataset}/{arch}.log"),
    benchmark:
        BENCHMARK("released/features/{dataset}/{arch}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: P.threads("features")
    resources:
        **P.resources("features"),
        **P.gpu_resources(),
    params:
        split=lambda wildcards, input: os.path.join(
            os.path.dirname(input.prepared), "novel"
        ),
        batch_size=config["features"]["batch_size"],
        device=P.device_args,
    shell:
        "python -m negmargin features --checkpoint {input.checkpoint} --split {params.split}"
        " --arch {wildcards.arch} --batch-size {params.batch_size} {params.device}"
        " --threads {threads} --out {output.features} > {log} 2>&1"


rule released_metatest:
    input:
        features=RELEASED_FEATURES,
    output:
        result=RELEASED_METATEST,
    log:
        LOG("released/metatest/{dataset}/{arch}/{shot}shot.log"),
    benchmark:
        BENCHMARK("released/metatest/{dataset}/{arch}/{shot}shot.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: P.threads("metatest")
    resources:
        **P.resources("metatest"),
    params:
        episodes=P.metatest_args,
    shell:
        "python -m negmargin metatest --features {input.features} --shots {wildcards.shot}"
        " {params.episodes} --threads {threads} --out {output.result} > {log} 2>&1"


rule released_table:
    input:
        unpack(P.released_table_inputs),
    output:
        table=report(
            RELEASED_TABLE,
            caption="../report/released_table.rst",
            category="Released models",
            labels={"dataset": "{dataset}"},
        ),
    log:
        LOG("released/table_{dataset}.log"),
    benchmark:
        BENCHMARK("released/table_{dataset}.tsv")
    conda:
        "../../envs/report.yaml"
    threads: P.threads("report")
    resources:
        **P.resources("report"),
    params:
        options=P.released_table_args,
    shell:
        "python -m negmargin released-table --dataset {wildcards.dataset} {params.options}"
        " --out {output.table} > {log} 2>&1"


rule released_plot:
    input:
        unpack(P.released_plot_inputs),
    output:
        figure=report(
            f"{PLOTS}/released_validation.png",
            caption="../report/released_validation.rst",
            category="Released models",
            labels={"dataset": "{dataset}", "arch": "{arch}", "figure": "validation"},
        ),
        vector=f"{PLOTS}/released_validation.svg",
        data=f"{PLOTS}/released_validation.csv",
    log:
        LOG("released/plot_{dataset}_{arch}.log"),
    benchmark:
        BENCHMARK("released/plot_{dataset}_{arch}.tsv")
    conda:
        "../../envs/report.yaml"
    threads: P.threads("report")
    resources:
        **P.resources("report"),
    params:
        args=P.released_plot_args,
        out_dir=out_dir("figure"),
    shell:
        "python -m negmargin plot-released-log {params.args} --title '{wildcards.dataset} {wildcards.arch}'"
        " --out-dir {params.out_dir} > {log} 2>&1"
