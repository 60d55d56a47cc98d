# Stage 2: one training run per (dataset, arch, margin, seed). train.json is written last, so its presence
# means the run finished; checkpoints and logs beside it are not declared, so an interrupted run resumes
# from train/last.pt when the job is run again.


rule train:
    input:
        prepared=PREPARED,
    output:
        summary=TRAIN_SUMMARY,
    log:
        "logs/train/{dataset}/{arch}/m{margin}/s{seed}.log",
    benchmark:
        "benchmarks/train/{dataset}/{arch}/m{margin}/s{seed}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: rule_resource("train", "threads")
    resources:
        mem_mb=rule_resource("train", "mem_mb"),
        runtime=attempt_runtime("train"),
        cpus_per_task=rule_resource("train", "threads"),
        gpu=gpu_count,
        gpu_model=gpu_model,
        gres=gpu_gres,
    params:
        data=lambda wildcards, input: os.path.dirname(input.prepared),
        out=lambda wildcards, output: os.path.dirname(output.summary),
        hyper=train_args,
        compute=train_compute_args,
    shell:
        "python -m negmargin train --data {params.data} --arch {wildcards.arch}"
        " --margin={wildcards.margin} --seed {wildcards.seed} {params.hyper} {params.compute}"
        " --threads {threads} --out {params.out} > {log} 2>&1"
