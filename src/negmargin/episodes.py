"""Fixed, seeded N-way K-shot episodes over a labelled set.

Everything random about a meta-test is drawn here from one seed, with numpy's PCG64 generator and only
its raw uniform doubles (``Generator.random``), whose stream is platform-independent:

* the episodes: classes, support and query images;
* the initial weights of each episode's new head (kaiming-uniform, U(-1/sqrt(D), 1/sqrt(D)));
* the order in which the support set is cut into fine-tuning mini-batches.

So the same seed gives the same episodes, initial heads and batch order on every run and machine, and
``Episodes.digest()`` lets two runs check that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from negmargin.errors import UserError


@dataclass(frozen=True)
class Episodes:
    """Indices into the feature bank. Support and query are ordered way by way; way w has label w."""

    support: np.ndarray  # int64 [E, ways*shots]
    query: np.ndarray  # int64 [E, ways*queries]
    classes: np.ndarray  # int64 [E, ways]: original labels
    ways: int
    shots: int
    queries: int
    seed: int

    @property
    def num_episodes(self) -> int:
        return int(self.support.shape[0])

    @property
    def query_labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.ways), self.queries)

    def digest(self) -> str:
        digest = hashlib.sha256()
        for array in (self.classes, self.support, self.query):
            digest.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
        return digest.hexdigest()


def short_classes(labels: np.ndarray, per_class: int, num_classes: int | None = None) -> list[tuple[int, int]]:
    """``(label, images)`` of every class with fewer than ``per_class`` images, in label order: no episode can
    draw such a class. ``num_classes`` (from the class names) also brings in classes without any image."""
    labels = np.asarray(labels, dtype=np.int64)
    length = max(int(labels.max()) + 1 if len(labels) else 0, num_classes or 0)
    counts = np.bincount(labels, minlength=length)
    present = np.arange(length) if num_classes is not None else np.unique(labels)
    return [(int(label), int(counts[label])) for label in present if counts[label] < per_class]


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(3)
    return tuple(np.random.Generator(np.random.PCG64(child)) for child in children)  # type: ignore[return-value]


def sample_episodes(labels: np.ndarray, ways: int, shots: int, queries: int, episodes: int, seed: int) -> Episodes:
    """Draw ``episodes`` episodes: ``ways`` distinct classes, then ``shots + queries`` distinct images per class."""
    labels = np.asarray(labels, dtype=np.int64)
    class_ids, counts = np.unique(labels, return_counts=True)
    per_class = shots + queries
    eligible = class_ids[counts >= per_class]
    if len(eligible) < ways:
        raise UserError(
            f"only {len(eligible)} classes have at least {per_class} images ({shots} shots + {queries} queries); "
            f"{ways}-way episodes need {ways}"
        )
    if episodes <= 0:
        raise UserError(f"episodes must be positive, got {episodes}")
    episode_rng, _, _ = _streams(seed)
    # Classes: the first `ways` of a random permutation of the eligible classes, per episode.
    class_keys = episode_rng.random((episodes, len(eligible)))
    chosen = eligible[np.argsort(class_keys, axis=1, kind="stable")[:, :ways]]
    # Images: a random permutation within each chosen class; padding slots sort last.
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=labels.max() + 1))[:-1]])
    full_counts = np.bincount(labels, minlength=labels.max() + 1)
    max_count = int(full_counts[chosen].max())
    image_keys = episode_rng.random((episodes, ways, max_count))
    image_keys[np.arange(max_count)[None, None, :] >= full_counts[chosen][:, :, None]] = np.inf
    picks = np.argsort(image_keys, axis=2, kind="stable")[:, :, :per_class]
    members = order[starts[chosen][:, :, None] + picks]  # [E, ways, shots+queries]
    return Episodes(
        support=members[:, :, :shots].reshape(episodes, ways * shots),
        query=members[:, :, shots:].reshape(episodes, ways * queries),
        classes=chosen,
        ways=ways,
        shots=shots,
        queries=queries,
        seed=seed,
    )


def initial_head_weights(episodes: Episodes, dim: int) -> np.ndarray:
    """float32 [E, ways, dim]: kaiming_uniform(a=sqrt(5)) for a [ways, dim] weight, i.e. U(-1/sqrt(dim), 1/sqrt(dim))."""
    _, weight_rng, _ = _streams(episodes.seed)
    bound = 1.0 / np.sqrt(dim)
    weights = np.empty((episodes.num_episodes, episodes.ways, dim), dtype=np.float32)
    for start in range(0, episodes.num_episodes, 256):  # chunked only to bound peak memory
        block = weight_rng.random((min(256, episodes.num_episodes - start), episodes.ways, dim))
        weights[start : start + len(block)] = (2.0 * block - 1.0) * bound
    return weights


def batch_schedule(episodes: Episodes, steps: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The support positions each fine-tuning step uses, as a data loader with shuffle=True would give.

    Each pass over the support set is a fresh random permutation cut into batches of ``batch_size``;
    the last batch of a pass may be smaller (no drop_last), and a new pass starts when one runs out.
    Returns ``positions`` int64 [E, steps, batch_size] (into the episode's support list) and
    ``mask`` bool [E, steps, batch_size] (False for the unused slots of a short batch).
    """
    _, _, order_rng = _streams(episodes.seed)
    n_support = episodes.ways * episodes.shots
    per_pass = -(-n_support // batch_size)
    passes = -(-steps // per_pass)
    keys = order_rng.random((episodes.num_episodes, passes, n_support))
    perms = np.argsort(keys, axis=2, kind="stable")  # [E, passes, n_support]
    padded = np.zeros((episodes.num_episodes, passes, per_pass * batch_size), dtype=np.int64)
    valid = np.zeros((passes, per_pass * batch_size), dtype=bool)
    padded[:, :, :n_support] = perms
    valid[:, :n_support] = True
    positions = padded.reshape(episodes.num_episodes, passes * per_pass, batch_size)[:, :steps]
    mask = np.broadcast_to(valid.reshape(passes * per_pass, batch_size)[:steps], positions.shape).copy()
    return positions, mask
