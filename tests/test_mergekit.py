"""mergekit configs run unchanged: per-model weight / density, global normalize / lambda /
rescale / int8_mask, checked against a numpy transcription of mergekit's formulas
(``generalized_task_arithmetic.py`` and ``linear.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from neuromerge.config import config_from_dict, load_config
from neuromerge.errors import ConfigError
from neuromerge.kernels import derive_seed, uniform_stream
from neuromerge.pipeline import merge

SHAPE = (8, 10)  # 80 entries: densities 0.5 / 0.25 keep exactly 40 / 20 (floor = ceil)
WEIGHTS = (0.7, 0.3)
DENSITIES = (0.5, 0.25)


def mk_gta(base: np.ndarray, models: list[np.ndarray], weights: tuple[float, ...], *,
           sparsify: str | None, consensus: bool, normalize: bool, lam: float = 1.0,
           densities: tuple[float, ...] = (1.0, 1.0), masks: list[np.ndarray] | None = None,
           rescale: bool = True) -> np.ndarray:
    """mergekit's GeneralizedTaskArithmeticMerge for one tensor, in numpy."""
    deltas = []
    for i, m in enumerate(models):
        d = (m - base).astype(np.float64)
        if sparsify == "magnitude" and densities[i] < 1:
            k = int(densities[i] * d.size)
            keep = np.zeros(d.size, bool)
            keep[np.argsort(-np.abs(d).ravel())[:k]] = True
            d = d * keep.reshape(d.shape)
        elif sparsify == "random":
            assert masks is not None
            d = d * masks[i] / (densities[i] if rescale else 1.0)
        deltas.append(d)
    stacked = np.stack(deltas)
    w = np.array(weights, dtype=np.float64).reshape(-1, *([1] * base.ndim))
    wd = stacked * w
    if consensus:
        majority = np.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(wd) == majority
        mixed = (wd * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = wd.sum(0)
        divisor = w.sum(0) + np.zeros_like(mixed)
        divisor[np.abs(divisor) < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def mk_linear(models: list[np.ndarray], weights: tuple[float, ...], normalize: bool = True
              ) -> np.ndarray:
    w = np.array(weights).reshape(-1, 1, 1)
    out = (np.stack(models).astype(np.float64) * w).sum(0)
    return out / w.sum(0) if normalize else out


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, list[Path], dict[str, np.ndarray]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    paths, arrays = [], {"base": base.numpy()}
    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    for i in range(2):
        t = base + torch.randn(SHAPE, generator=g, dtype=torch.float64)
        save_file({"w": t}, str(tmp_path / f"m{i}.safetensors"))
        paths.append(tmp_path / f"m{i}.safetensors")
        arrays[f"m{i}"] = t.numpy()
    return tmp_path / "base.safetensors", paths, arrays


def mergekit_yaml(method: str, base: Path, experts: list[Path], per_model: list[dict[str, Any]],
                  parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"merge_method": method, "base_model": str(base),
                           "models": [{"model": str(e), "parameters": pm}
                                      for e, pm in zip(experts, per_model, strict=True)],
                           "dtype": "float64"}
    if parameters:
        cfg["parameters"] = parameters
    return cfg


def run_yaml(tmp_path: Path, cfg: dict[str, Any], name: str) -> np.ndarray:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    merge(path, tmp_path / name, progress=False)
    return load_file(str(tmp_path / name / "model.safetensors"))["w"].numpy()


def dare_masks(experts: list[Path], densities: tuple[float, ...], seed: int = 0
               ) -> list[np.ndarray]:
    """The keep masks neuromerge draws: model t's stream (seeded by its path) for tensor w."""
    n = SHAPE[0] * SHAPE[1]
    return [(uniform_stream(derive_seed(derive_seed(seed, str(e)), "w"), 0, n) >= 1 - d)
            .reshape(SHAPE).numpy() for e, d in zip(experts, densities, strict=True)]


PER_MODEL = [{"weight": WEIGHTS[i], "density": DENSITIES[i]} for i in range(2)]


def test_ties_matches_mergekit(tmp_path: Path, models: Any) -> None:
    base, experts, a = models
    want = mk_gta(a["base"], [a["m0"], a["m1"]], WEIGHTS, sparsify="magnitude", consensus=True,
                  normalize=True, densities=DENSITIES)
    got = run_yaml(tmp_path, mergekit_yaml("ties", base, experts, PER_MODEL,
                                           {"int8_mask": True}), "ties")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # unweighted, it is not the weighted result: the weights are applied
    plain = run_yaml(tmp_path, mergekit_yaml("ties", base, experts, [
        {"density": d} for d in DENSITIES]), "ties_plain")
    assert np.abs(plain - want).max() > 1e-3
    # normalize: false and lambda
    want = mk_gta(a["base"], [a["m0"], a["m1"]], WEIGHTS, sparsify="magnitude", consensus=True,
                  normalize=False, densities=DENSITIES, lam=0.8)
    got = run_yaml(tmp_path, mergekit_yaml("ties", base, experts, PER_MODEL,
                                           {"normalize": False, "lambda": 0.8}), "ties_sum")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_and_linear_match_mergekit(tmp_path: Path, models: Any) -> None:
    base, experts, a = models
    per = [{"weight": w} for w in WEIGHTS]
    want = mk_gta(a["base"], [a["m0"], a["m1"]], WEIGHTS, sparsify=None, consensus=False,
                  normalize=False)  # mergekit's λ is 1 when weights are given
    got = run_yaml(tmp_path, mergekit_yaml("task_arithmetic", base, experts, per), "ta")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    want = mk_gta(a["base"], [a["m0"], a["m1"]], (0.5, 1.5), sparsify=None, consensus=False,
                  normalize=True, lam=0.5)
    got = run_yaml(tmp_path, mergekit_yaml("task_arithmetic", base, experts,
                                           [{"weight": 0.5}, {"weight": 1.5}],
                                           {"normalize": True, "lambda": 0.5}), "ta_norm")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # linear: no base_model needed; normalized weighted average by default
    cfg = mergekit_yaml("linear", base, experts, per)
    del cfg["base_model"]
    got = run_yaml(tmp_path, cfg, "linear")
    np.testing.assert_allclose(got, mk_linear([a["m0"], a["m1"]], WEIGHTS), rtol=1e-12)
    cfg["parameters"] = {"normalize": False}
    cfg["models"][1]["parameters"] = {"weight": 0.6}
    got = run_yaml(tmp_path, cfg, "linear_sum")
    np.testing.assert_allclose(got, mk_linear([a["m0"], a["m1"]], (0.7, 0.6), False),
                               rtol=1e-12)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_matches_mergekit(tmp_path: Path, models: Any, method: str) -> None:
    base, experts, a = models
    masks = dare_masks(experts, DENSITIES)
    for rescale in (True, False):
        # mergekit's defaults for both DARE methods: normalize false
        want = mk_gta(a["base"], [a["m0"], a["m1"]], WEIGHTS, sparsify="random",
                      consensus=method == "dare_ties", normalize=False, densities=DENSITIES,
                      masks=masks, rescale=rescale)
        got = run_yaml(tmp_path, mergekit_yaml(method, base, experts, PER_MODEL,
                                               {"rescale": rescale, "normalize": False}),
                       f"{method}_{rescale}")
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not all(m.all() for m in masks) and any(m.any() for m in masks)


def test_neuromerging_is_one_edit_away(tmp_path: Path, models: Any) -> None:
    base, experts, a = models
    cfg = mergekit_yaml("ties", base, experts, PER_MODEL,
                        {"lambda": 1.0, "normalize": True, "int8_mask": True})
    cfg["merge_method"] = "neuromerging"
    got = run_yaml(tmp_path, cfg, "nm")
    assert got.shape == SHAPE and np.isfinite(got).all() and np.abs(got - a["base"]).max() > 0
    cfg["models"] = [{"model": str(e), "parameters": {"density": d}}
                     for e, d in zip(experts, DENSITIES, strict=True)]
    unweighted = run_yaml(tmp_path, cfg, "nm_plain")
    assert np.abs(unweighted - got).max() > 1e-6  # the weights take part
    cfg["parameters"] = {"lambda": 0.5}
    with pytest.raises(ConfigError, match=r"parameters\.lambda: .* use lambda1 .* lambda2"):
        run_yaml(tmp_path, cfg, "nm_lambda")


def test_global_trim_differs_and_a_yaml_without_scope_is_mergekits(tmp_path: Path,
                                                                     models: Any) -> None:
    """With more than one tensor the paper's trim_scope: global differs from mergekit's
    per-tensor trim; a YAML that leaves trim_scope unset gives mergekit's result."""
    base, experts, a = models
    g = torch.Generator().manual_seed(1)
    extra = {n: torch.randn(4, 10, generator=g, dtype=torch.float64) * (3.0 if n != "base"
                                                                         else 1.0)
             for n in ("base", "m0", "m1")}
    for name, p in zip(("base", "m0", "m1"), (base, *experts), strict=True):
        save_file({"w": torch.from_numpy(a[name]), "v": extra[name]}, str(p))
    want = mk_gta(a["base"], [a["m0"], a["m1"]], WEIGHTS, sparsify="magnitude", consensus=True,
                  normalize=True, densities=DENSITIES)
    cfg = mergekit_yaml("ties", base, experts, PER_MODEL)
    np.testing.assert_allclose(run_yaml(tmp_path, cfg, "unset"), want, rtol=1e-12, atol=1e-12)
    cfg["parameters"] = {"trim_scope": "global", "trim_count": "floor"}
    assert np.abs(run_yaml(tmp_path, cfg, "global") - want).max() > 1e-3


def test_translation_and_refusals() -> None:
    raw = {"merge_method": "dare_ties", "base_model": "b",
           "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.7}}],
           "parameters": {"density": 0.4, "lambda": 0.9, "int8_mask": True}}
    cfg = config_from_dict(raw)
    # normalize: mergekit's dare_ties default (false), filled as the YAML leaves it unset
    assert cfg.parameters == {"drop_rate": pytest.approx(0.6), "scale": 0.9, "normalize": False}
    assert cfg.models[0].parameters == {"weight": 0.5, "drop_rate": pytest.approx(0.3)}
    assert raw["parameters"]["density"] == 0.4 and "lambda" in raw["parameters"]  # untouched
    # gradients and filters are kept (resolved per tensor), DARE's keep rate mapped pointwise
    grad = config_from_dict({**raw, "models": [
        {"model": "a", "parameters": {"weight": [0, 1], "density": [1, 0.5]}}]})
    assert grad.models[0].parameters == {"weight": [0, 1], "drop_rate": [0.0, 0.5]}
    filt = config_from_dict({**raw, "parameters": {"density": {"filter": "mlp", "value": 0.5}}})
    assert filt.parameters == {"drop_rate": {"filter": "mlp", "value": 0.5}, "normalize": False}
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight\[0\]: a list is "
                                          r"either a gradient"):
        config_from_dict({**raw, "models": [{"model": "a", "parameters": {
            "weight": [0, {"filter": "mlp", "value": 1}]}}]})
    with pytest.raises(ConfigError, match=r"parameters\.density: DARE's keep probability"):
        config_from_dict({**raw, "parameters": {"density": [0.5, 1.5]}})
    with pytest.raises(ConfigError, match=r"lambda or scale, not both"):
        config_from_dict({**raw, "parameters": {"lambda": 1, "scale": 1}})
    with pytest.raises(ConfigError, match=r"tokenizer_source: .*must be base, union or "
                                          r"model:PATH"):
        config_from_dict({**raw, "tokenizer_source": ""})


def test_per_model_value_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("merge_method: ties\nbase_model: b\nmodels:\n"
                    "  - {model: a, parameters: {density: 1.5}}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: models\[0\]\.parameters\.density"):
        load_config(path).validated_parameters()


@pytest.mark.parametrize(("extra", "message"), [
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
     r"give models or slices, not both"),
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "a"}}}},
     r"tokenizer.tokens: per-token embedding sources are not supported yet"),
    ({"tokenizer": {"source": "union"}, "tokenizer_source": "base"},
     r"give tokenizer_source or tokenizer, not both"),
    ({"chat_template": "nonsense"}, r"chat_template: .*'nonsense' is neither a template name"),
])
def test_what_is_not_supported_or_wrong_says_so_in_one_line(extra: dict, message: str) -> None:
    raw = {"merge_method": "ties", "base_model": "b", "models": ["a"], **extra}
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict(raw, source="m.yaml")
    assert str(err.value).startswith("m.yaml: ") and "\n" not in str(err.value)


def test_the_tokenizer_block_and_a_plain_tokenizer_source_are_mergekits_forms() -> None:
    raw = {"merge_method": "linear", "base_model": "b", "models": ["a"]}
    assert config_from_dict({**raw, "tokenizer": {"source": "base"}}).vocab_mode == "base"
    union = config_from_dict({**raw, "tokenizer": {}})  # mergekit's default source: union
    assert union.tokenizer_source == "union" and union.vocab_mode == "union"
    plain = config_from_dict({**raw, "tokenizer_source": "org/tok"})  # mergekit writes the id
    assert plain.tokenizer_source == "model:org/tok" and plain.vocab_mode == "model"
    assert config_from_dict({**raw, "tokenizer": {"source": "a"}}).tokenizer_source == "model:a"
