"""NeuroMerging (EMNLP 2025, arXiv 2503.05320): merge each neuron's task vectors separately in
the subspace parallel to the pretrained neuron (a rescaling: input sensitivity) and in the
subspace orthogonal to it (a rotation: task adaptability). Rules: docs/spec/neuromerging.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, NamedTuple

import torch
from pydantic import Field

from neuromerge.errors import ConfigError
from neuromerge.kernels import disjoint_mean, elect_sign, task_vectors, ties_merge, trim, weigh
from neuromerge.methods.dare import dropped_task_vectors, mergekit_keep_rate
from neuromerge.params import Density, DropRate, Seed, TrimScope, Weight
from neuromerge.registry import Mergekit, TensorContext, TrimSummary, merge_method

# Directions whose singular value is below this share of the row's largest are numerically null:
# the Gram route squares the condition number, so s_j/s_max < ~1e-7 is noise in float64.
DIRECTION_RTOL = 1e-6
# A task's orthogonal row this small relative to its task-vector row is rounding residue of an
# exactly parallel update, and coordinates this small relative to s_max are rounding of zeros.
RESIDUE_RTOL = 1e-10
# Row blocks keep the float64 per-neuron work within this many bytes, whatever the tensor size.
BLOCK_BYTES = 16 << 20


def split_neurons(w0: torch.Tensor, tv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project each task-vector row on its pretrained row.

    c_tᵏ = ⟨τtᵏ, w0ᵏ⟩ / ‖w0ᵏ‖² (0 when ‖w0ᵏ‖ = 0); τ⊥ = τtᵏ − c_tᵏ · w0ᵏ.
    ``w0``: (m, n); ``tv``: (T, m, n). Returns c: (T, m) and τ⊥: (T, m, n)."""
    c = neuron_coefficients(w0, tv)
    return c, tv - c.unsqueeze(-1) * w0


def neuron_coefficients(w0: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    norms2 = (w0 * w0).sum(dim=-1)
    dots = torch.einsum("tmn,mn->tm", tv, w0)
    safe = torch.where(norms2 > 0, norms2, torch.ones_like(norms2))
    return torch.where(norms2 > 0, dots / safe, torch.zeros_like(dots))


class NeuronFrames(NamedTuple):
    """Each neuron's SVD frame of its T orthogonal parts (``svd_frames``): M = U S Vᵀ."""

    u: torch.Tensor  # (m, T, r) left singular vectors, each direction's sign fixed
    s: torch.Tensor  # (m, r) singular values, descending
    keep: torch.Tensor  # (m, r) directions that take part (not numerically null, within ρ)
    coords: torch.Tensor  # (m, T, r) coordinates A = U S, rounding of zeros set to 0


def svd_frames(orth: torch.Tensor, rank_threshold: float = 1.0,
               zero_rows: torch.Tensor | None = None) -> NeuronFrames:
    """The per-neuron SVD frames NeuroMerging merges in. ``orth``: (T, m, n) orthogonal parts.

    Per row: M = U S Vᵀ (T × n), from the T × T Gram matrices M Mᵀ = U S² Uᵀ (batched eigh);
    each direction's sign is fixed so its largest |u_tj| is positive (first on ties); directions
    with s_j ≤ 1e-6 · s_max are dropped, and with ``rank_threshold`` ρ < 1 so are those after the
    leading ones whose cumulative S² share first reaches ρ. Coordinates A = U S; a task whose
    orthogonal row is exactly zero has exactly zero coordinates, and coordinates below 1e-10 ·
    s_max are rounding of zeros. ``zero_rows`` (T, m), when the caller knows them, saves a pass."""
    m_rows = orth.transpose(0, 1)  # (m, T, n), row-major per neuron
    gram = m_rows @ m_rows.transpose(1, 2)
    evals, u = torch.linalg.eigh(gram)
    evals, u = evals.flip(-1), u.flip(-1)  # descending singular values
    # Fix each direction's sign (largest |u_tj| positive, first on ties): the result then does
    # not depend on the eigensolver's choice even where a coordinate sum is exactly 0.
    pivot = u.abs().argmax(dim=1, keepdim=True)
    u = u * torch.sign(torch.gather(u, 1, pivot)).clamp(min=0).mul(2).sub(1)
    s = evals.clamp(min=0).sqrt()  # (m, r)
    s_max = s[:, :1]
    keep = s > DIRECTION_RTOL * s_max
    if rank_threshold < 1:
        energy = s * s
        total = energy.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
        share_before = (energy.cumsum(dim=-1) - energy) / total
        keep &= share_before < rank_threshold
    coords = u * s.unsqueeze(1)  # (m, T, r): A[k] = U S
    # A task whose orthogonal row is exactly zero has exactly zero coordinates.
    zero_row = ((m_rows == 0).all(dim=-1, keepdim=True) if zero_rows is None
                else zero_rows.transpose(0, 1).unsqueeze(-1))
    tiny = coords.abs() <= RESIDUE_RTOL * s_max.unsqueeze(1)
    coords = torch.where(zero_row | tiny, torch.zeros_like(coords), coords)
    return NeuronFrames(u, s, keep, coords)


def merge_orthogonal_svd(orth: torch.Tensor, rank_threshold: float = 1.0,
                         zero_rows: torch.Tensor | None = None) -> torch.Tensor:
    """TIES in each neuron's SVD frame. ``orth``: (T, m, n) orthogonal parts; returns (m, n).

    Per row: M = U S Vᵀ (T × n); coordinates A = M V = U S; s_j = sign(Σt A_tj) (0 → +, with
    each direction's sign fixed so its largest |u_tj| is positive);
    ā_j = mean of the non-zero A_tj with sign s_j; O = Σj ā_j v_j = Mᵀ U diag(ā / S).
    Computed for all rows at once from the T × T Gram matrices M Mᵀ = U S² Uᵀ (batched eigh,
    ``svd_frames``). With ``rank_threshold`` ρ < 1 only the leading directions whose cumulative
    S² share first reaches ρ are kept."""
    u, s, keep, coords = svd_frames(orth, rank_threshold, zero_rows)
    a = coords.transpose(0, 1)  # (T, m, r)
    a_bar = disjoint_mean(a, elect_sign(a, tensor_fallback=False))
    inv_s = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    weights = torch.einsum("mtr,mr->mt", u, a_bar * inv_s)  # O = Σt weights_t · M_t
    return torch.einsum("mt,tmn->mn", weights, orth)


def remove_parallel_(rows: torch.Tensor, w0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """τ⊥ = τ − c · w0 in place on ``rows`` (T, m, n), ``c`` (T, m) from ``neuron_coefficients``.

    An exactly parallel update leaves a rounding residue, not an orthogonal part: a row whose
    orthogonal part is at most 1e-10 of its task-vector row is set to exactly zero."""
    return remove_parallel_with_zero_rows_(rows, w0, c)[0]


def remove_parallel_with_zero_rows_(rows: torch.Tensor, w0: torch.Tensor, c: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`remove_parallel_`, also returning which (T, m) orthogonal rows are exactly zero."""
    row_norms = rows.norm(dim=-1)
    rows -= c.unsqueeze(-1) * w0
    after = rows.norm(dim=-1)
    residue = after <= RESIDUE_RTOL * row_norms
    if bool(residue.any()):  # rare (exactly parallel updates): skip the full pass otherwise
        rows.masked_fill_(residue.unsqueeze(-1), 0.0)
    return rows, residue | (after == 0)


def merge_neurons(w0: torch.Tensor, tv: torch.Tensor, *, lambda1: float, lambda2: float,
                  rank_threshold: float = 1.0, orthogonal_merge: str = "svd",
                  unit_parallel: bool = False,
                  tensor_sum: Callable[[str, Callable[[], float]], float] | None = None,
                  ) -> torch.Tensor:
    """λ1 · P + λ2 · O for a 2-D neuronal tensor (rows are neurons), computed in float64 a
    block of rows at a time and returned in ``w0``'s dtype.

    P ᵏ = c̄ᵏ · w0ᵏ with c̄ᵏ the TIES elect + disjoint mean of c_1ᵏ..c_Tᵏ (a zero sum takes the
    sign of the sum of all c of the tensor); O ᵏ is the orthogonal merge (SVD frame or, as an
    ablation, element-wise TIES). ``unit_parallel`` reproduces the released code's w0ᵏ/‖w0ᵏ‖.
    ``tensor_sum`` (``TensorContext.tensor_sum``) supplies the tie-breaks' tensor-wide sums when
    ``w0`` is a row block of a larger tensor."""
    if tensor_sum is None:
        def tensor_sum(key: str, local: Callable[[], float]) -> float:
            return float(local())
    t_count, m, n = tv.shape
    block = max(1, BLOCK_BYTES // max(1, 8 * t_count * n))
    blocks = [slice(i, min(m, i + block)) for i in range(0, m, block)]

    def rows64(b: slice) -> torch.Tensor:  # float64 only a block at a time: bounded memory
        return w0[b].to(torch.float64)

    c = None
    if lambda1 != 0 or orthogonal_merge == "ties":  # needed before (or beyond) the row loop
        c = torch.cat([neuron_coefficients(rows64(b), tv[:, b].to(torch.float64))
                       for b in blocks], dim=1)
    # tensor-wide sums first: a row-block pre-pass stops as soon as it has them
    c_sum = tensor_sum("c", c.sum) if c is not None and lambda1 != 0 else 0.0
    whole_orth_sum = None
    if c is not None and orthogonal_merge == "ties":  # element-wise election: Σ τ⊥ tensor-wide
        whole_orth_sum = tensor_sum("orthogonal", lambda: float(
            tv.sum(dtype=torch.float64) - sum(float((c[:, b].sum(0) * rows64(b).sum(-1)).sum())
                                              for b in blocks)))
    c_bar = None
    if lambda1 != 0:
        assert c is not None
        c_bar = disjoint_mean(c, elect_sign(c, whole_sum=c_sum))
    delta = torch.empty((m, n), dtype=w0.dtype, device=w0.device)
    for b in blocks:
        w0_b = rows64(b)
        orth = tv[:, b].to(torch.float64)
        c_b = c[:, b] if c is not None else neuron_coefficients(w0_b, orth)
        orth, zero_rows = remove_parallel_with_zero_rows_(orth, w0_b, c_b)
        if orthogonal_merge == "svd":
            d = merge_orthogonal_svd(orth, rank_threshold, zero_rows)
        else:
            d = ties_merge(orth, whole_sum=whole_orth_sum, inplace=True)
        d.mul_(lambda2)
        if c_bar is not None:
            direction = w0_b
            if unit_parallel:
                norms = w0_b.norm(dim=-1, keepdim=True)
                direction = torch.where(norms > 0, w0_b / torch.where(norms > 0, norms, 1.0), 0.0)
            d += lambda1 * c_bar[b].unsqueeze(-1) * direction
        delta[b] = d  # rounded once, to w0's dtype
    return delta


def lambda2_auto(trim: TrimSummary | None) -> float:
    """λ2 = 1/(1 − σ), σ = max_t σt = the largest share of a task's L1 mass the trim removed;
    equivalently max_t ‖τt‖₁ / ‖trim(τt)‖₁. 1 when nothing was trimmed."""
    if trim is None:
        return 1.0
    ratios = [tot / kept for tot, kept in zip(trim.l1_total, trim.l1_kept, strict=True)
              if tot > 0 and kept > 0]
    return max(ratios, default=1.0)


def _resolve(params: dict[str, Any], trim: TrimSummary | None) -> dict[str, Any]:
    if params["lambda2"] == "auto":
        params["lambda2"] = lambda2_auto(trim)
    return _lambda_point_follows(params)


def _lambda_point_follows(params: dict[str, Any]) -> dict[str, Any]:
    if params["lambda_point"] is None:
        params["lambda_point"] = params["lambda2"]
    return params


#: The merged delta is λ1 · P + λ2 · O (+ λ_point · TIES on point tensors): each component alone.
_COMPONENTS = {"lambda1": {"lambda1": 1.0, "lambda2": 0.0, "lambda_point": 0.0},
               "lambda2": {"lambda1": 0.0, "lambda2": 1.0, "lambda_point": 1.0}}


def _working_set(n_models: int, compute_itemsize: int) -> int:
    """Task vectors in the compute dtype and about six float64 per entry: the per-neuron
    parallel and orthogonal parts and their SVD-frame coordinates."""
    return (n_models + 1) * compute_itemsize + 6 * 8


def mergekit_keys(block: dict[str, Any], where: str) -> None:
    """A mergekit TIES / DARE file runs with one edit (merge_method): NeuroMerging's merges are
    means (normalize: true is what it does) and it scales its two subspaces separately (λ1,
    λ2), so mergekit's λ = 1 is a no-op and any other λ is refused."""
    if block.get("normalize", True) is not True:
        raise ConfigError(f"{where}.normalize: NeuroMerging's merges are means (normalize: "
                          f"true); remove the key")
    block.pop("normalize", None)
    if "lambda" in block:
        if block["lambda"] != 1:
            raise ConfigError(f"{where}.lambda: NeuroMerging scales its two subspaces "
                              f"separately: use lambda1 (parallel) and lambda2 (orthogonal) "
                              f"instead")
        del block["lambda"]


def _mergekit_dare_keys(block: dict[str, Any], where: str) -> None:
    mergekit_keys(block, where)
    mergekit_keep_rate(block, where)


# The parameters NeuroMerging and DARE + NeuroMerging share (one declaration each).
Lambda1 = Annotated[float, Field(
    description="λ1, scale of the merged parallel (rescaling) subspace; 0 without validation "
                "data")]
LambdaPoint = Annotated[float | None, Field(
    description="scale of point tensors (1-D/0-D: biases, norms), merged by plain TIES; null = "
                "the value of lambda2")]
RankThreshold = Annotated[float, Field(
    gt=0, le=1, description="ρ: keep the leading per-neuron SVD directions whose cumulative S² "
                            "share reaches ρ (1 keeps all)")]
OrthogonalMerge = Annotated[Literal["svd", "ties"], Field(
    description="svd: TIES in each neuron's SVD frame; ties: element-wise TIES on the "
                "orthogonal parts (ablation)")]
Compat = Annotated[Literal["spec", "official"], Field(
    description="official reproduces the released code's quirks (unit-vector parallel part, "
                "point tensors scaled by (λ1+λ2)/2) for side-by-side checks")]


def merge_sparse_task_vectors(base: torch.Tensor, tv: torch.Tensor, ctx: TensorContext, *,
                              lambda1: float, lambda2: float, lambda_point: float,
                              rank_threshold: float, orthogonal_merge: str, compat: str
                              ) -> torch.Tensor:
    """NeuroMerging Steps 1-5 on already sparsified task vectors ``tv`` (T, ...): neuronal
    tensors θ0 + λ1 · P + λ2 · O (:func:`merge_neurons`), point tensors θ0 + λ_point · TIES."""
    official = compat == "official"
    if ctx.resolved_kind(base) == "point":
        scale = (lambda1 + lambda2) / 2 if official else lambda_point
        return base + scale * ties_merge(tv, whole_sum=ctx.tensor_sum("tv", tv.sum),
                                              inplace=True)
    rows = base.shape[0]
    delta = merge_neurons(
        base.reshape(rows, -1), tv.reshape(tv.shape[0], rows, -1), lambda1=lambda1,
        lambda2=lambda2, rank_threshold=rank_threshold, orthogonal_merge=orthogonal_merge,
        unit_parallel=official, tensor_sum=ctx.tensor_sum,
    )
    return delta.reshape(base.shape).add_(base)


@merge_method(
    name="neuromerging", reference_url="https://arxiv.org/abs/2503.05320", trims=True,
    resolve=_resolve, trim_pass_if=lambda p: p["lambda2"] == "auto",
    per_model_params=("weight", "density"), linear_in=_COMPONENTS, working_set=_working_set,
    mergekit=Mergekit(rewrite=mergekit_keys),
)
def neuromerging(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    density: Density = 0.2,
    trim_scope: TrimScope = "global",
    lambda1: Lambda1 = 0.0,
    lambda2: Annotated[float | Literal["auto"], Field(
        description="λ2, scale of the merged orthogonal subspace; auto = 1/(1 - σ), σ the "
                    "largest share of a task's L1 mass removed by the trim")] = "auto",
    lambda_point: LambdaPoint = None,
    rank_threshold: RankThreshold = 1.0,
    orthogonal_merge: OrthogonalMerge = "svd",
    compat: Compat = "spec",
    weight: Weight = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """Neuron-subspace merging: θ = θ0 + λ1 · P + λ2 · O for neuronal tensors.

    Each trimmed task-vector row τtᵏ splits into c_tᵏ · w0ᵏ (parallel to the pretrained neuron)
    and τ⊥ = τtᵏ − c_tᵏ w0ᵏ. P merges the c by TIES elect + disjoint mean; O merges the τ⊥ by
    TIES in each neuron's SVD frame. Point tensors: θ0 + λ_point · TIES(τ̂). A model's
    ``weight`` w_t scales its trimmed task vector, w_t · τ̂t, before it is split."""
    n = len(tensors)
    tv = trim(task_vectors(base, tensors, base.dtype), ctx.per_model("density", density, n),
              ctx.thresholds, inplace=True)
    weigh(tv, ctx.per_model("weight", weight, n))
    return merge_sparse_task_vectors(
        base, tv, ctx, lambda1=lambda1, lambda2=lambda2, lambda_point=lambda_point,
        rank_threshold=rank_threshold, orthogonal_merge=orthogonal_merge, compat=compat)


def _resolve_dare(params: dict[str, Any], trim: TrimSummary | None) -> dict[str, Any]:
    if params["lambda2"] == "auto":
        params["lambda2"] = 1.0  # DARE's rescale already restores each task's expected L1 mass
    return _lambda_point_follows(params)


@merge_method(
    name="dare_neuromerging", reference_url="https://arxiv.org/abs/2503.05320",
    per_model_params=("seed", "weight", "drop_rate"), resolve=_resolve_dare,
    linear_in=_COMPONENTS, working_set=_working_set,
    mergekit=Mergekit(rewrite=_mergekit_dare_keys),
)
def dare_neuromerging(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
    drop_rate: DropRate = 0.5,
    seed: Seed = 0,
    lambda1: Lambda1 = 0.0,
    lambda2: Annotated[float | Literal["auto"], Field(
        description="λ2, scale of the merged orthogonal subspace; auto = 1: DARE's 1/(1-p) "
                    "rescale already restores each task's expected L1 mass, which is what "
                    "NeuroMerging's 1/(1 - σ) does after its magnitude trim")] = "auto",
    lambda_point: LambdaPoint = None,
    rank_threshold: RankThreshold = 1.0,
    orthogonal_merge: OrthogonalMerge = "svd",
    compat: Compat = "spec",
    weight: Weight = 1.0,
    ctx: TensorContext = TensorContext(),
) -> torch.Tensor:
    """DARE + NeuroMerging: θ = θ0 + λ1 · P + λ2 · O over DARE-sparsified τ̃t = τt ⊙ mt / (1 − p).

    DARE's random drop with rescale (mt ~ Bernoulli(1 − p) from model t's seeded stream, exactly
    as `dare_linear`/`dare_ties` draw it) replaces the magnitude trim, as the released
    NeuroMerging code allows; the neuron-subspace merge is NeuroMerging's, unchanged. Point
    tensors: θ0 + λ_point · TIES(τ̃). A separate method rather than an option of `neuromerging`,
    so that each lists only the parameters it uses (no density here, no seed there).

    λ2 = auto is 1, not 1/(1 − σ): σ measures the L1 mass the trim removed without putting it
    back, whereas the survivors of a DARE drop are already scaled by 1/(1 − p), so E‖τ̃t‖₁ =
    ‖τt‖₁ (σ = 0 in expectation). Defaults: p = 0.5, as `dare_linear`/`dare_ties` (DARE's usual
    choice); λ1 = 0 as NeuroMerging without validation data. Row-local, like both parts."""
    n = len(tensors)
    tv = dropped_task_vectors(base, tensors, ctx.per_model("drop_rate", drop_rate, n), seed, ctx)
    weigh(tv, ctx.per_model("weight", weight, n))
    return merge_sparse_task_vectors(
        base, tv, ctx, lambda1=lambda1, lambda2=float(lambda2), lambda_point=(
            float(lambda2) if lambda_point is None else lambda_point),
        rank_threshold=rank_threshold, orthogonal_merge=orthogonal_merge, compat=compat)
