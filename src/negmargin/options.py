"""Every option of the pipeline's verbs, declared once (see :mod:`negmargin.settings` for what is derived).

``section`` names the config block a setting lives in:

* ``train``: ``datasets.<dataset>.train.<arch>``; ``compute``: ``compute``; ``metatest``: ``metatest``;
  ``finetune``: ``metatest.finetune``; ``features``: ``features``; ``tsne``: ``tsne``;
  ``top``: a top-level key; ``prepare``: ``datasets.<dataset>.prepare``; ``options``:
  ``datasets.<dataset>.prepare.options``;
* none: set by the workflow itself (arch, margin and seed of a run, the validation shots), or command line only.

Standard library only: the Snakemake process reads these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from negmargin.settings import Settings, setting

# Backbones and heads by name: the class that implements each, in negmargin.models.backbones / .heads.
ARCHS = {"conv4": "Conv4", "resnet12": "ResNet12"}
METRICS = {"cosine": "CosineMarginHead", "softmax": "SoftmaxMarginHead"}
SELECTION_MODES = ("shared", "per-shot")
CHECKPOINT_PICKS = ("best", "final")  # the best-validation checkpoint (the paper's rule) or the last epoch's
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"
# A model of the grid: a backbone of ARCHS, optionally with a suffix naming a variant (conv4-softmax).
MODEL_PATTERN = "(" + "|".join(ARCHS) + ")(-[a-z0-9_.]+)?"
NAME_PATTERN = "[a-z0-9][a-z0-9_-]*"
AUGMENT_PATHS = ("batched", "per-image")
DATA_ON_DEVICE = ("auto", "always", "never")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Base training (spec 1.1-1.3). Defaults are mmfewshot's (CUB / mini-ImageNet Conv4 config)."""

    arch: str = setting("conv4", "backbone", choices=tuple(ARCHS))
    model: str | None = setting(None, "the model's name in results/ (a config `archs` entry such as conv4 or "
                                "conv4-softmax); null: the arch", pattern=MODEL_PATTERN)
    metric: str = setting("cosine", "margin head type", choices=tuple(METRICS), section="train")
    margin: float = setting(-0.01, "margin m: negative, zero or positive (in units of the head's similarity: "
                            "a cosine for the cosine head, a logit for the softmax head)")
    temperature: float = setting(10.0, "logit scale T", exclusive_minimum=0, section="train")
    num_classes: int | None = setting(None, "rows of the training head; null: the number of base classes",
                                      minimum=1, section="train")
    epochs: int = setting(200, "training epochs", minimum=1, section="train")
    batch_size: int = setting(64, "images per SGD step", minimum=1, section="train")
    lr: float = setting(0.05, "base learning rate of SGD", exclusive_minimum=0, section="train")
    momentum: float = setting(0.9, "SGD momentum", minimum=0, section="train")
    weight_decay: float = setting(1e-4, "SGD weight decay", minimum=0, section="train")
    lr_steps: tuple[int, ...] = setting((60, 120), "epochs after which the learning rate is multiplied by "
                                        "lr_gamma", minimum=1, min_items=1, section="train")
    lr_gamma: float = setting(0.1, "step decay factor", exclusive_minimum=0, section="train")
    warmup_iters: int = setting(3000, "linear warm-up length in iterations; 0 disables it", minimum=0,
                                section="train")
    warmup_ratio: float = setting(0.25, "the warm-up starts at this fraction of the learning rate",
                                  exclusive_minimum=0, maximum=1, section="train")
    seed: int = setting(0, "model init, batch order and augmentation seed", minimum=0)
    val_every: int = setting(5, "validate every this many epochs (and after the last)", minimum=1,
                             section="train")
    val_episodes: int = setting(100, "validation episodes per validation", minimum=1, section="train")
    val_shots: tuple[int, ...] = setting((1,), "validation shots; the first drives best.pt", minimum=1,
                                         min_items=1)
    val_ways: int = setting(5, "classes per validation episode", minimum=2)
    val_queries: int = setting(15, "queries per class in a validation episode", minimum=1)
    val_seed: int = setting(0, "seed of the fixed validation episodes", minimum=0, section="train")
    image_size: int | None = setting(None, "side of the network input in pixels; null: 84 for the imagenet84 "
                                     "pipeline, the stored size for omniglot", minimum=8, section="train")
    device: str = setting("auto", "device of training and feature extraction: auto, cpu, cuda or cuda:N",
                          pattern=DEVICE_PATTERN, section="compute")
    amp: str = setting("none", "mixed precision of training: bf16 autocast (CUDA only) or none",
                       choices=("none", "bf16"), section="compute")
    channels_last: bool = setting(True, "channels-last memory format (faster convolutions)")
    num_workers: int = setting(0, "data-loader worker processes of training", minimum=0, section="compute")
    augment: str = setting(
        "batched", "how the `imagenet84` training augmentation runs: `batched` - whole batches at once on the "
        "training device (negmargin.data.augment); `per-image` - the reference: torchvision v2 image by image "
        "in the data loader. Same distribution, different random draws, so a run's results depend on it; "
        "`omniglot` has no augmentation and gives the same results with both", choices=AUGMENT_PATHS,
        section="train")
    data_on_device: str = setting(
        "auto", "keep the prepared uint8 base split in device memory and slice the batches there (`batched` "
        "path): `auto` - on CUDA when the split takes at most half the free device memory; `always`; `never` "
        "- read each batch from the memory map and copy it through pinned memory. Results are the same",
        choices=DATA_ON_DEVICE, section="compute")
    compile: bool = setting(False, "run the model through torch.compile (bench/README.md: it did not pay on "
                            "the CPU; not measured on a GPU)", section="compute")
    checkpoint_every: int = setting(0, "also keep train/epoch_NNNN.pt every this many epochs; 0: never",
                                    minimum=0, section="train")
    log_every: int = setting(50, "iterations between progress lines when not on a terminal", minimum=1)


# Settings that may change between an interrupted run and its resumption without changing the result.
# compile is one of them in the sense device is: a compiled model computes the same function, rounded differently.
RESUMABLE_CHANGES = frozenset({"device", "num_workers", "log_every", "data_on_device", "compile"})


@dataclass(frozen=True)
class EpisodeConfig(Settings):
    """The episodes of a meta-test (mmfewshot's protocol)."""

    ways: int = setting(5, "classes per episode", minimum=2)
    shots: int = setting(1, "support images per class", minimum=1)
    queries: int = setting(15, "query images per class", minimum=1, section="metatest")
    episodes: int = setting(2000, "test episodes", minimum=1, section="metatest")
    episodes_seed: int = setting(0, "seed of the test episodes: the same seed gives the same episodes on "
                                 "every machine", minimum=0, section="metatest")


@dataclass(frozen=True)
class FinetuneConfig(Settings):
    """The per-episode fine-tuning of a new cosine head (spec 2.4); defaults are mmfewshot's."""

    steps: int | None = setting(None, "fine-tuning steps; null: 150 for 1-shot, 600 otherwise (mmfewshot)",
                                minimum=1, section="finetune")
    lr: float = setting(0.01, "SGD learning rate", exclusive_minimum=0, section="finetune")
    momentum: float = setting(0.9, "SGD momentum", minimum=0, section="finetune")
    dampening: float = setting(0.9, "SGD dampening", minimum=0, section="finetune")
    weight_decay: float = setting(1e-3, "SGD weight decay", minimum=0, section="finetune")
    batch_size: int = setting(4, "support features per fine-tuning step", minimum=1, section="finetune",
                              flag="--finetune-batch-size")
    temperature: float = setting(5.0, "logit scale of the episode's head", exclusive_minimum=0,
                                 section="finetune")

    def for_shots(self, shots: int) -> FinetuneConfig:
        """With ``steps`` resolved: mmfewshot runs 150 steps for 1-shot and 600 otherwise."""
        if self.steps is not None:
            return self
        return FinetuneConfig(**{**self.to_dict(), "steps": 150 if shots == 1 else 600})


@dataclass(frozen=True)
class SelectConfig(Settings):
    selection_mode: str = setting(
        "shared", "which validation picks the checkpoint of each meta-test shot: `shared` (mmfewshot) - the "
        "first shot's validation serves every shot; `per-shot` - each shot its own", choices=SELECTION_MODES,
        section="top", flag="--mode")
    pick: str = setting("best", "which checkpoint: `best` - the best on validation episodes (the paper's rule); "
                        "`final` - the last epoch's", choices=CHECKPOINT_PICKS)


@dataclass(frozen=True)
class FeatureConfig(Settings):
    batch_size: int = setting(256, "images per forward pass of feature extraction", minimum=1,
                              section="features")


@dataclass(frozen=True)
class TsneConfig(Settings):
    classes: int = setting(5, "novel classes shown", minimum=1, section="tsne")
    per_class: int = setting(20, "samples per class", minimum=1, section="tsne")
    seed: int = setting(0, "seed of the class and sample choice and of t-SNE", minimum=0, section="tsne")


@dataclass(frozen=True)
class ComputeConfig(Settings):
    """How the workflow asks a scheduler for devices (training's own device settings are in TrainConfig)."""

    gpu: bool = setting(False, "request a GPU: train and features jobs declare gpu=1 (Slurm: --gpus=1) and "
                        "run with --device cuda", section="compute", cli=False)
    gpu_model: str | None = setting(None, "GPU model to request (Slurm --gpus=<model>:1); null: any",
                                    section="compute", cli=False)
    gpu_request: str = setting("gpus", "how a GPU is requested: `gpus` (--gpus=[<model>:]1) or `gres` "
                               "(--gres=gpu[:<model>]:1, for clusters that take only that form)",
                               choices=("gpus", "gres"), section="compute", cli=False)
    max_runtime: int | None = setting(None, "upper bound in minutes of the runtime a retried job asks for "
                                      "(attempt n asks for n times its rule family's runtime); set it to the "
                                      "partition's time limit; null: no bound", minimum=1, section="compute",
                                      cli=False)


@dataclass(frozen=True)
class WorkflowConfig(Settings):
    name: str | None = setting(
        None, "name of this configuration's outputs: results/<name>/, data/<name>/ and logs/<name>/, so that "
        "two configurations never overwrite each other; null: results/, data/ and logs/", pattern=NAME_PATTERN,
        section="top", cli=False)
    restore_mtimes: bool = setting(
        True, "before building the DAG, give every file under data/, results/ and resources/ whose content "
        "matches results/mtimes.json its recorded modification time back, so that files restored by dvc pull, "
        "dvc checkout or git clone do not look newer than their outputs; false: plain modification times",
        section="top", cli=False)


@dataclass(frozen=True)
class SourceConfig(Settings):
    """Where a dataset's raw data comes from and how it is checked (`negmargin prepare <dataset>`)."""

    source: str | None = setting(None, "raw data: a URL, an archive or a folder; null: the dataset's default "
                                 "source, where it has one", section="prepare")
    md5: str | None = setting(None, "expected md5 of the archive; null: the default source's, if any",
                              pattern="[0-9a-f]{32}", section="prepare")
    sha256: str | None = setting(None, "expected sha256 of the archive", pattern="[0-9a-f]{64}",
                                 section="prepare")
    size: int | None = setting(None, "expected size of the archive in bytes", minimum=1, section="prepare")
    mirrors: tuple[str, ...] = setting((), "other URLs of the same file, tried in order when the source fails",
                                       section="prepare")
    skip_bad_images: bool = setting(False, "leave out images that cannot be decoded (named and counted in the "
                                    "log and prepared.json) instead of stopping at the first",
                                    section="prepare")
    # 4 retries 0.5, 1, 2 and 4 s apart: a DNS hiccup, a Wi-Fi reconnect or a burst of 503s of up to 7.5 s per
    # URL is ridden out, while a machine without a network gives up on CUB's two URLs within about 15 s.
    # Drops in the middle of a transfer do not count (the request resumed at once), and a longer outage costs
    # nothing already fetched: the next run resumes the .part file.
    retries: int = setting(4, "further attempts per URL after a transient network failure without progress "
                           "(a transfer that received bytes resumes at once and does not count)", minimum=0,
                           section="prepare")
    backoff: float = setting(0.5, "first retry delay in seconds; doubles each retry, at most 60", minimum=0)
    timeout: float = setting(60.0, "seconds a silent server may take before the attempt counts as failed "
                             "(the download then resumes)", exclusive_minimum=0, section="prepare")
    raw_dir: str = setting("data/raw", "where downloads and extracted archives go")

    @property
    def checks(self) -> dict[str, Any]:
        return {"md5": self.md5, "sha256": self.sha256, "size": self.size}
