"""mergekit's slices: layer ranges of the inputs stacked into the output (passthrough
frankenmerges), each slice merged with its own models and parameters; checked against mergekit
0.1.5 itself on tiny 4-layer Llama models, and the config's rules by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from neuromerge.config import config_from_dict
from neuromerge.errors import ConfigError
from neuromerge.param_settings import fallback
from neuromerge.pipeline import merge, plan_merge
from tests.mergekit_ref import (
    assert_same_tensors,
    llama_tensors,
    perf,
    read_folder,
    run_neuromerge,
    write_llama,
)

SIZE = perf.Size("tiny4", hidden=16, intermediate=24, layers=4, heads=2, kv_heads=2, vocab=32)
NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slices")
    return {k: write_llama(root / k, llama_tensors(seed, SIZE), SIZE)
            for k, seed in (("a", 1), ("b", 2), ("c", 3))}


def layer(i: int, rest: str = "mlp.up_proj.weight") -> str:
    return f"model.layers.{i}.{rest}"


def configs(m: dict[str, Path]) -> dict[str, dict[str, Any]]:
    a, b, c = m["a"], m["b"], m["c"]
    scale = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.5},
             {"value": 1.0}]
    return {
        "passthrough": {  # a frankenmerge: a's layers 0-2 then b's 1-3
            "slices": [{"sources": [{"model": a, "layer_range": [0, 3]}]},
                       {"sources": [{"model": b, "layer_range": [1, 4]}]}],
            "merge_method": "passthrough", "dtype": "float32"},
        "passthrough_scale": {  # one model's layers repeated, the copies' outputs scaled
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                       {"sources": [{"model": a, "layer_range": [1, 4],
                                     "parameters": {"scale": scale}}]}],
            "merge_method": "passthrough", "dtype": "float32"},
        "slerp": {  # the most published form: one slice over whole models, filtered gradients
            "slices": [{"sources": [{"model": a, "layer_range": [0, 4]},
                                    {"model": b, "layer_range": [0, 4]}]}],
            "merge_method": "slerp", "base_model": a, "dtype": "float32",
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                 {"value": 0.5}]}},
        "linear_ranges": {  # two sources of different layer ranges, a slice-level gradient
            "merge_method": "linear", "parameters": {"weight": 0.8}, "dtype": "float32",
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2]},
                                    {"model": b, "layer_range": [2, 4]}],
                        "parameters": {"weight": [0.9, 0.1]}}]},
        "ties_two_slices": {  # other models per slice, per-slice filters falling through
            "merge_method": "ties", "base_model": a, "dtype": "float32",
            "parameters": {"density": 0.5, "weight": [0.2, 1.0]},
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 2]},
                             {"model": b, "layer_range": [0, 2]},
                             {"model": c, "layer_range": [0, 2]}]},
                {"sources": [{"model": a, "layer_range": [2, 4]},
                             {"model": b, "layer_range": [2, 4], "parameters": {"weight": 0.3}}],
                 "parameters": {"density": [{"filter": "mlp", "value": 0.25}]}}]},
    }


@pytest.mark.parametrize("case", ["passthrough", "passthrough_scale", "slerp", "linear_ranges",
                                  "ties_two_slices"])
def test_matches_mergekit(case: str, models: dict[str, Path], mergekit, tmp_path: Path) -> None:
    cfg = configs(models)[case]
    assert_same_tensors(run_neuromerge(cfg, tmp_path), mergekit(cfg))


def test_a_frankenmerge_by_hand(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = configs(models)["passthrough"]
    out = run_neuromerge(cfg, tmp_path)
    a = llama_tensors(1, SIZE)
    b = llama_tensors(2, SIZE)
    assert sorted({int(n.split(".")[2]) for n in out if n.startswith("model.layers.")}) == \
        list(range(6))
    for k in range(3):
        assert torch.equal(out[layer(k)], a[layer(k)])          # a's layers 0..2
        assert torch.equal(out[layer(3 + k)], b[layer(1 + k)])  # then b's 1..3
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out[NORM], b[NORM]) and torch.equal(out["lm_head.weight"],
                                                           b["lm_head.weight"])
    written = json.loads((tmp_path / "neuromerge" / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 6


def test_t_restarts_in_each_slice(models: dict[str, Path]) -> None:
    a, b = models["a"], models["b"]
    cfg = {"merge_method": "slerp", "base_model": a, "parameters": {"t": [0.0, 1.0]},
           "slices": [{"sources": [{"model": a, "layer_range": [0, 2]},
                                   {"model": b, "layer_range": [0, 2]}]},
                      {"sources": [{"model": a, "layer_range": [1, 4]},
                                   {"model": b, "layer_range": [1, 4]}]}]}
    plan = plan_merge(cfg)
    t = {p.name: p.params["t"] for _, part in plan.parts for p in part.tensors
         if p.kind != "copy"}
    # slice 0: 2 layers at t = 0, 1; slice 1: 3 layers at 0, 0.5, 1; outside the layers t = 0
    assert [t[layer(i)] for i in range(5)] == [0.0, 1.0, 0.0, 0.5, 1.0]
    assert t["model.embed_tokens.weight"] == 0.0 and t[NORM] == 0.0
    assert len(plan.parts) == 1  # one model pair, one parameter set: one job


def test_one_slice_over_whole_models_is_the_models_merge(models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    a, b, c = models["a"], models["b"], models["c"]
    params = {"density": 0.5, "lambda2": "auto"}  # a global trim and λ2 from σ: one job
    sliced = merge({"merge_method": "neuromerging", "base_model": a, "parameters": params,
                    "slices": [{"sources": [{"model": m, "layer_range": [0, 4]}
                                            for m in (b, c)]}]}, tmp_path / "s", progress=False)
    flat = merge({"merge_method": "neuromerging", "base_model": a, "parameters": params,
                  "models": [{"model": b}, {"model": c}]}, tmp_path / "f", progress=False)
    assert sliced.params["lambda2"] == flat.params["lambda2"] > 1
    ours, theirs = read_folder(tmp_path / "s"), read_folder(tmp_path / "f")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_the_written_config_runs_again_to_the_same_output(models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    cfg = configs(models)["ties_two_slices"]
    merge(cfg, tmp_path / "one", progress=False)
    written = yaml.safe_load((tmp_path / "one" / "neuromerge_config.yaml").read_text())
    assert "slices" in written and "models" not in written
    merge(written, tmp_path / "two", progress=False)
    one, two = read_folder(tmp_path / "one"), read_folder(tmp_path / "two")
    assert all(torch.equal(one[n], two[n]) for n in one)
    record = json.loads((tmp_path / "one" / "neuromerge_result.json").read_text())
    assert [g["writes"] for g in record["groups"]] == [
        "embeddings (from slices[0]), slices[0] (layers 0..1)",
        "slices[1] (layers 2..3), final norm and head (from slices[1])"]
    assert record["groups"][0]["parameters"]["trim_scope"] == "tensor"


def test_a_global_pass_over_different_slices_is_refused(models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    a, b, c = models["a"], models["b"], models["c"]
    cfg = {"merge_method": "ties", "base_model": a,
           "parameters": {"trim_scope": "global", "density": 0.5},
           "slices": [{"sources": [{"model": b, "layer_range": [0, 2]}]},
                      {"sources": [{"model": c, "layer_range": [2, 4]}]}]}
    with pytest.raises(ConfigError, match=r"slices: ties needs a pass over the whole model .* "
                                          r"set trim_scope: tensor"):
        merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("slices", "message"), [
    ([{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
     r"slices\[0\]: every source of a slice takes the same number of layers"),
    ([{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "a", "layer_range": [2, 4]}]}],
     r"slices\[0\]: a model is listed twice"),
    ([{"sources": [{"model": "a", "layer_range": [3, 1]}]}], r"layer_range: .*start < stop"),
    ([{"sources": [{"model": "a", "layer_range": [0, 1], "weight": 1}]}],
     r"unknown key 'slices\[0\].sources.0.weight'"),
    ([], r"slices: a list of"),
])
def test_bad_slices_say_what_is_wrong_in_one_line(slices: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict({"merge_method": "passthrough", "slices": slices}, source="m.yaml")
    assert str(err.value).startswith("m.yaml: ") and "\n" not in str(err.value)


def test_a_range_beyond_the_model_names_it(models: dict[str, Path]) -> None:
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": models["a"], "layer_range": [2, 6]}]}]}
    with pytest.raises(ConfigError, match=r"slices\[0\] \(layers 0\.\.3\): layer_range \[2, 6\) "
                                          r"of .*/a reaches beyond its 4 layers"):
        plan_merge(cfg)


def test_models_and_slices_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="give models or slices, not both"):
        config_from_dict({"merge_method": "linear", "models": ["a"],
                          "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]})


def test_a_slice_setting_falls_through_only_where_its_filters_do_not_match() -> None:
    filters = [{"filter": "mlp", "value": 0.3}]
    assert fallback(filters, 0.5) == [*filters, {"value": 0.5}]
    assert fallback(filters, [0.1, 0.9]) == [*filters, {"value": [0.1, 0.9]}]
    assert fallback(filters, [{"filter": "attn", "value": 1}]) == [
        *filters, {"filter": "attn", "value": 1}]
    assert fallback(0.7, 0.5) == 0.7 and fallback([0.1, 0.2], 0.5) == [0.1, 0.2]
    assert fallback([*filters, {"value": 1}], 0.5) == [*filters, {"value": 1}]
    assert fallback(filters, None) == filters
