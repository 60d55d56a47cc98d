"""What each rule of the workflow runs, computed from a validated configuration.

A :class:`Plan` answers the questions the rules ask of the config: the training grid, the files a target
needs, and the command-line flags of each `negmargin` verb (derived with :func:`negmargin.settings.cli_flags`
from the same declarations the verbs parse). ``workflow/rules/common.smk`` makes one Plan and the rules call
its methods; every method here takes the rule's ``wildcards`` (anything with attributes) and is tested without
Snakemake.

Standard library only.
"""

from __future__ import annotations

import os
import re
import shlex
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from negmargin import settings
from negmargin.datasets import DATASETS, SPLITS
from negmargin.options import (
    CHECKPOINT_PICKS,
    MODEL_PATTERN,
    EpisodeConfig,
    FinetuneConfig,
    SourceConfig,
    TrainConfig,
    TsneConfig,
)
from negmargin.pipeline.config import margins, shots, validation_shots, ways


@dataclass(frozen=True)
class Paths:
    """One template per artifact, used by the rule that writes it and by every rule that reads it. A named
    configuration (top-level `name`) keeps its data, results and logs under folders of that name."""

    data: str = "data"
    results: str = "results"
    logs: str = "logs"

    @classmethod
    def named(cls, name: str | None) -> Paths:
        return cls() if not name else cls(f"data/{name}", f"results/{name}", f"logs/{name}")

    @property
    def prepared(self) -> str:
        return f"{self.data}/{{dataset}}/prepared.json"

    @property
    def run_dir(self) -> str:
        return f"{self.results}/{{dataset}}/{{arch}}/m{{margin}}/s{{seed}}"

    @property
    def train_summary(self) -> str:
        return f"{self.run_dir}/train/train.json"

    @property
    def selection(self) -> str:
        return f"{self.run_dir}/{{ckpt}}/selected_{{shot}}shot.json"

    @property
    def features(self) -> str:
        return f"{self.run_dir}/{{ckpt}}/features/{{shot}}shot_{{split}}.npz"

    @property
    def metatest(self) -> str:
        return f"{self.run_dir}/{{ckpt}}/metatest_{{ways}}way_{{shot}}shot.json"

    @property
    def analysis(self) -> str:
        return f"{self.run_dir}/{{ckpt}}/analysis.json"

    @property
    def metrics(self) -> str:
        return f"{self.results}/metrics.json"

    @property
    def train_logs(self) -> str:
        return f"{self.results}/train_logs.csv"

    @property
    def table(self) -> str:
        return f"{self.results}/tables/{{dataset}}.md"

    @property
    def plots(self) -> str:
        return f"{self.results}/plots/{{dataset}}/{{arch}}"

    @property
    def summary(self) -> str:
        return f"{self.results}/summary.md"

    @property
    def manifest(self) -> str:
        """The modification-time record of this configuration's files (negmargin.filestate)."""
        return f"{self.results}/mtimes.json"

    def log(self, relative: str) -> str:
        return f"{self.logs}/{relative}"

    def benchmark(self, relative: str) -> str:
        return f"{self.logs}/benchmarks/{relative}"

    # mmfewshot's released models (the `released` target): downloads, the imported checkpoint and its results.
    # Raw downloads are shared by every configuration, like data/raw.
    @property
    def released_download(self) -> str:
        return "data/raw/mmfewshot/{dataset}/{filename}"

    @property
    def released_dir(self) -> str:
        return f"{self.results}/released/{{dataset}}/{{arch}}"

    @property
    def released_checkpoint(self) -> str:
        return f"{self.released_dir}/checkpoint.pt"

    @property
    def released_provenance(self) -> str:
        return f"{self.released_dir}/checkpoint.provenance.json"

    @property
    def released_features(self) -> str:
        return f"{self.released_dir}/features_novel.npz"

    @property
    def released_metatest(self) -> str:
        return f"{self.released_dir}/metatest_{{shot}}shot.json"

    @property
    def released_table(self) -> str:
        return f"{self.results}/tables/released_{{dataset}}.md"


RELEASED_PLOT_FILES = ("released_validation.png", "released_validation.svg", "released_validation.csv")
PLOT_FILES = ("delta_vs_margin.png", "accuracy_vs_margin.png", "discriminability_vs_margin.png", "tsne_novel.png",
              "margin_sweep.csv")  # margin_sweep.csv: what `dvc plots show` draws (dvc.yaml)

# What a wildcard may match, so that paths cannot be parsed two ways.
WILDCARD_CONSTRAINTS = {
    "dataset": "|".join(DATASETS),
    "arch": MODEL_PATTERN,
    "margin": r"-?[0-9]+\.[0-9]+",
    "seed": "[0-9]+",
    "ckpt": "|".join(CHECKPOINT_PICKS),
    "ways": "[0-9]+",
    "shot": "[0-9]+",
    "split": "|".join(SPLITS),
    "filename": r"[^/]+",
}
# The first 8 hex digits of the file's sha256, which OpenMMLab puts before `.pth` in a released file name.
RELEASED_SHA_PREFIX = re.compile(r"-([0-9a-f]{8})\.pth$")
RULE_FAMILIES = ("prepare", "train", "select", "features", "metatest", "analyze", "report")


def url_filename(url: str) -> str:
    """The last path segment of a URL: the name a download keeps."""
    return os.path.basename(urllib.parse.urlparse(url).path)


def margin_label(value: float) -> str:
    """The margin as it appears in paths (m-0.01, m0.0, m0.2): fixed-point, no trailing zeros."""
    value = float(value) + 0.0  # -0.0 -> 0.0
    label = f"{value:.6f}".rstrip("0")
    if label.endswith("."):
        label = f"{label}0"
    if float(label) != value:
        raise ValueError(f"margin {value!r} has more than 6 decimals")
    return label


def _is_url(source: Any) -> bool:
    return "://" in str(source)


class Plan:
    """The workflow's questions about one validated config (``negmargin.pipeline.config.validate``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.paths = Paths.named(config.get("name"))

    # ------------------------------------------------------------------------------------------ the grid

    def dataset(self, name: str) -> dict[str, Any]:
        return self.config["datasets"][name]

    def archs(self, name: str) -> list[str]:
        return list(self.dataset(name)["archs"])

    def seeds(self, name: str, arch: str) -> list[int]:
        grid = self.dataset(name)["seeds"]
        return [int(s) for s in (grid[arch] if isinstance(grid, dict) else grid)]

    def shots(self) -> list[int]:
        return shots(self.config)

    def ways(self) -> list[int]:
        return ways(self.config)

    def checkpoints(self) -> list[str]:
        return list(self.config["metatest"]["checkpoints"])

    def tasks(self) -> list[tuple[int, int]]:
        """(ways, shots) of every meta-test of a checkpoint."""
        return [(w, k) for w in self.ways() for k in self.shots()]

    def selection_shot(self, shot: int | str) -> int:
        """Whose selection (and features) serves meta-test shot ``shot``: under `shared` the first shot's."""
        return self.shots()[0] if self.config["selection_mode"] == "shared" else int(shot)

    def analysis_shot(self) -> int:
        """The selection whose checkpoint is analysed (base accuracy, discriminability) and drawn in t-SNE."""
        return self.selection_shot(self.shots()[0])

    def runs(self) -> Iterator[dict[str, Any]]:
        """Wildcard values of every training run: (dataset, arch, margin, seed)."""
        for name in self.config["run_datasets"]:
            for arch in self.archs(name):
                for margin in margins(self.config, name, arch):
                    for seed in self.seeds(name, arch):
                        yield {"dataset": name, "arch": arch, "margin": margin_label(margin), "seed": seed}

    def run_outputs(self, wildcards: Any = None) -> list[str]:
        """Every file `negmargin metrics` reads, for every run in the grid."""
        files = []
        for run in self.runs():
            files.append(self.paths.train_summary.format(**run))
            for ckpt in self.checkpoints():
                files += [self.paths.selection.format(**run, ckpt=ckpt, shot=shot) for shot in self.shots()]
                files += [self.paths.metatest.format(**run, ckpt=ckpt, ways=w, shot=k) for w, k in self.tasks()]
                files.append(self.paths.analysis.format(**run, ckpt=ckpt))
        return files

    def run_dirs(self) -> list[str]:
        return [self.paths.run_dir.format(**run) for run in self.runs()]

    def final_outputs(self) -> list[str]:
        """Every run's result files, the metrics, tables, plots and summary. The run files are targets too:
        they are not committed (the tables, plots and metrics of the default run are), so in a fresh clone
        they make Snakemake re-run the whole chain instead of reporting "nothing to be done"."""
        outputs = self.run_outputs() + [self.paths.metrics, self.paths.train_logs, self.paths.summary]
        for name in self.config["run_datasets"]:
            outputs.append(self.paths.table.format(dataset=name))
            for arch in self.archs(name):
                folder = self.paths.plots.format(dataset=name, arch=arch)
                outputs += [f"{folder}/{plot}" for plot in PLOT_FILES]
        return outputs

    # ------------------------------------------------------------------------------------------ resources

    def threads(self, family: str) -> int:
        return int(self.config["resources"][family]["threads"])

    def resources(self, family: str) -> dict[str, Any]:
        """mem_mb, cpus_per_task and the `runtime` (minutes) of a rule family: the configured value times
        the attempt, capped at compute.max_runtime. A job that hits its time limit fails; with --retries
        (the Slurm profile sets it) Snakemake resubmits it with more time, and a training job resumes from
        its train/last.pt."""
        configured = self.config["resources"][family]
        cap = self.config["compute"]["max_runtime"]

        def runtime(wildcards: Any, attempt: int) -> int:
            minutes = configured["runtime"] * attempt
            return minutes if cap is None else max(min(minutes, cap), configured["runtime"])

        return {"mem_mb": configured["mem_mb"], "runtime": runtime, "cpus_per_task": configured["threads"]}

    def gpu_resources(self) -> dict[str, Any]:
        """The GPU request of train and features jobs: `gpu` (and `gpu_model`), or `gres` with
        compute.gpu_request `gres`; None (no sbatch flag at all) where the dataset runs without one."""
        compute = self.config["compute"]

        def wanted(wildcards: Any) -> bool:
            override = self.dataset(wildcards.dataset)["gpu"]
            return compute["gpu"] if override is None else override

        by_gres = compute["gpu_request"] == "gres"
        model = compute["gpu_model"]
        return {
            "gpu": lambda w: 1 if wanted(w) and not by_gres else None,
            "gpu_model": lambda w: model if wanted(w) and not by_gres else None,
            "gres": lambda w: (f"gpu:{model}:1" if model else "gpu:1") if wanted(w) and by_gres else None,
        }

    def device_args(self, wildcards: Any) -> str:
        override = self.dataset(wildcards.dataset)["gpu"]
        gpu = self.config["compute"]["gpu"] if override is None else override
        return settings.cli_flags(TrainConfig, {"device": "cuda" if gpu else self.config["compute"]["device"]})

    # ------------------------------------------------------------------------------------------ prepare

    def source(self, name: str) -> str | None:
        return self.dataset(name)["prepare"]["source"] or DATASETS[name].default_source

    def prepare_input(self, wildcards: Any) -> dict[str, str]:
        """A local source is an input (a changed file re-prepares); a URL is fetched by the job."""
        source = self.source(wildcards.dataset)
        return {} if source is None or _is_url(source) else {"source": source}

    def prepare_args(self, wildcards: Any) -> str:
        """The `negmargin prepare` sub-command and its flags: source and checks, then the dataset's options
        (a null source is left out: the verb then uses the registry's or explains what to download)."""
        spec = DATASETS[wildcards.dataset]
        prepare = self.dataset(wildcards.dataset)["prepare"]
        words = [spec.command, settings.cli_flags(SourceConfig, prepare, "prepare"),
                 settings.cli_flags(spec.options, prepare["options"], "options")]
        return " ".join(word for word in words if word)

    # ------------------------------------------------------------------------------------------ train

    def train_args(self, wildcards: Any) -> str:
        """Every result-affecting flag of `negmargin train` for (dataset, arch), and the compute flags;
        a change of the former retrains."""
        hyper = self.dataset(wildcards.dataset)["train"][wildcards.arch]
        derived = {"arch": self.backbone(wildcards.arch), "model": wildcards.arch,
                   "val_shots": validation_shots(self.config), "val_ways": self.ways()[0],
                   "val_queries": self.config["metatest"]["queries"]}
        compute = {key: self.config["compute"][key] for key in ("amp", "num_workers")}
        return " ".join([settings.cli_flags(TrainConfig, {**hyper, **derived, **compute}),
                         self.device_args(wildcards)])

    @staticmethod
    def backbone(model: str) -> str:
        """The backbone of a model name: conv4-softmax -> conv4."""
        return model.split("-", 1)[0]

    # ------------------------------------------------------------------------------------------ evaluate

    def novel_features_for(self, wildcards: Any) -> str:
        """Novel-class features of the checkpoint that serves ``wildcards.shot``."""
        fields = {**dict(wildcards.items()), "shot": self.selection_shot(wildcards.shot), "split": "novel"}
        return self.paths.features.format(**fields)

    def analysis_inputs(self, wildcards: Any) -> dict[str, str]:
        fields = {**dict(wildcards.items()), "shot": self.analysis_shot()}
        return {
            "selection": self.paths.selection.format(**fields),
            "base_features": self.paths.features.format(**fields, split="base_holdout"),
            "novel_features": self.paths.features.format(**fields, split="novel"),
        }

    def metatest_args(self, wildcards: Any) -> str:
        """Episode settings and the fine-tuning of `negmargin metatest` (a null `steps` keeps mmfewshot's
        150 / 600)."""
        test = self.config["metatest"]
        return " ".join([settings.cli_flags(EpisodeConfig, test, "metatest"),
                         settings.cli_flags(FinetuneConfig, test["finetune"], "finetune")])

    # ------------------------------------------------------------------------------------------ report

    def table_args(self, wildcards: Any) -> str:
        """--margin and --reference flags of `negmargin table` for one dataset."""
        block = self.dataset(wildcards.dataset)
        archs = self.archs(wildcards.dataset)
        words = []
        table_margin = block["table_margin"]
        if isinstance(table_margin, dict):
            chosen = {float(table_margin[a]) for a in archs}
            if len(chosen) == 1:
                words.append(f"--margin={margin_label(chosen.pop())}")
            else:
                words += [f"--margin={a}={margin_label(table_margin[a])}" for a in archs]
        elif table_margin is not None:
            words.append(f"--margin={margin_label(table_margin)}")
        references = block["references"]
        for arch, by_shot in references["accuracy"].items():
            words += [f"--reference {arch}:{int(shot)}={acc}" for shot, acc in by_shot.items()]
        if references["accuracy"] and references["source"]:
            words.append(f"--reference-source {shlex.quote(references['source'])}")
        return " ".join(words)

    def tsne_features(self, wildcards: Any) -> dict[str, str]:
        """Novel features of the most negative, the zero (or closest to zero) and the most positive margin of
        the (dataset, arch) grid, first seed, keyed by margin label."""
        grid = margins(self.config, wildcards.dataset, wildcards.arch)
        seed = self.seeds(wildcards.dataset, wildcards.arch)[0]
        ckpt = self.checkpoints()[0]
        features = {}
        for margin in (min(grid), min(grid, key=abs), max(grid)):
            label = margin_label(margin)
            features[label] = self.paths.features.format(dataset=wildcards.dataset, arch=wildcards.arch,
                                                         margin=label, seed=seed, ckpt=ckpt,
                                                         shot=self.analysis_shot(), split="novel")
        return features

    def tsne_inputs(self, wildcards: Any, input: Any) -> str:
        return " ".join(f"--features={label}={path}" for label, path in input.items())

    def tsne_args(self, wildcards: Any) -> str:
        """The panel options; a params entry of its own, so that changing one re-draws the t-SNE."""
        return settings.cli_flags(TsneConfig, self.config["tsne"], "tsne")

    # ------------------------------------------------------------------------------------------ released

    def released_models(self, name: str) -> dict[str, dict[str, str]]:
        """arch -> {checkpoint, log} URLs of mmfewshot's released models of dataset ``name`` that this run
        covers (archs of the dataset entry that have one)."""
        models = self.dataset(name)["released"]["models"]
        return {arch: models[arch] for arch in self.archs(name) if arch in models}

    def released_pairs(self) -> Iterator[dict[str, str]]:
        """(dataset, arch) of every released model the `released` target evaluates, in run_datasets order."""
        for name in self.config["run_datasets"]:
            for arch in self.released_models(name):
                yield {"dataset": name, "arch": arch}

    def released_outputs(self, wildcards: Any = None) -> list[str]:
        """The `released` target: per dataset with released models its table, per model its plots."""
        outputs = []
        for name in self.config["run_datasets"]:
            if self.released_models(name):
                outputs.append(self.paths.released_table.format(dataset=name))
        for pair in self.released_pairs():
            folder = self.paths.plots.format(**pair)
            outputs += [f"{folder}/{plot}" for plot in RELEASED_PLOT_FILES]
        return outputs

    def released_file(self, dataset: str, arch: str, kind: str) -> str:
        """Where the `kind` (checkpoint or log) of a released model is downloaded (or placed by hand)."""
        url = self.released_models(dataset)[arch][kind]
        return self.paths.released_download.format(dataset=dataset, filename=url_filename(url))

    def released_checkpoint_file(self, wildcards: Any) -> str:
        return self.released_file(wildcards.dataset, wildcards.arch, "checkpoint")

    def released_url(self, wildcards: Any) -> str:
        """The URL of the released file named ``wildcards.filename`` of ``wildcards.dataset``."""
        for model in self.released_models(wildcards.dataset).values():
            for url in model.values():
                if url_filename(url) == wildcards.filename:
                    return url
        raise ValueError(f"datasets.{wildcards.dataset}.released.models names no file {wildcards.filename!r}")

    def released_download_args(self, wildcards: Any) -> str:
        """`negmargin download` flags: the URL and, for a checkpoint, the sha256 prefix of its file name (the
        only checksum OpenMMLab publishes; a training log has none)."""
        url = self.released_url(wildcards)
        words = [f"--url {shlex.quote(url)}"]
        prefix = RELEASED_SHA_PREFIX.search(wildcards.filename)
        if prefix:
            words.append(f"--sha256-prefix {prefix.group(1)}")
        return " ".join(words)

    def released_table_inputs(self, wildcards: Any) -> dict[str, str]:
        """Per released model of the dataset: its provenance and its meta-test of every shot."""
        inputs = {}
        for arch in self.released_models(wildcards.dataset):
            fields = {"dataset": wildcards.dataset, "arch": arch}
            inputs[f"{arch}_provenance"] = self.paths.released_provenance.format(**fields)
            for shot in self.shots():
                inputs[f"{arch}_{shot}shot"] = self.paths.released_metatest.format(**fields, shot=shot)
        return inputs

    def released_table_args(self, wildcards: Any) -> str:
        """`negmargin released-table` flags: each model's folder and URLs, and the published numbers with
        their source (datasets.<name>.references)."""
        name = wildcards.dataset
        references = self.dataset(name)["references"]
        released = self.dataset(name)["released"]
        words = ["--shots " + " ".join(str(shot) for shot in self.shots())]
        for arch, model in self.released_models(name).items():
            folder = self.paths.released_dir.format(dataset=name, arch=arch)
            words += [f"--model {arch}={folder}", f"--ckpt-url {arch}={shlex.quote(model['checkpoint'])}",
                      f"--log-url {arch}={shlex.quote(model['log'])}"]
            for shot, accuracy in references["accuracy"].get(arch, {}).items():
                words.append(f"--reference {arch}:{int(shot)}={accuracy}")
            for shot, std in references["std"].get(arch, {}).items():
                words.append(f"--reference-std {arch}:{int(shot)}={std}")
        if references["source"]:
            words.append(f"--reference-source {shlex.quote(references['source'])}")
        if released["source"]:
            words.append(f"--release-source {shlex.quote(released['source'])}")
        return " ".join(words)

    def our_run(self, dataset: str, arch: str) -> dict[str, Any] | None:
        """Our run of (dataset, arch) that a released model is compared with: the table margin (or the only
        margin of the grid), first seed; None when neither picks one."""
        table_margin = self.dataset(dataset)["table_margin"]
        margin = table_margin.get(arch) if isinstance(table_margin, dict) else table_margin
        grid = margins(self.config, dataset, arch) if arch in self.dataset(dataset)["train"] else []
        if margin is None and len(grid) == 1:
            margin = grid[0]
        if margin is None:
            return None
        return {"dataset": dataset, "arch": arch, "margin": margin_label(margin), "seed": self.seeds(dataset, arch)[0]}

    def released_plot_inputs(self, wildcards: Any) -> dict[str, str]:
        """The released model's training log."""
        return {"published": self.released_file(wildcards.dataset, wildcards.arch, "log")}

    def released_plot_args(self, wildcards: Any) -> str:
        """`negmargin plot-released-log` flags: the published log and, where our run of the same (dataset,
        arch) has finished, its train.json. That file is read, not declared as an input: `released` must never
        schedule a training (a changed training rule or param would otherwise retrain from here)."""
        words = [f"--log {self.released_plot_inputs(wildcards)['published']}"]
        run = self.our_run(wildcards.dataset, wildcards.arch)
        if run is not None and os.path.exists(self.paths.train_summary.format(**run)):
            words.append(f"--ours {self.paths.train_summary.format(**run)}")
        return " ".join(words)
