# Helpers shared by every stage: the configured grid, path templates, and the command-line arguments each
# rule passes to `negmargin <verb>`. Rules stay declarative; anything computed from the config lives here.

import json
import os
import shlex
import sys
from pathlib import Path

# ------------------------------------------------------------------------------------------- the package
# Rules run `python -m negmargin` from this checkout's src/ folder, in whatever environment runs the job
# (the project's virtualenv, or with --use-conda an env from envs/, which carries the third-party
# dependencies only). Exporting PYTHONPATH here, instead of pip-installing the package into each conda env,
# keeps the code a job runs identical to the code next to the Snakefile; see docs/workflow.md.
# `envvars` hands the variable on to jobs of remote executors as well.
PACKAGE_SRC = Path(workflow.basedir, "src").resolve()
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(PACKAGE_SRC)]
    + [
        p
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if p and Path(p).resolve() != PACKAGE_SRC
    ]
)


envvars:
    "PYTHONPATH",


# ------------------------------------------------------------------------------------------ path templates
# One template per artifact, used by the rule that writes it and by every rule that reads it.
PREPARED = "data/{dataset}/prepared.json"
TRAIN_SUMMARY = "results/{dataset}/{arch}/m{margin}/s{seed}/train/train.json"
SELECTION = "results/{dataset}/{arch}/m{margin}/s{seed}/selected_{shot}shot.json"
FEATURES = "results/{dataset}/{arch}/m{margin}/s{seed}/features/{shot}shot_{split}.npz"
METATEST = "results/{dataset}/{arch}/m{margin}/s{seed}/metatest_{shot}shot.json"
ANALYSIS = "results/{dataset}/{arch}/m{margin}/s{seed}/analysis.json"
RUN_DIR = "results/{dataset}/{arch}/m{margin}/s{seed}"
METRICS = "results/metrics.json"
TABLE = "results/tables/{dataset}.md"
PLOTS = "results/plots/{dataset}/{arch}"
SUMMARY = "results/summary.md"

SPLITS = ("base", "base_holdout", "val", "novel")
ARCHS = ("conv4", "resnet12")


wildcard_constraints:
    dataset="[a-z0-9][a-z0-9_]*",
    arch="|".join(ARCHS),
    margin=r"-?[0-9]+\.[0-9]+",
    seed="[0-9]+",
    shot="[0-9]+",
    split="|".join(SPLITS),


# ------------------------------------------------------------------------------------------- the grid


def margin_label(value):
    """The margin as it appears in paths (m-0.01, m0.0, m0.2): fixed-point, no trailing zeros."""
    value = float(value) + 0.0  # -0.0 -> 0.0
    label = f"{value:.6f}".rstrip("0")
    if label.endswith("."):
        label = f"{label}0"
    if float(label) != value:
        raise ValueError(f"margin {value!r} has more than 6 decimals")
    return label


def dataset_config(dataset):
    return config["datasets"][dataset]


def archs(dataset):
    return list(dataset_config(dataset)["archs"])


def margins(dataset, arch):
    """The margin grid of (dataset, arch) as floats, in config order."""
    grid = dataset_config(dataset)["margins"]
    return [float(m) for m in (grid[arch] if isinstance(grid, dict) else grid)]


def seeds(dataset):
    return [int(s) for s in dataset_config(dataset)["seeds"]]


def train_config(dataset, arch):
    return dataset_config(dataset)["train"][arch]


def shots():
    return [int(s) for s in config["metatest"]["shots"]]


def selection_shot(shot):
    """Whose selection (and features) serves meta-test shot `shot`: under `shared` the first shot's."""
    return shots()[0] if config["selection_mode"] == "shared" else int(shot)


def validation_shots():
    return [shots()[0]] if config["selection_mode"] == "shared" else shots()


def analysis_shot():
    """The selection whose checkpoint is analysed (base accuracy, discriminability) and drawn in t-SNE."""
    return selection_shot(shots()[0])


def runs():
    """Wildcard values of every training run in the grid: (dataset, arch, margin, seed)."""
    for d in config["run_datasets"]:
        for a in archs(d):
            for m in margins(d, a):
                for s in seeds(d):
                    yield dict(dataset=d, arch=a, margin=margin_label(m), seed=s)


# Facts of each dataset `negmargin prepare` knows: classes of the splits episodes are drawn from (val for
# validation, novel for the meta-test) and the fewest images a class has there (None: not known before the
# data is prepared; data/<dataset>/<split>/meta.json is read when it exists).
DATASET_FACTS = {
    "omniglot": {"classes": {"val": 172, "novel": 423}, "images_per_class": 20},
    "cub": {"classes": {"val": 50, "novel": 50}, "images_per_class": None},
    "mini_imagenet": {"classes": {"val": 16, "novel": 20}, "images_per_class": 600},
    "tiered_imagenet": {"classes": {"val": 97, "novel": 160}, "images_per_class": None},
}


def split_facts(dataset, split):
    """(classes, why, fewest images per class, why) of a split as the configuration will prepare it; None
    where that is not known before preparation. `why` says where a number comes from, when not obvious.
    """
    options = dataset_config(dataset)["prepare"]["options"]
    facts = DATASET_FACTS[dataset]
    classes, per_class = facts["classes"][split], facts["images_per_class"]
    classes_why = per_class_why = ""
    if dataset == "omniglot":
        if options.get("max-classes") is not None:
            classes = min(classes, int(options["max-classes"]))
            classes_why = f" (prepare.options.max-classes {options['max-classes']})"
        rotations = options.get("rotations", [0])
        classes *= len(rotations if isinstance(rotations, list) else [rotations])
    elif options.get("fixture"):
        classes, per_class = None, None
    meta = Path("data", dataset, split, "meta.json")
    if (classes is None or per_class is None) and meta.is_file():
        try:
            stored = json.loads(meta.read_text())
            if classes is None:
                classes, classes_why = int(stored["num_classes"]), f" ({meta})"
            if per_class is None:
                per_class = int(stored["images_per_class"]["min"])
                per_class_why = f" (at least, in {meta})"
        except (ValueError, KeyError, TypeError):
            pass
    return classes, classes_why, per_class, per_class_why


def check_episodes(d, problems):
    """Ways against the classes of the val and novel splits; shots + queries against images per class."""
    test = config["metatest"]
    ways, queries = int(test["ways"]), int(test["queries"])
    for split, split_shots in (("val", validation_shots()), ("novel", shots())):
        classes, classes_why, per_class, per_class_why = split_facts(d, split)
        if classes is not None and ways > classes:
            problems.append(
                f"metatest.ways is {ways}, but the {split} split of {d} has {classes} classes{classes_why}; "
                f"allowed: 2 to {classes}"
            )
        most = max(split_shots)
        if per_class is not None and most + queries > per_class:
            problems.append(
                f"metatest.shots {most} + metatest.queries {queries} = {most + queries} images per class, "
                f"but the {split} split of {d} has {per_class} per class{per_class_why}; "
                f"allowed: shots + queries <= {per_class}"
            )


def config_key(path):
    """['datasets', 'omniglot', 'margins', 1] -> 'datasets.omniglot.margins[1]'."""
    key = ""
    for part in path:
        key += (
            f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        )
    return key or "(top level)"


def schema_problem(error):
    """One line for a schema violation: the key, the value, what is allowed. Of the alternatives of a
    oneOf/anyOf the deepest failure is the telling one ("'0.2' is not of type 'number'", not "not valid
    under any of the given schemas")."""
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    message = error.message
    if error.validator == "type" and isinstance(error.instance, str):
        expected = error.validator_value
        expected = [expected] if isinstance(expected, str) else list(expected)
        if {"number", "integer"} & set(expected):
            message += " (write the number without quotes)"
    elif error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        if allowed:
            message += f"; allowed: {', '.join(allowed)}"
    return f"{config_key(error.absolute_path)}: {message}"


def validate_config(schema_path):
    """The schema check, each violation as one line naming its key; then Snakemake's validate, which
    also fills in the defaults."""
    import jsonschema
    import yaml

    with open(schema_path) as handle:
        schema = yaml.safe_load(handle)
    errors = jsonschema.Draft202012Validator(schema).iter_errors(config)
    problems = sorted({schema_problem(e) for e in errors})
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))
    validate(config, schema_path)


def check_config():
    """Cross-key checks the JSON schema cannot express; a message names the key to fix."""
    problems = []
    for d in config["datasets"]:
        if d not in DATASET_FACTS:
            problems.append(
                f"datasets.{d}: unknown dataset; allowed: {', '.join(sorted(DATASET_FACTS))}"
            )
    for d in config["run_datasets"]:
        if d not in DATASET_FACTS:
            problems.append(
                f"run_datasets names {d!r}: unknown dataset; allowed: {', '.join(sorted(DATASET_FACTS))}"
            )
            continue
        if d not in config["datasets"]:
            problems.append(
                f"run_datasets names {d!r}, which has no entry under `datasets`"
            )
            continue
        cfg = dataset_config(d)
        check_episodes(d, problems)
        if d == "omniglot" and cfg["prepare"]["skip_bad_images"]:
            problems.append(
                "datasets.omniglot.prepare.skip_bad_images is true, but the Omniglot archive holds arrays, "
                "not image files; allowed: false"
            )
        for a in archs(d):
            if a not in cfg["train"]:
                problems.append(f"datasets.{d}.train has no block for arch {a!r}")
        for key in ("margins", "table_margin"):
            if isinstance(cfg.get(key), dict):
                missing = set(archs(d)) - set(cfg[key])
                if missing:
                    problems.append(f"datasets.{d}.{key} lacks archs {sorted(missing)}")
        for a, by_shot in cfg["references"]["accuracy"].items():
            if a not in archs(d):
                problems.append(
                    f"datasets.{d}.references.accuracy names arch {a!r}, not in archs"
                )
            elif set(map(int, by_shot)) - set(shots()):
                problems.append(
                    f"datasets.{d}.references.accuracy.{a} names shots not in metatest.shots"
                )
        table_margin = cfg["table_margin"]
        for a in archs(d):
            chosen = (
                table_margin.get(a) if isinstance(table_margin, dict) else table_margin
            )
            if chosen is not None and float(chosen) not in margins(d, a):
                problems.append(
                    f"datasets.{d}.table_margin {chosen} is not in the {a} margin grid"
                )
        if cfg["prepare"]["source"] is None:
            print(
                f"negmargin workflow: datasets.{d}.prepare.source is not set; "
                "its prepare job stops and says what to download (see docs/workflow.md)",
                file=sys.stderr,
            )
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------- per-rule resources


def rule_resource(family, key):
    return config["resources"][family][key]


def gpu_requested(dataset):
    override = dataset_config(dataset)["gpu"]
    return config["compute"]["gpu"] if override is None else override


def attempt_runtime(family):
    """The `runtime` resource (minutes) of the rules of `family`: the configured value times the attempt,
    capped at compute.max_runtime. A job that hits its time limit fails; with --retries (the Slurm profile
    sets it) Snakemake resubmits it with more time, and a training job resumes from its train/last.pt.
    """

    def runtime(wildcards, attempt):
        minutes = rule_resource(family, "runtime") * attempt
        cap = config["compute"]["max_runtime"]
        return (
            minutes
            if cap is None
            else max(min(minutes, cap), rule_resource(family, "runtime"))
        )

    return runtime


def gpu_by_gres():
    return config["compute"]["gpu_request"] == "gres"


def gpu_count(wildcards):
    """1 when the dataset asks for a GPU (and compute.gpu_request is `gpus`); None (unset, no sbatch flag
    at all) otherwise."""
    return 1 if gpu_requested(wildcards.dataset) and not gpu_by_gres() else None


def gpu_model(wildcards):
    if not gpu_requested(wildcards.dataset) or gpu_by_gres():
        return None
    return config["compute"]["gpu_model"]


def gpu_gres(wildcards):
    """With compute.gpu_request `gres`: the GPU as a generic resource (sbatch --gres=gpu[:<model>]:1)."""
    if not gpu_requested(wildcards.dataset) or not gpu_by_gres():
        return None
    model = config["compute"]["gpu_model"]
    return f"gpu:{model}:1" if model else "gpu:1"


def device_args(wildcards):
    device = "cuda" if gpu_requested(wildcards.dataset) else config["compute"]["device"]
    return f"--device {device}"


# ---------------------------------------------------------------------------------- command arguments


def cli_options(options):
    """{'image-size': 28, 'rotations': [0, 90], 'flag': True} -> '--image-size 28 --rotations 0 90 --flag'."""
    words = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        words.append(f"--{key}")
        if isinstance(value, list):
            words += [str(v) for v in value]
        elif value is not True:
            words.append(str(value))
    return " ".join(shlex.quote(w) for w in words)


def is_url(source):
    return "://" in str(source)


def prepare_input(wildcards):
    """A local source is an input (a changed file re-prepares); a URL is fetched by the job."""
    source = dataset_config(wildcards.dataset)["prepare"]["source"]
    return {} if source is None or is_url(source) else {"source": source}


def prepare_command(wildcards):
    """The `negmargin prepare` sub-command of a dataset: its name with '_' spelled '-'."""
    return wildcards.dataset.replace("_", "-")


def prepare_args(wildcards):
    """--source (left out while it is null: the verb then explains what to download and which key to set),
    checksums, mirrors and the dataset's further options."""
    prepare = dataset_config(wildcards.dataset)["prepare"]
    options = {
        "source": prepare["source"],
        "md5": prepare["md5"],
        "size": prepare["size"],
    }
    words = [cli_options(options)]
    words += [f"--mirror {shlex.quote(url)}" for url in prepare["mirrors"]]
    if prepare["skip_bad_images"]:
        words.append("--skip-bad-images")
    words.append(cli_options(prepare["options"]))
    return " ".join(w for w in words if w)


def train_args(wildcards):
    """Every hyper-parameter flag of `negmargin train` for (dataset, arch); a change retrains."""
    cfg = train_config(wildcards.dataset, wildcards.arch)
    options = {
        "metric": cfg["metric"],
        "temperature": cfg["temperature"],
        "num-classes": cfg["num_classes"],
        "image-size": cfg["image_size"],
        "epochs": cfg["epochs"],
        "batch-size": cfg["batch_size"],
        "lr": cfg["lr"],
        "momentum": cfg["momentum"],
        "weight-decay": cfg["weight_decay"],
        "lr-steps": cfg["lr_steps"],
        "lr-gamma": cfg["lr_gamma"],
        "warmup-iters": cfg["warmup_iters"],
        "warmup-ratio": cfg["warmup_ratio"],
        "val-every": cfg["val_every"],
        "val-episodes": cfg["val_episodes"],
        "val-shots": validation_shots(),
        "val-seed": cfg["val_seed"],
        "checkpoint-every": cfg["checkpoint_every"],
        "val-ways": config["metatest"]["ways"],
        "val-queries": config["metatest"]["queries"],
    }
    return cli_options(options)


def train_compute_args(wildcards):
    compute = config["compute"]
    options = {"amp": compute["amp"], "num-workers": compute["num_workers"]}
    return f"{device_args(wildcards)} {cli_options(options)}"


def novel_features_for(wildcards):
    """Novel-class features of the checkpoint that serves `wildcards.shot` (under `shared`, the first shot's)."""
    fields = {
        **dict(wildcards.items()),
        "shot": selection_shot(wildcards.shot),
        "split": "novel",
    }
    return FEATURES.format(**fields)


def analysis_inputs(wildcards):
    fields = {**dict(wildcards.items()), "shot": analysis_shot()}
    return {
        "selection": SELECTION.format(**fields),
        "base_features": FEATURES.format(**fields, split="base_holdout"),
        "novel_features": FEATURES.format(**fields, split="novel"),
    }


def metatest_args(wildcards):
    """Episode settings plus the fine-tuning overrides that are set (null keeps the verb's default)."""
    test = config["metatest"]
    finetune = dict(test["finetune"])
    steps = finetune.pop("steps", None)
    if isinstance(steps, dict):
        steps = {int(k): v for k, v in steps.items()}.get(int(wildcards.shot))
    options = {
        "ways": test["ways"],
        "queries": test["queries"],
        "episodes": test["episodes"],
        "seed": test["episodes_seed"],
        "steps": steps,
        "lr": finetune.get("lr"),
        "momentum": finetune.get("momentum"),
        "dampening": finetune.get("dampening"),
        "weight-decay": finetune.get("weight_decay"),
        "finetune-batch-size": finetune.get("batch_size"),
        "temperature": finetune.get("temperature"),
    }
    return cli_options(options)


def run_outputs(wildcards):
    """Every file `negmargin metrics` reads, for every run in the grid."""
    files = []
    for run in runs():
        files.append(TRAIN_SUMMARY.format(**run))
        files += [SELECTION.format(**run, shot=shot) for shot in shots()]
        files += [METATEST.format(**run, shot=shot) for shot in shots()]
        files.append(ANALYSIS.format(**run))
    return files


def run_dirs():
    return [RUN_DIR.format(**run) for run in runs()]


def table_args(wildcards):
    """--margin and --reference flags of `negmargin table` for one dataset."""
    cfg = dataset_config(wildcards.dataset)
    words = []
    table_margin = cfg["table_margin"]
    if isinstance(table_margin, dict):
        chosen = {float(table_margin[a]) for a in archs(wildcards.dataset)}
        if len(chosen) == 1:
            words.append(f"--margin={margin_label(chosen.pop())}")
        else:
            words += [
                f"--margin={a}={margin_label(table_margin[a])}"
                for a in archs(wildcards.dataset)
            ]
    elif table_margin is not None:
        words.append(f"--margin={margin_label(table_margin)}")
    references = cfg["references"]
    for a, by_shot in references["accuracy"].items():
        words += [f"--reference {a}:{int(shot)}={acc}" for shot, acc in by_shot.items()]
    if references["accuracy"] and references["source"]:
        words.append(f"--reference-source {shlex.quote(references['source'])}")
    return " ".join(words)


def tsne_features(wildcards):
    """Novel features of the most negative, the zero (or closest to zero) and the most positive margin of
    the (dataset, arch) grid, first seed, keyed by margin label."""
    grid = margins(wildcards.dataset, wildcards.arch)
    picked = [min(grid), min(grid, key=abs), max(grid)]
    seed = seeds(wildcards.dataset)[0]
    features = {}
    for m in picked:
        label = margin_label(m)
        features[label] = FEATURES.format(
            dataset=wildcards.dataset,
            arch=wildcards.arch,
            margin=label,
            seed=seed,
            shot=analysis_shot(),
            split="novel",
        )
    return features


def tsne_args(wildcards, input):
    return " ".join(f"--features={label}={path}" for label, path in input.items())


def tsne_options(wildcards):
    tsne = config["tsne"]
    return cli_options(
        {
            "classes": tsne["classes"],
            "per-class": tsne["per_class"],
            "seed": tsne["seed"],
        }
    )


def final_outputs():
    # Every run's result files are targets too. They are not committed, while the tables, plots and
    # metrics of the default run are: in a fresh clone these missing files make Snakemake re-run the whole
    # chain (and then the reports), instead of reporting "nothing to be done".
    outputs = run_outputs(None) + [METRICS, SUMMARY]
    outputs += expand(TABLE, dataset=config["run_datasets"])
    for d in config["run_datasets"]:
        plots = [
            "accuracy_vs_margin.png",
            "discriminability_vs_margin.png",
            "tsne_novel.png",
            "margin_sweep.csv",  # what `dvc plots show` draws (dvc.yaml)
        ]
        outputs += expand(f"{PLOTS}/{{plot}}", dataset=d, arch=archs(d), plot=plots)
    return outputs
