"""The benchmark's evaluation records: ``Results`` (a JSON-lines file of records, each under a key
made of what determines it, so that a rerun skips what is there) and what reads them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from neuromerge.bench.train import TextDataset


def record_key(*parts: Any) -> str:
    """A short stable hash of ``parts`` (JSON, sorted keys): the key of a record, or of a cached
    expert, that changes whenever anything it depends on does."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Results:
    """Evaluation records in a JSON-lines file; a record's key makes reruns skip it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run: that evaluation is redone
                self.records[rec["key"]] = rec

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, rec: dict[str, Any]) -> None:
        self.records[rec["key"]] = rec
        with self.path.open("a") as f:
            # after a cut-short line, start a fresh one so this record stays readable
            if f.tell() > 0 and not self.path.read_bytes().endswith(b"\n"):
                f.write("\n")
            f.write(json.dumps(rec) + "\n")


def mean_accuracy(acc: Mapping[str, float]) -> float:
    """The mean over tasks of a record's ``accuracy`` ({task: accuracy})."""
    return sum(acc.values()) / len(acc)


def dataset_key(ds: TextDataset) -> str:
    """The ``record_key`` of a dataset's texts, labels and label names."""
    return record_key(ds.texts, ds.labels, ds.label_names)
