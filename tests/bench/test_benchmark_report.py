"""The report's numbers, computed by hand from a few records."""

from pathlib import Path

import pytest

from neuromerge.bench.benchmark_report import (
    markdown_table,
    paired_differences,
    paired_table,
    summarize,
    write_report,
)

RECORDS = [
    {"kind": "expert", "seed": 0, "task": "a", "accuracy": 0.8},
    {"kind": "expert", "seed": 0, "task": "b", "accuracy": 0.5},
    {"kind": "expert", "seed": 1, "task": "a", "accuracy": 1.0},
    {"kind": "expert", "seed": 1, "task": "b", "accuracy": 0.5},
    {"kind": "probe", "seed": 0, "task": "a", "accuracy": 0.6},
    {"kind": "probe", "seed": 0, "task": "b", "accuracy": 0.3},
    {"kind": "probe", "seed": 1, "task": "a", "accuracy": 0.6},
    {"kind": "probe", "seed": 1, "task": "b", "accuracy": 0.3},
    {"kind": "merge", "mode": "default", "method": "ties", "seed": 0, "params": {"scale": 1},
     "accuracy": {"a": 0.4, "b": 0.5}},
    {"kind": "merge", "mode": "default", "method": "ties", "seed": 1, "params": {"scale": 1},
     "accuracy": {"a": 0.8, "b": 0.25}},
]


def test_summary_means_and_normalization() -> None:
    s = summarize(RECORDS, ["a", "b"])
    ties = s["default/ties"]
    assert ties["seeds"] == [0, 1]
    assert ties["average"] == pytest.approx([0.45, 0.525])
    # seed 0: (0.4/0.8 + 0.5/0.5)/2 = 0.75; seed 1: (0.8/1.0 + 0.25/0.5)/2 = 0.65
    assert ties["normalized"] == pytest.approx([0.75, 0.65])
    assert s["reference/expert (upper bound)"]["normalized"] == pytest.approx([1.0, 1.0])
    table = markdown_table(s, ["a", "b"], "default")
    # average 48.75 ± std(45, 52.5) = 5.3
    assert "| ties | 60.0 ± 28.3 | 37.5 ± 17.7 | 48.8 ± 5.3 | 70.0 ± 7.1 |" in table


def test_write_report_files(tmp_path: Path) -> None:
    meta = {"profile": {"name": "t", "tasks": ["a", "b"], "seeds": [0, 1]},
            "seconds": {"fine-tuning": 3.0}}
    out = write_report(RECORDS, meta, tmp_path)
    assert "Without validation" in out["markdown"] and "With validation" not in out["markdown"]
    assert (tmp_path / "report.md").read_text() == out["markdown"]
    csv_rows = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "mode,method,seed,task,accuracy" and len(csv_rows) == 1 + 8 + 4
    assert (tmp_path / "accuracy_default.png").stat().st_size > 1000


def test_paired_differences_are_per_seed() -> None:
    nm = [{"kind": "merge", "mode": "default", "method": "neuromerging", "seed": 0, "params": {},
           "accuracy": {"a": 0.5, "b": 0.5}},
          {"kind": "merge", "mode": "default", "method": "neuromerging", "seed": 1, "params": {},
           "accuracy": {"a": 0.6, "b": 0.31}}]
    s = summarize(RECORDS + nm, ["a", "b"])
    # neuromerging avg: 0.5, 0.455; ties avg: 0.45, 0.525 -> +0.05, -0.07: mean -0.01, std 0.0849
    d = paired_differences(s, "default")
    assert d["ties"] == pytest.approx([0.05, -0.07])
    assert paired_differences(s, "tuned") == {}
    assert "| ties | +5.0, -7.0 | -1.0 ± 8.5 | 1 of 2 |" in paired_table(s, "default")


def test_a_method_on_fewer_seeds_is_marked_and_compared_on_the_common_seeds(tmp_path: Path
                                                                         ) -> None:
    """A method measured on seed 0 only (a run still going) is labelled so, and a second table
    compares every method on the seeds they share."""
    nm0 = {"kind": "merge", "mode": "default", "method": "neuromerging", "seed": 0, "params": {},
           "accuracy": {"a": 0.5, "b": 0.5}}
    meta = {"profile": {"name": "t", "tasks": ["a", "b"], "seeds": [0, 1]}, "seconds": {}}
    md = write_report([*RECORDS, nm0], meta, tmp_path)["markdown"]
    assert "| neuromerging (seed 0 only) | 50.0 | 50.0 | 50.0 |" in md
    assert "| ties | 60.0 ± 28.3 |" in md  # both seeds: not marked
    assert "every method on seed 0" in md
    common = md.split("every method on seed 0")[1]
    assert "| ties | 40.0 | 50.0 | 45.0 | 75.0 |" in common  # ties on seed 0 alone
    full = write_report(RECORDS, meta, tmp_path)["markdown"]
    assert "only" not in full and "every method on" not in full
    # a run resumed with --seeds 0 records seeds [0] in its meta: the records still hold 0 and 1
    resumed = {"profile": {**meta["profile"], "seeds": [0]}, "seconds": {}}
    md = write_report([*RECORDS, nm0], resumed, tmp_path)["markdown"]
    assert "over seeds [0, 1]" in md and "| neuromerging (seed 0 only) |" in md
    assert "| ties | 60.0 ± 28.3 |" in md
