"""The benchmark's profiles."""

from __future__ import annotations

from neuromerge.bench.profiles import CORE_METHODS, PROFILES
from neuromerge.registry import all_methods, get_method


def test_quick_profile_merges_the_core_methods_and_full_merges_all() -> None:
    assert PROFILES["quick"].methods == CORE_METHODS
    assert "neuromerging" in CORE_METHODS and all(get_method(m) for m in CORE_METHODS)
    assert PROFILES["full"].methods is None  # every registered method
    assert len(all_methods()) > len(CORE_METHODS)
