"""The streaming analysis through its Python API, on tiny state dicts with known answers."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch

import neuromerge
from neuromerge.analysis import NO_LAYER, analyze, scan
from neuromerge.analysis.measures import total
from neuromerge.engine import build_plan
from neuromerge.engine.inputs import Inputs
from neuromerge.engine.trim_pass import trim_pass
from neuromerge.engine.units import plan_units
from neuromerge.errors import ConfigError, InputError
from neuromerge.io.reader import StateDictReader

SD = dict[str, torch.Tensor]


def base_sd(seed: int = 0) -> SD:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(12, 6, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=g),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(6, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(10, 6, generator=g),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(6, 6, generator=g),
        "model.layers.1.input_layernorm.weight": torch.ones(6),
        "model.norm.weight": torch.ones(6),
        "model.position_ids": torch.arange(6),  # not a float: copied, not analysed
    }


def shifted(base: SD, delta: Mapping[str, torch.Tensor]) -> SD:
    return {k: (v + delta[k] if k in delta else v.clone()) for k, v in base.items()}


def random_delta(base: SD, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in base.items()
            if v.dtype.is_floating_point}


def test_an_exactly_parallel_expert_shows_100_percent_parallel_energy() -> None:
    base = base_sd()
    # θt = 2 θ0 on neuronal tensors: τ = θ0 exactly (c = 1 everywhere); point tensors move too
    parallel = {k: (2 * v if v.dim() >= 2 else v + 0.5) if v.dtype.is_floating_point else v
                for k, v in base.items()}
    other = shifted(base, random_delta(base, 1))
    a = analyze(base, {"parallel": parallel, "other": other})
    e = a.summary["overall"]["energy"]
    assert e["parallel_share"][0] == 1.0 and e["orthogonal_share"][0] == 0.0
    assert 0 < e["parallel_share"][1] < 0.5
    for m, g in a.summary["by_module"].items():
        if g["neurons"]:
            assert g["energy"]["parallel_share"][0] == 1.0, m
        else:
            assert g["energy"]["parallel_share"] == [None, None], m  # norms: point tensors only
    q = a.summary["c_quantiles"]["overall"]["parallel"]
    for k in ("p1", "p5", "p25", "p50", "p75", "p95", "p99"):
        assert q[k] == pytest.approx(1.0, rel=1e-12), k  # c = ⟨θ0, θ0⟩ / ‖θ0‖², to rounding
    assert q["count"] == a.summary["overall"]["neurons"] == 12 + 6 + 10 + 6
    assert e["point_share"][0] == pytest.approx(0.25 * (6 + 6 + 6) / (
        0.25 * 18 + sum(float((v * v).sum()) for v in base.values() if v.dim() == 2)))


def test_an_expert_orthogonal_to_every_base_row_shows_0_percent() -> None:
    base = {"layers.0.mlp.fc1.weight": torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0]])}
    expert = {"layers.0.mlp.fc1.weight": torch.tensor([[1.0, 3, 0], [0, 1, -2], [5, 5, 5]])}
    a = analyze(base, [expert])
    assert a.summary["overall"]["energy"]["parallel_share"] == [0.0]
    assert a.summary["overall"]["energy"]["orthogonal_share"] == [1.0]
    assert a.summary["c_quantiles"]["overall"]["task1"]["zero_share"] == 1.0


def test_opposite_experts_conflict_everywhere_with_cosine_minus_one() -> None:
    base = base_sd()
    delta = random_delta(base, 2)
    a = analyze(base, {"up": shifted(base, delta),
                       "down": shifted(base, {k: -v for k, v in delta.items()})},
                densities=[0.5], conflict_density=0.5)
    ov = a.summary["overall"]
    assert ov["cosine"][0][1] == pytest.approx(-1.0, abs=1e-6)
    c = ov["conflicts"]
    assert c["elementwise"]["rate"] == 1.0
    assert c["elementwise"]["contested"] == ov["entries"]
    assert c["pairwise"][0][1] == 1.0
    assert c["svd"]["rate"] == 1.0
    # both trimmed alike (same magnitudes): still every kept entry conflicts
    assert c["elementwise_trimmed"]["rate"] == 1.0 and c["svd_trimmed"]["rate"] == 1.0


def test_identical_experts_have_cosine_one_and_no_conflicts() -> None:
    base = base_sd()
    expert = shifted(base, random_delta(base, 3))
    a = analyze(base, [expert, {k: v.clone() for k, v in expert.items()}])
    ov = a.summary["overall"]
    assert ov["cosine"] == [[1.0, 1.0], [1.0, 1.0]]
    for frame in ("elementwise", "elementwise_trimmed", "svd", "svd_trimmed"):
        assert ov["conflicts"][frame]["rate"] == 0.0, frame
        assert ov["conflicts"][frame]["lost_energy"] == 0.0, frame
    assert a.tasks == ["task1", "task2"]


def test_trim_statistics_equal_the_engines_at_every_density() -> None:
    base = base_sd()
    experts = [shifted(base, random_delta(base, s)) for s in (4, 5, 6)]
    readers = [StateDictReader(e, f"e{i}") for i, e in enumerate(experts)]
    b = StateDictReader(base, "base")
    plan = build_plan(b, readers)
    units = plan_units(plan, b, readers, 1 << 30, torch.float32)[0]
    inputs = Inputs(b, readers, torch.device("cpu"), torch.float32, read_ahead=False)
    ours = scan.trim_statistics(units, inputs, [0.05, 0.2, 0.5, 1.0])
    for d in (0.05, 0.2, 0.5):
        theirs = trim_pass(units, inputs, density=d, scope="global")
        assert ours[d] == theirs, d
    assert ours[1.0].sigma == (0.0, 0.0, 0.0)


def test_sigma_and_lambda2_are_those_of_a_neuromerging_merge() -> None:
    base = base_sd()
    experts = {f"t{s}": shifted(base, random_delta(base, s, scale=0.05 * s)) for s in (1, 2, 3)}
    a = analyze(base, experts, densities=[0.1, 0.3])
    merged = neuromerge.merge_state_dicts(base, experts, "neuromerging", {"density": 0.3})
    row = next(r for r in a.summary["trim"] if r["density"] == 0.3)
    assert row["lambda2_auto"] == merged.params["lambda2"]
    assert tuple(row["sigma"]) == merged.trim.sigma
    assert tuple(row["thresholds"]) == merged.trim.thresholds
    assert row["lambda2_auto"] == pytest.approx(1 / (1 - row["max_sigma"]))
    assert [r["density"] for r in a.summary["trim"]] == [0.1, 0.2, 0.3]  # + conflict density
    assert a.summary["trim"][0]["lambda2_auto"] > a.summary["trim"][2]["lambda2_auto"]


def test_trimmed_statistics_keep_k_entries_per_task() -> None:
    base = base_sd()
    a = analyze(base, [shifted(base, random_delta(base, s)) for s in (7, 8)])
    row = next(r for r in a.summary["trim"] if r["density"] == 0.2)
    kept = total(a.records.values(), 2)["pair_both_trim"]
    assert np.diag(kept).tolist() == [row["k"], row["k"]]  # continuous values: no ties
    assert row["n_entries"] == a.summary["overall"]["entries"]


def test_groups_add_up_to_the_model() -> None:
    base = base_sd()
    a = analyze(base, [shifted(base, random_delta(base, s)) for s in (9, 10, 11)])
    s = a.summary
    want = np.array(s["overall"]["energy"]["total"])
    for key in ("by_module", "by_layer"):
        got = sum(np.array(g["energy"]["total"]) for g in s[key].values())
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert sum(g["tensors"] for g in s[key].values()) == s["overall"]["tensors"] == 7
    cells = [g for row in s["by_layer_module"].values() for g in row.values()]
    assert sum(g["entries"] for g in cells) == s["overall"]["entries"]
    assert s["layers"] == ["0", "1", NO_LAYER]
    assert s["modules"] == ["embed", "attn.q", "mlp.up", "norm"]
    assert s["tensor_counts"] == {"neuronal": 4, "point": 3, "copy": 1}
    assert {t["name"] for t in a.tensors} == {k for k in base if k != "model.position_ids"}
    assert set(s["c_quantiles"]["by_module"]) == {"embed", "attn.q", "mlp.up"}


def test_row_blocks_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    base = base_sd()
    experts = [shifted(base, random_delta(base, s)) for s in (12, 13)]
    whole = analyze(base, experts)
    blocks: list[int] = []
    real = scan.plan_units

    def tiny_budget(plan, b, exs, budget, cdtype):  # type: ignore[no-untyped-def]
        units, held = real(plan, b, exs, 3000, cdtype)  # a few rows per block
        blocks.append(sum(u.rows is not None for u in units))
        return units, held

    monkeypatch.setattr(scan, "plan_units", tiny_budget)
    blocked = analyze(base, experts)
    assert blocks[0] > 4
    for name, rec in whole.records.items():
        for k, v in rec.items():
            np.testing.assert_allclose(blocked.records[name][k], v, rtol=1e-9, atol=1e-12,
                                       err_msg=f"{name} {k}")
    assert blocked.summary["trim"] == whole.summary["trim"]


def test_a_single_expert() -> None:
    base = base_sd()
    a = analyze(base, [shifted(base, random_delta(base, 14))])
    ov = a.summary["overall"]
    assert ov["cosine"] == [[1.0]]
    assert ov["conflicts"]["elementwise"]["rate"] is None  # nothing is contested
    assert math.isclose(ov["energy"]["parallel_share"][0] + ov["energy"]["orthogonal_share"][0],
                        1.0)


def test_an_unchanged_expert_has_undefined_shares_not_nan() -> None:
    base = base_sd()
    a = analyze(base, {"same": {k: v.clone() for k, v in base.items()},
                       "moved": shifted(base, random_delta(base, 15))})
    ov = a.summary["overall"]
    assert ov["energy"]["parallel_share"][0] is None
    assert ov["cosine"][0] == [None, None]
    assert a.summary["trim"][0]["sigma"][0] == 0.0


def test_bad_arguments_are_config_errors() -> None:
    base = base_sd()
    with pytest.raises(ConfigError, match="no expert"):
        analyze(base, [])
    with pytest.raises(ConfigError, match="2 names for 1 experts"):
        analyze(base, [base], names=["a", "b"])
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="must be a number in"):
            analyze(base, [base], densities=[bad])
    with pytest.raises(ConfigError, match="must be a number in"):
        analyze(base, [base], conflict_density=0)


def test_mismatched_experts_fail_like_a_merge() -> None:
    base = base_sd()
    wrong = {k: v.clone() for k, v in base.items()}
    wrong["model.layers.0.mlp.up_proj.weight"] = torch.zeros(11, 6)
    with pytest.raises(InputError, match=r"shape \[11, 6\] in e differs from \[10, 6\]"):
        scan.analyze_readers(StateDictReader(base, "base"), [StateDictReader(wrong, "e")],
                               ["e"])
    extra = dict(base, extra=torch.zeros(2))
    with pytest.raises(InputError, match="'extra' is not in the base"):
        analyze(base, [extra])
    nan = {k: v.clone() for k, v in base.items()}
    nan["model.norm.weight"][0] = float("nan")
    with pytest.raises(InputError, match="NaN or Inf"):
        analyze(base, [nan])
