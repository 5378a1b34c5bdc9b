"""Statistics files: safetensors whose tensor names are the checkpoint's weight names, with
their provenance in the metadata, and a cache keyed by (model, data, settings)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from neuromerge.errors import InputError
from neuromerge.io.reader import CheckpointReader, SafetensorsReader
from neuromerge.statistics.estimate import KIND_KEY, Kind, Statistics

log = logging.getLogger("neuromerge")


def data_hash(texts: Sequence[str], labels: Sequence[int] | None = None) -> str:
    """A short identity of a data set (texts and labels, in order)."""
    payload = json.dumps([list(texts), None if labels is None else [int(y) for y in labels]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_statistics(stats: Statistics, path: str | os.PathLike[str], *,
                    model_fingerprint: str = "", data: str = "") -> Path:
    """Write ``stats`` as safetensors (atomically) with its provenance in the metadata."""
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {KIND_KEY: stats.kind, "n_examples": str(stats.n_examples),
            "model_fingerprint": model_fingerprint, "data_hash": data,
            "info": json.dumps(stats.info, sort_keys=True)}
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in stats.tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def open_statistics(path: str | os.PathLike[str], kind: Kind | None, *,
                    model: str = "") -> CheckpointReader:
    """A reader over a statistics file, refused when it holds another kind of statistic."""
    p = Path(path)
    who = f" (statistics of {model})" if model else ""
    if not p.is_file():
        raise InputError(f"{p}: no such statistics file{who}")
    reader = SafetensorsReader(str(p), [p])
    got = reader.metadata().get(KIND_KEY)
    if kind is not None and got != kind:
        reader.close()
        found = f"a {got} file" if got else "not a neuromerge statistics file"
        raise InputError(f"{p}: {found}, but the method needs {kind} statistics{who}")
    return reader


def statistics_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    reader = open_statistics(path, None)
    try:
        return reader.metadata()
    finally:
        reader.close()


def cached_statistics(cache_dir: str | os.PathLike[str], kind: Kind, model_fingerprint: str,
                      data: str, compute: Callable[[], Statistics],
                      settings: Mapping[str, Any] | None = None) -> Path:
    """The statistics file for (model, data, settings) in ``cache_dir``, computed by
    ``compute()`` only when it is not there yet."""
    key = hashlib.sha256(json.dumps([kind, model_fingerprint, data, dict(settings or {})],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{kind}-{key}.safetensors"
    if path.is_file():
        return path
    stats = compute()
    log.info("%s statistics: %d examples, %d tensors -> %s", kind, stats.n_examples,
             len(stats.tensors), path)
    return save_statistics(stats, path, model_fingerprint=model_fingerprint, data=data)
