"""The benchmark data tests run offline: see ``_offline``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from neuromerge.bench.data import fetch
from tests.bench.data.fakes import REAL_RUN


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may download: pip and apt-get fail loudly; dpkg-deb (local) still runs. The env
    cache points into tmp_path so nothing lands in the real ~/.cache."""

    def guard(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        if "download" in cmd:
            raise AssertionError(f"test tried to download: {cmd}")
        return REAL_RUN(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", guard)
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "env-cache"))
