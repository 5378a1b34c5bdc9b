"""Which axis of a tensor is the neuron, and which tensors are tied copies of others, read from
the base model's ``config.json`` (no transformers import, no model instantiation).

NeuroMerging decomposes each neuron's task vector; the engine hands every method its tensors as
(neurons, fan-in ...), so a method never needs to know the layout a checkpoint stores:

- ``nn.Linear`` (out, in), ``nn.Embedding`` (tokens, d), conv (out, in, k...) weights: neuron
  axis 0, the layout PyTorch and the spec assume (each output unit / token / filter a row).
- ``transformers``' ``Conv1D`` (GPT-2, OpenAI GPT, ImageGPT, Decision Transformer, CLVP's MLPs)
  stores (in, out): neuron axis 1. Names alone cannot tell (GPTBigCode's ``c_attn`` is an
  ``nn.Linear``), so this rule applies only where the config names a Conv1D model type.
- A bare parameter with a leading broadcast axis, (1, n, d) (ViT's ``position_embeddings``,
  ``cls_token``): neuron axis 1, each of the n vectors a neuron of size d, as the same table is
  in models that store it as an ``nn.Embedding`` (BERT, CLIP).

``docs/architectures.md`` lists what each tensor of the tested architectures is.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuromerge.errors import ConfigError
from neuromerge.io.reader import CheckpointReader, TensorMeta, read_json_object

#: Model types whose ``transformers`` implementation stores weights in ``Conv1D`` (in, out)
#: (checked against the modules of tiny instances in tests/test_architectures.py).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer",
                                "clvp", "clvp_decoder"})
#: The Conv1D weights of those models: attention in/out projections and the MLP.
_CONV1D = re.compile(r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$")
#: GPT-2's causal-mask buffers that old checkpoints store (``attn.bias`` 4-D, ``masked_bias``
#: 0-D): constants, never merged (a real bias is ``c_attn.bias``, 1-D).
_GPT2_MASK = re.compile(r"(^|\.)(attn|crossattention)\.(bias|masked_bias)$")
#: Names of input embeddings: the copy kept when an output embedding is tied to one.
_INPUT_EMBEDDING = re.compile(r"(^|\.)(wte|word_embeddings|embed_tokens|shared|embed_in)\.")


@dataclass(frozen=True)
class Architecture:
    """What the base's ``config.json`` says about the layout of its tensors."""

    model_types: tuple[str, ...] = ()  # the config's and its sub-configs' (text_config, ...)
    architectures: tuple[str, ...] = ()
    vocab_sizes: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    source: str = ""  # the config file, '' when there is none
    #: The config's layer count (``num_hidden_layers`` / ``n_layer``): the positions t that
    #: per-layer parameter gradients are interpolated at.
    num_layers: int | None = None

    @property
    def conv1d(self) -> bool:
        return any(t in CONV1D_MODEL_TYPES for t in self.model_types)

    def describe(self) -> str:
        if not self.source:
            return "unknown (no config.json)"
        name = "/".join(self.model_types) or "no model_type"
        return f"{name} ({', '.join(self.architectures)})" if self.architectures else name

    def column_neurons(self, name: str, meta: TensorMeta) -> bool:
        return self.conv1d and len(meta.shape) == 2 and bool(_CONV1D.search(name))

    def copy_reason(self, name: str, meta: TensorMeta) -> str:
        """Why a float tensor is a constant to copy from the base, or ''."""
        if self.conv1d and len(meta.shape) != 1 and _GPT2_MASK.search(name):
            return "GPT-2 attention mask buffer"
        return ""

    def record(self) -> dict[str, Any]:
        return {"model_types": list(self.model_types), "architectures": list(self.architectures),
                "tie_word_embeddings": self.tie_word_embeddings, "config": self.source}


UNKNOWN = Architecture()


def _configs(d: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The config and every nested sub-config (text_config, vision_config, decoder, ...)."""
    yield d
    for v in d.values():
        if isinstance(v, Mapping) and ("model_type" in v or "vocab_size" in v):
            yield from _configs(v)


def from_config(config: Mapping[str, Any] | None, source: str = "config") -> Architecture:
    """An :class:`Architecture` from a config dict (``config.json``'s content, or
    ``model.config.to_dict()``)."""
    if not config:
        return UNKNOWN
    subs = list(_configs(config))
    types = tuple(dict.fromkeys(str(c["model_type"]) for c in subs if c.get("model_type")))
    vocab = tuple(dict.fromkeys(int(c["vocab_size"]) for c in subs
                                if isinstance(c.get("vocab_size"), int)))
    # An absent flag means True: transformers 4 wrote only non-default values, and its default
    # was to tie (gpt2's config.json has no tie_word_embeddings and its lm_head is tied).
    tie = any(c.get("tie_word_embeddings", True) is not False for c in subs
              if "vocab_size" in c)
    archs = config.get("architectures") or ()
    layers = next((int(config[k]) for k in ("num_hidden_layers", "n_layer", "num_layers")
                   if isinstance(config.get(k), int)), None)
    return Architecture(types, tuple(str(a) for a in archs), vocab, tie, source, layers)


def read_architecture(path: str | Path) -> Architecture:
    """The architecture of the model folder ``path`` (its ``config.json``); :data:`UNKNOWN` for a
    bare weights file or a folder without a config."""
    cfg = Path(path) / "config.json"
    if not Path(path).is_dir() or not cfg.is_file():
        return UNKNOWN
    return from_config(read_json_object(cfg, "config.json"), str(cfg))


def neuron_axis(name: str, meta: TensorMeta, arch: Architecture,
                overrides: Mapping[str, int]) -> tuple[int, str]:
    """The axis of a neuronal (≥2-D) tensor that indexes its neurons, and why (shown in the
    plan). An override (glob → axis, first match wins) beats the architecture's rules."""
    ndim = len(meta.shape)
    for pattern, axis in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            if not 0 <= axis < ndim:
                raise ConfigError(f"neuron_axis: {pattern!r} gives {name!r} axis {axis}, but it "
                                  f"has shape {list(meta.shape)} (axes 0..{ndim - 1})")
            return axis, f"neuron_axis {pattern!r}"
    if arch.column_neurons(name, meta):
        return 1, f"Conv1D (in, out) of {'/'.join(arch.model_types)}"
    if ndim >= 3 and meta.shape[0] == 1 and not name.endswith(".weight"):
        return 1, "broadcast parameter (1, n, ...): n neurons"
    return 0, ""


def suspicious_without_config(names: Sequence[str]) -> str | None:
    """A tensor that looks like a GPT-2 Conv1D weight, for the warning given when the base has no
    config.json to tell (the neuron would be a column, not a row)."""
    return next((n for n in names if _CONV1D.search(n)), None)


def tied_copies(base: CheckpointReader, experts: Sequence[CheckpointReader],
                arch: Architecture, block_bytes: int = 64 << 20) -> dict[str, str]:
    """{copy: kept} for output embeddings stored beside the input embedding they are tied to.

    ``save_pretrained`` stores a tied pair once; a ``.bin`` (or an older export) holds both.
    Merged separately, a randomised method (DARE: a stream per tensor name) would give the two
    copies different values, and ``from_pretrained`` would then leave them untied. A pair is tied
    when the config ties word embeddings and both tensors are vocabulary-sized and equal in the
    base and in every expert that holds both (an expert holding only the kept one is tied too):
    the kept one is merged once and the copy is left out of the output, as ``save_pretrained``
    does; ``from_pretrained`` ties it back."""
    if not arch.tie_word_embeddings or not arch.vocab_sizes:
        return {}
    groups: dict[tuple[tuple[int, ...], torch.dtype], list[str]] = {}
    for n in base.names():
        m = base.meta(n)
        if m.dtype.is_floating_point and m.shape and m.shape[0] in arch.vocab_sizes:
            groups.setdefault((m.shape, m.dtype), []).append(n)
    ties: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        # kept: an input embedding (shortest name: T5's `shared` over `encoder.embed_tokens`)
        keep = min(names, key=lambda n: (not _INPUT_EMBEDDING.search(n), len(n), n))
        for other in names:
            if other != keep and all(_equal_in(r, keep, other, block_bytes)
                                     for r in (base, *experts)):
                ties[other] = keep
    return ties


def _equal_in(reader: CheckpointReader, a: str, b: str, block_bytes: int) -> bool:
    names = set(reader.names())
    if b not in names:
        return a in names  # only the kept copy: tied as saved by save_pretrained
    if a not in names or reader.meta(a) != reader.meta(b):
        return False
    meta = reader.meta(a)
    step = max(1, block_bytes // max(1, meta.nbytes // meta.shape[0]))
    for i in range(0, meta.shape[0], step):
        j = min(meta.shape[0], i + step)
        if not torch.equal(reader.read_rows(a, i, j), reader.read_rows(b, i, j)):
            return False
    return True
