"""Golden tests for the per-layer SVD merges (TSV-M, Iso-C, Iso-CTS): hand-computed 2×2 and 4×4
cases, numpy transcriptions of the reference code (the TSV authors' and FusionBench's) on random
full-rank matrices where that code is well defined, and properties."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.methods import iso_c, iso_cts, tsv_m
from neuromerge.methods.svd import common_space_split
from neuromerge.registry import TensorContext, get_method

F64 = torch.float64


def t64(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def run(method: Any, taus: list[torch.Tensor], **params: object) -> torch.Tensor:
    """The method on one tensor with base 0 (ctx given: no engine, neuronal by shape)."""
    base = torch.zeros_like(taus[0])
    return method(base, [base + t for t in taus], ctx=TensorContext(), **params)


# --- TSV-M ------------------------------------------------------------------------------------


def test_tsv_m_orthogonal_tasks_add_up() -> None:
    # τ1 = 3 e1 e1ᵀ, τ2 = 2 e2 e2ᵀ: k = max(1, 2 // 2) = 1 triplet each; U = [e1 e2] and
    # V = [e1 e2] are already orthogonal, so ⊥ changes nothing: merged = diag(3, 2) = τ1 + τ2.
    out = run(tsv_m, [t64([[3, 0], [0, 0]]), t64([[0, 0], [0, 2]])], alpha=0.5)
    assert_close(out, t64([[1.5, 0], [0, 1.0]]))


def test_tsv_m_whitens_interfering_directions_by_hand() -> None:
    # τ1 = 1 · e1 e1ᵀ; τ2 = 2 · u e1ᵀ with u = (e1 + e2)/√2, i.e. [[√2, 0], [√2, 0]].
    # U = [e1, u] = [[1, c], [0, c]], c = 1/√2. Its polar factor is a rotation by
    # θ = atan2(x21 - x12, x11 + x22) = atan2(-c, 1 + c) = -π/8 (the nearest rotation to a 2×2
    # matrix of positive determinant): R = [[cos π/8, sin π/8], [-sin π/8, cos π/8]].
    # V stacks e1ᵀ twice: [[1, 0], [1, 0]] = √2 a e1ᵀ with a = (1, 1)/√2, so ⊥(V) = a e1ᵀ
    # (its null direction is dropped: the reference would add an arbitrary-signed one).
    # merged = R diag(1, 2) a e1ᵀ = c · R [1, 2]ᵀ e1ᵀ.
    co, si = math.cos(math.pi / 8), math.sin(math.pi / 8)
    c = 1 / math.sqrt(2)
    col = [c * (co + 2 * si), c * (-si + 2 * co)]  # [1.19447, 1.03597]
    out = run(tsv_m, [t64([[1, 0], [0, 0]]), t64([[2 * c, 0], [2 * c, 0]])])
    assert_close(out, t64([[col[0], 0], [col[1], 0]]))


def test_tsv_m_of_one_task_is_task_arithmetic() -> None:
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(5, 3, generator=gen, dtype=F64)
    assert_close(run(tsv_m, [tau], alpha=0.7), 0.7 * tau)


def test_tsv_m_more_tasks_than_rank_keeps_one_direction_each() -> None:
    # r = 1 < T = 3: each task keeps its one triplet (the reference's int(1/3) = 0 keeps none)
    taus = [t64([[1.0, 2.0, 0.0]]), t64([[0.0, 1.0, 1.0]]), t64([[-1.0, 0.0, 3.0]])]
    out = run(tsv_m, taus)
    assert bool(torch.isfinite(out).all()) and float(out.abs().sum()) > 0


# --- Iso-C ------------------------------------------------------------------------------------


def test_iso_c_flattens_the_spectrum_by_hand() -> None:
    # Σ τ = diag(3, 1): σ̄ = 2, U = V = I -> merged = 2 I; α = 0.5 -> I
    out = run(iso_c, [t64([[2, 0], [0, 0]]), t64([[1, 0], [0, 1]])], alpha=0.5)
    assert_close(out, t64([[1, 0], [0, 1]]))


def test_iso_c_gives_null_directions_nothing() -> None:
    # Σ τ = diag(1, 0): σ̄ = (1 + 0)/2 counts the zero, but only e1 e1ᵀ receives it
    assert_close(run(iso_c, [t64([[1, 0], [0, 0]])]), t64([[0.5, 0], [0, 0]]))


# --- Iso-CTS ----------------------------------------------------------------------------------


def test_common_space_split() -> None:
    assert common_space_split(768, 8, 0.8) == (616, 19)  # ⌊614.4⌋ = 614; round(154/8) = 19
    assert common_space_split(4, 2, 0.5) == (2, 1)
    assert common_space_split(5, 2, 0.8) == (5, 0)   # round(0.5) = 0 (Python rounds to even)
    assert common_space_split(3, 2, 0.0) == (1, 1)   # round(1.5)·2 = 4 > 3: one share less
    assert common_space_split(1, 4, 0.8) == (1, 0)


def test_iso_cts_by_hand() -> None:
    # T = 2, r = 4, f = 0.5 -> k_c = 2, k_t = 1.
    # τ1 = 4 e1e1ᵀ + e3e3ᵀ, τ2 = 3 e2e2ᵀ + 0.5 e4e3ᵀ. Σ = 4 e1e1ᵀ + 3 e2e2ᵀ + (e3 + 0.5 e4)e3ᵀ:
    #   σ = [4, 3, √1.25, 0]; common space: e1, e2.
    # Outside it: τ1 -> 1 · e3 e3ᵀ, τ2 -> 0.5 · e4 e3ᵀ: one triplet each.
    # U = [e3, e4, e1, e2] is orthonormal (⊥ keeps it); V stacks e3ᵀ, e3ᵀ, e1ᵀ, e2ᵀ: ⊥(V) =
    # [(1,1,0,0)/√2 · e3ᵀ; (0,0,1,0) · e1ᵀ; (0,0,0,1) · e2ᵀ] (the duplicate e3 is merged).
    # σ̄ = (4 + 3 + 1 + 0.5) / 4 = 2.125 -> merged = 2.125 (e1e1ᵀ + e2e2ᵀ + (e3 + e4) e3ᵀ / √2)
    e = torch.eye(4, dtype=F64)
    tau1 = 4 * torch.outer(e[0], e[0]) + torch.outer(e[2], e[2])
    tau2 = 3 * torch.outer(e[1], e[1]) + 0.5 * torch.outer(e[3], e[2])
    want = 2.125 * (torch.outer(e[0], e[0]) + torch.outer(e[1], e[1])
                    + torch.outer(e[2] + e[3], e[2]) / math.sqrt(2))
    assert_close(run(iso_cts, [tau1, tau2], common_space_fraction=0.5), want)
    # Iso-C on the same tasks keeps Σ's own third direction (e3 + 0.5 e4)/√1.25
    s_bar = (4 + 3 + math.sqrt(1.25)) / 4
    want_c = s_bar * (torch.outer(e[0], e[0]) + torch.outer(e[1], e[1])
                      + torch.outer(e[2] + 0.5 * e[3], e[2]) / math.sqrt(1.25))
    assert_close(run(iso_c, [tau1, tau2]), want_c)


def test_iso_cts_with_the_whole_common_space_is_iso_c() -> None:
    gen = torch.Generator().manual_seed(2)
    taus = [torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(3)]
    assert_close(run(iso_cts, taus, common_space_fraction=1.0), run(iso_c, taus))


# --- numpy transcriptions of the reference code ----------------------------------------------


def ref_polar(x: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def ref_tsvm(taus: list[np.ndarray]) -> np.ndarray:
    """compute_and_sum_svd_mem_reduction (TSV authors, FusionBench) for one 2-D key.

    The reference computes k = int(r * (1 / T)), one less than ⌊r/T⌋ when T divides r and 1/T
    is not a binary fraction (6 · (1/3) = 1.9999999999999998); the method uses ⌊r/T⌋."""
    t_count = len(taus)
    u0, s0, v0 = np.linalg.svd(taus[0], full_matrices=False)
    sum_u, sum_s, sum_v = np.zeros_like(u0), np.zeros_like(s0), np.zeros_like(v0)
    k = s0.shape[0] // t_count
    for i, tau in enumerate(taus):
        u, s, v = np.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    return ref_polar(sum_u) @ np.diag(sum_s) @ ref_polar(sum_v)


def ref_iso_c(taus: list[np.ndarray]) -> np.ndarray:
    """FusionBench iso_c for one 2-D key: the summed task vectors with a flat spectrum."""
    u, s, v = np.linalg.svd(sum(taus), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ v


def ref_iso_cts(taus: list[np.ndarray], fraction: float) -> np.ndarray:
    """FusionBench iso_cts for one 2-D key."""
    t_count, r = len(taus), min(taus[0].shape)
    k_c = int(r * fraction)
    k_c = r - round((r - k_c) / t_count) * t_count
    u, s, v = np.linalg.svd(sum(taus), full_matrices=False)
    cu, cs, cv = u[:, :k_c], s[:k_c], v[:k_c, :]
    per = int((r - k_c) / t_count)
    us, ss, vs = [], [], []
    for w in taus:
        u_t, s_t, v_t = np.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        us.append(u_t[:, :per])
        ss.append(s_t[:per])
        vs.append(v_t[:per, :])
    big_u = np.concatenate([*us, cu], axis=1)
    big_s = np.concatenate([*ss, cs])
    big_v = np.concatenate([*vs, cv], axis=0)
    return ref_polar(big_u) @ np.diag(np.full_like(big_s, big_s.mean())) @ ref_polar(big_v)


@pytest.mark.parametrize(("shape", "t_count"), [((6, 6), 3), ((8, 5), 2), ((5, 9), 4),
                                                ((300, 260), 3)])
def test_match_the_reference_code_on_full_rank_matrices(shape: tuple[int, int],
                                                       t_count: int) -> None:
    # (300, 260) is decomposed in float32 (more than 2^16 entries): looser tolerance
    rng = np.random.default_rng(sum(shape) + t_count)
    base = rng.normal(size=shape)
    taus = [rng.normal(scale=0.1, size=shape) for _ in range(t_count)]
    experts = [{"w": torch.from_numpy(base + t), "b": torch.from_numpy(base[0] + t[0])}
               for t in taus]
    tol = {"rtol": 1e-9, "atol": 1e-9} if shape[0] * shape[1] <= 1 << 16 else \
        {"rtol": 2e-3, "atol": 2e-4}
    for name, ref, params in [("tsv_m", ref_tsvm(taus), {"alpha": 0.8}),
                              ("iso_c", ref_iso_c(taus), {"alpha": 1.3}),
                              ("iso_cts", ref_iso_cts(taus, 0.8), {"alpha": 1.5})]:
        out = merge_state_dicts({"w": torch.from_numpy(base), "b": torch.from_numpy(base[0])},
                                experts, name, params, dtype="float64").state_dict
        assert_close(out["w"], torch.from_numpy(base + params["alpha"] * ref), **tol,
                     msg=name)
        # point tensors: α · the mean task vector, as the reference averages non-2-D tensors
        mean = sum(t[0] for t in taus) / t_count
        assert_close(out["b"], torch.from_numpy(base[0] + params["alpha"] * mean))


# --- properties -------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 6), n=st.integers(1, 6),
       t_count=st.integers(1, 4), rank=st.integers(0, 3))
def test_iso_c_spectrum_is_flat(seed: int, m: int, n: int, t_count: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    taus = [torch.randn(m, rank, generator=gen, dtype=F64) @ torch.randn(
        rank, n, generator=gen, dtype=F64) for _ in range(t_count)]
    out = run(iso_c, taus)
    s_sum = torch.linalg.svdvals(sum(taus))
    s_out = torch.linalg.svdvals(out)
    s_bar = float(s_sum.mean()) if s_sum.numel() else 0.0
    # σ̄ on the directions of the sum (rank-deficient ones have singular values ~1e-16 s_max),
    # nothing elsewhere
    k = int((s_sum > 1e-8 * float(s_sum.max())).sum()) if s_bar > 0 else 0
    assert_close(s_out[:k], torch.full((k,), s_bar, dtype=F64))
    assert bool((s_out[k:] <= 1e-9 * (1 + s_bar)).all())


def test_conv_kernels_are_merged_as_rows_by_the_rest() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 2, 3, generator=gen)
    experts = [base + torch.randn(4, 2, 3, generator=gen) for _ in range(2)]
    for name in ("tsv_m", "iso_c", "iso_cts"):
        as_3d = merge_state_dicts({"k": base}, [{"k": e} for e in experts], name).state_dict
        flat = merge_state_dicts({"k": base.reshape(4, 6)},
                                 [{"k": e.reshape(4, 6)} for e in experts], name).state_dict
        assert_close(as_3d["k"].reshape(4, 6), flat["k"])
        assert not get_method(name).row_local


def test_zero_and_rank_deficient_task_vectors_are_finite() -> None:
    base = {"w": torch.zeros(4, 3)}
    rank_one = torch.outer(torch.arange(4.0), torch.ones(3))
    for name in ("tsv_m", "iso_c", "iso_cts"):
        out = merge_state_dicts(base, [{"w": torch.zeros(4, 3)}, {"w": rank_one},
                                       {"w": rank_one}], name).state_dict["w"]
        assert bool(torch.isfinite(out).all())
        # every update lies along the one direction the experts moved
        assert_close(out - torch.outer(out[:, 0], torch.ones(3)), torch.zeros(4, 3))
