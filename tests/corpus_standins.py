"""Tiny stand-ins for the models the mergekit corpus configs name (tests/mergekit_corpus/), so
each config runs unchanged: hub ids served by the local FakeHub (tests/hub_server.py), local
paths created at the same relative path under one working folder.

- Llama-shaped (hidden 8, 81 layers: the longest layer_range in the corpus is [0, 81]) for
  every config, whatever its models' real architecture (Mistral, Qwen2, Yi, Zamba2, Florence-2,
  Qwen2-VL: mergekit reads the architecture from each stand-in's config.json, so the configs'
  parameters, filters and slices are exercised on Llama tensor names); GPT-2-shaped (12
  layers, Conv1D weights, tied head) where the config names GPT-2 models.
- Values: one shared random base per architecture, each model that base plus its own noise
  (seeded by its name), stored in bfloat16 as published models are.
- Every stand-in has the same tiny WordLevel tokenizer (32 tokens), so tokenizer_source and
  chat_template configs have tokenizers to read.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from tests.mergekit_ref import perf

CORPUS = Path(__file__).parent / "mergekit_corpus"
LLAMA = perf.Size("corpus", hidden=8, intermediate=12, layers=81, heads=2, kv_heads=2, vocab=32)
GPT2_LAYERS = 12
TOKENS = ["<unk>", "<s>", "</s>", "<pad>", *[chr(c) for c in range(ord("a"), ord("z") + 1)],
          "<|eot_id|>", "<|start_header_id|>"]


def corpus() -> list[tuple[str, dict[str, Any]]]:
    """(file stem, parsed YAML) of every corpus config, in file order."""
    return [(p.stem, yaml.safe_load(p.read_text())) for p in sorted(CORPUS.glob("*.yaml"))]


def refs(data: dict[str, Any]) -> list[str]:
    """Every model a config names (base, models, slices' sources and bases, tokenizer)."""
    out = [data.get("base_model")]
    out += [m["model"] if isinstance(m, dict) else m for m in data.get("models") or []]
    for s in data.get("slices") or []:
        out += [s.get("base_model"), *(src["model"] for src in s["sources"])]
    tok = data.get("tokenizer_source")
    if isinstance(tok, str) and tok not in ("base", "union"):
        out.append(tok.removeprefix("model:"))
    return [r.strip() for r in dict.fromkeys(out) if r]


def is_local(ref: str) -> bool:
    """Local paths in the corpus: relative (``./x``), Windows-style (``D:/...``: a relative
    folder ``D:`` here) or bare names other than the hub's ``gpt2``."""
    return ref.startswith(".") or bool(re.match(r"^[A-Za-z]:/", ref)) or (
        "/" not in ref and ref != "gpt2")


def architecture(data: dict[str, Any]) -> str:
    return "gpt2" if any("gpt2" in r.lower() for r in refs(data)) else "llama"


def write_standin(folder: Path, ref: str, arch: str) -> Path:
    """The stand-in for ``ref`` at ``folder`` (weights, config.json, tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    config, shapes = _shapes(arch)
    base = _base(arch)
    g = torch.Generator().manual_seed(zlib.crc32(ref.encode()))
    tensors = {n: (base[n] + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
                   ).to(torch.bfloat16) for n, shape in shapes}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in _tokenizer().iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@cache
def _shapes(arch: str) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...]]]]:
    if arch == "llama":
        return LLAMA.hf_config(), LLAMA.tensors()
    import transformers

    cfg = transformers.GPT2Config(vocab_size=len(TOKENS), n_positions=16, n_embd=8,
                                  n_layer=GPT2_LAYERS, n_head=2, bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(cfg)
    shapes = [(n, tuple(t.shape)) for n, t in model.state_dict().items()
              if n != "lm_head.weight" and t.is_floating_point()]
    config = {**cfg.to_dict(), "architectures": ["GPT2LMHeadModel"], "torch_dtype": "bfloat16"}
    return config, shapes


@cache
def _base(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(shape, generator=g, dtype=torch.float64)
            for n, shape in _shapes(arch)[1]}


@cache
def _tokenizer() -> Path:
    """A tiny fast tokenizer's files (one folder, copied into every stand-in)."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    folder = Path(tempfile.mkdtemp(prefix="corpus-tokenizer-"))
    fast.save_pretrained(folder)
    return folder
