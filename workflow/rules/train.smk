# Stage 2: one training run per (dataset, arch, margin, seed); `arch` is a model of the config's `archs` (a
# backbone, optionally with a -<variant> suffix such as conv4-softmax). train.json is written last, so its presence
# means the run finished; checkpoints and logs beside it are not declared, so an interrupted run resumes
# from train/last.pt when the job is run again.


rule train:
    input:
        prepared=PREPARED,
    output:
        summary=TRAIN_SUMMARY,
    log:
        LOG("train/{dataset}/{arch}/m{margin}/s{seed}.log"),
    benchmark:
        BENCHMARK("train/{dataset}/{arch}/m{margin}/s{seed}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: P.threads("train")
    resources:
        **P.resources("train"),
        **P.gpu_resources(),
    params:
        data=in_dir("prepared"),
        out=out_dir("summary"),
        options=P.train_args,
    shell:
        "python -m negmargin train --data {params.data} --margin={wildcards.margin}"
        " --seed {wildcards.seed} {params.options}"
        " --threads {threads} --out {params.out} > {log} 2>&1"
