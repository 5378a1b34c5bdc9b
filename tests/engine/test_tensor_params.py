"""Parameters that vary per tensor (mergekit's gradients and filters): each tensor is merged
with its own resolved values, exactly as a merge with those values as plain numbers; the
plan, the record and the errors say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from neuromerge import merge, merge_state_dicts
from neuromerge.errors import ConfigError
from neuromerge.pipeline import plan_merge

N_LAYERS = 5


def models() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(11)
    base = {"model.embed_tokens.weight": torch.randn(12, 6, generator=gen)}
    for i in range(N_LAYERS):
        base[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(6, 6, generator=gen)
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(8, 6, generator=gen)
    base["model.norm.weight"] = torch.ones(6)
    experts = {k: {n: v + 0.1 * torch.randn(v.shape, generator=gen) for n, v in base.items()}
               for k in ("a", "b")}
    return base, experts


def test_a_gradient_gives_each_layer_its_interpolated_value() -> None:
    base, experts = models()
    out = merge_state_dicts(base, experts, "task_arithmetic",
                            {"scale": [0.0, 1.0]}).state_dict  # t = i / 4 → scale i / 4
    for i in range(N_LAYERS):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        want = merge_state_dicts({name: base[name]}, {k: {name: e[name]} for k, e in
                                                      experts.items()},
                                 "task_arithmetic", {"scale": i / 4}).state_dict[name]
        assert torch.equal(out[name], want), i
    # outside the layers t = 0: the embeddings and the final norm get the first point
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"])


def test_filters_and_per_model_settings_follow_mergekit_precedence() -> None:
    base, experts = models()
    params = {"weight": 1.0, "scale": [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]}
    per_model = [{"weight": [{"filter": "mlp", "value": 0.0}]}, {}]  # a: no mlp update
    res = merge_state_dicts(base, experts, "task_arithmetic", params, per_model=per_model)
    attn, mlp = "model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"
    tau = {k: {n: e[n] - base[n] for n in (attn, mlp)} for k, e in experts.items()}
    torch.testing.assert_close(res.state_dict[attn],
                               base[attn] + 0.5 * (tau["a"][attn] + tau["b"][attn]))
    torch.testing.assert_close(res.state_dict[mlp], base[mlp] + 1.0 * tau["b"][mlp])
    assert res.extra["tensor_params"][attn] == {"scale": 0.5, "weight": 1.0}  # no model sets one
    assert res.extra["tensor_params"][mlp] == {"scale": 1.0, "weight": [0.0, 1.0]}


def test_a_density_gradient_trims_each_tensor_on_its_own() -> None:
    base, experts = models()
    with pytest.raises(ConfigError, match="set trim_scope: tensor"):
        merge_state_dicts(base, experts, "ties", {"density": [0.2, 1.0]})
    res = merge_state_dicts(base, experts, "ties", {"density": [0.2, 1.0],
                                                    "trim_scope": "tensor"})
    name = "model.layers.4.mlp.up_proj.weight"  # t = 1: density 1
    want = merge_state_dicts({name: base[name]}, {k: {name: e[name]} for k, e in
                                                  experts.items()},
                             "ties", {"density": 1.0, "trim_scope": "tensor"})
    assert torch.equal(res.state_dict[name], want.state_dict[name])
    # NeuroMerging's λ2 = auto over per-tensor densities: σ measured with each tensor's own
    nm = merge_state_dicts(base, experts, "neuromerging",
                           {"density": [0.2, 1.0], "trim_scope": "tensor"})
    assert nm.trim is not None and 0 < max(nm.trim.sigma) < 1
    assert nm.params["lambda2"] == pytest.approx(1 / (1 - max(nm.trim.sigma)))


@pytest.mark.parametrize(("params", "message"), [
    ({"trim_scope": ["global", "tensor"]}, "one value for the whole model"),
    ({"lambda2": ["auto", 1.0]}, "cannot vary per tensor"),
    ({"density": [0.2, 2.0]}, "density"),
])
def test_settings_that_cannot_vary_are_refused(params: dict, message: str) -> None:
    base, experts = models()
    with pytest.raises(ConfigError, match=message):
        merge_state_dicts(base, experts, "neuromerging", params)


def folder(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                  "num_hidden_layers": N_LAYERS}))
    return path


def test_a_mergekit_gradient_config_runs_and_records_each_tensors_value(tmp_path: Path) -> None:
    base, experts = models()
    paths = {k: folder(tmp_path / k, sd) for k, sd in {"base": base, **experts}.items()}
    cfg = {"merge_method": "ties", "base_model": str(paths["base"]),
           "models": [{"model": str(paths["a"]), "parameters": {"weight": 1.0,
                                                                  "density": [1.0, 0.5]}},
                      {"model": str(paths["b"]), "parameters": {"weight": 1.0,
                                                                  "density": 0.5}}],
           "parameters": {"normalize": True, "int8_mask": True}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    plan = plan_merge(tmp_path / "m.yaml")
    assert plan.params["trim_scope"] == "tensor"  # switched: the density varies per tensor
    assert "density=[1, 0.5]" in plan.table()  # layer 0: model a keeps all, b half
    merge(tmp_path / "m.yaml", tmp_path / "out", progress=False)
    record = json.loads((tmp_path / "out" / "neuromerge_result.json").read_text())
    assert record["tensor_params"]["model.layers.2.mlp.up_proj.weight"] == {
        "density": [0.75, 0.5]}
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(base)
