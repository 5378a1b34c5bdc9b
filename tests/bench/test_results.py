"""The evaluation records file."""

from __future__ import annotations

from pathlib import Path

from neuromerge.bench.results import Results


def test_results_survive_a_line_cut_short_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    r = Results(path)
    r.add({"key": "a", "accuracy": 0.5})
    with path.open("a") as f:
        f.write('{"key": "b", "accur')  # killed mid-write
    again = Results(path)
    assert set(again.records) == {"a"}
    again.add({"key": "c", "accuracy": 0.7})
    assert set(Results(path).records) == {"a", "c"}
