"""Tiny Llama families for the parity tests of the spherical methods against mergekit: random
tensors plus edge cases, one per tensor, so one mergekit run checks them all (layer 0: q_proj
colinear with the base, k_proj antipodal, v_proj a 1e-5 perturbation of the base, a zero
input_layernorm in the base; layer 1: o_proj equal in every model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.mergekit_ref import assert_same_tensors, llama_tensors, run_neuromerge, write_llama

L0, L1 = "model.layers.0.", "model.layers.1."


def family(tmp_path: Path, n_models: int = 2, *, equal: bool = True) -> tuple[Path, list[Path]]:
    """The base and ``n_models`` models, written under tmp_path/family (``equal=False``: no
    tensor equal in every model; multislerp refuses more than two zero task vectors)."""
    base = llama_tensors(0)
    models = [llama_tensors(i + 1) for i in range(n_models)]
    g = torch.Generator().manual_seed(99)
    m = models[0]
    m[L0 + "self_attn.q_proj.weight"] = 2 * base[L0 + "self_attn.q_proj.weight"]
    m[L0 + "self_attn.k_proj.weight"] = -base[L0 + "self_attn.k_proj.weight"]
    m[L0 + "self_attn.v_proj.weight"] = base[L0 + "self_attn.v_proj.weight"] + 1e-5 * torch.randn(
        base[L0 + "self_attn.v_proj.weight"].shape, generator=g)
    base[L0 + "input_layernorm.weight"] = torch.zeros_like(base[L0 + "input_layernorm.weight"])
    for other in models if equal else []:
        other[L1 + "self_attn.o_proj.weight"] = base[L1 + "self_attn.o_proj.weight"].clone()
    root = tmp_path / "family"
    return (write_llama(root / "base", base),
            [write_llama(root / f"model{i}", t) for i, t in enumerate(models)])


def check_parity(mergekit: Any, tmp_path: Path, config: dict[str, Any], *,
                 rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``config`` (float32 compute and output added) run by mergekit and by neuromerge: every
    output tensor the same within the tolerance."""
    config = {**config, "dtype": "float32", "out_dtype": "float32"}
    assert_same_tensors(run_neuromerge(config, tmp_path), mergekit(config), rtol=rtol, atol=atol)
