"""Import mmfewshot's released Neg-Margin checkpoints as negmargin checkpoints.

mmfewshot (open-mmlab/mmfewshot, configs/classification/neg_margin/) publishes one trained model per dataset
and backbone. Each is an mmcv checkpoint: a dict with ``state_dict`` and usually ``meta``. Its keys are

* ``device_indicator``: an empty buffer of mmfewshot's base classifier; it carries no weights and is dropped;
* ``head.weight`` [num_classes, D]: the training head (100 rows for CUB and mini-ImageNet, 351 for
  tiered-ImageNet; the mini-ImageNet head has more rows than its 64 base classes);
* ``backbone.<name>``: Conv4 ``layers.<block>.layers.<j>.<param>`` (j: conv, bn, relu, pool), which is our
  ``layers.<4 * block + j>``; ResNet-12 ``layer<k>.0.{conv<n>, norm<n>, downsample.<i>}.<param>``, which is
  our ``blocks.<k - 1>.{conv<n>, bn<n>, shortcut.<i>}``.

The name table is built from our own modules (every tensor of our ``Classifier`` must come from exactly one
key of the file), so a key we do not know, a key we lack, or a shape that differs stops the import with one
line naming the file and the key; nothing is written then.

The file is untrusted: it is read with ``torch.load(weights_only=True)``. mmcv's ``meta`` may hold numpy
scalars (the best validation score), so numpy's scalar and dtype classes, and nothing else, are allowed on
top of torch's tensors and plain containers.

The verb ``negmargin import-mmfewshot SRC.pth --arch {conv4,resnet12} [--dataset {cub,mini-imagenet,
tiered-imagenet}] --out DST.pt`` (negmargin.commands.evaluate) calls :func:`import_mmfewshot`. DST then works
with ``negmargin features`` and ``negmargin analyze`` like a checkpoint written by training: the head rows
carry our class names in mmfewshot's label order (:func:`head_class_names`), which analyze maps by name.
"""

from __future__ import annotations

import csv
import io
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from negmargin import __version__
from negmargin.errors import UserError
from negmargin.io import sha256_file, torch_load_weights_only, torch_save, write_json
from negmargin.models import CHECKPOINT_FORMAT, Classifier, ModelSpec

PROVENANCE_FORMAT = "negmargin-mmfewshot-import/1"

# What mmfewshot's NegMargin model adds to the backbone and head: an empty device buffer, no weights.
IGNORED_KEYS = ("device_indicator",)

# Fixed by mmfewshot's configs (img_size = 84, RGB input); the temperature is the training head's
# (temperature=10.0 in every neg_margin config), used when the file's meta does not say.
IMAGE_SIZE = 84
IN_CHANNELS = 3
DEFAULT_TEMPERATURE = 10.0

# Our dataset names (the prepared store's ``dataset``) and the spellings a user or a file name may use.
DATASET_ALIASES = {
    "cub": "cub",
    "mini-imagenet": "mini_imagenet",
    "mini_imagenet": "mini_imagenet",
    "tiered-imagenet": "tiered_imagenet",
    "tiered_imagenet": "tiered_imagenet",
}
# mmfewshot's dataset classes, as its config text names them.
MMFEWSHOT_DATASETS = {"CUBDataset": "cub", "MiniImageNetDataset": "mini_imagenet",
                      "TieredImageNetDataset": "tiered_imagenet"}
MMFEWSHOT_BACKBONES = {"Conv4": "conv4", "ResNet12": "resnet12"}
# mmfewshot's label order of each dataset's base classes (package data under negmargin/data/splits/).
MMFEWSHOT_CLASS_ORDER = {"cub": "mmfewshot/cub_train.csv", "mini_imagenet": "mmfewshot/mini_imagenet_train.csv",
                         "tiered_imagenet": "mmfewshot/tiered_imagenet_train.csv"}
# Rows of the training head in mmfewshot's neg_margin configs (num_classes of ``head``).
RELEASED_HEAD_ROWS = {"cub": 100, "mini_imagenet": 100, "tiered_imagenet": 351}
# Training margins of the released models, from configs/classification/neg_margin/<dataset>/
# neg-margin_cosine_<arch>_1xb64_<dataset>_5way-{1,5}shot.py (both shot configs train the same model).
RELEASED_MARGINS = {
    ("cub", "conv4"): -0.01,
    ("cub", "resnet12"): -0.01,
    ("mini_imagenet", "conv4"): -0.005,
    ("mini_imagenet", "resnet12"): -0.005,
    ("tiered_imagenet", "conv4"): -0.02,
    ("tiered_imagenet", "resnet12"): -0.01,
}
# A released file name: the config name, a time stamp, and the first 8 hex digits of the file's sha256.
RELEASED_NAME = re.compile(
    r"^neg-margin_(?P<metric>cosine|softmax)_(?P<arch>conv4|resnet12)_1xb64_"
    r"(?P<dataset>cub|mini-imagenet|tiered-imagenet)_5way-\d+shot"
)
SHA_PREFIX = re.compile(r"-(?P<prefix>[0-9a-f]{8})\.pth$")

# meta fields worth keeping in the provenance (env_info is left out: it describes the machine, with paths;
# hook_msgs' checkpoint paths likewise).
META_FIELDS = ("mmcv_version", "mmcls_version", "time", "epoch", "iter", "seed", "exp_name")
HOOK_FIELDS = ("best_score", "ckpt_time")


# ------------------------------------------------------------------------------------------- name mapping


def mmfewshot_key(our_key: str, arch: str) -> str:
    """The key in an mmfewshot NegMargin state_dict that holds our Classifier's tensor ``our_key``."""
    if our_key.startswith("head."):
        return our_key
    if not our_key.startswith("backbone."):
        raise ValueError(f"{our_key}: not a backbone or head tensor")
    name = our_key[len("backbone."):]
    if arch == "conv4":
        found = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if found is None:
            raise ValueError(f"{our_key}: not a Conv4 layer tensor")
        block, position = divmod(int(found.group(1)), 4)
        return f"backbone.layers.{block}.layers.{position}.{found.group(2)}"
    if arch == "resnet12":
        found = re.fullmatch(r"blocks\.(\d+)\.(conv\d|bn\d|shortcut\.\d)\.(.+)", name)
        if found is None:
            raise ValueError(f"{our_key}: not a ResNet-12 block tensor")
        stage, module, param = int(found.group(1)), found.group(2), found.group(3)
        module = module.replace("bn", "norm").replace("shortcut", "downsample")
        return f"backbone.layer{stage + 1}.0.{module}.{param}"
    raise ValueError(f"unknown arch {arch!r}")


def key_table(model: Classifier) -> dict[str, str]:
    """mmfewshot key -> our key, for every tensor (parameters and BN buffers) of ``model``."""
    return {mmfewshot_key(key, model.spec.arch): key for key in model.state_dict()}


def _arch_of_keys(keys: list[str]) -> str | None:
    """The backbone a state_dict holds, told by its module names; None if neither."""
    if any(key.startswith("backbone.layer1.") for key in keys):
        return "resnet12"
    if any(key.startswith("backbone.layers.") for key in keys):
        return "conv4"
    return None


# --------------------------------------------------------------------------------------------- reading


def _safe_meta_globals() -> list[Any]:
    """numpy scalars and their dtypes: what mmcv's meta holds beyond plain containers (a numpy float best
    score). A scalar is rebuilt from a dtype and raw bytes, so none of these can run code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    # Files pickled under numpy 1.x name the scalar numpy.core.multiarray.scalar; numpy 2 moved it to _core.
    allowed: list[Any] = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                          np.dtype]
    dtypes = getattr(np, "dtypes", None)
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append(getattr(dtypes, name))
    return allowed


def read_mmfewshot_file(path: Path) -> dict[str, Any]:
    """The unpickled mmcv checkpoint (tensors, plain containers, numpy scalars only); UserError otherwise."""
    payload = torch_load_weights_only(path, allowed=_safe_meta_globals(),
                                      accepted="tensors, plain containers and numpy scalars only",
                                      advice="; a downloaded file is never unpickled beyond that")
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        kind = "a dict without 'state_dict'" if isinstance(payload, dict) else f"a {type(payload).__name__}"
        raise UserError(f"{path}: not an mmcv checkpoint (it holds {kind}; expected a dict with "
                        "'state_dict')")
    odd = [key for key in payload["state_dict"] if not isinstance(key, str)]
    if odd:
        raise UserError(f"{path}: state_dict has a key that is not a name ({odd[0]!r})")
    return payload


def release_sha_prefix(name: str) -> str | None:
    """The 8 hex digits before ``.pth`` in a released file name (the start of its sha256), or None."""
    found = SHA_PREFIX.search(name)
    return found.group("prefix") if found else None


def check_release_sha256(path: Path, sha256: str | None = None) -> bool:
    """True if ``path``'s sha256 starts with the prefix in its released name; False if the name carries
    none; UserError if it differs (a damaged or substituted download). ``sha256``: the digest if known."""
    path = Path(path)
    prefix = release_sha_prefix(path.name)
    if prefix is None:
        return False
    digest = sha256 or sha256_file(path)
    if not digest.startswith(prefix):
        raise UserError(
            f"{path}: sha256 {digest[:8]}... does not start with {prefix}, the prefix in its released name: "
            "the download is damaged or not the released file; download it again"
        )
    return True


# -------------------------------------------------------------------------------------- what the file says


def _plain(value: Any) -> Any:
    """``value`` as JSON-safe plain data (numpy scalars become Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str):
        return value
    # np.float64 is a float subclass: convert, or the record would pickle a numpy scalar.
    for kind in (bool, int, float):
        if isinstance(value, kind):
            return kind(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return repr(value)[:200]


def _config_head(config_text: str) -> dict[str, Any]:
    """Settings of the training ``head=dict(...)`` in mmcv's config text (not meta_test_head), read with
    regular expressions: the text is data from an untrusted file, never executed."""
    settings: dict[str, Any] = {}
    head = re.search(r"(?<![\w.])head\s*=\s*dict\(([^()]*)\)", config_text)
    if head is not None:
        body = head.group(1)
        number = r"\s*=\s*(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
        for name in ("margin", "temperature"):
            found = re.search(rf"\b{name}{number}", body)
            if found:
                settings[name] = float(found.group(1))
        found = re.search(r"\bnum_classes\s*=\s*(\d+)", body)
        if found:
            settings["num_classes"] = int(found.group(1))
        found = re.search(r"\bmetric_type\s*=\s*['\"](\w+)['\"]", body)
        if found:
            settings["metric"] = found.group(1)
    found = re.search(r"backbone\s*=\s*dict\(\s*type\s*=\s*['\"](\w+)['\"]", config_text)
    if found and found.group(1) in MMFEWSHOT_BACKBONES:
        settings["arch"] = MMFEWSHOT_BACKBONES[found.group(1)]
    datasets = {MMFEWSHOT_DATASETS[name] for name in re.findall(r"['\"](\w+Dataset)['\"]", config_text)
                if name in MMFEWSHOT_DATASETS}
    if len(datasets) == 1:
        settings["dataset"] = datasets.pop()
    return settings


def _dataset_name(value: str, path: Path) -> str:
    if value not in DATASET_ALIASES:
        raise UserError(f"{path}: unknown dataset {value!r}; expected one of cub, mini-imagenet, "
                        "tiered-imagenet")
    return DATASET_ALIASES[value]


def _agree(path: Path, what: str, sources: dict[str, Any]) -> tuple[Any, str | None]:
    """The one value that the known ``sources`` (name -> value or None) give, and the first source naming it;
    UserError if two sources disagree."""
    known = {source: value for source, value in sources.items() if value is not None}
    if len(set(known.values())) > 1:
        said = ", ".join(f"{source} says {value!r}" for source, value in known.items())
        raise UserError(f"{path}: conflicting {what}: {said}")
    for source, value in known.items():
        return value, source
    return None, None


# ------------------------------------------------------------------------------------------ head-row order


def mmfewshot_base_classes(dataset: str) -> list[tuple[str, str]]:
    """(our class name, mmfewshot's class name) of every row of mmfewshot's ``dataset`` head, in its label
    order: the dataset's train classes as ``mmfewshot/classification/datasets/<dataset>.py`` lists them
    (committed as ``negmargin/data/splits/mmfewshot/<dataset>_train.csv``; see the splits README)."""
    text = resources.files("negmargin.data").joinpath("splits", *MMFEWSHOT_CLASS_ORDER[dataset].split("/"))
    rows = list(csv.DictReader(io.StringIO(text.read_text(encoding="utf-8"))))
    return [(row["class"], row["mmfewshot_class"]) for row in rows]


def head_class_names(src: Path, dataset: str | None, meta_classes: list[str] | None
                     ) -> tuple[list[str] | None, str]:
    """Our class name of each head row (None when unknown) and where that order comes from.

    mmfewshot labels the base classes in its own order, which is not ours (mini-ImageNet: n02074367 first,
    Ravi's train.csv n01532829), so row i of the head is not our base class i. The file's meta CLASSES says
    the order (mmfewshot's names, e.g. tiered-ImageNet's WordNet words: translated to ours); without it,
    mmfewshot's dataset module does, when the dataset is known."""
    table = mmfewshot_base_classes(dataset) if dataset in MMFEWSHOT_CLASS_ORDER else None
    if meta_classes is None:
        if table is None:
            return None, "unknown"
        return [ours for ours, _ in table], f"mmfewshot's {dataset} train classes ({MMFEWSHOT_CLASS_ORDER[dataset]})"
    if table is None:
        return list(meta_classes), "meta CLASSES"
    ours_of = {theirs: ours for ours, theirs in table}
    unknown = [name for name in meta_classes if name not in ours_of]
    if unknown:
        raise UserError(f"{src}: meta CLASSES names {unknown[0]!r}, not a base class of mmfewshot's {dataset}")
    return [ours_of[name] for name in meta_classes], "meta CLASSES"


# ---------------------------------------------------------------------------------------------- mapping


def _tensor_listing(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def map_state_dict(path: Path, state: dict[str, Any], model: Classifier) -> dict[str, torch.Tensor]:
    """Our state_dict for ``model`` from mmfewshot's ``state``: every key used, every shape equal."""
    arch = model.spec.arch
    table = key_table(model)
    ours = model.state_dict()
    present = [key for key in state if key not in IGNORED_KEYS]
    missing = [key for key in table if key not in state]
    unexpected = [key for key in present if key not in table]
    if missing:
        raise UserError(f"{path}: missing {len(missing)} key(s) of mmfewshot's {arch} NegMargin model: "
                        f"{_tensor_listing(missing)}")
    if unexpected:
        raise UserError(f"{path}: {len(unexpected)} unexpected key(s), not part of mmfewshot's {arch} "
                        f"NegMargin model: {_tensor_listing(unexpected)}")
    mapped: dict[str, torch.Tensor] = {}
    for their_key, our_key in table.items():
        tensor = state[their_key]
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{path}: {their_key} holds a {type(tensor).__name__}, expected a tensor")
        expected = ours[our_key]
        if tuple(tensor.shape) != tuple(expected.shape):
            raise UserError(f"{path}: {their_key} has shape {list(tensor.shape)}, expected "
                            f"{list(expected.shape)} for {arch} (our {our_key})")
        if tensor.is_floating_point() != expected.is_floating_point():
            raise UserError(f"{path}: {their_key} holds {tensor.dtype}, expected {expected.dtype}")
        mapped[our_key] = tensor.to(expected.dtype)
    return mapped


# ----------------------------------------------------------------------------------------------- import


def provenance_path(dst: Path) -> Path:
    """Where the provenance JSON of checkpoint ``dst`` goes: ``DST.provenance.json`` beside it."""
    return dst.with_name(dst.stem + ".provenance.json")


def import_mmfewshot(src: Path, arch: str, dst: Path, dataset: str | None = None) -> dict[str, Any]:
    """Convert the mmfewshot Neg-Margin checkpoint ``src`` (a ``arch`` backbone) into the negmargin checkpoint
    ``dst``, plus ``DST.provenance.json``; returns the provenance. ``dataset`` (cub, mini-imagenet,
    tiered-imagenet) is checked against what the file says; without it the file's meta or name decide, and
    an unknown dataset is left out of the checkpoint's config.

    Nothing is written when the file is unreadable, not an mmcv checkpoint, holds pickled objects, lacks a
    key, has an unknown key, a shape that differs, or holds the other backbone."""
    src, dst = Path(src), Path(dst)
    if arch not in MMFEWSHOT_BACKBONES.values():
        raise UserError(f"unknown arch {arch!r}; expected conv4 or resnet12")
    if not src.is_file():
        raise UserError(f"{src}: checkpoint not found")
    # The checksum first: a damaged download is reported as such, before it fails to unpickle.
    digest = sha256_file(src)
    prefix_checked = check_release_sha256(src, digest)
    payload = read_mmfewshot_file(src)
    state = payload["state_dict"]
    meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}

    held = _arch_of_keys(list(state))
    if held is not None and held != arch:
        raise UserError(f"{src}: holds a {held} backbone (its keys are {held}'s module names), but arch "
                        f"{arch!r} was asked for")
    head = state.get("head.weight")
    if not isinstance(head, torch.Tensor) or head.ndim != 2:
        raise UserError(f"{src}: missing key head.weight (the training head, a [num_classes, D] tensor)")

    released = RELEASED_NAME.match(src.name)
    named = released.groupdict() if released else {}
    config_text = meta.get("config") if isinstance(meta.get("config"), str) else ""
    from_config = _config_head(config_text)
    _agree(src, "arch", {"--arch": arch, "the meta config": from_config.get("arch"),
                         "the file name": named.get("arch")})
    dataset_name, dataset_source = _agree(src, "dataset", {
        "--dataset": _dataset_name(dataset, src) if dataset else None,
        "the meta config": from_config.get("dataset"),
        "the file name": DATASET_ALIASES.get(named.get("dataset", "")),
    })
    metric, _ = _agree(src, "metric", {"the meta config": from_config.get("metric"),
                                       "the file name": named.get("metric")})
    num_classes = int(head.shape[0])
    if from_config.get("num_classes") not in (None, num_classes):
        raise UserError(f"{src}: head.weight has {num_classes} rows, but the meta config's head has "
                        f"num_classes={from_config['num_classes']}")
    if dataset_name is not None and num_classes != RELEASED_HEAD_ROWS[dataset_name]:
        raise UserError(f"{src}: head.weight has {num_classes} rows, but mmfewshot's {dataset_name} head has "
                        f"{RELEASED_HEAD_ROWS[dataset_name]}; is it a checkpoint of another dataset?")
    released_margin = RELEASED_MARGINS.get((dataset_name, arch)) if released else None
    margin, margin_source = _agree(src, "margin", {"the meta config": from_config.get("margin"),
                                                   "the released config of the file name": released_margin})
    temperature = from_config.get("temperature", DEFAULT_TEMPERATURE)

    class_names = meta.get("CLASSES")
    if class_names is not None:
        if not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names):
            raise UserError(f"{src}: meta CLASSES is not a list of class names")
        if len(class_names) > num_classes:
            raise UserError(f"{src}: meta CLASSES lists {len(class_names)} classes, more than the head's "
                            f"{num_classes} rows")
    head_classes, head_order_from = head_class_names(src, dataset_name, class_names)

    # margin only shifts training logits; an unknown one is recorded as None in the config (0.0 in the spec,
    # which needs a number and does not change features or inference logits).
    spec = ModelSpec(arch, IN_CHANNELS, IMAGE_SIZE, num_classes, metric or "cosine", float(temperature),
                     float(margin) if margin is not None else 0.0)
    model = Classifier(spec)
    mapped = map_state_dict(src, state, model)
    model.load_state_dict(mapped, strict=True)

    hook_msgs = meta.get("hook_msgs") if isinstance(meta.get("hook_msgs"), dict) else {}
    kept_meta = {field: _plain(meta[field]) for field in META_FIELDS if field in meta}
    kept_meta.update({f"hook_msgs.{field}": _plain(hook_msgs[field])
                      for field in HOOK_FIELDS if field in hook_msgs})
    if config_text:
        kept_meta["config"] = config_text
    if class_names is not None:
        kept_meta["num_CLASSES"] = len(class_names)
    provenance: dict[str, Any] = {
        "format": PROVENANCE_FORMAT,
        "source_file": src.name,
        "source_sha256": digest,
        "source_bytes": src.stat().st_size,
        "sha256_prefix_checked": prefix_checked,
        "arch": arch,
        "dataset": dataset_name,
        "dataset_from": dataset_source,
        "head_shape": list(head.shape),
        "metric": spec.metric,
        "margin": margin,
        "margin_from": margin_source or "unknown",
        "head_class_order": head_order_from,
        "temperature": spec.temperature,
        "temperature_from": ("the meta config" if "temperature" in from_config
                             else "mmfewshot's neg_margin configs"),
        "image_size": IMAGE_SIZE,
        "tensors_mapped": len(mapped),
        "ignored_keys": [key for key in IGNORED_KEYS if key in state],
        "had_optimizer": "optimizer" in payload,
        "mmfewshot_meta": kept_meta,
        "checkpoint": dst.name,
        "negmargin_version": __version__,
    }
    # channels_last False: `negmargin features` then runs the backbone in mmfewshot's own memory format
    # (NCHW), which gives the mmfewshot module's features bit for bit on the CPU; channels_last is faster but
    # moves float32 features by up to ~1e-5 of their size, and this checkpoint exists to check published numbers.
    config: dict[str, Any] = {"arch": arch, "metric": spec.metric, "margin": margin,
                              "temperature": spec.temperature, "image_size": IMAGE_SIZE,
                              "num_classes": num_classes, "channels_last": False, "source": "mmfewshot"}
    if dataset_name is not None:
        config = {"dataset": dataset_name, **config}
    checkpoint: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "negmargin_version": __version__,
        "model_spec": spec.to_dict(),
        "config": config,
        "model": model.state_dict(),
        "provenance": provenance,
    }
    if head_classes is not None:
        # Row i of the head is head_classes[i] (mmfewshot's label order, in our class names): analyze maps
        # each base class to its row by name.
        checkpoint["base_class_names"] = head_classes
    # Provenance first: a checkpoint that exists always has its record beside it.
    write_json(provenance_path(dst), provenance)
    torch_save(dst, checkpoint)
    return provenance
