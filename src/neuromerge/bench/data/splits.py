"""Seeded, stratified, disjoint train / validation / test splits of a task (``make_splits``)."""

from __future__ import annotations

import logging

import numpy as np

from neuromerge.bench.data.dataset import Dataset
from neuromerge.errors import ConfigError

log = logging.getLogger("neuromerge.bench")


def _apportion(size: int, counts: np.ndarray, room: np.ndarray) -> np.ndarray:
    # Largest-remainder share of `size` proportional to `counts`, then capped at `room` with the
    # shortfall given to the classes with the most room left (ties: lowest label id).
    total = int(counts.sum())
    exact = size * counts / total
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -(exact - quota)))
    quota[order[: size - int(quota.sum())]] += 1
    quota = np.minimum(quota, room)
    for _ in range(size - int(quota.sum())):
        quota[int(np.argmax(room - quota))] += 1
    return quota


def make_splits(dataset: Dataset, seed: int, n_train: int, n_val: int,
                n_test: int) -> dict[str, Dataset]:
    """Disjoint, stratified ``train``/``val``/``test`` subsets of ``dataset``, fixed by ``seed``.

    Each split's label distribution is the dataset's (largest-remainder rounding, so within one
    example per label). The test split is drawn first, then val, then train, from the same seeded
    per-label shuffles, so the test set depends only on ``seed`` and ``n_test``: asking for more
    training data never changes it. Examples inside a split are in seeded random order.

    If the dataset has fewer examples than ``n_train + n_val + n_test``, all three sizes are
    scaled down by the same factor (rounded down) and a warning is logged; the returned splits
    have the actual sizes.
    """
    asked = {"train": n_train, "val": n_val, "test": n_test}
    for key, n in asked.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"n_{key} must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    have, want = len(dataset), sum(asked.values())
    sizes = dict(asked)
    if want > have:
        sizes = {k: n * have // want for k, n in asked.items()}
        log.warning("task %s has %d examples, fewer than the %d asked: splits shrunk to "
                    "train=%d, val=%d, test=%d", dataset.name or "?", have, want,
                    sizes["train"], sizes["val"], sizes["test"])
    labels = np.asarray(dataset.labels, dtype=np.int64)
    n_labels = len(dataset.label_names)
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(n_labels)]
    counts = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(n_labels, dtype=np.int64)
    out: dict[str, Dataset] = {}
    for k, split in enumerate(("test", "val", "train")):
        quota = (_apportion(sizes[split], counts, counts - taken) if sizes[split]
                 else np.zeros(n_labels, dtype=np.int64))
        idx = np.concatenate([pools[c][taken[c]:taken[c] + quota[c]] for c in range(n_labels)]
                             + [np.zeros(0, dtype=np.int64)])
        taken += quota
        # Own stream per split, so shuffling one split does not move another's draw.
        idx = np.random.default_rng([seed, k]).permutation(idx)
        out[split] = Dataset([dataset.texts[i] for i in idx], [dataset.labels[i] for i in idx],
                             list(dataset.label_names), dataset.name)
    return {split: out[split] for split in ("train", "val", "test")}
