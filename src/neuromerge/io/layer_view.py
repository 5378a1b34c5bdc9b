"""A checkpoint seen under other tensor names: one model's layers renumbered into an output
model's (mergekit's ``slices``), read from the underlying reader on demand."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from neuromerge.io.reader import CheckpointReader, TensorMeta


class RenamedReader:
    """``names()`` are the output names of ``mapping`` (output name → the reader's name), in
    its order; reads go to the reader. Closing it leaves the reader open (its owner closes)."""

    def __init__(self, reader: CheckpointReader, mapping: Mapping[str, str], source: str
                 ) -> None:
        self.reader, self.mapping, self.source = reader, dict(mapping), source

    def names(self) -> list[str]:
        return list(self.mapping)

    def meta(self, name: str) -> TensorMeta:
        return self.reader.meta(self.mapping[name])

    def read(self, name: str) -> torch.Tensor:
        return self.reader.read(self.mapping[name])

    def read_rows(self, name: str, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        return self.reader.read_rows(self.mapping[name], start, stop, axis)

    def files(self) -> list[Path]:
        return self.reader.files()

    def close(self) -> None:
        pass
