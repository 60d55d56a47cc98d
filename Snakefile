# Negative Margin Matters (Liu et al., ECCV 2020): prepare -> train -> select -> features -> metatest ->
# analyze -> metrics, tables, plots, summary; `snakemake released` checks mmfewshot's released models (download ->
# import -> features -> metatest -> table). See docs/workflow.md; the contract is docs/architecture.md.
from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


# The landing page of `snakemake --report`: the pipeline, what ran, and the configuration it ran with.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/filestate.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/released.smk"


# Jobs of seconds that read only small files: on a cluster they run on the submitting host instead of
# waiting in the queue (docs/workflow.md, "On a Slurm cluster").
localrules:
    all,
    select,
    metrics,
    table,
    plot_margins,
    plot_tsne,
    summary,
    released,
    released_download,
    released_table,
    released_plot,


rule all:
    default_target: True
    input:
        P.final_outputs(),
