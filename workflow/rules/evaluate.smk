# Stage 3: checkpoint selection, cached features, episodic meta-test and the margin analysis of each run.
# With selection_mode `shared` every shot reuses the first shot's selection, so features/<shot>shot_* exist
# for that shot only and nothing is extracted twice.


rule select:
    input:
        train=TRAIN_SUMMARY,
    output:
        selection=SELECTION,
    log:
        LOG("select/{dataset}/{arch}/m{margin}/s{seed}/{ckpt}_{shot}shot.log"),
    benchmark:
        BENCHMARK("select/{dataset}/{arch}/m{margin}/s{seed}/{ckpt}_{shot}shot.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: P.threads("select")
    resources:
        **P.resources("select"),
    params:
        train_dir=in_dir("train"),
        mode=config["selection_mode"],
    shell:
        "python -m negmargin select --train-dir {params.train_dir} --shot {wildcards.shot}"
        " --mode {params.mode} --pick {wildcards.ckpt} --out {output.selection} > {log} 2>&1"


rule features:
    input:
        selection=SELECTION,
        prepared=PREPARED,
    output:
        features=FEATURES,
    log:
        LOG("features/{dataset}/{arch}/m{margin}/s{seed}/{ckpt}_{shot}shot_{split}.log"),
    benchmark:
        BENCHMARK(
            "features/{dataset}/{arch}/m{margin}/s{seed}/{ckpt}_{shot}shot_{split}.tsv"
        )
    conda:
        "../../envs/torch.yaml"
    threads: P.threads("features")
    resources:
        **P.resources("features"),
        **P.gpu_resources(),
    params:
        split=lambda wildcards, input: os.path.join(
            os.path.dirname(input.prepared), wildcards.split
        ),
        batch_size=config["features"]["batch_size"],
        device=P.device_args,
    shell:
        "python -m negmargin features --checkpoint {input.selection} --split {params.split}"
        " --batch-size {params.batch_size} {params.device} --threads {threads}"
        " --out {output.features} > {log} 2>&1"


rule metatest:
    input:
        features=P.novel_features_for,
        selection=SELECTION,
    output:
        result=METATEST,
    log:
        LOG(
            "metatest/{dataset}/{arch}/m{margin}/s{seed}/{ckpt}_{ways}way_{shot}shot.log"
        ),
    benchmark:
        BENCHMARK(
            "metatest/{dataset}/{arch}/m{margin}/s{seed}/{ckpt}_{ways}way_{shot}shot.tsv"
        )
    conda:
        "../../envs/torch.yaml"
    threads: P.threads("metatest")
    resources:
        **P.resources("metatest"),
    params:
        episodes=P.metatest_args,
    shell:
        "python -m negmargin metatest --features {input.features} --ways {wildcards.ways} --shots {wildcards.shot}"
        " {params.episodes} --threads {threads} --out {output.result} > {log} 2>&1"


rule analyze:
    input:
        unpack(P.analysis_inputs),
    output:
        analysis=ANALYSIS,
    log:
        LOG("analyze/{dataset}/{arch}/m{margin}/s{seed}/{ckpt}.log"),
    benchmark:
        BENCHMARK("analyze/{dataset}/{arch}/m{margin}/s{seed}/{ckpt}.tsv")
    conda:
        "../../envs/report.yaml"
    threads: P.threads("analyze")
    resources:
        **P.resources("analyze"),
    shell:
        "python -m negmargin analyze --checkpoint {input.selection}"
        " --base-features {input.base_features} --novel-features {input.novel_features}"
        " --out {output.analysis} > {log} 2>&1"
