"""``neuromerge statistics``: its checks before any work (the statistics themselves:
tests/test_statistics.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.mark.parametrize("flag", ["--max-examples", "--batch-size", "--max-length"])
def test_statistics_rejects_a_size_below_one_before_any_work(
        run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path, flag: str) -> None:
    code, out, err = run_cli("statistics", "fisher", tmp_path / "model", "--data",
                             tmp_path / "d.jsonl", "--out", tmp_path / "s.safetensors", flag, "0")
    assert code == 1 and out == ""
    assert err == f"neuromerge: error: {flag} must be at least 1 (got 0)\n"
    assert not (tmp_path / "s.safetensors").exists()
