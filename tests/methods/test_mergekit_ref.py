"""The mergekit harness itself (tests/mergekit_ref.py), on a method both tools have: the same
YAML, run by mergekit 0.1.5 and by ``neuromerge merge``, gives the same tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.mergekit_ref import (
    TINY,
    assert_same_tensors,
    llama_names,
    llama_tensors,
    read_folder,
    run_neuromerge,
    write_llama,
)


def test_write_llama_round_trip(tmp_path: Path) -> None:
    tensors = llama_tensors(3)
    folder = write_llama(tmp_path / "m", tensors)
    back = read_folder(folder)
    assert sorted(back) == sorted(n for n, _ in llama_names(TINY))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert (folder / "config.json").read_text().count("LlamaForCausalLM") == 1


def test_task_arithmetic_matches_mergekit(mergekit, tmp_path: Path) -> None:
    base = write_llama(tmp_path / "base", llama_tensors(0))
    experts = [write_llama(tmp_path / f"e{i}", llama_tensors(i + 1)) for i in range(2)]
    config = {"merge_method": "task_arithmetic", "base_model": base,
              "models": [{"model": e, "parameters": {"weight": w}}
                         for e, w in zip(experts, (0.3, 0.6), strict=True)],
              "parameters": {"lambda": 0.8}, "dtype": "float32", "out_dtype": "float32"}
    assert_same_tensors(run_neuromerge(config, tmp_path), mergekit(config))
