# What every stage shares: the package on PYTHONPATH, the validated config, its Plan (negmargin.pipeline), and
# the path templates. The logic lives in the package (src/negmargin/pipeline/), where the tests reach it.

import os
import sys
from pathlib import Path

# Rules run `python -m negmargin` from this checkout's src/ folder, in whatever environment runs the job
# (the project's virtualenv, or with --use-conda an env from envs/, which carries the third-party
# dependencies only). Exporting PYTHONPATH, instead of pip-installing the package into each conda env, keeps
# the code a job runs identical to the code next to the Snakefile (docs/workflow.md). `envvars` hands it on
# to jobs of remote executors too.
PACKAGE_SRC = Path(workflow.basedir, "src").resolve()
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(PACKAGE_SRC)]
    + [
        p
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if p and Path(p).resolve() != PACKAGE_SRC
    ]
)
sys.path.insert(0, str(PACKAGE_SRC))


envvars:
    "PYTHONPATH",


from negmargin.pipeline import config as config_check
from negmargin.pipeline.plan import WILDCARD_CONSTRAINTS, Plan

# Every key checked (one line per problem, naming the key) and every default filled in before any job runs.
config_check.validate(
    config, Path(workflow.basedir, "workflow/schemas/config.schema.yaml")
)
P = Plan(config)
for notice in config_check.notices(config):
    print(notice, file=sys.stderr)


wildcard_constraints:
    **WILDCARD_CONSTRAINTS,


# Path templates (negmargin.pipeline.plan.Paths), one per artifact; a named config has its own folders.
PATHS = P.paths
PREPARED = PATHS.prepared
TRAIN_SUMMARY = PATHS.train_summary
SELECTION = PATHS.selection
FEATURES = PATHS.features
METATEST = PATHS.metatest
ANALYSIS = PATHS.analysis
METRICS = PATHS.metrics
TRAIN_LOGS = PATHS.train_logs
TABLE = PATHS.table
PLOTS = PATHS.plots
SUMMARY = PATHS.summary
LOG = PATHS.log
BENCHMARK = PATHS.benchmark
RELEASED_DOWNLOAD = PATHS.released_download
RELEASED_CHECKPOINT = PATHS.released_checkpoint
RELEASED_PROVENANCE = PATHS.released_provenance
RELEASED_FEATURES = PATHS.released_features
RELEASED_METATEST = PATHS.released_metatest
RELEASED_TABLE = PATHS.released_table


def out_dir(name):
    """A params function: the folder of output `name`."""
    return lambda wildcards, output: os.path.dirname(output[name])


def in_dir(name):
    """A params function: the folder of input `name`."""
    return lambda wildcards, input: os.path.dirname(input[name])
