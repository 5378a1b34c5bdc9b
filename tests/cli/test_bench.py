"""``neuromerge bench``: its checks before any work, and --threads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


def test_bench_rejects_an_unknown_method_before_any_work(
        run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    code, out, err = run_cli("bench", "--methods", "ties,nope", "--out", tmp_path / "b",
                             "--cache", tmp_path / "c")
    assert code == 1 and out == ""
    assert err.startswith("neuromerge: error: unknown merge_method 'nope'")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_bench_threads_sets_torch_threads_for_the_run(
        run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import neuromerge.bench.benchmark as runner

    seen: list[int] = []

    def fake(profile: str, out: str, **kwargs: Any) -> dict[str, str]:
        seen.append(torch.get_num_threads())
        return {"markdown": "report"}

    monkeypatch.setattr(runner, "run_benchmark", fake)
    before = torch.get_num_threads()
    try:
        code, out, err = run_cli("bench", "--threads", "1", "--out", tmp_path / "b")
    finally:
        torch.set_num_threads(before)
    assert code == 0 and seen == [1] and out.startswith("report")
    code, out, err = run_cli("bench", "--threads", "0", "--out", tmp_path / "b")
    assert code == 1 and out == ""
    assert err == "neuromerge: error: --threads must be at least 1 (got 0)\n"
