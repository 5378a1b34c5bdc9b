"""``make_splits``: sized, disjoint, stratified, seeded; shrunk with a warning when short."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.bench.data import Dataset, make_splits
from neuromerge.errors import ConfigError


def _toy(counts: list[int]) -> Dataset:
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    return Dataset([f"text {i}" for i in range(len(labels))], labels,
                   [f"c{c}" for c in range(len(counts))], "toy")


def test_splits_are_sized_disjoint_stratified_and_seeded() -> None:
    ds = _toy([600, 300, 100])
    s = make_splits(ds, seed=3, n_train=500, n_val=100, n_test=200)
    assert list(s) == ["train", "val", "test"]
    assert [len(s[k]) for k in s] == [500, 100, 200]
    sets = [set(s[k].texts) for k in s]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    for split in s.values():
        got = Counter(split.labels)
        for c, share in enumerate([0.6, 0.3, 0.1]):
            assert abs(got[c] - share * len(split)) <= 1
        assert split.label_names == ds.label_names
        assert all(ds.labels[int(t.split()[1])] == y  # texts keep their labels
                   for t, y in zip(split.texts, split.labels, strict=True))
    again = make_splits(ds, seed=3, n_train=500, n_val=100, n_test=200)
    assert again == s
    other = make_splits(ds, seed=4, n_train=500, n_val=100, n_test=200)
    assert other["test"].texts != s["test"].texts
    # Classes are interleaved inside a split, not in blocks.
    assert s["train"].labels != sorted(s["train"].labels)


def test_test_split_does_not_depend_on_train_size() -> None:
    ds = _toy([400, 250, 50])
    small = make_splits(ds, seed=0, n_train=100, n_val=50, n_test=150)
    large = make_splits(ds, seed=0, n_train=450, n_val=80, n_test=150)
    assert small["test"] == large["test"]


def test_splits_shrink_proportionally_and_say_so(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # The CLI may have turned propagation off on the package logger in an earlier test.
    monkeypatch.setattr(logging.getLogger("neuromerge"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="neuromerge.bench")
    ds = _toy([70, 30])
    s = make_splits(ds, seed=0, n_train=100, n_val=50, n_test=50)
    assert [len(s[k]) for k in s] == [50, 25, 25]
    assert "toy has 100 examples, fewer than the 200 asked" in caplog.text
    assert "train=50, val=25, test=25" in caplog.text
    whole = make_splits(ds, seed=0, n_train=80, n_val=10, n_test=10)  # exactly all of it
    assert sorted(t for v in whole.values() for t in v.texts) == sorted(ds.texts)


def test_splits_reject_bad_arguments() -> None:
    ds = _toy([5, 5])
    for kwargs in ({"n_train": -1}, {"n_val": 1.5}, {"seed": -2}, {"n_test": True}):
        args: dict[str, Any] = {"seed": 0, "n_train": 2, "n_val": 2, "n_test": 2, **kwargs}
        with pytest.raises(ConfigError):
            make_splits(ds, **args)
    empty = make_splits(ds, seed=0, n_train=0, n_val=0, n_test=3)
    assert [len(v) for v in empty.values()] == [0, 0, 3]


@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       sizes=st.tuples(st.integers(0, 60), st.integers(0, 30), st.integers(0, 30)),
       seed=st.integers(0, 2**32))
def test_split_invariants(counts: list[int], sizes: tuple[int, int, int], seed: int) -> None:
    ds = _toy(counts)
    s = make_splits(ds, seed=seed, n_train=sizes[0], n_val=sizes[1], n_test=sizes[2])
    got = [len(v) for v in s.values()]
    if sum(sizes) <= len(ds):
        assert got == list(sizes)
    else:
        assert got == [n * len(ds) // sum(sizes) for n in sizes]
    texts = [t for v in s.values() for t in v.texts]
    assert len(texts) == len(set(texts))
    for split in s.values():  # per-class counts never exceed what the class has
        for c, n in Counter(split.labels).items():
            assert n <= counts[c]
