"""PEFT LoRA adapters as experts, and a merged model written back as a LoRA adapter.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) names no full
weights: its expert is ``base + s·B·A`` with ``s = lora_alpha / r`` (``/ √r`` with rsLoRA).
:class:`LoraExpertReader` forms that tensor by tensor as the engine asks for it, and a row
block from the rows of the factors it needs (``B[rows] @ A``), so no merged copy of the model
is ever held. The sum is computed in float32 and rounded once to the base's dtype; PEFT's
``merge_and_unload`` rounds the delta to the base's dtype before adding it, so half-precision
results may differ from PEFT's by one unit in the last place.

:func:`write_lora` does the reverse for a merged model: each 2-D tensor's delta ``θ − θ0`` is
replaced by its best rank-r approximation (truncated SVD, Eckart–Young), stored as PEFT's
factors; the relative Frobenius error of each is returned for the merge record.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuromerge.errors import InputError, OutputError
from neuromerge.io.reader import (
    CheckpointReader,
    SafetensorsReader,
    TensorMeta,
    TorchBinReader,
    open_checkpoint,
    read_json_object,
)

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
#: Config keys of PEFT variants whose weights are not ``base + s·B·A`` (or that add tensors this
#: reader does not form): refused rather than merged wrongly.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA) adapters",
    "lora_bias": "adapters with a LoRA bias (lora_bias)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable token adapters (trainable_token_indices)",
    "layer_replication": "adapters with layer_replication",
    "use_qalora": "QA-LoRA adapters",
    "use_bdlora": "block-diagonal LoRA adapters",
    "alora_invocation_tokens": "activated LoRA (aLoRA) adapters",
}
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$"
                     r"|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")


def is_adapter_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def _load_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    cfg = read_json_object(path, "adapter config")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise InputError(f"{path}: peft_type {kind} is not supported (only LORA adapters)")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise InputError(f"{path}: {what} are not supported ({key}: {cfg[key]!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), int | float) or cfg[key] <= 0:
            raise InputError(f"{path}: {key} must be a positive number (got {cfg.get(key)!r})")
    return cfg


def _open_weights(folder: Path) -> CheckpointReader:
    st, binf = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        return SafetensorsReader(str(folder), [st])
    if binf.is_file():
        return TorchBinReader(str(folder), [binf])
    raise InputError(f"{folder}: adapter folder without adapter_model.safetensors or "
                     f"adapter_model.bin")


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    """PEFT's ``get_pattern_key``: a pattern matches a module name it ends (a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


@dataclass
class _Adapted:
    """A base tensor's LoRA update in stored layout: ``delta = scaling · left @ right``, where
    ``left`` (rows of the stored tensor × r) and ``right`` (r × the rest, flattened) are
    views of PEFT's factors (``B, A`` for Linear/Conv; ``Aᵀ, Bᵀ`` for Conv1D and Embedding)."""

    a_key: str
    b_key: str
    transposed: bool  # fan_in_fan_out Linear (Conv1D) or Embedding: delta = (B @ A)ᵀ
    scaling: float


class LoraExpertReader:
    """An expert given as a LoRA adapter over the merge's base: the base's names and metadata,
    values ``base + s·B·A`` (float32 sum, rounded to the base's dtype)."""

    def __init__(self, base: CheckpointReader, folder: str | Path,
                 weights: CheckpointReader | None = None) -> None:
        """``weights``: the adapter's factors when not read from ``folder`` (a hub adapter's
        headers while the merge is planned)."""
        self.folder = Path(folder)
        self.source = str(self.folder)
        self.config = _load_adapter_config(self.folder)
        self._base = base
        self._weights = weights if weights is not None else _open_weights(self.folder)
        base_names = base.names()
        self._resolver = _NameResolver(base_names)
        cfg = self.config
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora"))
        fifo = bool(cfg.get("fan_in_fan_out"))
        factors: dict[str, dict[str, str]] = {}
        #: base tensor → the adapter key holding its full replacement (modules_to_save, biases,
        #: an embedding's base_layer saved with save_embedding_layers)
        self._full: dict[str, str] = {}
        self._adapted: dict[str, _Adapted] = {}
        for key in self._weights.names():
            if not key.startswith(_PREFIX):
                raise InputError(f"{self.folder}: adapter tensor {key!r} does not start with "
                                 f"{_PREFIX!r} (not a PEFT LoRA state dict)")
            rest = key[len(_PREFIX):]
            m = _FACTOR.match(rest)
            if m:
                module = m["module"] or m["emodule"]
                kind = (m["kind"] or m["ekind"])[-1]  # "A" or "B"
                slot = factors.setdefault(module, {})
                slot[kind] = key
                slot["embedding"] = "1" if m["ekind"] else slot.get("embedding", "")
                continue
            if "lora_" in rest:
                raise InputError(f"{self.folder}: adapter tensor {key!r} is not a LoRA factor "
                                 f"this reader forms (lora_A/lora_B/lora_embedding_A/B)")
            # full tensors: PEFT saves them under the module's wrapper names
            plain = rest.replace(".modules_to_save.default.", ".").replace(
                ".modules_to_save.", ".").replace(".base_layer.", ".")
            name = self._resolver.find(plain, self.folder, key)
            if self._weights.meta(key).shape != base.meta(name).shape:
                raise InputError(
                    f"{self.folder}: adapter tensor {key!r} has shape "
                    f"{list(self._weights.meta(key).shape)} but the base's {name!r} has "
                    f"{list(base.meta(name).shape)} (an adapter of another base model?)")
            self._full[name] = key
        for module, slot in factors.items():
            if "A" not in slot or "B" not in slot:
                missing = "lora_B" if "A" in slot else "lora_A"
                raise InputError(f"{self.folder}: module {module!r} has no {missing} factor")
            name = self._resolver.find(module + ".weight", self.folder, slot["A"])
            a_shape, b_shape = self._weights.meta(slot["A"]).shape, self._weights.meta(
                slot["B"]).shape
            r = a_shape[0]
            embedding = bool(slot["embedding"])
            # Embedding: A (r, tokens), B (dim, r), delta (B @ A)ᵀ (tokens, dim); Conv1D alike
            if embedding or fifo:
                got = (a_shape[1], b_shape[0])
            else:
                got = (b_shape[0], _prod(a_shape[1:]))
            shape = base.meta(name).shape
            if b_shape[1] != r or len(shape) < 2 or (shape[0], _prod(shape[1:])) != got:
                raise InputError(
                    f"{self.folder}: LoRA factors of {module!r} (A {list(a_shape)}, B "
                    f"{list(b_shape)}) do not fit the base's {name!r} {list(shape)}"
                    + (" (GPT-2 Conv1D weights need fan_in_fan_out: true)"
                       if not fifo and not embedding and shape[::-1] == (got[0], got[1])
                       else ""))
            alpha = _pattern_value(alpha_pattern, module) or cfg["lora_alpha"]
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            self._adapted[name] = _Adapted(slot["A"], slot["B"], embedding or fifo, scaling)

    # -- CheckpointReader ---------------------------------------------------------------------
    def names(self) -> list[str]:
        return self._base.names()

    def meta(self, name: str) -> TensorMeta:
        return self._base.meta(name)

    def adapted(self) -> list[str]:
        """The base tensors this adapter changes by a low-rank update."""
        return list(self._adapted)

    def replaced(self) -> list[str]:
        """The base tensors this adapter stores whole (modules_to_save, trained biases)."""
        return list(self._full)

    def read(self, name: str) -> torch.Tensor:
        shape = self.meta(name).shape
        return self.read_rows(name, 0, shape[0] if shape else 1)

    def read_rows(self, name: str, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        meta = self.meta(name)
        if name in self._full:
            t = self._weights.read(self._full[name]) if not meta.shape else (
                self._weights.read_rows(self._full[name], start, stop, axis))
            t = t.to(meta.dtype)
        else:
            t = (self._base.read(name) if not meta.shape
                 else self._base.read_rows(name, start, stop, axis))
        ad = self._adapted.get(name)
        if ad is None:
            return t
        a = self._weights.read(ad.a_key).float()
        b = self._weights.read(ad.b_key).float()
        left, right = ((a.T, b.T) if ad.transposed
                       else (b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)))
        if axis == 0:
            delta = left[start:stop] @ right
        elif axis == 1 and len(meta.shape) == 2:
            delta = left @ right[:, start:stop]
        else:  # not an axis the engine uses for conv kernels; formed whole, then sliced
            delta = (left @ right).reshape(meta.shape).narrow(axis, start, stop - start)
        delta = delta.reshape(t.shape)
        return (t.float() + ad.scaling * delta).to(meta.dtype)

    def files(self) -> list[Path]:
        return [self.folder / ADAPTER_CONFIG, *self._weights.files()]

    def close(self) -> None:
        self._weights.close()
        self._base.close()


class _NameResolver:
    """Adapter module paths are the PEFT-wrapped model's; checkpoints may store the same tensor
    with or without the model's prefix (``transformer.h.0…`` vs ``h.0…``)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)

    def find(self, name: str, folder: Path, key: str) -> str:
        if name in self.names:
            return name
        hits = [n for n in self.names if n.endswith("." + name) or name.endswith("." + n)]
        if len(hits) == 1:
            return hits[0]
        why = f"several do ({', '.join(sorted(hits)[:3])})" if hits else "none does"
        raise InputError(f"{folder}: adapter tensor {key!r} targets {name!r}, which the base "
                         f"does not hold ({why}; an adapter of another base model?)")


def _prod(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def open_expert(path: str | Path, base_path: str | Path) -> CheckpointReader:
    """An expert's reader: a full checkpoint, or a LoRA adapter folder over the base (which is
    opened again: headers only, and the expert's reads stay independent of the base's)."""
    if is_adapter_folder(path):
        return LoraExpertReader(open_checkpoint(base_path), path)
    return open_checkpoint(path)


#: 2-D tensors stored as ``nn.Embedding`` weights (PEFT's lora_embedding_A/B)
_EMBEDDING = re.compile(r"(^|\.)(wte|wpe|embed_tokens|embed_positions|word_embeddings|"
                        r"position_embeddings|token_type_embeddings|shared|embed_in)\.weight$")


@dataclass
class LoraReport:
    """What :func:`write_lora` wrote: each encoded tensor's relative Frobenius error
    ``‖Δ − Δr‖ / ‖Δ‖``, and the changed tensors an adapter cannot carry with their relative
    change ``‖Δ‖ / ‖θ0‖`` (lost when the adapter is applied to the base)."""

    rank: int
    path: str
    errors: dict[str, float]
    not_encoded: dict[str, float]

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def record(self) -> dict[str, Any]:
        return {"rank": self.rank, "path": self.path, "max_relative_error": self.max_error,
                "relative_errors": self.errors, "not_encoded": self.not_encoded}

    def summary(self) -> str:
        mean = sum(self.errors.values()) / max(len(self.errors), 1)
        text = (f"LoRA adapter of rank {self.rank} in {self.path}: {len(self.errors)} tensors, "
                f"relative Frobenius error of the merged delta max {self.max_error:.4g}, mean "
                f"{mean:.4g}")
        if self.not_encoded:
            worst = max(self.not_encoded, key=self.not_encoded.__getitem__)
            text += (f"; {len(self.not_encoded)} changed tensors are not 2-D weights a LoRA can "
                     f"carry and are left at the base (largest relative change "
                     f"{self.not_encoded[worst]:.3g}: {worst})")
        return text


def write_lora(base: CheckpointReader, merged: CheckpointReader, folder: Path, rank: int, *,
               conv1d: set[str] | frozenset[str] = frozenset(), base_name: str = "") -> LoraReport:
    """Write ``merged − base`` as a PEFT LoRA adapter of rank ``rank`` to ``folder``.

    Every changed 2-D weight (Linear; Conv1D when named in ``conv1d``, stored (in, out);
    Embedding by name) is replaced by its truncated SVD ``U_r S_r V_rᵀ``, split as
    ``B = U_r √S_r``, ``A = √S_r V_rᵀ`` (``lora_alpha = r``: scaling 1), zero-padded where the
    tensor's rank is below ``rank``. Other changed tensors (biases, norms, a Linear among
    Conv1D weights, whose fan_in_fan_out would differ) are reported, not written.
    """
    from safetensors.torch import save_file

    if rank < 1:
        raise InputError(f"LoRA rank must be at least 1 (got {rank})")
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    not_encoded: dict[str, float] = {}
    targets: list[str] = []
    fifo = bool(conv1d)
    for name in merged.names():
        meta = merged.meta(name)
        if not meta.dtype.is_floating_point:
            continue
        theta0 = base.read(name).float()
        delta = merged.read(name).float() - theta0
        norm = float(torch.linalg.vector_norm(delta))
        if norm == 0.0:
            continue
        embedding = bool(_EMBEDDING.search(name))
        is_conv1d = name in conv1d
        if (len(meta.shape) != 2 or not name.endswith(".weight")
                or (fifo and not is_conv1d and not embedding)):
            not_encoded[name] = norm / max(float(torch.linalg.vector_norm(theta0)), 1e-30)
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        errors[name] = float(torch.linalg.vector_norm(s[k:]) / torch.linalg.vector_norm(s))
        root = s[:k].sqrt()
        left = torch.zeros(delta.shape[0], rank)
        right = torch.zeros(rank, delta.shape[1])
        left[:, :k] = u[:, :k] * root
        right[:k] = root[:, None] * vh[:k]
        module = name[: -len(".weight")]
        key = _PREFIX + module
        if embedding:  # delta (tokens, dim) = (B @ A)ᵀ
            tensors[f"{key}.lora_embedding_A"] = left.T.contiguous()
            tensors[f"{key}.lora_embedding_B"] = right.T.contiguous()
        elif is_conv1d:  # delta (in, out) = (B @ A)ᵀ
            tensors[f"{key}.lora_A.weight"] = left.T.contiguous()
            tensors[f"{key}.lora_B.weight"] = right.T.contiguous()
        else:  # delta (out, in) = B @ A
            tensors[f"{key}.lora_A.weight"] = right.contiguous()
            tensors[f"{key}.lora_B.weight"] = left.contiguous()
        targets.append(module)
    if not targets:
        raise OutputError(f"{folder}: no 2-D weight of the merged model differs from the base's, "
                          f"so there is no LoRA adapter to write")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name or None,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": fifo, "target_modules": targets, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return LoraReport(rank, str(folder), errors, not_encoded)
