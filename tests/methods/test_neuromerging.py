"""Golden tests for NeuroMerging (shared/spec/neuromerging.md, Steps 1-5, "Which tensors are
neuronal", ``compat: official``).

Expected values are either literals derived by hand in the comments, or come from an independent
float64 numpy reference (explicit loops over rows, ``numpy.linalg.svd``) that never calls the
package's own helpers.
"""

from __future__ import annotations

import importlib
import logging
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import neuromerge
from neuromerge.methods import neuromerging
from neuromerge.methods.neuromerging import (
    merge_orthogonal_svd,
    neuron_coefficients,
    split_neurons,
)
from neuromerge.registry import TensorContext

# the package re-exports the function under the module's name: fetch the module itself
nm_module = importlib.import_module("neuromerge.methods.neuromerging")

F64 = torch.float64
TIGHT = {"rtol": 0.0, "atol": 1e-12}
F64_TOL = {"rtol": 1e-9, "atol": 1e-9}
F32_TOL = {"rtol": 1e-6, "atol": 1e-6}


def t64(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def t32(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def direct(base: torch.Tensor, taus: list[torch.Tensor], **params: object) -> torch.Tensor:
    """The registered method on one tensor, trimmed on its own (ctx without thresholds)."""
    params.setdefault("density", 1.0)
    return neuromerging(base, [base + t for t in taus], ctx=TensorContext(), **params)


# --------------------------------------------------------------------------------------------
# Independent float64 numpy reference: explicit loops over rows, numpy.linalg.svd per row.
# --------------------------------------------------------------------------------------------


def ref_ties(values: np.ndarray, fallback: float) -> float:
    """TIES elect + disjoint mean of a 1-D array; a zero sum takes ``fallback`` (+1 or -1)."""
    total = float(np.sum(values))
    s = 1.0 if total > 0 else -1.0 if total < 0 else fallback
    kept = [float(v) for v in values if v != 0 and (v > 0) == (s > 0)]
    return sum(kept) / len(kept) if kept else 0.0


def sign_or_plus(x: float) -> float:
    return -1.0 if x < 0 else 1.0


def ref_orth_row(mat: np.ndarray, rho: float = 1.0, flips: np.ndarray | None = None
                 ) -> np.ndarray:
    """One neuron: M (T x n) = U S V^T; A = M V; TIES per direction (zero sum -> +);
    O = sum_j abar_j v_j over the leading directions whose cumulative S^2 share reaches rho."""
    _, s, vt = np.linalg.svd(mat, full_matrices=False)
    vt = vt.copy()
    if flips is not None:  # an SVD is only defined up to the sign of each singular pair
        vt *= flips[: len(s), None]
    coords = mat @ vt.T
    q = len(s)
    if rho < 1:
        share = np.cumsum(s**2) / np.sum(s**2)
        q = next(i + 1 for i in range(len(s)) if share[i] >= rho)
    out = np.zeros(mat.shape[1])
    for j in range(q):
        out += ref_ties(coords[:, j], 1.0) * vt[j]
    return out


def ref_neuronal(w0: np.ndarray, taus: list[np.ndarray], *, lambda1: float, lambda2: float,
                 rho: float = 1.0, official: bool = False, orth_mode: str = "svd",
                 flips: np.ndarray | None = None) -> np.ndarray:
    """theta - theta0 = lambda1 * P + lambda2 * O for a 2-D tensor of already-trimmed taus."""
    w0 = np.asarray(w0, dtype=np.float64)
    m, n = w0.shape
    n_tasks = len(taus)
    c = np.zeros((n_tasks, m))
    orth = np.zeros((n_tasks, m, n))
    for k in range(m):
        norm2 = float(w0[k] @ w0[k])
        for t in range(n_tasks):
            c[t, k] = float(taus[t][k] @ w0[k]) / norm2 if norm2 > 0 else 0.0
            orth[t, k] = taus[t][k] - c[t, k] * w0[k]
    delta = np.zeros((m, n))
    c_fallback = sign_or_plus(float(c.sum()))
    for k in range(m):
        cbar = ref_ties(c[:, k], c_fallback)
        direction = w0[k]
        if official:
            nrm = math.sqrt(float(w0[k] @ w0[k]))
            direction = w0[k] / nrm if nrm > 0 else np.zeros(n)
        delta[k] += lambda1 * cbar * direction
    if orth_mode == "svd":
        for k in range(m):
            delta[k] += lambda2 * ref_orth_row(orth[:, k, :], rho, flips)
    else:
        o_fallback = sign_or_plus(float(orth.sum()))
        for k in range(m):
            for j in range(n):
                delta[k, j] += lambda2 * ref_ties(orth[:, k, j], o_fallback)
    return delta


def random_problem(seed: int, n_tasks: int, shape: tuple[int, ...]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.normal(size=shape))
    taus = [torch.from_numpy(rng.normal(size=shape)) for _ in range(n_tasks)]
    return base, taus


# --------------------------------------------------------------------------------------------
# Steps 1-2: split each neuron into parallel and orthogonal parts.
# --------------------------------------------------------------------------------------------


def test_split_neurons_coefficients_and_orthogonal_parts_by_hand() -> None:
    w0 = t64([[1, 0], [1, 1], [0, 0]])
    tv = t64([[[2, 3], [1, 3], [5, -1]],      # task 1
              [[-1, 0], [2, 0], [0, 0]]])     # task 2
    c, orth = split_neurons(w0, tv)
    # row 0: |w0|^2 = 1: c1 = <(2,3),(1,0)> = 2, c2 = -1; orth1 = (0,3), orth2 = (0,0)
    # row 1: |w0|^2 = 2: c1 = (1+3)/2 = 2, orth1 = (1,3)-(2,2) = (-1,1)
    #                     c2 = (2+0)/2 = 1, orth2 = (2,0)-(1,1) = (1,-1)
    # row 2: w0 = 0 -> c = 0 (no NaN), orth = tau itself
    assert_close(c, t64([[2, 2, 0], [-1, 1, 0]]), **TIGHT)
    assert_close(orth, t64([[[0, 3], [-1, 1], [5, -1]],
                            [[0, 0], [1, -1], [0, 0]]]), **TIGHT)
    assert_close(neuron_coefficients(w0, tv), c, **TIGHT)
    # by construction <orth, w0> = 0 for every row and task
    assert_close(torch.einsum("tmn,mn->tm", orth, w0), torch.zeros(2, 3, dtype=F64), **TIGHT)
    assert not torch.isnan(c).any() and not torch.isnan(orth).any()


def test_zero_norm_pretrained_row_gives_no_nan_in_merge() -> None:
    base = t64([[1, 0], [0, 0]])
    taus = [t64([[2, 3], [5, -1]]), t64([[-1, 0], [0, 0]])]
    got = direct(base, taus, lambda1=2.0, lambda2=0.5)
    # row 0: c = (2, -1), sum 1 -> +, cbar = 2, P = (2,0); orth = (0,3), (0,0) -> O = (0,3)
    #        delta = 2*(2,0) + 0.5*(0,3) = (4, 1.5)
    # row 1: w0 = 0 -> c = (0, 0), P = 0; orth = (5,-1), (0,0) -> O = (5,-1), 0.5*O
    assert torch.isfinite(got).all()
    assert_close(got, t64([[5, 1.5], [2.5, -0.5]]), **F64_TOL)


# --------------------------------------------------------------------------------------------
# Step 3: parallel parts (TIES on the scalars c per row).
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["one_block", "row_blocks"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once as-is and once with the per-neuron work split into one-row blocks: the
    tensor-wide tie-breaks must not depend on how rows are batched."""
    if request.param == "row_blocks":
        monkeypatch.setattr(nm_module, "BLOCK_BYTES", 1)
    return request.param


def parallel_taus(w0: torch.Tensor, cs: list[list[float]]) -> list[torch.Tensor]:
    """Task vectors c_t^k * w0^k (purely parallel: orthogonal parts exactly 0)."""
    return [t64(col).unsqueeze(-1) * w0 for col in cs]


def test_parallel_merge_elect_disjoint_mean_and_negative_tensor_fallback(blocks: str) -> None:
    w0 = t64([[1, 2], [2, -1], [1, 1]])
    # c per row (tasks 1..3): row0 (2,-1,4), row1 (1,-1,0), row2 (-3,-6,1)
    taus = parallel_taus(w0, [[2, 1, -3], [-1, -1, -6], [4, 0, 1]])
    got = direct(w0, taus, lambda1=0.5, lambda2=1.0)
    # row0: sum 5 -> +, mean(2,4) = 3           -> 0.5*3*(1,2)     = (1.5, 3)
    # row2: sum -8 -> -, mean(-3,-6) = -4.5     -> 0.5*-4.5*(1,1)  = (-2.25, -2.25)
    # row1: sum 0 -> sign of all c = 5+0-8 < 0 -> -, mean(-1) = -1 -> 0.5*-1*(2,-1) = (-1, 0.5)
    want = w0 + t64([[1.5, 3], [-1, 0.5], [-2.25, -2.25]])
    assert_close(got, want, **F64_TOL)


def test_parallel_merge_zero_tensor_sum_falls_back_to_plus(blocks: str) -> None:
    w0 = t64([[1, 2], [2, -1], [1, 1], [0.5, 0.5]])
    # c rows: (2,-1,4) sum 5; (1,-1,0) sum 0; (-5,0,0) sum -5; (0,0,0) -> all c sum to 0
    taus = parallel_taus(w0, [[2, 1, -5, 0], [-1, -1, 0, 0], [4, 0, 0, 0]])
    got = direct(w0, taus, lambda1=1.0, lambda2=1.0)
    # row0: 3*(1,2); row1: fallback + -> mean(1) = 1 -> (2,-1); row2: -5*(1,1); row3: none -> 0
    want = w0 + t64([[3, 6], [2, -1], [-5, -5], [0, 0]])
    assert_close(got, want, **F64_TOL)


def test_lambda1_zero_drops_purely_parallel_updates() -> None:
    w0 = t64([[1, 2], [2, -1]])
    taus = parallel_taus(w0, [[2, -1], [3, 0.5]])
    assert_close(direct(w0, taus, lambda1=0.0, lambda2=1.7), w0, **TIGHT)


def test_compat_official_unit_vector_parallel_and_point_scale() -> None:
    base = t64([[3, 4], [0, 2]])
    # row0: tau1 = 1*(3,4) + (4,-3) = (7,1), tau2 = 3*(3,4) = (9,12); c = (1,3), cbar = 2,
    #       O = (4,-3) (only task 1 has an orthogonal part)
    # row1: tau1 = tau2 = -1*(0,2); cbar = -1, O = 0
    taus = [t64([[7, 1], [0, -2]]), t64([[9, 12], [0, -2]])]
    spec = direct(base, taus, lambda1=1.0, lambda2=3.0)
    # spec: P = cbar * w0: row0 2*(3,4) + 3*(4,-3) = (18,-1); row1 -1*(0,2) = (0,-2)
    assert_close(spec, base + t64([[18, -1], [0, -2]]), **F64_TOL)
    official = direct(base, taus, lambda1=1.0, lambda2=3.0, compat="official")
    # official: P = cbar * w0/|w0|: row0 2*(0.6,0.8) + (12,-9) = (13.2,-7.4); row1 (0,-1)
    assert_close(official, base + t64([[13.2, -7.4], [0, -1]]), **F64_TOL)

    bias = t64([1, 2])
    btaus = [t64([1, 0]), t64([2, -1])]  # TIES: e0 sum 3 -> mean(1,2) = 1.5; e1 -> -1
    got_spec = direct(bias, btaus, lambda1=1.0, lambda2=3.0, lambda_point=10.0)
    assert_close(got_spec, bias + 10 * t64([1.5, -1]), **F64_TOL)
    got_off = direct(bias, btaus, lambda1=1.0, lambda2=3.0, lambda_point=10.0,
                     compat="official")
    # official: scaled by (lambda1 + lambda2)/2 = 2, lambda_point ignored
    assert_close(got_off, bias + 2 * t64([1.5, -1]), **F64_TOL)


@pytest.mark.parametrize("n_tasks", [2, 3, 5])
def test_compat_official_matches_reference_on_random_data(n_tasks: int) -> None:
    base, taus = random_problem(11 + n_tasks, n_tasks, (4, 3))
    got = direct(base, taus, lambda1=0.8, lambda2=1.1, compat="official")
    want = ref_neuronal(base.numpy(), [t.numpy() for t in taus], lambda1=0.8, lambda2=1.1,
                        official=True)
    assert_close(got - base, torch.from_numpy(want), rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Step 4: orthogonal parts, TIES in each neuron's SVD frame.
# --------------------------------------------------------------------------------------------


def test_orthogonal_svd_single_direction_by_hand() -> None:
    # one neuron, 3 tasks, all orthogonal parts on the line (0,1): v = +-(0,1),
    # A = +-(3,-1,2): elected sign = sign(+-4), mean of (3,2) -> O = 2.5*(0,1), whatever sign v has
    orth = t64([[[0, 3]], [[0, -1]], [[0, 2]]])
    assert_close(merge_orthogonal_svd(orth), t64([[0, 2.5]]), **F64_TOL)
    assert_close(merge_orthogonal_svd(-orth), t64([[0, -2.5]]), **F64_TOL)


def test_orthogonal_svd_zero_task_row_does_not_dilute_mean() -> None:
    # A = (4, 0, 2): the zero coordinate is not "agreeing": mean(4, 2) = 3, not (4+0+2)/3 = 2
    orth = t64([[[0, 4]], [[0, 0]], [[0, 2]]])
    assert_close(merge_orthogonal_svd(orth), t64([[0, 3]]), **F64_TOL)


def test_orthogonal_svd_purely_parallel_task_does_not_dilute_mean() -> None:
    # u = (0.3, 0, -0.1) is orthogonal to w0 = (0.1, 0.2, 0.3) (0.03 - 0.03 = 0).
    # tau1 = 0.5 w0 + 3u, tau2 = 0.7 w0 (orthogonal part exactly 0), tau3 = -0.2 w0 + u.
    # O = mean(3, 1) u = 2u = (0.6, 0, -0.2); lambda1 = 0.
    w0 = t64([[0.1, 0.2, 0.3]])
    u = t64([[0.3, 0.0, -0.1]])
    taus = [0.5 * w0 + 3 * u, 0.7 * w0, -0.2 * w0 + u]
    got = direct(w0, taus, lambda1=0.0, lambda2=1.0)
    assert_close(got, w0 + t64([[0.6, 0.0, -0.2]]), **F64_TOL)


def test_orthogonal_svd_rotated_frame_by_hand() -> None:
    # M = U S V^T with U = [[.6,.8],[.8,-.6]], S = (10, 5), v1 = (0,.6,.8), v2 = (0,.8,-.6):
    # rows 6 v1 + 4 v2 = (0, 6.8, 2.4) and 8 v1 - 3 v2 = (0, 2.4, 8.2)
    # (check: M M^T = [[52,36],[36,73]] = U diag(100,25) U^T).
    # A = U S = [[6,4],[8,-3]]: dir1 mean(6,8) = 7; dir2 sum 1 -> +, mean(4) = 4
    # O = 7 v1 + 4 v2 = (0, 7.4, 3.2)  (element-wise TIES would give (0, 4.6, 5.3))
    orth = t64([[[0, 6.8, 2.4]], [[0, 2.4, 8.2]]])
    assert_close(merge_orthogonal_svd(orth), t64([[0, 7.4, 3.2]]), **F64_TOL)
    # the same through the method: w0 = (1,0,0), c = (2, -1), lambda1 = 0
    w0 = t64([[1, 0, 0]])
    got = direct(w0, [t64([[2, 6.8, 2.4]]), t64([[-1, 2.4, 8.2]])], lambda1=0.0, lambda2=2.0)
    assert_close(got, w0 + 2 * t64([[0, 7.4, 3.2]]), **F64_TOL)


@pytest.mark.parametrize(("rho", "want"), [
    (0.5, [0, 3, 0]),    # share after 1 direction: 9/10 >= 0.5 -> 1 direction
    (0.8, [0, 3, 0]),
    (0.9, [0, 3, 0]),    # 9/10 reaches 0.9 exactly -> still 1 direction
    (0.95, [0, 3, 1]),   # 0.9 < 0.95 -> both directions
    (1.0, [0, 3, 1]),
])
def test_orthogonal_svd_rank_threshold_by_hand(rho: float, want: list[float]) -> None:
    # M rows (0,3,0), (0,0,1): S = (3, 1), S^2 shares 0.9, 1.0; A = diag(3, 1)
    orth = t64([[[0, 3, 0]], [[0, 0, 1]]])
    assert_close(merge_orthogonal_svd(orth, rank_threshold=rho), t64([want]), **F64_TOL)


@pytest.mark.parametrize(("n_tasks", "n_cols", "rho"), [
    (2, 4, 1.0), (3, 4, 1.0), (4, 3, 1.0), (6, 3, 1.0), (5, 2, 1.0), (3, 4, 0.6),
    (6, 3, 0.7), (4, 4, 0.95),
])
def test_orthogonal_svd_matches_numpy_reference(n_tasks: int, n_cols: int, rho: float) -> None:
    rng = np.random.default_rng(100 * n_tasks + n_cols)
    m = 5
    orth = rng.normal(size=(n_tasks, m, n_cols)) * rng.uniform(0.2, 3.0, size=(n_tasks, m, 1))
    orth[1, 2] = 0.0  # task 1's row 2 exactly zero: must not dilute
    orth[0, 4] = 0.0
    got = merge_orthogonal_svd(torch.from_numpy(orth), rank_threshold=rho)
    want = np.stack([ref_orth_row(orth[:, k, :], rho) for k in range(m)])
    assert_close(got, torch.from_numpy(want), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orthogonal_svd_does_not_depend_on_singular_vector_signs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    orth = rng.normal(size=(4, 3, 5))
    got = merge_orthogonal_svd(torch.from_numpy(orth))
    for _ in range(3):
        flips = rng.choice([-1.0, 1.0], size=5)
        want = np.stack([ref_orth_row(orth[:, k, :], 1.0, flips) for k in range(3)])
        assert_close(got, torch.from_numpy(want), rtol=1e-7, atol=1e-8)
    # negating every orthogonal part flips every frame and every elected sign
    assert_close(merge_orthogonal_svd(-torch.from_numpy(orth)), -got, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize(("n_tasks", "n_cols", "rho"), [(3, 4, 1.0), (5, 3, 1.0), (4, 4, 0.6)])
def test_merged_update_is_orthogonal_to_pretrained_rows_when_lambda1_zero(
        n_tasks: int, n_cols: int, rho: float) -> None:
    base, taus = random_problem(7 * n_tasks + n_cols, n_tasks, (6, n_cols))
    got = direct(base, taus, lambda1=0.0, lambda2=1.4, rank_threshold=rho)
    delta = got - base
    assert delta.abs().max() > 0.1  # something was merged
    dots = (delta * base).sum(-1) / (delta.norm(dim=-1) * base.norm(dim=-1))
    assert_close(dots, torch.zeros(6, dtype=F64), rtol=0.0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Full neuronal merge against the reference.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_tasks", "n_cols", "lambda1", "rho"), [
    (2, 3, 0.7, 1.0), (3, 4, -0.4, 1.0), (5, 3, 1.3, 1.0), (4, 2, 0.9, 1.0), (4, 4, 0.5, 0.8),
])
def test_neuronal_merge_matches_reference(n_tasks: int, n_cols: int, lambda1: float,
                                          rho: float) -> None:
    base, taus = random_problem(n_tasks * 13 + n_cols, n_tasks, (5, n_cols))
    base[3] = 0.0  # a zero-norm pretrained row
    got = direct(base, taus, lambda1=lambda1, lambda2=1.3, rank_threshold=rho)
    want = ref_neuronal(base.numpy(), [t.numpy() for t in taus], lambda1=lambda1, lambda2=1.3,
                        rho=rho)
    assert torch.isfinite(got).all()
    assert_close(got - base, torch.from_numpy(want), rtol=1e-7, atol=1e-8)


def test_neuronal_merge_with_ctx_thresholds_matches_reference() -> None:
    base, taus = random_problem(5, 3, (4, 4))
    hs = (0.5, 0.8, 0.3)
    got = neuromerging(base, [base + t for t in taus], lambda1=0.6, lambda2=1.2,
                       ctx=TensorContext(thresholds=hs))
    trimmed = [np.where(np.abs(t.numpy()) >= h, t.numpy(), 0.0) for t, h in zip(taus, hs,
                                                                                strict=True)]
    want = ref_neuronal(base.numpy(), trimmed, lambda1=0.6, lambda2=1.2)
    assert_close(got - base, torch.from_numpy(want), rtol=1e-7, atol=1e-8)


def test_order_of_experts_does_not_matter() -> None:
    base, taus = random_problem(3, 4, (5, 3))
    a = direct(base, taus, lambda1=0.5, lambda2=1.1)
    b = direct(base, taus[::-1], lambda1=0.5, lambda2=1.1)
    c = direct(base, [taus[2], taus[0], taus[3], taus[1]], lambda1=0.5, lambda2=1.1)
    assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert_close(a, c, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------------------------
# orthogonal_merge: ties (element-wise ablation).
# --------------------------------------------------------------------------------------------


def test_orthogonal_ties_ablation_by_hand(blocks: str) -> None:
    base = t64([[1, 0, 0], [0, 0, 1]])
    # row0: w0 = (1,0,0): c = (2,-1); orth1 = (0,6.8,2.4), orth2 = (0,2.4,8.2)
    #       element-wise: (0, mean(6.8,2.4), mean(2.4,8.2)) = (0, 4.6, 5.3)
    # row1: w0 = (0,0,1): c = (5,3); orth1 = (1,-1,0), orth2 = (-1,1,0): every sum is 0 ->
    #       sign of the whole orthogonal tensor's sum = 6.8+2.4+2.4+8.2 = 19.8 > 0 -> +
    #       -> (1, 1, 0)
    taus = [t64([[2, 6.8, 2.4], [1, -1, 5]]), t64([[-1, 2.4, 8.2], [-1, 1, 3]])]
    got = direct(base, taus, lambda1=0.0, lambda2=2.0, orthogonal_merge="ties")
    assert_close(got, base + 2 * t64([[0, 4.6, 5.3], [1, 1, 0]]), **F64_TOL)
    # negate row0's orthogonal parts: whole sum -19.8 -> row1 elects - -> (-1, -1, 0)
    taus = [t64([[2, -6.8, -2.4], [1, -1, 5]]), t64([[-1, -2.4, -8.2], [-1, 1, 3]])]
    got = direct(base, taus, lambda1=0.0, lambda2=2.0, orthogonal_merge="ties")
    assert_close(got, base + 2 * t64([[0, -4.6, -5.3], [-1, -1, 0]]), **F64_TOL)
    # row1 alone: the whole sum is 0 too -> +
    got = direct(base[1:], [t[1:] for t in taus], lambda1=0.0, lambda2=1.0,
                 orthogonal_merge="ties")
    assert_close(got, base[1:] + t64([[1, 1, 0]]), **F64_TOL)


@pytest.mark.parametrize("n_tasks", [2, 4])
def test_orthogonal_ties_ablation_matches_reference(n_tasks: int) -> None:
    base, taus = random_problem(40 + n_tasks, n_tasks, (4, 3))
    got = direct(base, taus, lambda1=0.3, lambda2=0.9, orthogonal_merge="ties")
    want = ref_neuronal(base.numpy(), [t.numpy() for t in taus], lambda1=0.3, lambda2=0.9,
                        orth_mode="ties")
    assert_close(got - base, torch.from_numpy(want), rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Point tensors (1-D, 0-D) and conv weights.
# --------------------------------------------------------------------------------------------


def test_point_tensor_1d_trimmed_ties_times_lambda_point() -> None:
    base = t64([1, 1, 1, 1])
    taus = [t64([4, -2, 0.5, -5]), t64([-3, 2, 0.25, -1])]
    got = direct(base, taus, density=0.75, lambda1=5.0, lambda2=3.0, lambda_point=0.5)
    # density 0.75 of 4 -> k = 3: tau1 keeps |.| >= 2 -> (4,-2,0,-5); tau2 >= 1 -> (-3,2,0,-1)
    # e0: sum 1 -> +, 4; e1: sum 0 -> sign of tensor sum (-3) + (-2) < 0 -> -, -2;
    # e2: nothing kept -> 0; e3: sum -6 -> mean(-5,-1) = -3. Times lambda_point 0.5.
    assert_close(got, base + 0.5 * t64([4, -2, 0, -3]), **F64_TOL)


def test_point_tensor_0d() -> None:
    base = t64(2.0)
    taus = [t64(1.0), t64(-0.5), t64(-2.0)]
    got = direct(base, taus, density=0.5, lambda2=1.0, lambda_point=2.0)
    # k = ceil(0.5*1) = 1 keeps the single entry; sum -1.5 -> -, mean(-0.5,-2) = -1.25
    assert got.shape == ()
    assert_close(got, t64(2.0 - 2.5), **F64_TOL)


def test_lambda_point_defaults_to_lambda2_in_engine() -> None:
    base = {"b": t32([1, 1, 1, 1])}
    experts = [{"b": base["b"] + t32([4, -2, 0.5, -5])}, {"b": base["b"] + t32([-3, 2, 0.25, -1])}]
    res = neuromerge.merge_state_dicts(base, experts, "neuromerging",
                                       {"density": 1.0, "lambda2": 3.0})
    # untrimmed TIES: e0 4; e1 sum 0 -> tensor sum -4.25 -> -2; e2 mean(.5,.25); e3 -3
    assert res.params["lambda_point"] == 3.0
    assert_close(res.state_dict["b"], t32([1 + 12, 1 - 6, 1 + 1.125, 1 - 9]), **F32_TOL)


def test_lambda_point_defaults_to_lambda2_with_ctx() -> None:
    base = t64([1, 1, 1, 1])
    taus = [t64([4, -2, 0.5, -5]), t64([-3, 2, 0.25, -1])]
    got = direct(base, taus, lambda2=3.0)
    assert_close(got, t64([13, -5, 2.125, -8]), **F64_TOL)


def test_conv_weight_is_out_by_in_kh_kw_by_hand() -> None:
    # shape (out=2, in=1, kh=2, kw=2): neurons are the 2 rows of 4
    base = t64([[[[1, 1], [1, 1]]], [[[0, 0], [0, 2]]]])
    tau = t64([[[[2, 0], [0, 0]]], [[[0, 0], [1, 0]]]])
    got = direct(base, [tau], lambda1=2.0, lambda2=0.5)
    # row0: w0 = (1,1,1,1), tau = (2,0,0,0): c = 2/4 = 0.5, orth = (1.5,-.5,-.5,-.5)
    #       delta = 2*0.5*(1,1,1,1) + 0.5*orth = (1.75, 0.75, 0.75, 0.75)
    #       (per kernel row (1,1): c = 1, orth (1,-1) would give (2.5, 1.5 | 0, 0) instead)
    # row1: w0 = (0,0,0,2), tau = (0,0,1,0): c = 0, orth = tau -> delta = (0,0,0.5,0)
    want = base + t64([[[[1.75, 0.75], [0.75, 0.75]]], [[[0, 0], [0.5, 0]]]])
    assert got.shape == base.shape
    assert_close(got, want, **F64_TOL)


def test_conv_weight_matches_reference() -> None:
    base, taus = random_problem(9, 3, (3, 2, 2, 2))
    got = direct(base, taus, lambda1=0.7, lambda2=1.2)
    want = ref_neuronal(base.reshape(3, 8).numpy(), [t.reshape(3, 8).numpy() for t in taus],
                        lambda1=0.7, lambda2=1.2)
    assert_close((got - base).reshape(3, 8), torch.from_numpy(want), rtol=1e-7, atol=1e-8)


def test_tensor_class_override_and_ctx_kind() -> None:
    base = {"w": t32([[1, 0], [0, 1]]), "b": t32([0, 0])}
    taus = [({"w": [[0, 3], [-1, 0.5]], "b": [2, -0.5]}),
            ({"w": [[2, 0], [1.5, -2]], "b": [-2, 2]})]
    experts = [{k: base[k] + t32(v) for k, v in tau.items()} for tau in taus]
    res = neuromerge.merge_state_dicts(base, experts, "neuromerging",
                                       {"density": 1.0, "lambda2": 1.0},
                                       tensor_class={"w": "point", "b": "copy"})
    # w as a point tensor, element-wise TIES: e00 (0,2) -> 2; e01 (3,0) -> 3;
    # e10 (-1,1.5) sum .5 -> +, 1.5; e11 (.5,-2) sum -1.5 -> -, -2.  b is copied from the base.
    assert_close(res.state_dict["w"], t32([[1 + 2, 3], [1.5, 1 - 2]]), **F32_TOL)
    assert torch.equal(res.state_dict["b"], base["b"])
    got = neuromerging(base["w"].double(), [e["w"].double() for e in experts], density=1.0,
                       lambda2=1.0, lambda_point=1.0, ctx=TensorContext(kind="point"))
    assert_close(got, t64([[3, 3], [1.5, -1]]), **F64_TOL)


# --------------------------------------------------------------------------------------------
# Whole model: global trim, lambda2 = auto, non-float tensors.
# --------------------------------------------------------------------------------------------


def global_example() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = {"w": t32([[1, 0], [0, 1]]), "b": t32([0, 0]),
            "ids": torch.tensor([0, 1, 2], dtype=torch.int64)}
    taus = [{"w": [[0, 3], [-1, 0.5]], "b": [2, -0.5]},
            {"w": [[2, 0], [1.5, -2]], "b": [-2, 2]},
            {"w": [[0, 0], [0, 0]], "b": [0, 0]}]
    experts = []
    for i, tau in enumerate(taus):
        sd = {k: base[k] + t32(v) for k, v in tau.items()}
        sd["ids"] = torch.tensor([5 + i, 6, 7], dtype=torch.int64)
        experts.append(sd)
    return base, experts


def test_lambda2_auto_global_trim_by_hand(caplog: pytest.LogCaptureFixture) -> None:
    base, experts = global_example()
    caplog.set_level(logging.INFO, logger="neuromerge")
    res = neuromerge.merge_state_dicts(base, experts, "neuromerging", {"density": 0.5})
    # N = 4 + 2 = 6 merged float entries (the int64 "ids" does not take part), k = ceil(3) = 3.
    # task 1 |tau|: 0,3,1,.5 | 2,.5 -> sorted 3,2,1,.5,.5,0 -> h = 1; kept 3+1+2 = 6 of 7
    #   sigma1 = 1/7
    # task 2 |tau|: 2,0,1.5,2 | 2,2 -> sorted 2,2,2,2,1.5,0 -> h = 2; the 4 ties are all kept:
    #   kept 8 of 9.5 -> sigma2 = 1.5/9.5 = 3/19  (keeping only 3 would give 7/19)
    # task 3: all zero -> sigma3 = 0
    # lambda2 = 1/(1 - 3/19) = 19/16 = 1.1875
    st = res.trim
    assert st is not None
    assert st.n_entries == 6 and st.k == 3
    assert st.thresholds == pytest.approx((1.0, 2.0, 0.0), abs=0)
    assert st.sigma == pytest.approx((1 / 7, 3 / 19, 0.0), rel=1e-12, abs=1e-15)
    assert res.params["lambda2"] == pytest.approx(19 / 16, rel=1e-12)
    assert res.params["lambda_point"] == pytest.approx(19 / 16, rel=1e-12)
    assert res.params["lambda1"] == 0.0
    assert "lambda2 resolved to 1.1875" in caplog.text
    # trimmed: tau1 w = [[0,3],[-1,0]], b = (2,0); tau2 w = [[2,0],[0,-2]], b = (-2,2); tau3 = 0
    # w row0 (w0 = (1,0)): orth (0,3), 0, 0 -> O = (0,3)
    # w row1 (w0 = (0,1)): tau1 (-1,0) orth (-1,0); tau2 (0,-2) is parallel -> O = (-1,0)
    # w = base + 19/16 * O ; lambda1 = 0
    assert_close(res.state_dict["w"], t32([[1, 3 * 19 / 16], [-19 / 16, 1]]), **F32_TOL)
    # b: e0 (2,-2,0) sum 0 -> tensor sum 2 > 0 -> +, 2; e1 (0,2,0) -> 2; times 19/16
    assert_close(res.state_dict["b"], t32([2 * 19 / 16, 2 * 19 / 16]), **F32_TOL)
    assert torch.equal(res.state_dict["ids"], base["ids"])
    # density 0.4: k = ceil(0.4 * 6) = ceil(2.4) = 3 as well (not floor = 2)
    res4 = neuromerge.merge_state_dicts(base, experts, "neuromerging", {"density": 0.4})
    assert res4.trim is not None and res4.trim.k == 3
    assert res4.trim.thresholds == pytest.approx((1.0, 2.0, 0.0), abs=0)
    assert res4.params["lambda2"] == pytest.approx(19 / 16, rel=1e-12)
    assert_close(res4.state_dict["w"], res.state_dict["w"], **F32_TOL)


def test_lambda2_auto_tensor_scope_sigma_is_model_wide() -> None:
    base = {"w": t32([[1, 0], [0, 1]]), "b": t32([0, 0])}
    taus = [{"w": [[4, 3], [2, 0]], "b": [1, 0.5]}, {"w": [[0, 0], [0, 1]], "b": [0, 0]}]
    experts = [{k: base[k] + t32(v) for k, v in tau.items()} for tau in taus]
    res = neuromerge.merge_state_dicts(base, experts, "neuromerging",
                                       {"density": 0.5, "trim_scope": "tensor"})
    # task 1, per tensor: w k=2 keeps 4,3 (removes 2); b k=1 keeps 1 (removes .5)
    #   model-wide sigma1 = (2 + .5)/10.5 = 5/21   (per-tensor max would be 1/3)
    # task 2: w keeps all (2nd largest is 0), b all zero -> sigma2 = 0
    # lambda2 = 1/(1 - 5/21) = 21/16 = 1.3125
    assert res.trim is not None and res.trim.thresholds is None
    assert res.trim.sigma == pytest.approx((5 / 21, 0.0), rel=1e-12, abs=1e-15)
    assert res.params["lambda2"] == pytest.approx(21 / 16, rel=1e-12)
    # w row0: tau1 (4,3): c = 4, orth (0,3); row1: tau2 (0,1) parallel -> O = [[0,3],[0,0]]
    assert_close(res.state_dict["w"], t32([[1, 3 * 21 / 16], [0, 1]]), **F32_TOL)
    # b: trimmed tau1 (1,0), tau2 0 -> (1, 0) * 21/16
    assert_close(res.state_dict["b"], t32([21 / 16, 0]), **F32_TOL)
    # the global scope on the same model: k = 3 of 6, task 1 keeps 4,3,2 -> sigma1 = 1.5/10.5
    glob = neuromerge.merge_state_dicts(base, experts, "neuromerging", {"density": 0.5})
    assert glob.params["lambda2"] == pytest.approx(7 / 6, rel=1e-12)


def test_density_one_keeps_everything() -> None:
    base, experts = global_example()
    res = neuromerge.merge_state_dicts(base, experts, "neuromerging", {"density": 1.0})
    assert res.trim is not None
    assert res.trim.sigma == (0.0, 0.0, 0.0)
    assert res.params["lambda2"] == 1.0
    # untrimmed w row0: orth (0,3) -> O (0,3); row1 (w0 = (0,1)): tau1 (-1,.5) orth (-1,0),
    #   tau2 (1.5,-2) orth (1.5,0): one direction, A = +-(-1, 1.5, 0) -> sum +-.5 -> 1.5
    # b: e0 (2,-2) sum 0 -> tensor sum 1.5 > 0 -> 2; e1 (-.5, 2) -> 2
    assert_close(res.state_dict["w"], t32([[1, 3], [1.5, 1]]), **F32_TOL)
    assert_close(res.state_dict["b"], t32([2, 2]), **F32_TOL)


def test_single_expert_with_purely_orthogonal_update_comes_back_exactly() -> None:
    rng = np.random.default_rng(21)
    base = torch.from_numpy(rng.normal(size=(4, 3)))
    raw = torch.from_numpy(rng.normal(size=(4, 3)))
    # remove the parallel component with an explicit per-row projection
    tau = torch.stack([raw[k] - (raw[k] @ base[k]) / (base[k] @ base[k]) * base[k]
                       for k in range(4)])
    expert = base + tau
    got = neuromerging(base, [expert], density=1.0, lambda1=0.0, lambda2=1.0,
                       ctx=TensorContext())
    assert_close(got, expert, **TIGHT)
    # the same through the engine (float32 compute): lambda2 = auto = 1 since density = 1
    res = neuromerge.merge_state_dicts({"w": base.float()}, [{"w": expert.float()}],
                                       "neuromerging", {"density": 1.0, "lambda1": 0.0})
    assert res.params["lambda2"] == 1.0
    assert_close(res.state_dict["w"], expert.float(), **F32_TOL)
    # with a parallel part too, lambda1 = lambda2 = 1 gives the single expert back
    expert2 = base + raw
    got2 = neuromerging(base, [expert2], density=1.0, lambda1=1.0, lambda2=1.0,
                        ctx=TensorContext())
    assert_close(got2, expert2, **TIGHT)


def test_identical_experts_give_base_back() -> None:
    base, _ = global_example()
    experts = [dict(base), dict(base)]
    res = neuromerge.merge_state_dicts(base, experts, "neuromerging", {"density": 0.2,
                                                                       "lambda1": 0.5})
    assert res.params["lambda2"] == 1.0
    assert res.trim is not None and res.trim.sigma == (0.0, 0.0)
    for k, v in base.items():
        assert torch.equal(res.state_dict[k], v), k


# --------------------------------------------------------------------------------------------
# The registered method called directly.
# --------------------------------------------------------------------------------------------

DIRECT_BASE = [[1.0, 0.0], [0.0, 2.0]]
DIRECT_TAUS = [[[1.0, 4.0], [0.25, -2.0]], [[-1.0, 0.5], [3.0, 0.0]]]


def direct_inputs() -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = t64(DIRECT_BASE)
    return base, [base + t64(t) for t in DIRECT_TAUS]


def test_direct_call_without_ctx_trims_this_tensor() -> None:
    base, experts = direct_inputs()
    # density 0.5 of 4 -> k = 2: tau1 |.| 1,4,.25,2 -> h = 2 -> [[0,4],[0,-2]]
    #                             tau2 |.| 1,.5,3,0 -> h = 1 -> [[-1,0],[3,0]]
    # row0 (w0 = (1,0)): c = (0,-1) -> cbar -1, P = (-1,0); orth (0,4), 0 -> O = (0,4)
    # row1 (w0 = (0,2)): c = (-4/4, 0) = (-1, 0) -> P = (0,-2); orth 0, (3,0) -> O = (3,0)
    got = neuromerging(base, experts, density=0.5, lambda2=1.5)
    assert_close(got, t64([[1, 6], [4.5, 2]]), **F32_TOL)  # lambda1 = 0 by default
    got = neuromerging(base, experts, density=0.5, lambda1=0.5, lambda2=1.5)
    assert_close(got, t64([[0.5, 6], [4.5, 1]]), **F32_TOL)
    # lambda2 auto over this tensor alone: ||tau1||_1 = 7.25, kept 6; ||tau2||_1 = 4.5, kept 4
    # -> lambda2 = max(7.25/6, 4.5/4) = 29/24
    got = neuromerging(base, experts, density=0.5)
    assert_close(got, t64([[1, 4 * 29 / 24], [3 * 29 / 24, 2]]), **F32_TOL)


def test_direct_call_with_ctx_thresholds() -> None:
    base, experts = direct_inputs()
    got = neuromerging(base, experts, density=0.5, lambda1=1.0, lambda2=2.0,
                       ctx=TensorContext(thresholds=(4.0, 0.5)))
    # thresholds override density: tau1 keeps |.| >= 4 -> [[0,4],[0,0]];
    # tau2 keeps >= 0.5 -> [[-1,.5],[3,0]]
    # row0: c = (0,-1) -> P = (-1,0); orth (0,4), (0,.5): one direction, A = (4,.5) -> 2.25
    # row1: c = (0,0) -> sum 0 -> sign of all c (-1) -> -, none -> 0; orth 0, (3,0) -> O = (3,0)
    # theta = base + P + 2 O = [[0, 4.5], [6, 2]]
    assert_close(got, t64([[0, 4.5], [6, 2]]), **F64_TOL)


def test_defaults_follow_the_spec() -> None:
    d = neuromerging.defaults
    assert d["density"] == 0.2
    assert d["trim_scope"] == "global"
    assert d["lambda1"] == 0.0
    assert d["lambda2"] == "auto"
    assert d["lambda_point"] is None
    assert d["rank_threshold"] == 1.0
    assert d["orthogonal_merge"] == "svd"
    assert d["compat"] == "spec"


def test_svd_zero_sum_direction_is_resolved_deterministically() -> None:
    # Two tasks with exactly opposite orthogonal parts: the coordinate sum on their one
    # direction is exactly 0, so "zero sum → +" depends on the direction's sign. The sign is
    # fixed (largest |u_tj| positive, first task on ties), so the result is the first task's
    # part whatever the eigensolver returns, and the same on every call.
    orth = torch.tensor([[[0.0, 3.0, 4.0]], [[0.0, -3.0, -4.0]]], dtype=torch.float64)
    out = merge_orthogonal_svd(orth)
    assert_close(out, orth[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(out, merge_orthogonal_svd(orth.clone()))
