"""Lazy checkpoint readers: names, shapes and dtypes from headers; values one tensor at a time.

safetensors files are read with plain positioned reads into fresh tensors (no mmap), so the
memory a merge holds is the tensors in flight, never file pages of whole models.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from neuromerge.errors import InputError
from neuromerge.io.dtypes import ST_TO_TORCH

_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class CheckpointReader(Protocol):
    """What the engine needs from a model: its tensor names, their metadata, their values."""

    source: str

    def names(self) -> list[str]: ...
    def meta(self, name: str) -> TensorMeta: ...
    def read(self, name: str) -> torch.Tensor: ...
    def read_rows(self, name: str, start: int, stop: int, axis: int = 0) -> torch.Tensor: ...
    def files(self) -> list[Path]: ...
    def close(self) -> None: ...


class SafetensorsFile:
    """One .safetensors file: header parsed and checked on open, tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = open(path, "rb")  # noqa: SIM115 (kept open for positioned reads)
        except OSError as exc:
            raise InputError(f"{path}: cannot open ({exc.strerror})") from None
        size = os.fstat(self._fh.fileno()).st_size
        raw = self._fh.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(_MAX_HEADER, size - 8):
            raise InputError(f"{path}: corrupt safetensors file (header length {hlen} does not "
                             f"fit a {size}-byte file)")
        header_bytes = self._fh.read(hlen)
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: corrupt safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + hlen
        data_len = size - self._data_start
        self._entries: dict[str, tuple[TensorMeta, int, int]] = {}
        for name, info in header.items():
            try:
                dtype = ST_TO_TORCH[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{path}: tensor {name!r}: unsupported or malformed header "
                                 f"entry {info!r}") from None
            meta = TensorMeta(shape, dtype)
            if not 0 <= begin <= end <= data_len or end - begin != meta.nbytes:
                raise InputError(
                    f"{path}: tensor {name!r}: data offsets {begin}..{end} do not match shape "
                    f"{list(shape)} {info['dtype']} in a {data_len}-byte data section "
                    f"(truncated or corrupt file)")
            self._entries[name] = (meta, begin, end)

    def names(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> TensorMeta:
        return self._entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        meta = self._entries[name][0]
        return self.read_rows(name, 0, meta.shape[0] if meta.shape else 1)

    def read_rows(self, name: str, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        """Indices ``start:stop`` of axis ``axis`` (rows: axis 0): one contiguous positioned read
        per index of the axes before it (one in all for rows; a column block of an (in, out)
        Conv1D weight takes one read per input row)."""
        meta, begin, _ = self._entries[name]
        if not meta.shape:
            return self._pread(name, torch.empty((), dtype=meta.dtype), begin)
        outer = _prod(meta.shape[:axis])
        inner = _prod(meta.shape[axis + 1:]) * meta.dtype.itemsize
        n = meta.shape[axis]
        out = torch.empty((outer, stop - start, inner // meta.dtype.itemsize), dtype=meta.dtype)
        for o in range(outer):
            self._pread(name, out[o], begin + (o * n + start) * inner)
        return out.reshape(*meta.shape[:axis], stop - start, *meta.shape[axis + 1:])

    def _pread(self, name: str, out: torch.Tensor, begin: int) -> torch.Tensor:
        nbytes = out.numel() * out.element_size()
        if nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            if _read_into(self._fh, view, self._data_start + begin) != nbytes:
                raise InputError(f"{self.path}: tensor {name!r}: short read (file truncated?)")
        return out

    def close(self) -> None:
        self._fh.close()


def _prod(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a config file), or a one-line InputError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} is not a JSON object")
    return data


def _read_into(fh: object, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; loops because one read(2) returns at most ~2 GiB."""
    done = 0
    fd = fh.fileno()  # type: ignore[attr-defined]
    while done < len(view):
        got = _pread_into(fd, view[done:], offset + done)
        if got <= 0:
            break
        done += got
    return done


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.readv(fd, [view])


class SafetensorsReader:
    """A model stored as one or several (sharded, with an index) safetensors files."""

    def __init__(self, source: str, files: Iterable[Path],
                 weight_map: Mapping[str, str] | None = None) -> None:
        self.source = source
        self._files = {p.name: SafetensorsFile(p) for p in files}
        self._where: dict[str, SafetensorsFile] = {}
        for f in self._files.values():
            for name in f.names():
                self._where[name] = f
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise InputError(f"{source}: index lists tensor {missing[0]!r} "
                                 f"(in {weight_map[missing[0]]}) but no shard holds it")

    def names(self) -> list[str]:
        return list(self._where)

    def metadata(self) -> dict[str, str]:
        """The files' safetensors ``__metadata__``, merged."""
        out: dict[str, str] = {}
        for f in self._files.values():
            out.update(f.metadata)
        return out

    def meta(self, name: str) -> TensorMeta:
        return self._where[name].meta(name)

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def read_rows(self, name: str, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        return self._where[name].read_rows(name, start, stop, axis)

    def files(self) -> list[Path]:
        return [f.path for f in self._files.values()]

    def close(self) -> None:
        for f in self._files.values():
            f.close()


class TorchBinReader:
    """``pytorch_model.bin`` (or its shards), loaded with ``weights_only=True`` (mmap'd when the
    file is in the zip format, read whole for the legacy format)."""

    def __init__(self, source: str, files: Iterable[Path]) -> None:
        self.source = source
        self._paths = list(files)
        self._tensors: dict[str, torch.Tensor] = {}
        for path in self._paths:
            sd = _torch_load(path)
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict):
                raise InputError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
            for name, value in sd.items():
                if not isinstance(value, torch.Tensor):
                    raise InputError(f"{path}: entry {name!r} is not a tensor "
                                     f"({type(value).__name__})")
                self._tensors[name] = value

    def names(self) -> list[str]:
        return list(self._tensors)

    def meta(self, name: str) -> TensorMeta:
        t = self._tensors[name]
        return TensorMeta(tuple(t.shape), t.dtype)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()

    def read_rows(self, name: str, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        return self._tensors[name].narrow(axis, start, stop - start).clone()

    def files(self) -> list[Path]:
        return list(self._paths)

    def close(self) -> None:
        self._tensors.clear()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _torch_load(path: Path) -> object:
    try:
        head = path.open("rb").read(64)
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror})") from None
    if head.startswith(b"version https://git-lfs"):
        raise InputError(f"{path}: a Git LFS pointer, not the weights (run git lfs pull)")
    zipped = head.startswith(b"PK")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        text = _ANSI.sub("", str(exc))
        if "weights_only" in text or "Unsupported global" in text:
            raise InputError(f"{path}: holds objects other than tensors, which weights_only "
                             f"loading refuses (it could run arbitrary code); convert the "
                             f"checkpoint to safetensors") from None
        raise InputError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated "
                         f"file?)") from None
    except Exception:  # torch raises many types for a damaged zip or pickle
        raise InputError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated "
                         f"file?)") from None


def _fingerprint(path: Path, sample: int = 1 << 20) -> str:
    """sha256 of a file's first and last MiB and its size: cheap, and different for any two
    real checkpoints (a full hash would read every byte once more)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        h.update(f.read(sample))
        if size > sample:
            f.seek(max(sample, size - sample))
            h.update(f.read(sample))
    h.update(str(size).encode())
    return h.hexdigest()


def fingerprint(reader: CheckpointReader) -> str:
    """A short identity of a checkpoint's files (see ``_fingerprint``); '' for in-memory."""
    files = reader.files()
    if not files:
        return ""
    h = hashlib.sha256()
    for f in files:
        h.update(_fingerprint(Path(f)).encode())
    return h.hexdigest()[:16]


class StateDictReader:
    """An in-memory state dict behind the same interface (the Python API, tests)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], source: str = "<state_dict>"
                 ) -> None:
        self.source = source
        self._sd = dict(state_dict)

    def names(self) -> list[str]:
        return list(self._sd)

    def meta(self, name: str) -> TensorMeta:
        t = self._sd[name]
        return TensorMeta(tuple(t.shape), t.dtype)

    def read(self, name: str) -> torch.Tensor:
        # a copy: results must never share storage with the caller's tensors
        return self._sd[name].detach().to("cpu", copy=True)

    def read_rows(self, name: str, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        t = self._sd[name].detach().narrow(axis, start, stop - start)
        return t.to("cpu", copy=True).contiguous()

    def files(self) -> list[Path]:
        return []

    def close(self) -> None:
        pass


def load_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index file, or a one-line InputError."""
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{path}: unreadable or malformed index (expected a JSON object "
                         f"with a 'weight_map')") from None
    return {str(k): str(v) for k, v in weight_map.items()}


def _shards(folder: Path, index_path: Path) -> tuple[list[Path], dict[str, str]]:
    weight_map = load_index(index_path)
    files = []
    for fname in dict.fromkeys(weight_map.values()):
        shard = folder / fname
        if not shard.is_file():
            raise InputError(f"{index_path}: shard {fname} is missing")
        files.append(shard)
    return files, weight_map


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open an HF model folder (safetensors, sharded safetensors, pytorch_model.bin, sharded
    .bin) or a bare ``.safetensors`` / ``.bin`` / ``.pt`` file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsReader(str(p), [p])
        if p.suffix in (".bin", ".pt", ".pth"):
            return TorchBinReader(str(p), [p])
        raise InputError(f"{p}: unknown checkpoint format (expected .safetensors, .bin or .pt)")
    candidates = [
        ("model.safetensors.index.json", "st-index"), ("model.safetensors", "st"),
        ("pytorch_model.bin.index.json", "bin-index"), ("pytorch_model.bin", "bin"),
    ]
    for fname, kind in candidates:
        f = p / fname
        if not f.is_file():
            continue
        if kind == "st-index":
            files, weight_map = _shards(p, f)
            return SafetensorsReader(str(p), files, weight_map)
        if kind == "st":
            return SafetensorsReader(str(p), [f])
        if kind == "bin-index":
            return TorchBinReader(str(p), _shards(p, f)[0])
        return TorchBinReader(str(p), [f])
    lone = sorted(p.glob("*.safetensors"))
    if len(lone) == 1:
        return SafetensorsReader(str(p), lone)
    raise InputError(f"{p}: no weights found (expected model.safetensors, "
                     f"model.safetensors.index.json or pytorch_model.bin)")
