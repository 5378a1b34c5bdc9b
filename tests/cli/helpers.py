"""What several CLI test files share: the method lists, the expected output files, and
readers and checks of merged folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

METHODS = ["average", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
           "neuromerging", "dare_neuromerging", "pcb", "breadcrumbs", "consensus_ta",
           "consensus_ties", "tsv_m",
           "iso_c", "iso_cts", "breadcrumbs_ties", "della", "della_linear", "model_stock",
           "sce"]
DATA_METHODS = ["fisher", "regmean"]  # need per-model statistics: tests/test_statistics.py
#: mergekit's spherical and two-model methods: merged through `neuromerge merge` against mergekit
#: itself in their tests (tests/methods/test_<name>.py, tests/mergekit_ref.py)
SPHERICAL_METHODS = ["slerp", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion"]
#: one model at a time (frankenmerges with slices): tests/test_slices.py
SLICE_METHODS = ["passthrough"]
SUPPORT = ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
OUTPUT_FILES = sorted(["README.md", "model.safetensors", "neuromerge_config.yaml",
                       "neuromerge_result.json", *SUPPORT])
TEXTS = ["the merged model runs", "a neuron of the task"]

Family = tuple[Path, list[Path]]


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an output folder, read with safetensors itself; checks the index."""
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert k not in out
                out[k] = sf.get_tensor(k)
                where[k] = f.name
    index = folder / "model.safetensors.index.json"
    if len(files) > 1:
        data = json.loads(index.read_text())
        assert data["weight_map"] == where
        assert data["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                     for t in out.values())
    else:
        assert [f.name for f in files] == ["model.safetensors"]
        assert not index.exists()
    return out


def tree_hashes(*roots: Path) -> dict[str, str]:
    hashes = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                hashes[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert hashes
    return hashes


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".neuromerge-" in p.name)


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def load_and_run(folder: Path) -> tuple[Any, torch.Tensor]:
    """from_pretrained with nothing missing or unexpected, the tokenizer, a forward pass."""
    model, info = AutoModel.from_pretrained(str(folder), dtype="auto", output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert enc["input_ids"].shape[0] == len(TEXTS)
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape[:2] == enc["input_ids"].shape
    assert bool(torch.isfinite(hidden.float()).all())
    return model, hidden
