"""``neuromerge methods``: the registered methods as JSON, text and Markdown."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from tests.cli.helpers import DATA_METHODS, METHODS, SLICE_METHODS, SPHERICAL_METHODS


def test_methods_json(run_cli: Callable[..., tuple[int, str, str]]) -> None:
    code, stdout, _ = run_cli("methods", "--format", "json")
    assert code == 0
    data = {m["name"]: m for m in json.loads(stdout)}
    assert sorted(data) == sorted(METHODS + DATA_METHODS + SPHERICAL_METHODS +
                                 SLICE_METHODS)
    assert data["fisher"]["needs_statistics"] == "fisher"
    assert data["regmean"]["needs_statistics"] == "regmean"
    assert data["ties"]["needs_statistics"] is None
    params = {name: {p["name"]: p for p in m["parameters"]} for name, m in data.items()}
    assert params["average"] == {}
    assert params["ties"]["density"]["default"] == 0.2
    assert params["ties"]["trim_scope"]["type"] == "global | tensor"
    assert params["neuromerging"]["lambda2"]["default"] == "auto"
    assert params["task_arithmetic"]["scale"]["default"] == 0.3
    assert data["dare_ties"]["per_model_parameters"] == ["seed", "weight", "drop_rate"]
    assert data["ties"]["per_model_parameters"] == ["weight", "density"]
    assert data["ties"]["row_local"] and not data["tsv_m"]["row_local"]
    assert all(m["reference"].startswith("https://") and m["summary"] for m in data.values())
    assert all(p["description"] for m in params.values() for p in m.values())


def test_methods_text_and_markdown(run_cli: Callable[..., tuple[int, str, str]]) -> None:
    code, text, _ = run_cli("methods")
    assert code == 0
    for m in METHODS:
        assert re.search(rf"^{m}  \(https://", text, re.M), m
    assert "    density: float = 0.2" in text
    assert "    per-model: seed" in text
    assert "    whole tensors only (not row-local)" in text
    assert "    needs per-model regmean statistics (models[i].statistics" in text
    code, md, _ = run_cli("methods", "--format", "markdown")
    assert code == 0
    assert md.startswith("# Merge methods")
    for m in METHODS:
        assert f"## `{m}`" in md
    assert "| `density` | float | `0.2` |" in md
    code, one, _ = run_cli("methods", "dare_ties", "--format", "json")
    assert code == 0
    assert [m["name"] for m in json.loads(one)] == ["dare_ties"]


def test_methods_unknown_name(run_cli: Callable[..., tuple[int, str, str]]) -> None:
    code, stdout, stderr = run_cli("methods", "nosuch")
    assert code == 1 and stdout == ""
    assert stderr.count("\n") == 1
    assert stderr.startswith("neuromerge: error: unknown merge_method 'nosuch'")
