# Stage 1: raw data -> the prepared-split store data/<dataset>/{base,base_holdout,val,novel}.


rule prepare:
    input:
        unpack(P.prepare_input),
    output:
        prepared=PREPARED,
    log:
        LOG("prepare/{dataset}.log"),
    benchmark:
        BENCHMARK("prepare/{dataset}.tsv")
    conda:
        "../../envs/torch.yaml"
    threads: P.threads("prepare")
    resources:
        **P.resources("prepare"),
    params:
        args=P.prepare_args,
        out=out_dir("prepared"),
    shell:
        "python -m negmargin prepare {params.args} --out {params.out} > {log} 2>&1"
