"""model_stock, sce, breadcrumbs, breadcrumbs_ties, della / della_linear and ties (with the YAML
defaults: mergekit's) against the real mergekit 0.1.5 (tests/mergekit_ref.py): the same YAML
run by both on tiny Llama models.

Where a method is random (della), its deterministic part is checked: density 1 (no drop), so the
weights, the sign consensus, normalize and λ are mergekit's. Breadcrumbs use densities and gammas
whose counts are integers for every tensor size of the tiny model (256, 384, 512 and 16
entries), where k = ⌈density·N⌉ and mergekit's ⌊density·N⌋ agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.mergekit_ref import assert_same_tensors, llama_tensors, run_neuromerge, write_llama


def _family(tmp_path: Path, n: int) -> tuple[Path, list[Path]]:
    base = write_llama(tmp_path / "base", llama_tensors(0))
    return base, [write_llama(tmp_path / f"m{i}", llama_tensors(i + 1)) for i in range(n)]


def _config(method: str, base: Path, models: list[Path], params: dict[str, Any],
            per_model: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"merge_method": method, "base_model": base,
            "models": [{"model": m, **({"parameters": p} if p else {})}
                       for m, p in zip(models, per_model or [{}] * len(models), strict=True)],
            **({"parameters": params} if params else {}),
            "dtype": "float32", "out_dtype": "float32"}


def _check(mergekit, tmp_path: Path, config: dict[str, Any], name: str) -> None:
    assert_same_tensors(run_neuromerge(config, tmp_path, name=f"nm-{name}"),
                        mergekit(config, name=f"mk-{name}"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(mergekit, tmp_path: Path, filter_wise: bool) -> None:
    base, models = _family(tmp_path, 3)
    _check(mergekit, tmp_path, _config("model_stock", base, models,
                                       {"filter_wise": filter_wise}), "ms")


@pytest.mark.parametrize("select_topk", [1.0, 0.5])
def test_sce_matches_mergekit(mergekit, tmp_path: Path, select_topk: float) -> None:
    base, models = _family(tmp_path, 3)
    _check(mergekit, tmp_path, _config("sce", base, models, {"select_topk": select_topk}),
           "sce")


WEIGHTED = [{"weight": 0.4, "density": 0.5, "gamma": 0.0625},
            {"weight": 0.9, "density": 0.75},
            {"weight": 0.6, "density": 0.25, "gamma": 0.125}]


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("extra", [{}, {"normalize": True, "rescale": True, "lambda": 0.8}])
def test_breadcrumbs_match_mergekit(mergekit, tmp_path: Path, method: str,
                                    extra: dict[str, Any]) -> None:
    base, models = _family(tmp_path, 3)
    _check(mergekit, tmp_path, _config(method, base, models, {"gamma": 0.0625, **extra},
                                       WEIGHTED), method)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("normalize", [True, False])
def test_della_without_the_drop_matches_mergekit(mergekit, tmp_path: Path, method: str,
                                                 normalize: bool) -> None:
    base, models = _family(tmp_path, 3)
    per_model = [{"weight": w} for w in (0.4, 0.9, 0.6)]
    _check(mergekit, tmp_path, _config(method, base, models,
                                       {"normalize": normalize, "lambda": 0.7,
                                        "epsilon": 0.1}, per_model), method)


@pytest.mark.parametrize(("method", "params", "per_model"), [
    # no trim_scope, no trim_count: mergekit's per-tensor trim and its k = max(1, int(d·n)),
    # at densities whose d·n is not an integer for any tensor of the tiny model
    ("ties", {"density": 0.33, "weight": 1}, None),
    ("ties", {"weight": 1}, [{"density": 0.37, "weight": 0.7}, {"density": 0.61},
                             {"weight": 1.3}]),
    ("ties", {"density": [0.2, 0.45], "weight": 0.8}, None),  # a density gradient
    ("breadcrumbs_ties", {"density": 0.43, "gamma": 0.07, "weight": 1}, None),
    ("breadcrumbs", {"density": 0.57, "gamma": 0.03, "weight": 0.5}, None),
])
def test_a_yaml_without_trim_settings_means_mergekits_trim(
        mergekit, tmp_path: Path, method: str, params: dict[str, Any],
        per_model: list[dict[str, Any]] | None) -> None:
    base, models = _family(tmp_path, 3)
    _check(mergekit, tmp_path, _config(method, base, models, params, per_model), method)


def test_the_paper_trim_is_one_setting_away(tmp_path: Path) -> None:
    """trim_scope: global and trim_count: ceil give neuromerge's TIES paper trim: a different
    merge (the guard that the defaults above are what decides)."""
    base, models = _family(tmp_path, 3)
    cfg = _config("ties", base, models, {"density": 0.33, "weight": 1})
    default = run_neuromerge(cfg, tmp_path, name="default")
    paper = run_neuromerge({**cfg, "parameters": {"density": 0.33, "weight": 1,
                                                  "trim_scope": "global",
                                                  "trim_count": "ceil"}}, tmp_path, name="paper")
    assert any(not bool((default[n] == paper[n]).all()) for n in default)
