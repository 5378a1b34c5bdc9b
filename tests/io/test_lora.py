"""LoRA adapters as experts (checked against PEFT's own merge_and_unload) and merged models
written back as LoRA adapters (loaded with PEFT)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from neuromerge.errors import ConfigError, InputError
from neuromerge.io.lora import LoraExpertReader, is_adapter_folder
from neuromerge.io.reader import open_checkpoint
from neuromerge.pipeline import merge
from tests.helpers import lora_adapter, tiny_causal_lm

pytest.importorskip("peft")

LLAMA_LORA: dict[str, Any] = dict(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    modules_to_save=["lm_head"])


def _reference_sd(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_reader(reader: LoraExpertReader, ref: dict[str, torch.Tensor], axis_of: Any,
                  **tol: float) -> None:
    for name in reader.names():
        got = reader.read(name)
        assert got.dtype == reader.meta(name).dtype
        torch.testing.assert_close(got, ref[name], msg=name, **tol)
        if got.dim() == 2:  # row blocks along the neuron axis are slices of the whole
            axis = axis_of(name)
            n = got.shape[axis]
            block = reader.read_rows(name, 1, n - 2, axis=axis)
            assert torch.equal(block, got.narrow(axis, 1, n - 3)), name


@pytest.mark.parametrize("case", ["llama-fp32", "llama-bf16-rslora", "gpt2-fan-in-fan-out"])
def test_reader_matches_peft_merge_and_unload(tmp_path: Path, case: str) -> None:
    kind = case.split("-")[0]
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    base = tiny_causal_lm(tmp_path / "base", kind, dtype)
    if kind == "llama":
        cfg = dict(LLAMA_LORA)
        if "rslora" in case:  # scaling α/√r, and a per-module α and rank
            cfg.update(use_rslora=True, alpha_pattern={"v_proj": 3},
                       rank_pattern={"down_proj": 2})
    else:
        cfg = dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc", "wte"],
                   fan_in_fan_out=True)
    ref = _reference_sd(lora_adapter(base, tmp_path / "adapter", seed=1, **cfg))
    reader = LoraExpertReader(open_checkpoint(base), tmp_path / "adapter")
    try:
        assert len(reader.adapted()) == (7 if kind == "llama" else 5)
        base_reader = open_checkpoint(base)
        changed = [n for n in reader.names()
                   if not torch.equal(reader.read(n), base_reader.read(n))]
        assert len(changed) == len(reader.adapted()) + (kind == "llama")  # + lm_head (saved)
        # bf16: we round base + delta once, PEFT rounds the delta first (one ulp apart at most)
        tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(
            rtol=1e-5, atol=1e-6)
        _check_reader(reader, ref, lambda n: 1 if kind == "gpt2" and ".h." in n and
                      n.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")) else 0,
                      **tol)
    finally:
        reader.close()


def _two_llama_experts(tmp_path: Path, dtype: torch.dtype = torch.float32
                       ) -> tuple[Path, list[Path], list[Path]]:
    """A tiny Llama, two LoRA adapters over it, and their merge_and_unload'ed full folders."""
    base = tiny_causal_lm(tmp_path / "base", "llama", dtype)
    adapters, fulls = [], []
    for i, targets in enumerate((["q_proj", "v_proj", "embed_tokens"],
                                 ["q_proj", "o_proj", "up_proj"])):
        cfg = dict(r=2 + i, lora_alpha=4, target_modules=targets)
        model = lora_adapter(base, tmp_path / f"adapter{i}", seed=10 + i, **cfg)
        model.save_pretrained(tmp_path / f"full{i}")
        adapters.append(tmp_path / f"adapter{i}")
        fulls.append(tmp_path / f"full{i}")
    return base, adapters, fulls


@pytest.mark.parametrize("method", ["task_arithmetic", "neuromerging"])
def test_merge_of_lora_experts_equals_merge_of_merged_experts(tmp_path: Path,
                                                              method: str) -> None:
    base, adapters, fulls = _two_llama_experts(tmp_path)
    results = {}
    for label, experts in (("lora", adapters), ("full", fulls)):
        cfg = {"merge_method": method, "base_model": str(base),
               "models": [str(e) for e in experts], "parameters": {"density": 0.5}
               if method == "neuromerging" else {"scale": 0.7}}
        merge(cfg, tmp_path / f"out-{label}", progress=False)
        results[label] = open_checkpoint(tmp_path / f"out-{label}")
    assert results["lora"].names() == results["full"].names()
    moved = 0
    for name in results["lora"].names():
        a, b = results["lora"].read(name), results["full"].read(name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(a, open_checkpoint(base).read(name))
    assert moved >= 5  # the adapters' targets changed
    record = json.loads((tmp_path / "out-lora" / "neuromerge_result.json").read_text())
    assert record["lora"] is None


def test_saved_lora_loads_with_peft_within_reported_error(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapters, _ = _two_llama_experts(tmp_path)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [str(e) for e in adapters], "save_lora": 2}
    result = merge(cfg, tmp_path / "out", progress=False)
    rec = json.loads((tmp_path / "out" / "neuromerge_result.json").read_text())["lora"]
    assert rec == json.loads(json.dumps(result.extra["lora"]))
    assert rec["rank"] == 2 and rec["path"] == "lora"  # relative to the folder
    errors = rec["relative_errors"]
    # q_proj carries both adapters' updates (rank 2 + 3): rank 2 cannot hold it
    assert 0.01 < errors["model.layers.0.self_attn.q_proj.weight"] < 1
    assert set(errors) == {n for a in adapters for n in
                           LoraExpertReader(open_checkpoint(base), a).adapted()}
    assert rec["not_encoded"] == {}
    assert is_adapter_folder(tmp_path / "out" / "lora")

    merged = open_checkpoint(tmp_path / "out")
    theta0 = open_checkpoint(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    applied = PeftModel.from_pretrained(model, tmp_path / "out" / "lora").merge_and_unload()
    sd = applied.state_dict()
    for name in merged.names():
        delta = merged.read(name) - theta0.read(name)
        err = torch.linalg.vector_norm(sd[name] - merged.read(name))
        bound = errors.get(name, 0.0) * torch.linalg.vector_norm(delta)
        assert err <= bound * (1 + 1e-4) + 1e-5, name  # Eckart–Young: what was reported


def test_saved_lora_of_full_rank_is_exact_for_gpt2(tmp_path: Path, run_cli: Any) -> None:
    """Conv1D weights (fan_in_fan_out) and the token embedding, through the CLI."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_causal_lm(tmp_path / "base", "gpt2")
    for i in range(2):
        lora_adapter(base, tmp_path / f"a{i}", seed=i, r=2, lora_alpha=2,
                     target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic",
                                   "base_model": str(base),
                                   "models": [str(tmp_path / "a0"), str(tmp_path / "a1")]}))
    code, out, err = run_cli("merge", cfg, tmp_path / "out", "--save-lora", "4", "--quiet")
    assert code == 0, err
    code, out, err = run_cli("merge", cfg, tmp_path / "out", "--save-lora", "4", "--force")
    assert code == 0, err
    assert "LoRA adapter of rank 4" in out and "relative error of the merged delta max" in out
    rec = json.loads((tmp_path / "out" / "neuromerge_result.json").read_text())["lora"]
    assert rec["max_relative_error"] < 1e-5  # rank 4 holds the sum of two rank-2 updates
    assert json.loads((tmp_path / "out" / "lora" / "adapter_config.json").read_text())[
        "fan_in_fan_out"] is True
    model = AutoModelForCausalLM.from_pretrained(base)
    sd = PeftModel.from_pretrained(model, tmp_path / "out" / "lora").merge_and_unload(
        ).state_dict()
    merged = open_checkpoint(tmp_path / "out")
    for name in merged.names():
        torch.testing.assert_close(sd[name], merged.read(name), rtol=1e-4, atol=1e-5, msg=name)


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_refusals_name_the_problem(tmp_path: Path, write_config: Any) -> None:
    base = tiny_causal_lm(tmp_path / "base", "llama")
    other = tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    lora_adapter(base, tmp_path / "ad", seed=0, r=2, target_modules=["q_proj"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}

    with pytest.raises(InputError, match=r"DoRA .* not supported \(use_dora: True\)"):
        _edit_config(tmp_path / "ad", use_dora=True)
        LoraExpertReader(open_checkpoint(base), tmp_path / "ad")
    _edit_config(tmp_path / "ad", use_dora=False, peft_type="IA3")
    with pytest.raises(InputError, match="peft_type IA3 is not supported"):
        LoraExpertReader(open_checkpoint(base), tmp_path / "ad")
    _edit_config(tmp_path / "ad", peft_type="LORA")
    with pytest.raises(InputError, match=r"targets 'model.layers.0.self_attn.q_proj.weight', "
                                         r"which the base does not hold"):
        LoraExpertReader(open_checkpoint(other), tmp_path / "ad")
    with pytest.raises(InputError, match="base_model is a LoRA adapter folder"):
        merge(write_config("task_arithmetic", tmp_path / "ad", [base]), tmp_path / "o",
              progress=False)
    with pytest.raises(ConfigError, match="LoRA rank must be at least 1"):
        merge(write_config("task_arithmetic", base, [tmp_path / "ad"]), tmp_path / "o",
              progress=False, lora_rank=0)
    assert not (tmp_path / "o").exists()
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before[
        "adapter_model.safetensors"]


def test_missing_factor_and_shape_mismatch(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base = tiny_causal_lm(tmp_path / "base", "llama")
    lora_adapter(base, tmp_path / "ad", seed=0, r=2, target_modules=["q_proj"])
    path = tmp_path / "ad" / "adapter_model.safetensors"
    sd = load_file(path)
    key_b = next(k for k in sd if k.endswith("lora_B.weight"))
    save_file({k: v for k, v in sd.items() if k != key_b}, path)
    with pytest.raises(InputError, match="has no lora_B factor"):
        LoraExpertReader(open_checkpoint(base), tmp_path / "ad")
    sd[key_b] = torch.zeros(3, 2)
    save_file(sd, path)
    with pytest.raises(InputError, match=r"LoRA factors of .* do not fit the base's"):
        LoraExpertReader(open_checkpoint(base), tmp_path / "ad")


def test_analyze_reads_lora_experts_as_their_merged_weights(tmp_path: Path) -> None:
    from neuromerge.analysis import analyze

    base, adapters, fulls = _two_llama_experts(tmp_path)
    lora = analyze(base, adapters, names=["a", "b"], progress=False).summary["overall"]
    full = analyze(base, fulls, names=["a", "b"], progress=False).summary["overall"]
    assert lora["energy"]["parallel_share"] == pytest.approx(full["energy"]["parallel_share"],
                                                             rel=1e-4)
    assert lora["energy"]["orthogonal_share"][0] > 0
