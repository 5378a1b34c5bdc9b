"""Experts whose vocabularies differ from the base's (added [PAD] or chat tokens): their
embeddings and LM heads have other row counts. ``vocab: base`` keeps the base's rows;
``vocab: union`` aligns every model's rows by token string into the union vocabulary (base
tokens first, then the added tokens in the order the experts list them); ``tokenizer_source:
model:PATH`` aligns them into the vocabulary of that model.

The engine sees every model through an :class:`AlignedReader` that presents each vocabulary
tensor with the target's rows: a model lacking a token presents the base's row for it (a zero
task vector: it does not take part), and where the base lacks a token its row is the mean of the
rows of the experts that have it. So a token one expert added gets that expert's row under every
method, and a token several experts added gets their rows merged around their mean.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuromerge.architectures import read_architecture
from neuromerge.errors import ConfigError, InputError
from neuromerge.io.model_folder import support_files
from neuromerge.io.reader import CheckpointReader, TensorMeta

_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens",
                    "spiece", "sentencepiece", "chat_template")


@dataclass
class _Model:
    path: Path
    tokens: list[str]  # by id
    special: set[str]
    rows: int  # rows of its vocabulary tensors (config.json's vocab_size)


def _load(path: Path) -> _Model:
    if not path.is_dir():
        raise InputError(f"{path}: a vocab rule needs model folders with tokenizer files")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("vocab: base | union needs transformers to read tokenizers: "
                          "pip install 'neuromerge[hf]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot load its tokenizer ({exc})") from None
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    sizes = read_architecture(path).vocab_sizes
    rows = sizes[0] if sizes else len(tokens)
    special = set(tok.all_special_tokens) | {
        str(t.content) for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    return _Model(path, [str(t) for t in tokens], special, rows)


class VocabAlignment:
    """Target rows of the vocabulary tensors and, per model (base first), the source row of each
    (-1: the model lacks the token)."""

    def __init__(self, mode: str, models: list[_Model], readers: list[CheckpointReader],
                 target: list[str | None], added: list[str]) -> None:
        self.mode, self.models, self.readers = mode, models, readers
        self.target, self.added = target, added
        self.tokenizer_from: Path | None = None  # model mode: whose tokenizer files to copy
        self.index: list[torch.Tensor] = []
        for i, m in enumerate(models):
            ids = {t: j for j, t in enumerate(m.tokens) if j < m.rows}
            # a row with no token (padding beyond the tokenizer) keeps its position
            self.index.append(torch.tensor(
                [ids.get(t, -1) if t is not None else (r if r < m.rows else -1)
                 for r, t in enumerate(target)], dtype=torch.long))
            if mode == "base" and i > 0:
                self.index[i] = torch.arange(len(target))  # checked: the base's ids are a prefix
        self.names = self._vocab_tensors()

    @property
    def rows(self) -> int:
        return len(self.target)

    def _vocab_tensors(self) -> set[str]:
        base = self.readers[0]
        names = set()
        for name in base.names():
            meta = base.meta(name)
            if not meta.dtype.is_floating_point or not meta.shape or \
                    meta.shape[0] != self.models[0].rows:
                continue
            fits = all(name in r.names() and r.meta(name).shape[0] == m.rows and
                       r.meta(name).shape[1:] == meta.shape[1:]
                       for r, m in zip(self.readers[1:], self.models[1:], strict=True))
            if fits:
                names.add(name)
        return names

    def wrap(self) -> list[CheckpointReader]:
        return [AlignedReader(r, i, self) for i, r in enumerate(self.readers)]

    def _gather(self, m: int, name: str, idx: torch.Tensor) -> torch.Tensor:
        reader = self.readers[m]
        meta = reader.meta(name)
        out = torch.zeros((len(idx), *meta.shape[1:]), dtype=meta.dtype)
        valid = idx >= 0
        if bool(valid.any()):
            lo, hi = int(idx[valid].min()), int(idx[valid].max()) + 1
            block = reader.read_rows(name, lo, hi)  # one read: a slice when rows are contiguous
            out[valid] = block[idx[valid] - lo]
        return out

    def base_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        idx = self.index[0][start:stop]
        out = self._gather(0, name, idx)
        missing = (idx < 0).nonzero().flatten()
        if len(missing):
            total = torch.zeros((len(missing), *out.shape[1:]), dtype=torch.float64)
            count = torch.zeros(len(missing), dtype=torch.float64)
            for m in range(1, len(self.readers)):
                sub = self.index[m][start:stop][missing]
                total += self._gather(m, name, sub).to(torch.float64)
                count += (sub >= 0).to(torch.float64)
            if bool((count == 0).any()):
                row = start + int(missing[int((count == 0).nonzero()[0])])
                raise InputError(f"tensor {name!r}: no model has a row for target token "
                                 f"{self.target[row]!r} (row {row})")
            shape = (-1, *([1] * (out.dim() - 1)))
            out[missing] = (total / count.reshape(shape)).to(out.dtype)
        return out

    def rows_of(self, m: int, name: str, start: int, stop: int) -> torch.Tensor:
        if m == 0:
            return self.base_rows(name, start, stop)
        idx = self.index[m][start:stop]
        out = self._gather(m, name, idx)
        missing = idx < 0
        if bool(missing.any()):  # the base's row: a zero task vector for this model
            out[missing] = self.base_rows(name, start, stop)[missing].to(out.dtype)
        return out

    def write(self, out: Path, base_path: Path) -> None:
        """The output's tokenizer and config.json ``vocab_size`` for the target vocabulary."""
        if self.mode == "union" and self.added:
            from transformers import AddedToken, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(base_path))
            special = set().union(*(m.special for m in self.models[1:]))
            for t in self.added:
                tok.add_tokens([AddedToken(t, special=t in special, normalized=t not in special)],
                               special_tokens=t in special)
            got = tok.convert_tokens_to_ids(self.added)
            want = list(range(self.models[0].rows, self.rows))
            if got != want:
                raise InputError(f"{base_path}: the union tokenizer gave the added tokens ids "
                                 f"{got[:3]}..., not {want[:3]}... (rows of the merged "
                                 f"embeddings)")
            tok.save_pretrained(str(out))
        elif self.mode == "model" and self.tokenizer_from is not None:
            for f in support_files(self.tokenizer_from):
                if f.name.startswith(_TOKENIZER_FILES):
                    shutil.copy2(f, out / f.name)
        cfg_path = out / "config.json"
        if cfg_path.is_file() and self.rows != self.models[0].rows:
            cfg = json.loads(cfg_path.read_text())
            _set_vocab_size(cfg, self.models[0].rows, self.rows)
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _set_vocab_size(cfg: dict[str, Any], old: int, new: int) -> None:
    for key, value in cfg.items():
        if key == "vocab_size" and value == old:
            cfg[key] = new
        elif isinstance(value, dict):
            _set_vocab_size(value, old, new)


class AlignedReader:
    """A checkpoint seen with its vocabulary tensors in the target's rows."""

    def __init__(self, inner: CheckpointReader, model: int, alignment: VocabAlignment) -> None:
        self.inner, self.model, self.alignment = inner, model, alignment
        self.source = inner.source

    def names(self) -> list[str]:
        return self.inner.names()

    def meta(self, name: str) -> TensorMeta:
        meta = self.inner.meta(name)
        if name in self.alignment.names:
            return TensorMeta((self.alignment.rows, *meta.shape[1:]), meta.dtype)
        return meta

    def read(self, name: str) -> torch.Tensor:
        if name in self.alignment.names:
            return self.read_rows(name, 0, self.alignment.rows)
        return self.inner.read(name)

    def read_rows(self, name: str, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        if name in self.alignment.names:
            if axis != 0:
                raise InputError(f"tensor {name!r}: a vocabulary tensor's tokens must be rows")
            return self.alignment.rows_of(self.model, name, start, stop)
        if axis == 0:
            return self.inner.read_rows(name, start, stop)
        return self.inner.read_rows(name, start, stop, axis=axis)

    def files(self) -> list[Path]:
        return self.inner.files()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


def align_vocabularies(mode: str, base_path: Path, expert_paths: Sequence[Path],
                       base: CheckpointReader, experts: Sequence[CheckpointReader],
                       model_path: Path | None = None) -> VocabAlignment:
    """The alignment for ``mode`` (base | union | model, with ``model_path``)."""
    models = [_load(base_path)] + [_load(p) for p in expert_paths]
    readers = [base, *experts]
    b = models[0]
    if mode == "base":
        for m in models[1:]:
            n = min(len(b.tokens), len(m.tokens))
            bad = next((i for i in range(n) if b.tokens[i] != m.tokens[i]), None)
            if bad is not None or len(m.tokens) < len(b.tokens):
                i = bad if bad is not None else n
                theirs = m.tokens[i] if i < len(m.tokens) else "nothing"
                raise InputError(
                    f"{m.path}: token id {i} is {theirs!r} there but {b.tokens[i]!r} in the base "
                    f"{b.path}: its vocabulary does not extend the base's (use vocab: union to "
                    f"align rows by token string)")
        target: list[str | None] = [*b.tokens, *[None] * (b.rows - len(b.tokens))]
        return VocabAlignment(mode, models, readers, target, [])
    if mode == "model":
        assert model_path is not None
        paths = [base_path.resolve(), *[p.resolve() for p in expert_paths]]
        if model_path.resolve() not in paths:
            raise ConfigError(f"tokenizer_source: model:{model_path}: not the base or one of "
                              f"the models being merged")
        m = models[paths.index(model_path.resolve())]
        target = [*m.tokens, *[None] * (m.rows - len(m.tokens))]
        alignment = VocabAlignment(mode, models, readers, target, [])
        alignment.tokenizer_from = m.path
        return alignment
    if len(b.tokens) != b.rows:
        raise InputError(f"{base_path}: its tokenizer has {len(b.tokens)} tokens but its "
                         f"embeddings {b.rows} rows: vocab: union needs them equal")
    seen = set(b.tokens)
    added: list[str] = []
    for m in models[1:]:
        for t in m.tokens[:m.rows]:
            if t not in seen:
                seen.add(t)
                added.append(t)
    return VocabAlignment(mode, models, readers, [*b.tokens, *added], added)
