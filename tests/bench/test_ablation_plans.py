"""The ablations' grids and settings: each ablation scores the settings it claims, the small grid
is a subset of the full one, the task subsets are deterministic, and ``--only`` is parsed."""

from __future__ import annotations

import pytest

from neuromerge.bench.ablation_plans import (
    ABLATIONS,
    AUTO,
    PLANS,
    Plan,
    ablation_names,
    density_settings,
    frame_settings,
    nm_setting,
    subspace_settings,
    task_subsets,
    trim_compat_settings,
)
from neuromerge.errors import ConfigError

PLAN = Plan(lambda1=(0.0, 2.0), lambda2=(0.0, AUTO, 2.0), rank_thresholds=(0.5,),
            densities=(0.2, 1.0), lambda2_grid=(0.5, 2.0, 4.0),
            task_methods=("task_arithmetic", "neuromerging"), subsets_per_size=2)


def test_task_subsets_are_deterministic_and_cover_every_size() -> None:
    tasks = [f"t{i}" for i in range(7)]
    a = task_subsets(tasks, 3, seed=0)
    assert a == task_subsets(tasks, 3, seed=0)
    assert a != task_subsets(tasks, 3, seed=1)
    sizes = [len(s) for s in a]
    assert sizes == sorted(sizes) and set(sizes) == set(range(2, 8))
    assert sizes.count(7) == 1 and sizes.count(6) == 3 and sizes.count(2) == 3
    assert len(set(a)) == len(a) and all(len(set(s)) == len(s) for s in a)
    assert task_subsets(tasks, 1, sizes=(2, 7)) == [task_subsets(tasks, 1)[0], tuple(tasks)]
    with pytest.raises(ConfigError, match="cannot merge 8 of 7 tasks"):
        task_subsets(tasks, 1, sizes=(8,))
    # all subsets when there are few: 3 tasks give the 3 pairs and the triple
    assert task_subsets(["a", "b", "c"], 5) == [("a", "b"), ("a", "c"), ("b", "c"),
                                                  ("a", "b", "c")]


def test_settings_are_what_each_ablation_claims() -> None:
    sub = subspace_settings(PLAN)
    assert len(sub) == 6 and {(s.lambda1, s.lambda2) for s in sub} == {
        (a, b) for a in (0.0, 2.0) for b in (0.0, AUTO, 2.0)}
    assert all(s.lambda_point == AUTO for s in sub)  # points fixed: only the subspaces vary
    assert [s.label.split(":")[0] for s in sub] == [
        "neither (points only)", "orthogonal only", "orthogonal only", "parallel only", "both",
        "both"]
    frame = frame_settings(PLAN)
    assert [dict(s.fixed)["orthogonal_merge"] for s in frame] == ["svd", "ties", "svd"]
    assert [dict(s.fixed)["rank_threshold"] for s in frame] == [1.0, 1.0, 0.5]
    tc = {s.label: dict(s.fixed) for s in trim_compat_settings(PLAN)}
    assert tc["per-tensor trim"]["trim_scope"] == "tensor"
    assert tc["compat: official"]["compat"] == "official"
    auto, grid = density_settings(PLAN, 0.05)
    assert auto.lambda2 == AUTO and dict(auto.fixed)["density"] == 0.05
    assert [s.lambda2 for s in grid] == [0.5, 2.0, 4.0]
    # the default merge is one setting whichever ablation names it: it is scored once
    default = nm_setting("x")
    assert frame[0].key("c", "val") == default.key("c", "val") == \
        trim_compat_settings(PLAN)[0].key("c", "val") == \
        density_settings(PLAN, 0.2)[0].key("c", "val")
    assert sub[1].key("c", "val") == default.key("c", "val")  # λ1 0, λ2 = λ_point = auto
    with pytest.raises(ConfigError, match="non-linear"):
        nm_setting("x", lambda3=1.0)


def test_small_grid_is_a_subset_of_the_full_one() -> None:
    full, small = PLANS["full"], PLANS["small"]
    for name in ("lambda1", "densities", "task_methods", "rank_thresholds"):
        assert set(getattr(small, name)) <= set(getattr(full, name)), name
    assert len(subspace_settings(small)) == 4 and len(trim_compat_settings(small)) == 3
    assert len(trim_compat_settings(full)) == 3 + 2 * 2  # official vs spec at λ1 = 1 and 3
    assert small.splits == ("test",) and full.splits == ("val", "test")


def test_ablation_names() -> None:
    assert ablation_names(None) == ABLATIONS
    assert ablation_names("frame, tasks") == ("frame", "tasks")
    with pytest.raises(ConfigError, match="unknown ablation 'subspace'"):
        ablation_names("subspace")
