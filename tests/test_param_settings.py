"""mergekit's parameter settings: gradients interpolated over the layers, filters matched by
substring, first match wins (mergekit 0.1.5's ``evaluate_setting``), by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.errors import ConfigError
from neuromerge.param_settings import (
    check_setting,
    evaluate,
    layer_positions,
    leaves,
    map_leaves,
    resolve,
)


def test_a_numeric_gradient_interpolates_between_neighbouring_points() -> None:
    g = [0.0, 0.5, 0.3, 0.7, 1.0]  # 5 points: t = 0, 0.25, 0.5, 0.75, 1
    assert evaluate(g, "x", 0.0) == 0.0
    assert evaluate(g, "x", 0.25) == 0.5
    assert evaluate(g, "x", 1.0) == 1.0
    assert evaluate(g, "x", 0.125) == pytest.approx(0.25)  # halfway between 0 and 0.5
    assert evaluate(g, "x", 0.625) == pytest.approx(0.5)   # halfway between 0.3 and 0.7
    assert evaluate([2, 4], "x", 0.5) == 3.0


def test_a_gradient_of_labels_takes_the_point_at_or_below_t() -> None:
    assert evaluate(["a", "b", "c"], "x", 0.49) == "a"
    assert evaluate(["a", "b", "c"], "x", 0.5) == "b"
    assert evaluate([True, False], "x", 0.99) is True


def test_filters_first_match_wins_and_a_bare_entry_is_the_default() -> None:
    setting = [{"filter": "self_attn", "value": [0, 1]},
               {"filter": "mlp", "value": [1, 0]},
               {"value": 0.5}]
    assert evaluate(setting, "model.layers.3.self_attn.q_proj.weight", 0.25) == 0.25
    assert evaluate(setting, "model.layers.3.mlp.up_proj.weight", 0.25) == 0.75
    assert evaluate(setting, "model.norm.weight", 0.25) == 0.5
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0) is None
    assert evaluate({"filter": "*", "value": 2}, "anything", 0.3) == 2


def test_scopes_fall_through_to_the_next_where_no_filter_matches() -> None:
    per_model = {"weight": [{"filter": "mlp", "value": 2.0}]}
    global_ = {"weight": 0.5}
    assert resolve([per_model, global_], "weight", "a.mlp.w", 0) == (True, 2.0)
    assert resolve([per_model, global_], "weight", "a.attn.w", 0) == (True, 0.5)
    assert resolve([per_model], "weight", "a.attn.w", 0) == (False, None)


def test_layer_positions_follow_mergekit() -> None:
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.w" for i in range(5)),
             "model.norm.weight", "lm_head.weight"]
    t = layer_positions(names)
    assert [t[f"model.layers.{i}.mlp.w"] for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    # outside the layers: t = 0 (mergekit evaluates embeddings, final norm and head there)
    assert t["model.embed_tokens.weight"] == t["lm_head.weight"] == t["model.norm.weight"] == 0
    assert layer_positions(["h.0.w"], n_layers=1) == {"h.0.w": 1.0}
    assert layer_positions(["h.2.w"], n_layers=5)["h.2.w"] == 0.5  # the config's layer count


def test_leaves_and_map_leaves_reach_every_value() -> None:
    setting = [{"filter": "mlp", "value": [0.2, 0.4]}, {"value": 0.6}]
    assert leaves(setting) == [0.2, 0.4, 0.6]
    assert map_leaves(setting, lambda d: round(1 - d, 6)) == [
        {"filter": "mlp", "value": [0.8, 0.6]}, {"value": 0.4}]


@pytest.mark.parametrize(("setting", "message"), [
    ([], "empty list"),
    ([{"filter": "mlp"}], "filter entry"),
    ([{"filter": "mlp", "value": 1, "x": 2}], "filter entry"),
    ([1, {"filter": "mlp", "value": 1}], "not a mix"),
    ({"filter": 3, "value": 1}, "must be a string"),
])
def test_malformed_settings_are_refused(setting: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_setting(setting, "parameters.t")


@given(points=st.lists(st.floats(-10, 10), min_size=1, max_size=9), t=st.floats(0, 1))
def test_a_gradient_stays_between_its_neighbouring_points(points: list[float], t: float
                                                          ) -> None:
    value = evaluate(points, "x", t)
    i0 = int(t * (len(points) - 1))
    i1 = min(len(points) - 1, i0 + 1)
    lo, hi = sorted((points[i0], points[i1]))
    assert lo - 1e-9 <= value <= hi + 1e-9
