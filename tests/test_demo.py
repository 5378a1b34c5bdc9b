"""``neuromerge demo``: every weight-only method merges the built-in tiny family, loads and runs;
the printed table agrees with what the methods must give."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neuromerge.cli import main as cli_main
from neuromerge.registry import all_methods


def test_demo_merges_every_weight_only_method(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| (\w+) \| (\d+ \|.*)\|$", out, re.M)}
    data_methods = sorted(m.name for m in all_methods() if m.needs)
    assert data_methods == ["fisher", "regmean"]
    assert sorted(rows) == sorted(m.name for m in all_methods() if not m.needs)
    assert f"Not in the demo: {', '.join(m.name for m in all_methods() if m.needs)}" in out
    for name in rows:
        assert (tmp_path / "demo" / "merged" / name / "model.safetensors").is_file(), name

    def cells(name: str) -> list[tuple[float, float]]:
        parts = [p.strip() for p in rows[name].split("|")]
        return [tuple(map(float, p.split(" / "))) for p in parts[1:4]]  # type: ignore[misc]

    assert rows["slerp"].startswith("1 ") and rows["nuslerp"].startswith("2 ")
    assert rows["ties"].startswith("3 ")
    # passthrough copies the one model it is given: all of expert 1, none of the others' own
    assert cells("passthrough")[0] == (1.0, 1.0)
    # the uniform weighted average is the plain average
    assert cells("linear") == cells("average")
    # the demo's ties is the paper's (density 0.2 over the model), not mergekit's density 1
    config = (tmp_path / "demo" / "configs" / "ties.yaml").read_text()
    assert "density: 0.2" in config and "trim_scope: global" in config
