"""The per-tensor measures on hand-made tensors with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuromerge.analysis.measures import (
    CHistogram,
    add_into,
    cosine,
    derive,
    elementwise,
    empty_record,
    energy_split,
    frame_conflicts,
    tensor_measures,
)


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_energy_split_by_hand() -> None:
    # row 0: c = ⟨(2, 3), (1, 0)⟩ / 1 = 2, parallel 4, orthogonal (0, 3) → 9;
    # row 1: c = (1 − 1) / 2 = 0, parallel 0, orthogonal (1, −1) → 2
    w0 = t([[1, 0], [1, 1]])
    tv = t([[[2, 3], [1, -1]]])
    c, par, orth_e, orth = energy_split(w0, tv)
    assert c.tolist() == [[2.0, 0.0]]
    assert par.tolist() == [4.0] and orth_e.tolist() == [11.0]
    assert orth.tolist() == [[[0.0, 3.0], [1.0, -1.0]]]
    assert float(par + orth_e) == float((tv.double() ** 2).sum())  # Pythagoras


def test_exactly_parallel_expert_is_100_percent_parallel() -> None:
    w0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    tv = torch.stack([0.5 * w0, -2 * w0])  # exact in float32: τ = c · w0 exactly
    d = derive(tensor_measures(w0, tv, neuronal=True))
    assert d["energy"]["parallel_share"] == [1.0, 1.0]
    assert d["energy"]["orthogonal_share"] == [0.0, 0.0]
    assert d["c"]["mean"] == pytest.approx([0.5, -2], rel=1e-12)


def test_expert_orthogonal_to_every_base_row_is_0_percent_parallel() -> None:
    w0 = t([[1, 0, 0], [0, 2, 0]])
    tv = t([[[0, 5, 1], [3, 0, -1]]])
    d = derive(tensor_measures(w0, tv, neuronal=True))
    assert d["energy"]["parallel_share"] == [0.0]
    assert d["energy"]["orthogonal_share"] == [1.0]
    assert d["c"]["zero_share"] == [1.0]


def test_zero_norm_pretrained_row_is_all_orthogonal() -> None:
    w0 = t([[0, 0], [1, 0]])
    tv = t([[[1, 1], [2, 0]]])  # row 0: c = 0 by the rule, all orthogonal; row 1: parallel
    d = derive(tensor_measures(w0, tv, neuronal=True))
    assert d["energy"]["parallel_share"] == [pytest.approx(4 / 6)]
    assert d["energy"]["orthogonal_share"] == [pytest.approx(2 / 6)]
    assert all(math.isfinite(x) for x in d["c"]["mean"])


def test_elementwise_conflicts_by_hand() -> None:
    v = t([[1, -2, 0, 3], [1, 2, 0, 0], [-1, 0, 5, 0]])
    el = elementwise(v)
    # entry 0: + + − (contested, conflicting; sum 1 elects +, loses 1²);
    # entry 1: − + (contested, conflicting; sum 0 elects +, loses 2²); entries 2, 3: one task
    assert el["contested"] == 2 and el["conflicting"] == 2
    assert el["lost"] == 5.0 and el["energy"] == 14 + 5 + 26
    assert el["l1"].tolist() == [6.0, 3.0, 6.0]
    assert el["pair_both"].tolist() == [[3, 2, 1], [2, 2, 1], [1, 1, 2]]
    assert el["pair_opposite"].tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    assert el["dots"].tolist() == [[14, -3, -1], [-3, 5, -1], [-1, -1, 26]]


def test_opposite_experts_conflict_everywhere_and_have_cosine_minus_one() -> None:
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(12, 6, generator=gen)
    tau = torch.randn(12, 6, generator=gen)
    d = derive(tensor_measures(w0, torch.stack([tau, -tau]), neuronal=True))
    assert d["cosine"] == [[1.0, -1.0], [-1.0, 1.0]]
    conf = d["conflicts"]
    assert conf["elementwise"]["rate"] == 1.0
    assert conf["elementwise"]["contested"] == 72
    assert conf["elementwise"]["lost_energy"] == pytest.approx(0.5)  # a zero sum elects +
    assert conf["pairwise"][0][1] == conf["pairwise"][1][0] == 1.0
    # in the SVD frame: one direction per neuron (rank 1), coordinates ±√2 s
    assert conf["svd"]["directions"] == 12 and conf["svd"]["rate"] == 1.0
    assert conf["svd"]["lost_energy"] == pytest.approx(0.5)


def test_identical_experts_have_cosine_one_and_no_conflicts() -> None:
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(10, 5, generator=gen)
    tau = torch.randn(10, 5, generator=gen)
    d = derive(tensor_measures(w0, torch.stack([tau, tau, tau]), neuronal=True))
    assert d["cosine"] == [[1.0] * 3] * 3
    for frame in ("elementwise", "svd"):
        assert d["conflicts"][frame]["rate"] == 0.0
        assert d["conflicts"][frame]["lost_energy"] == 0.0
    assert d["conflicts"]["svd"]["directions"] == 10  # rank 1: the other two are null
    assert d["conflicts"]["pairwise"] == [[0.0] * 3] * 3


def test_frame_conflicts_by_hand() -> None:
    # orthogonal rows (3, 0) and (0, 4): two directions, each held by one task: no contest
    fc = frame_conflicts(torch.tensor([[[3.0, 0.0]], [[0.0, 4.0]]], dtype=torch.float64))
    assert fc == {"directions": 2, "contested": 0, "conflicting": 0, "lost": 0.0,
                  "energy": pytest.approx(25.0)}
    # (1, 1) and (3, 3): one direction, same sign
    fc = frame_conflicts(torch.tensor([[[1.0, 1.0]], [[3.0, 3.0]]], dtype=torch.float64))
    assert (fc["directions"], fc["contested"], fc["conflicting"]) == (1, 1, 0)
    assert fc["energy"] == pytest.approx(20.0)
    # (1, 1) and (−3, −3): one direction, both signs; + wins (Σ = −2√2 < 0 elects −): loses 2
    fc = frame_conflicts(torch.tensor([[[1.0, 1.0]], [[-3.0, -3.0]]], dtype=torch.float64))
    assert (fc["contested"], fc["conflicting"]) == (1, 1)
    assert fc["lost"] == pytest.approx(2.0) and fc["energy"] == pytest.approx(20.0)


def test_a_task_with_a_zero_orthogonal_row_does_not_contest() -> None:
    w0 = t([[1, 0]])
    tv = t([[[2, 0]], [[0, 3]]])  # task 0 purely parallel: its orthogonal row is exactly zero
    d = derive(tensor_measures(w0, tv, neuronal=True))
    assert d["conflicts"]["svd"] == {"rate": None, "lost_energy": 0.0, "contested": 0,
                                     "conflicting": 0, "directions": 1}


def test_point_tensors_have_no_subspace_energy() -> None:
    base = t([1, 2, 3])
    tv = t([[1, 0, -1], [1, 1, 1]])
    rec = tensor_measures(base, tv, neuronal=False)
    d = derive(rec)
    assert d["energy"]["parallel_share"] == [None, None]
    assert d["energy"]["point_share"] == [1.0, 1.0]
    assert d["energy"]["total"] == [2.0, 3.0]
    assert d["neurons"] == 0 and d["conflicts"]["svd"]["directions"] == 0
    assert d["conflicts"]["elementwise"]["rate"] == 0.5  # entry 2: −1 vs +1


def test_trimmed_variant_and_its_default() -> None:
    w0 = t([[1, 0], [0, 1]])
    tv = t([[[1, 5], [0, 0]], [[-1, 4], [2, 2]]])
    trimmed = t([[[0, 5], [0, 0]], [[0, 4], [0, 2]]])  # task 1: orthogonal 4², parallel 2²
    d = derive(tensor_measures(w0, tv, trimmed, neuronal=True))
    assert d["conflicts"]["elementwise"]["rate"] == 0.5
    assert d["conflicts"]["elementwise_trimmed"]["rate"] == 0.0
    assert d["energy"]["orthogonal_share_trimmed"] == [1.0, pytest.approx(16 / 20)]
    same = derive(tensor_measures(w0, tv, None, neuronal=True))
    assert same["conflicts"]["elementwise_trimmed"] == same["conflicts"]["elementwise"]
    assert same["energy"]["parallel_share_trimmed"] == same["energy"]["parallel_share"]


def test_records_of_row_blocks_add_up_to_the_tensor() -> None:
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(9, 4, generator=gen)
    tv = torch.randn(3, 9, 4, generator=gen)
    whole = tensor_measures(w0, tv, neuronal=True)
    parts = empty_record(3)
    for b in (slice(0, 4), slice(4, 9)):
        add_into(parts, tensor_measures(w0[b], tv[:, b], neuronal=True))
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_cosine_of_a_zero_task_vector_is_undefined() -> None:
    dots = np.array([[4.0, 0.0], [0.0, 0.0]])
    assert cosine(dots) == [[1.0, None], [None, None]]


def test_histogram_quantiles() -> None:
    h = CHistogram(2)
    c = torch.stack([torch.arange(1, 101, dtype=torch.float64),
                     torch.tensor([0.0] * 50 + [-0.25] * 50, dtype=torch.float64)])
    h.add(c[:, :60], "a")
    h.add(c[:, 60:], "b")
    q1, q2 = h.summary()  # type: ignore[misc]
    assert q1["count"] == 100 and q1["min"] == 1 and q1["max"] == 100
    assert q1["p1"] == 1.0  # the smallest value, exactly
    for key, want in (("p5", 5), ("p25", 25), ("p50", 50), ("p75", 75), ("p95", 95),
                      ("p99", 99)):
        assert q1[key] == pytest.approx(want, rel=0.012), key
    assert q1["zero_share"] == 0.0
    assert q2["zero_share"] == 0.5
    assert q2["p25"] == -0.25 and q2["p75"] == 0.0  # exact: a bin holding one value
    assert h.summary(["a"])[0]["count"] == 60  # type: ignore[index]
    assert h.summary(["nothing"]) is None


def test_histogram_orders_negative_zero_positive() -> None:
    h = CHistogram(1)
    h.add(torch.tensor([[-1e3, -1e-3, 0.0, 1e-9, 2.0]]))
    s = h.summary(quantiles=(0.2, 0.4, 0.6, 0.8, 1.0))[0]  # type: ignore[index]
    assert s["p20"] == -1e3 and s["p100"] == 2.0
    assert s["p40"] == pytest.approx(-1e-3, rel=0.012)
    assert s["p60"] == 0.0
    assert s["p80"] == pytest.approx(1e-9, rel=0.012)
