# Stage 4: every run's numbers in one file, then tables, plots and the summary. These rules read only
# results/metrics.json and cached features, so changing them (or their config) never retrains anything.


rule metrics:
    input:
        P.run_outputs,
    output:
        metrics=METRICS,
        train_logs=TRAIN_LOGS,
    log:
        LOG("report/metrics.log"),
    benchmark:
        BENCHMARK("report/metrics.tsv")
    conda:
        "../../envs/report.yaml"
    threads: P.threads("report")
    resources:
        **P.resources("report"),
    params:
        runs=P.run_dirs(),
    shell:
        "python -m negmargin metrics --runs {params.runs} --out {output.metrics}"
        " --train-logs {output.train_logs} > {log} 2>&1"


rule table:
    input:
        metrics=METRICS,
        train_logs=TRAIN_LOGS,
    output:
        table=report(
            TABLE,
            caption="../report/table.rst",
            category="Tables",
            labels={"dataset": "{dataset}"},
        ),
    log:
        LOG("report/table_{dataset}.log"),
    benchmark:
        BENCHMARK("report/table_{dataset}.tsv")
    conda:
        "../../envs/report.yaml"
    threads: P.threads("report")
    resources:
        **P.resources("report"),
    params:
        options=P.table_args,
    shell:
        "python -m negmargin table --metrics {input.metrics} --dataset {wildcards.dataset}"
        " {params.options} --train-logs {input.train_logs} --out {output.table} > {log} 2>&1"


rule plot_margins:
    input:
        metrics=METRICS,
    output:
        delta=report(
            f"{PLOTS}/delta_vs_margin.png",
            caption="../report/delta_vs_margin.rst",
            category="Margin analysis",
            subcategory="{dataset} {arch}",
            labels={
                "dataset": "{dataset}",
                "arch": "{arch}",
                "figure": "difference to m = 0",
            },
        ),
        accuracy=report(
            f"{PLOTS}/accuracy_vs_margin.png",
            caption="../report/accuracy_vs_margin.rst",
            category="Margin analysis",
            subcategory="{dataset} {arch}",
            labels={"dataset": "{dataset}", "arch": "{arch}", "figure": "accuracy"},
        ),
        discriminability=report(
            f"{PLOTS}/discriminability_vs_margin.png",
            caption="../report/discriminability_vs_margin.rst",
            category="Margin analysis",
            subcategory="{dataset} {arch}",
            labels={
                "dataset": "{dataset}",
                "arch": "{arch}",
                "figure": "discriminability",
            },
        ),
        vectors=multiext(
            f"{PLOTS}/",
            "delta_vs_margin.svg",
            "accuracy_vs_margin.svg",
            "discriminability_vs_margin.svg",
        ),
        data=report(
            f"{PLOTS}/margin_analysis.csv",
            caption="../report/margin_analysis.rst",
            category="Margin analysis",
            subcategory="{dataset} {arch}",
            labels={"dataset": "{dataset}", "arch": "{arch}", "figure": "data (CSV)"},
        ),
        sweep=f"{PLOTS}/margin_sweep.csv",
    log:
        LOG("report/plot_margins_{dataset}_{arch}.log"),
    benchmark:
        BENCHMARK("report/plot_margins_{dataset}_{arch}.tsv")
    conda:
        "../../envs/report.yaml"
    threads: P.threads("report")
    resources:
        **P.resources("report"),
    params:
        out_dir=out_dir("accuracy"),
    shell:
        "python -m negmargin plot-margins --metrics {input.metrics} --dataset {wildcards.dataset}"
        " --arch {wildcards.arch} --out-dir {params.out_dir} > {log} 2>&1"


rule plot_tsne:
    input:
        unpack(P.tsne_features),
    output:
        figure=report(
            f"{PLOTS}/tsne_novel.png",
            caption="../report/tsne_novel.rst",
            category="t-SNE of novel-class features",
            labels={"dataset": "{dataset}", "arch": "{arch}", "figure": "t-SNE"},
        ),
        vector=f"{PLOTS}/tsne_novel.svg",
        data=f"{PLOTS}/tsne.csv",
    log:
        LOG("report/plot_tsne_{dataset}_{arch}.log"),
    benchmark:
        BENCHMARK("report/plot_tsne_{dataset}_{arch}.tsv")
    conda:
        "../../envs/report.yaml"
    threads: P.threads("report")
    resources:
        **P.resources("report"),
    params:
        features=P.tsne_inputs,
        options=P.tsne_args,
        out_dir=out_dir("figure"),
    shell:
        "python -m negmargin plot-tsne {params.features} {params.options}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule summary:
    input:
        metrics=METRICS,
    output:
        summary=report(SUMMARY, caption="../report/summary.rst", category="Summary"),
    log:
        LOG("report/summary.log"),
    benchmark:
        BENCHMARK("report/summary.tsv")
    conda:
        "../../envs/report.yaml"
    threads: P.threads("report")
    resources:
        **P.resources("report"),
    shell:
        "python -m negmargin summary --metrics {input.metrics} --out {output.summary} > {log} 2>&1"
