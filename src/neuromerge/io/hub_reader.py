"""A hub model's weights known from their safetensors headers only (read over HTTP range
requests by huggingface_hub): what a merge is planned and checked from before any weight is
downloaded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from neuromerge.errors import InputError
from neuromerge.io.dtypes import ST_TO_TORCH
from neuromerge.io.reader import TensorMeta


class HubHeaderReader:
    """A hub model's weights known from their safetensors headers: names, shapes and dtypes
    for planning a merge; values are not there (``read`` raises: download first)."""

    def __init__(self, source: str, files: Mapping[str, Any],
                 weight_map: Mapping[str, str] | None = None) -> None:
        self.source = source
        self._meta: dict[str, TensorMeta] = {}
        self._file_metadata: dict[str, str] = {}
        for fname, fmeta in files.items():
            self._file_metadata.update(fmeta.metadata or {})
            for name, info in fmeta.tensors.items():
                try:
                    meta = TensorMeta(tuple(int(d) for d in info.shape), ST_TO_TORCH[info.dtype])
                    begin, end = (int(x) for x in info.data_offsets)
                except (KeyError, TypeError, ValueError):
                    raise InputError(f"{source}: {fname}: tensor {name!r}: unsupported or "
                                     f"malformed header entry") from None
                if end - begin != meta.nbytes:
                    raise InputError(f"{source}: {fname}: tensor {name!r}: data offsets "
                                     f"{begin}..{end} do not match shape {list(meta.shape)} "
                                     f"{info.dtype}")
                self._meta[name] = meta
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._meta))
            if missing:
                raise InputError(f"{source}: index lists tensor {missing[0]!r} (in "
                                 f"{weight_map[missing[0]]}) but no shard holds it")

    def names(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def metadata(self) -> dict[str, str]:
        return dict(self._file_metadata)

    def read(self, name: str) -> torch.Tensor:
        raise InputError(f"{self.source}: tensor {name!r}: only its header is known (the "
                         f"weights are downloaded once the merge is planned)")

    def read_rows(self, name: str, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        return self.read(name)

    def files(self) -> list[Path]:
        return []

    def close(self) -> None:
        pass
