"""Streaming output: safetensors shards written tensor by tensor, inside a temporary folder that
is renamed into place only once complete.

Every tensor's name, shape and output dtype are known before the merge starts, so each shard's
header (with all offsets) is written first and tensor data is then appended as it is produced:
memory holds one output tensor, never a whole shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from neuromerge.errors import ConfigError, OutputError
from neuromerge.io.dtypes import TORCH_TO_ST
from neuromerge.io.reader import TensorMeta

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str | int, what: str = "max_shard_size") -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"2GiB"`` → 2·2³⁰, ``"500MB"``, or a plain byte count."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what}: cannot read {value!r} (use e.g. 5GB, 500MB, "
                              f"2GiB or a byte count)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"{what}: must be positive (got {value!r})")
    return size


def plan_shards(entries: Sequence[tuple[str, TensorMeta]], max_shard_size: int
                ) -> list[list[tuple[str, TensorMeta]]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[tuple[str, TensorMeta]]] = [[]]
    size = 0
    for name, meta in entries:
        if shards[-1] and size + meta.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, meta))
        size += meta.nbytes
    return shards


def _header(entries: Sequence[tuple[str, TensorMeta]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, meta in entries:
        header[name] = {"dtype": TORCH_TO_ST[meta.dtype], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + meta.nbytes]}
        offset += meta.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data section starts 8-byte aligned


class ShardedSafetensorsWriter:
    """Writes the planned tensors, in plan order, to ``model.safetensors`` or to
    ``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``."""

    def __init__(self, folder: Path, entries: Sequence[tuple[str, TensorMeta]],
                 max_shard_size: int) -> None:
        self.folder = folder
        self.shards = plan_shards(entries, max_shard_size)
        n = len(self.shards)
        self.filenames = (["model.safetensors"] if n == 1 else
                          [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._order = [(s, name, meta) for s, shard in enumerate(self.shards)
                       for name, meta in shard]
        self._pos = 0
        self._rows_done = 0  # of the tensor at _pos, when it arrives in row blocks
        self._shard = -1
        self._tensor_start = 0  # file offset of the tensor being written in blocks
        self._fh: object | None = None
        self.total_size = sum(meta.nbytes for _, _, meta in self._order)

    def write(self, name: str, tensor: torch.Tensor, row_start: int | None = None,
              axis: int = 0) -> None:
        """Append a tensor, or (``row_start`` given) the next block of one along ``axis`` (rows:
        axis 0), in plan order. A block along a later axis (a column block of a Conv1D weight)
        is written with one positioned write per index of the axes before it."""
        if self._pos >= len(self._order):
            raise RuntimeError(f"unplanned tensor {name!r} written")
        shard, expected, meta = self._order[self._pos]
        shape = tuple(tensor.shape)
        if row_start is None:
            ok = shape == meta.shape and self._rows_done == 0
            rows = meta.shape[axis] if meta.shape else 1
        else:
            ok = (row_start == self._rows_done and len(shape) == len(meta.shape) > axis
                  and shape[:axis] == meta.shape[:axis]
                  and shape[axis + 1:] == meta.shape[axis + 1:]
                  and row_start + shape[axis] <= meta.shape[axis])
            rows = shape[axis] if ok else 0
        if name != expected or not ok or tensor.dtype != meta.dtype:
            raise RuntimeError(f"writer expected {expected} {meta.shape} {meta.dtype} (axis "
                               f"{axis} from {self._rows_done}), got {name} {shape} "
                               f"{tensor.dtype} (from {row_start})")
        if shard != self._shard:
            self._open(shard)
        fh = self._fh
        assert fh is not None
        if self._rows_done == 0:
            self._tensor_start = fh.tell()  # type: ignore[attr-defined]
        outer = 1
        for d in meta.shape[:axis]:
            outer *= d
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if row_start is None or outer == 1:
            fh.write(memoryview(data))  # type: ignore[attr-defined]
        else:
            data = data.reshape(outer, -1)
            stride = meta.nbytes // outer  # bytes per index of the axes before ``axis``
            at = self._tensor_start + row_start * (stride // meta.shape[axis])
            for o in range(outer):
                fh.seek(at + o * stride)  # type: ignore[attr-defined]
                fh.write(memoryview(data[o]))  # type: ignore[attr-defined]
        self._rows_done += rows
        if row_start is None or self._rows_done == meta.shape[axis]:
            if row_start is not None and outer > 1:
                fh.seek(self._tensor_start + meta.nbytes)  # type: ignore[attr-defined]
            self._pos += 1
            self._rows_done = 0

    def _open(self, shard: int) -> None:
        if self._fh is not None:
            self._fh.close()  # type: ignore[attr-defined]
        header = _header(self.shards[shard])
        self._fh = open(self.folder / self.filenames[shard], "wb")  # noqa: SIM115
        self._fh.write(len(header).to_bytes(8, "little"))  # type: ignore[attr-defined]
        self._fh.write(header)  # type: ignore[attr-defined]
        self._shard = shard

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()  # type: ignore[attr-defined]
            self._fh = None
        if self._pos != len(self._order):
            missing = self._order[self._pos][1]
            raise RuntimeError(f"output incomplete: tensor {missing!r} was never written")
        if len(self.shards) == 0 or not self._order:
            # A model with no tensors still gets a valid (empty) file.
            (self.folder / "model.safetensors").write_bytes(
                len(_header([])).to_bytes(8, "little") + _header([]))
        if len(self.shards) > 1:
            weight_map = {name: self.filenames[s] for s, name, _ in self._order}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n")


class OutputFolder:
    """``with OutputFolder(target, force) as tmp:`` write into ``tmp``; on success it is renamed
    to ``target`` (replacing an existing folder only with ``force``); on any failure it is
    removed and ``target`` is left exactly as it was."""

    def __init__(self, target: str | os.PathLike[str], *, force: bool = False) -> None:
        self.target = Path(target)
        self.force = force
        if self.target.exists() or self.target.is_symlink():
            if not self.target.is_dir():
                raise OutputError(f"{self.target}: exists and is not a folder")
            if not force:
                raise OutputError(f"{self.target}: output folder exists (use --force to "
                                  f"replace it)")
        self.tmp = self.target.parent / f".{self.target.name}.neuromerge-tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        # parents this merge creates are removed again if it fails
        self._created = [p for p in (self.target.parent, *self.target.parent.parents)
                         if not p.exists()]
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"{self.target}: cannot create output folder ({exc.strerror})"
                              ) from None
        return self.tmp

    def _abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for p in self._created:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._abandon()
            return
        if self.target.exists() and not self.force:  # appeared while we were merging
            self._abandon()
            raise OutputError(f"{self.target}: output folder appeared during the merge (use "
                              f"--force to replace it)")
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.neuromerge-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def refuse_overlap(out: Path, inputs: list[Path]) -> None:
    """With --force the output folder is replaced: it must not be, contain, or sit inside an
    input folder, nor contain an input file."""
    o = out.resolve()
    for p in inputs:
        r = p.resolve()
        inside_input_folder = r.is_dir() and r in o.parents
        if o == r or o in r.parents or inside_input_folder:
            raise OutputError(f"{out}: output would overlap the input {p}; choose another folder")
