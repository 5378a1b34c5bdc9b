"""model_stock, sce, breadcrumbs, breadcrumbs_ties and della / della_linear against the real
mergekit 0.1.5 (tests/mergekit_ref.py): the same YAML run by both on tiny Llama models.

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
