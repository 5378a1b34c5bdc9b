"""The ablations report's cells."""

from __future__ import annotations

from neuromerge.bench.ablations_report import mean_std, percent_cell


def test_cells_on_fewer_seeds_say_how_many() -> None:
    assert percent_cell(mean_std([0.5]), 3) == "50.0 [1 seed]"
    assert percent_cell(mean_std([0.4, 0.6]), 3) == "50.0 ± 14.1 [2 seeds]"
    assert percent_cell(mean_std([0.4, 0.6]), 2) == "50.0 ± 14.1"
    assert percent_cell(mean_std([0.5]), 1) == "50.0"
    assert percent_cell(mean_std([]), 3) == "–"
