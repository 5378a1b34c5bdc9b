"""The benchmark's profiles."""

from __future__ import annotations

from neuromerge.bench.profiles import CORE_METHODS, PROFILES, SWEEPS
from neuromerge.registry import all_methods, get_method


def test_quick_profile_merges_the_core_methods_and_full_merges_all() -> None:
    assert PROFILES["quick"].methods == CORE_METHODS
    assert "neuromerging" in CORE_METHODS and all(get_method(m) for m in CORE_METHODS)
    assert PROFILES["full"].methods is None  # every registered method
    assert len(all_methods()) > len(CORE_METHODS)


def test_every_swept_scale_is_one_the_method_is_linear_in() -> None:
    """Tuned mode scores a grid of scales by recombining one merge per component: that is
    exact only for parameters the method declares ``linear_in``."""
    for method, sweep in SWEEPS.items():
        spec = get_method(method).linear_in
        assert set(sweep["linear"]) <= set(spec), method
        for unit in spec.values():
            assert set(unit) <= set(get_method(method).param_names), method
    assert set(get_method("neuromerging").linear_in) == {"lambda1", "lambda2"}
