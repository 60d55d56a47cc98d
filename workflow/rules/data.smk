# Stage 1: raw data -> the prepared-split store data/<dataset>/{base,base_holdout,val,novel}.


rule prepare:
    input:
        unpack(prepare_input),
    output:
        prepared=PREPARED,
    log:
        "logs/prepare/{dataset}.log",
    benchmark:
        "benchmarks/prepare/{dataset}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: rule_resource("prepare", "threads")
    resources:
        mem_mb=rule_resource("prepare", "mem_mb"),
        runtime=attempt_runtime("prepare"),
        cpus_per_task=rule_resource("prepare", "threads"),
    params:
        command=prepare_command,
        args=prepare_args,
        out=lambda wildcards, output: os.path.dirname(output.prepared),
    shell:
        "python -m negmargin prepare {params.command} {params.args} --out {params.out}"
        " > {log} 2>&1"
