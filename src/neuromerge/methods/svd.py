"""Per-layer SVD merges: TSV-M (task singular vectors, Gargiulo et al., CVPR 2025) and Iso-C /
Iso-CTS (isotropic merging, Marczak et al., arXiv 2502.04959).

Each neuronal tensor is one matrix (rows × the rest: a conv kernel (out, in, kh, kw) is
(out, in·kh·kw)); point tensors (1-D, 0-D) are averaged, as the reference implementations do
with every tensor that is not a 2-D matrix. A merged matrix depends on all of its rows, so these
methods merge whole tensors (not row-local).

Numerics: matrices of at most ``FLOAT64_MAX_ENTRIES`` entries are decomposed in float64, larger
ones in float32 (the compute dtype's float64 is kept). A singular direction whose value is below
the matrix's numerical-rank tolerance s_max · max(m, n) · eps (the convention of
``torch.linalg.matrix_rank``) is treated as absent: its singular vectors are arbitrary (any basis
of the null space), and the reference code, which keeps them, then returns a result that depends
on the SVD routine. All-zero task vectors, rank-deficient sums and T > min(m, n) thus give
finite, reproducible results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

import torch
from pydantic import Field

from neuromerge.kernels import floor_count, task_vectors
from neuromerge.params import Alpha
from neuromerge.registry import TensorContext, merge_method

#: Matrices up to this many entries are decomposed in float64, larger ones in float32.
FLOAT64_MAX_ENTRIES = 1 << 16

_TSV_REFERENCE = "https://arxiv.org/abs/2412.00081"
_ISO_REFERENCE = "https://arxiv.org/abs/2502.04959"


def _task_matrices(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """τt as matrices (T, m, n), in float64 for small matrices and for a float64 compute dtype."""
    rows = base.shape[0]
    cols = base.numel() // rows if rows else 0
    small = rows * cols <= FLOAT64_MAX_ENTRIES
    dtype = torch.float64 if (small or base.dtype == torch.float64) else torch.float32
    return task_vectors(base, tensors, dtype).reshape(len(tensors), rows, cols)


def svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Thin SVD ``mat = U diag(S) Vh`` (S descending) and the numerical rank: the number of
    singular values above s_max · max(m, n) · eps."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    if s.numel() == 0:
        return u, s, vh, 0
    tol = s[0] * max(mat.shape) * torch.finfo(s.dtype).eps
    return u, s, vh, int((s > tol).sum())


def polar(mat: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of ``mat``: U Vh over its numerically non-zero singular
    directions (the nearest matrix with orthonormal columns, or rows, when ``mat`` has full
    rank). The reference code orthogonalises by ``U @ Vh`` of the full SVD."""
    u, _, vh, rank = svd(mat)
    return u[:, :rank] @ vh[:rank]


def tsv_merge(tv: torch.Tensor) -> torch.Tensor:
    """TSV-M of task matrices ``tv`` (T, m, n): see :func:`tsv_m`."""
    t_count, m, n = tv.shape
    k = max(1, min(m, n) // t_count)
    us, ss, vs = [], [], []
    for t in range(t_count):
        u, s, vh, rank = svd(tv[t])
        j = min(k, rank)
        us.append(u[:, :j])
        ss.append(s[:j])
        vs.append(vh[:j])
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return torch.zeros((m, n), dtype=tv.dtype, device=tv.device)
    return polar(torch.cat(us, dim=1)) @ (s_cat.unsqueeze(1) * polar(torch.cat(vs, dim=0)))


def iso_c_merge(tv: torch.Tensor) -> torch.Tensor:
    """Iso-C of task matrices ``tv`` (T, m, n): see :func:`iso_c`."""
    u, s, vh, rank = svd(tv.sum(dim=0))
    if rank == 0:
        return torch.zeros(tv.shape[1:], dtype=tv.dtype, device=tv.device)
    return s.mean() * (u[:, :rank] @ vh[:rank])


def common_space_split(r: int, t_count: int, fraction: float) -> tuple[int, int]:
    """(k_c, k_t): the common-space size and each task's share, as the reference code sizes them
    so that the task-specific part divides evenly: k_c = ⌊r·f⌋, then T·k_t =
    round((r − k_c) / T) · T (Python's round) and k_c = r − T·k_t. T·k_t is kept ≤ r (the
    reference would index a negative k_c for f near 0)."""
    k_c = floor_count(fraction, r)
    specific = round((r - k_c) / t_count) * t_count
    while specific > r:
        specific -= t_count
    return r - specific, specific // t_count


def iso_cts_merge(tv: torch.Tensor, fraction: float) -> torch.Tensor:
    """Iso-CTS of task matrices ``tv`` (T, m, n): see :func:`iso_cts`."""
    t_count, m, n = tv.shape
    r = min(m, n)
    k_c, k_t = common_space_split(r, t_count, fraction)
    u, s, vh, rank = svd(tv.sum(dim=0))
    j_c = min(k_c, rank)
    u_c, vh_c = u[:, :j_c], vh[:j_c]
    s_total = s[:k_c].sum()
    us, vs = [], []
    if k_t > 0:
        for t in range(t_count):
            specific = tv[t] - u_c @ (u_c.T @ tv[t])
            u_t, s_t, vh_t, rank_t = svd(specific)
            s_total = s_total + s_t[:k_t].sum()
            j = min(k_t, rank_t)
            us.append(u_t[:, :j])
            vs.append(vh_t[:j])
    u_cat = torch.cat([*us, u_c], dim=1)
    if r == 0 or u_cat.shape[1] == 0:
        return torch.zeros((m, n), dtype=tv.dtype, device=tv.device)
    s_bar = s_total / r  # the mean of the r singular values the reference code stacks
    return s_bar * (polar(u_cat) @ polar(torch.cat([*vs, vh_c], dim=0)))


def _merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], ctx: TensorContext,
           alpha: float, matrix_rule: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if ctx.resolved_kind(base) == "point":
        return base + alpha * task_vectors(base, tensors, base.dtype).mean(dim=0)
    if base.numel() == 0:
        return base.clone()
    delta = matrix_rule(_task_matrices(base, tensors))
    return base + alpha * delta.reshape(base.shape).to(base.dtype)


@merge_method(name="tsv_m", reference_url=_TSV_REFERENCE, row_local=False, linear_in=("alpha",))
def tsv_m(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    alpha: Alpha = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Task Singular Vectors Merge: θ = θ0 + α · ⊥(U) diag(S) ⊥(V)ᵀ per matrix.

    Each task matrix τt = Ut St Vtᵀ keeps its k = max(1, ⌊r/T⌋) leading singular triplets
    (r = min(m, n)); U = [U1,k ... UT,k], S = [S1,k ... ST,k], Vᵀ = [V1,kᵀ; ...; VT,kᵀ] stack
    them, and ⊥(X) = P Qᵀ for X = P Σ Qᵀ (the nearest orthogonal matrix: whitening the
    interfering directions). Point tensors: θ0 + α · mean_t τt.

    As the reference (the authors' and FusionBench's `compute_and_sum_svd_mem_reduction`), every
    2-D tensor, embeddings included, takes the SVD rule; exclude one with `tensor_class`
    (`point` averages it). Differences: k = ⌊r/T⌋ exactly (the reference's int(r · (1/T)) is
    one less when T divides r and 1/T is not a binary fraction, e.g. r = 768, T = 3) and at least
    1 when T > r (there the reference keeps no direction and leaves the tensor at θ0); ≥3-D
    tensors are reshaped to (rows, rest) instead of averaged; numerically null directions are
    dropped (module notes). Default α = 1: the paper's and FusionBench's value."""
    return _merge(base, tensors, ctx, alpha, tsv_merge)


@merge_method(name="iso_c", reference_url=_ISO_REFERENCE, row_local=False, linear_in=("alpha",))
def iso_c(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    alpha: Alpha = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Isotropic merging in the common subspace: θ = θ0 + α · σ̄ U Vᵀ per matrix.

    U diag(σ) Vᵀ is the SVD of the task-arithmetic sum Σt τt and σ̄ = mean(σ) over its r =
    min(m, n) singular values: the spectrum is flattened so that no direction dominates. Point
    tensors: θ0 + α · mean_t τt.

    As FusionBench's `iso_c` (the sum; the TSV repository's copy takes the mean, i.e. σ̄/T),
    every 2-D tensor takes the rule; σ̄ is given only to the numerically non-zero directions (the
    reference would also give it to arbitrary null-space directions of a rank-deficient sum).
    Default α = 1, FusionBench's default; the paper picks α on validation data."""
    return _merge(base, tensors, ctx, alpha, iso_c_merge)


@merge_method(name="iso_cts", reference_url=_ISO_REFERENCE, row_local=False,
              linear_in=("alpha",))
def iso_cts(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    alpha: Alpha = 1.0,
    common_space_fraction: Annotated[float, Field(
        ge=0, le=1, description="share f of the r = min(m, n) directions taken from the common "
                                "subspace of the summed task vectors; the rest is split evenly "
                                "among the tasks' own subspaces")] = 0.8,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Isotropic merging in common and task-specific subspaces: θ = θ0 + α · σ̄ ⊥(U) ⊥(V)ᵀ.

    The SVD of Σt τt gives the k_c leading common directions Uc, Vc (k_c ≈ f · r); each task adds
    the k_t leading singular directions of its part outside the common space, τt − Uc Ucᵀ τt,
    with T · k_t = r − k_c. U and V stack the task blocks and the common block, ⊥ orthogonalises
    them (polar factor) and σ̄ is the mean of the r stacked singular values. Point tensors:
    θ0 + α · mean_t τt.

    As FusionBench's `iso_cts` (adapted from the authors' code): k_c = ⌊r·f⌋, then
    T · k_t = round((r − k_c)/T) · T and k_c = r − T · k_t. Numerically null directions are left
    out of U, V and the projection (module notes); their singular values (≈ 0) still count in
    σ̄. With f = 1 this is Iso-C. Defaults: f = 0.8 (the paper's and both codes'); α = 1,
    FusionBench's default (the paper picks α on validation data)."""
    return _merge(base, tensors, ctx, alpha,
                  lambda tv: iso_cts_merge(tv, common_space_fraction))
