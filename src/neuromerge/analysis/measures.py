"""Per-tensor measures of task vectors: pure functions of tensors, no I/O.

A tensor's measures are a ``Record``: a dict of float64 numpy arrays (scalars, per-task
vectors of length T, T × T matrices) that are all *sums* (counts, energies, dot products), so the
record of a tensor is the sum of the records of its row blocks, and the record of a layer, a
module type or the whole model is the sum of its tensors' records. Ratios (shares, rates,
cosines) are taken from the sums only at the end, by ``derive``: each is pooled over the group
(total conflicting ÷ total contested), not a mean of per-tensor ratios.

Definitions (τt = θt − θ0, T tasks; "trimmed": each task's largest-magnitude entries kept, as
NeuroMerging's trim does):

- **Parallel / orthogonal energy** of task t in a neuronal tensor W (rows are neurons):
  parallel Σk (c_tᵏ)² ‖w0ᵏ‖², orthogonal Σk ‖τ⊥_tᵏ‖², with c_tᵏ = ⟨τtᵏ, w0ᵏ⟩ / ‖w0ᵏ‖² (0 where
  ‖w0ᵏ‖ = 0: such a row is all orthogonal) and τ⊥ = τtᵏ − c_tᵏ w0ᵏ, computed in float64 with the
  method's own code (``neuron_coefficients``, ``remove_parallel_``: the rounding residue of an
  exactly parallel row is zero). The two add up to ‖τt‖² (Pythagoras); the shares are each
  divided by their sum, so they add up to exactly 1. Point tensors (1-D, 0-D) have no neurons:
  their energy counts in ``energy`` but in neither subspace.
- **c distribution**: every neuron's c_tᵏ, in a log-binned histogram (``CHistogram``).
- **Element-wise sign conflicts**: among the entries where at least two tasks are non-zero
  (*contested*), the share whose non-zero values do not all have the same sign (*conflicting*).
  *Lost energy*: the share of Σt τt² on entries whose sign is not the elected one,
  sign(Σt τt) (+ where the sum is exactly 0): what TIES' disjoint mean drops. Pairwise: for
  tasks a, b, among the entries where both are non-zero, the share of opposite signs.
- **SVD-frame sign conflicts**: per neuron, the T tasks' orthogonal rows M = U S Vᵀ and their
  coordinates A = U S, exactly as NeuroMerging merges them (``svd_frames``: directions with
  s_j ≤ 1e-6 s_max dropped, signs fixed). Among the kept directions where at least two tasks have
  a non-zero coordinate, the share with coordinates of both signs; lost energy: the share of
  Σ A² on coordinates against the elected sign(Σt A_tj) (+ on a zero sum). Since the columns of U
  are orthogonal, a dense frame has conflicts in all but (at most) its leading direction by
  construction; the lost-energy share says how much they weigh.
- **Cosine similarity**: ⟨τa, τb⟩ / (‖τa‖ ‖τb‖) of the flattened task vectors (all merged
  tensors, point tensors included); undefined (None) for an all-zero task vector.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from neuromerge.kernels import elect_sign
from neuromerge.methods.neuromerging import (
    BLOCK_BYTES,
    neuron_coefficients,
    remove_parallel_,
    svd_frames,
)

Record = dict[str, np.ndarray]

#: Entries per task processed at a time by the element-wise measures (bounded temporaries).
CHUNK = 1 << 18
#: Quantiles of c reported (as fractions).
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)

_SCALARS = ("tensors", "entries", "neurons")
_PER_TASK = ("l1", "energy", "energy_neuronal", "parallel", "orthogonal", "parallel_trim",
             "orthogonal_trim", "c_sum", "c_sq", "c_zero")
_MATRICES = ("dots", "pair_both", "pair_opposite", "pair_both_trim", "pair_opposite_trim")
_CONFLICTS = ("contested", "conflicting", "lost", "energy")


def _conflict_keys() -> list[str]:
    keys = [f"{frame}{trim}_{k}" for frame in ("elem", "svd") for trim in ("", "_trim")
            for k in _CONFLICTS]
    return [*keys, "svd_directions", "svd_trim_directions"]


def empty_record(n_tasks: int) -> Record:
    """All sums zero."""
    rec: Record = {k: np.zeros(()) for k in _SCALARS}
    rec.update({k: np.zeros(n_tasks) for k in _PER_TASK})
    rec.update({k: np.zeros((n_tasks, n_tasks)) for k in _MATRICES})
    rec.update({k: np.zeros(()) for k in _conflict_keys()})
    return rec


def add_into(acc: Record, rec: Record) -> Record:
    """acc += rec, key by key; returns ``acc``."""
    for k, v in rec.items():
        acc[k] = acc[k] + v
    return acc


def total(records: Iterable[Record], n_tasks: int) -> Record:
    acc = empty_record(n_tasks)
    for r in records:
        add_into(acc, r)
    return acc


# --- the measures of one tensor ----------------------------------------------------------------


def energy_split(w0: torch.Tensor, tv: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each task-vector row into the parts parallel and orthogonal to its pretrained row.

    ``w0``: (m, n); ``tv``: (T, m, n). Returns, in float64, c (T, m), the parallel energy
    Σk (c_tᵏ)² ‖w0ᵏ‖² (T,), the orthogonal energy Σk ‖τ⊥_tᵏ‖² (T,) and τ⊥ (T, m, n)."""
    w = w0.to(torch.float64)
    orth = tv.to(torch.float64, copy=True)
    c = neuron_coefficients(w, orth)
    parallel = (c * c * (w * w).sum(dim=-1)).sum(dim=-1)
    remove_parallel_(orth, w, c)
    return c, parallel, (orth * orth).sum(dim=(-1, -2)), orth


def frame_conflicts(orth: torch.Tensor, rank_threshold: float = 1.0) -> dict[str, float]:
    """Sign conflicts in each neuron's SVD frame of the orthogonal parts ``orth`` (T, m, n).

    Returns sums: ``directions`` (kept (neuron, direction) pairs), ``contested`` (kept, with ≥ 2
    non-zero coordinates), ``conflicting`` (contested with coordinates of both signs), ``lost``
    (Σ A² against the elected sign) and ``energy`` (Σ A² over kept directions)."""
    frames = svd_frames(orth, rank_threshold)
    coords, keep = frames.coords, frames.keep  # (m, T, r), (m, r)
    pos = (coords > 0).sum(dim=1)
    neg = (coords < 0).sum(dim=1)
    contested = keep & (pos + neg >= 2)
    conflicting = contested & (pos > 0) & (neg > 0)
    sign = elect_sign(coords.transpose(0, 1), tensor_fallback=False)  # (m, r)
    sq = torch.where(keep.unsqueeze(1), coords * coords, torch.zeros_like(coords))
    lost = torch.where(coords * sign.unsqueeze(1) < 0, sq, torch.zeros_like(sq))
    return {"directions": float(keep.sum()), "contested": float(contested.sum()),
            "conflicting": float(conflicting.sum()), "lost": float(lost.sum()),
            "energy": float(sq.sum())}


def elementwise(values: torch.Tensor, *, pairwise: bool = True) -> dict[str, Any]:
    """Element-wise measures of stacked task vectors ``values`` (T, ...), in chunks of entries.

    Returns the T × T dot products ``dots`` (float64), per-task ``l1``, the sign-conflict sums
    ``contested``, ``conflicting``, ``lost``, ``energy`` (see the module doc) and, with
    ``pairwise``, the T × T counts ``pair_both`` (both non-zero) and ``pair_opposite``."""
    t_count = values.shape[0]
    flat = values.reshape(t_count, -1)
    dots = torch.zeros((t_count, t_count), dtype=torch.float64, device=values.device)
    l1 = torch.zeros(t_count, dtype=torch.float64, device=values.device)
    both = torch.zeros((t_count, t_count), dtype=torch.int64, device=values.device)
    opposite = torch.zeros_like(both)
    sums = dict.fromkeys(_CONFLICTS, 0.0)
    for chunk in flat.split(CHUNK, dim=1):
        c64 = chunk.to(torch.float64)
        dots += c64 @ c64.T
        l1 += c64.abs().sum(dim=1)
        pos = (chunk > 0).sum(dim=0)
        neg = (chunk < 0).sum(dim=0)
        sums["contested"] += float((pos + neg >= 2).sum())
        sums["conflicting"] += float(((pos > 0) & (neg > 0)).sum())
        sign = elect_sign(c64, tensor_fallback=False)
        sums["energy"] += float((c64 * c64).sum())
        sums["lost"] += float((c64 * sign).clamp_(max=0).square_().sum())
        if pairwise:
            sg = torch.sign(chunk).to(torch.int8)
            for a in range(t_count):
                both[a, a] += int((sg[a] != 0).sum())
                for b in range(a + 1, t_count):
                    prod = sg[a] * sg[b]
                    both[a, b] += int((prod != 0).sum())
                    opposite[a, b] += int((prod < 0).sum())
    both = both + both.triu(1).T
    opposite = opposite + opposite.T
    return {"dots": dots, "l1": l1, "pair_both": both, "pair_opposite": opposite, **sums}


def tensor_measures(base: torch.Tensor, tv: torch.Tensor, tv_trim: torch.Tensor | None = None, *,
                 neuronal: bool, hist: CHistogram | None = None, hist_key: Hashable = "other",
                 rank_threshold: float = 1.0) -> Record:
    """The record of one tensor (or row block of one): ``base`` its pretrained values, ``tv``
    the stacked task vectors (T, *base.shape), ``tv_trim`` the trimmed ones (None: no trim, the
    trimmed measures are the raw ones). Neuronal tensors (rows are neurons; a ≥ 3-D tensor is
    (rows, rest)) also get the subspace energies and SVD-frame conflicts, and their c go to
    ``hist`` under ``hist_key``. ``tensors`` is left 0: the caller counts whole tensors."""
    t_count = tv.shape[0]
    rec = empty_record(t_count)
    rec["entries"] = np.array(float(base.numel()))
    variants = [("", tv)] + ([("_trim", tv_trim)] if tv_trim is not None else [])
    for suffix, values in variants:
        el = elementwise(values)
        if suffix == "":
            rec["dots"] = el["dots"].cpu().numpy()
            rec["l1"] = el["l1"].cpu().numpy()
            rec["energy"] = np.diag(rec["dots"]).copy()
        rec[f"pair_both{suffix}"] = el["pair_both"].cpu().numpy().astype(np.float64)
        rec[f"pair_opposite{suffix}"] = el["pair_opposite"].cpu().numpy().astype(np.float64)
        for k in _CONFLICTS:
            rec[f"elem{suffix}_{k}"] = np.array(el[k])
    if neuronal:
        _neuron_measures(rec, base, tv, tv_trim, hist, hist_key, rank_threshold)
    if tv_trim is None:  # the trimmed measures are the raw ones
        for k in list(rec):
            raw = k.replace("_trim", "")
            if "_trim" in k and raw in rec:
                rec[k] = rec[raw].copy()
    return rec


def _neuron_measures(rec: Record, base: torch.Tensor, tv: torch.Tensor,
                  tv_trim: torch.Tensor | None, hist: CHistogram | None, hist_key: Hashable,
                  rank_threshold: float) -> None:
    t_count, m = tv.shape[0], base.shape[0]
    w0 = base.reshape(m, -1)
    n = w0.shape[1]
    rows = tv.reshape(t_count, m, n)
    rows_trim = tv_trim.reshape(t_count, m, n) if tv_trim is not None else None
    rec["neurons"] = np.array(float(m))
    rec["energy_neuronal"] = rec["energy"].copy()
    block = max(1, BLOCK_BYTES // max(1, 8 * t_count * n))
    for i in range(0, m, block):
        b = slice(i, min(m, i + block))
        for suffix, values in (("", rows), ("_trim", rows_trim)):
            if values is None:
                continue
            c, par, orth_e, orth = energy_split(w0[b], values[:, b])
            rec[f"parallel{suffix}"] += par.cpu().numpy()
            rec[f"orthogonal{suffix}"] += orth_e.cpu().numpy()
            fc = frame_conflicts(orth, rank_threshold)
            del orth
            for k in (*_CONFLICTS, "directions"):
                rec[f"svd{suffix}_{k}"] = rec[f"svd{suffix}_{k}"] + fc[k]
            if suffix == "":
                rec["c_sum"] += c.sum(dim=1).cpu().numpy()
                rec["c_sq"] += (c * c).sum(dim=1).cpu().numpy()
                rec["c_zero"] += (c == 0).sum(dim=1).cpu().numpy().astype(np.float64)
                if hist is not None:
                    hist.add(c, hist_key)


# --- ratios from sums --------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _vec(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [_ratio(a, b) for a, b in zip(num.tolist(), den.tolist(), strict=True)]


def cosine(dots: np.ndarray) -> list[list[float | None]]:
    """T × T cosine similarities from T × T dot products (None where a norm is 0), clipped to
    [−1, 1]."""
    sq = np.clip(np.diag(dots), 0, None)
    return [[float(np.clip(dots[a, b] / math.sqrt(sq[a] * sq[b]), -1, 1))
             if sq[a] * sq[b] > 0 else None for b in range(len(sq))] for a in range(len(sq))]


def _conflict(rec: Record, prefix: str) -> dict[str, Any]:
    out = {"rate": _ratio(float(rec[f"{prefix}_conflicting"]), float(rec[f"{prefix}_contested"])),
           "lost_energy": _ratio(float(rec[f"{prefix}_lost"]), float(rec[f"{prefix}_energy"])),
           "contested": int(rec[f"{prefix}_contested"]),
           "conflicting": int(rec[f"{prefix}_conflicting"])}
    if prefix.startswith("svd"):
        out["directions"] = int(rec[f"{prefix}_directions"])
    return out


def derive(rec: Record) -> dict[str, Any]:
    """The shares, rates and cosines of a record (a tensor's or a group's), JSON-ready."""
    neurons = float(rec["neurons"])
    par, orth = rec["parallel"], rec["orthogonal"]
    par_t, orth_t = rec["parallel_trim"], rec["orthogonal_trim"]
    point = rec["energy"] - rec["energy_neuronal"]

    def pairwise(suffix: str) -> list[list[float | None]]:
        both, opp = rec[f"pair_both{suffix}"], rec[f"pair_opposite{suffix}"]
        return [_vec(opp[a], both[a]) for a in range(len(both))]

    return {
        "tensors": int(rec["tensors"]), "entries": int(rec["entries"]), "neurons": int(neurons),
        "energy": {
            "total": rec["energy"].tolist(),
            "parallel_share": _vec(par, par + orth),
            "orthogonal_share": _vec(orth, par + orth),
            "parallel_share_trimmed": _vec(par_t, par_t + orth_t),
            "orthogonal_share_trimmed": _vec(orth_t, par_t + orth_t),
            "point_share": _vec(np.clip(point, 0, None), rec["energy"]),
        },
        "l1": rec["l1"].tolist(),
        "c": {"mean": _vec(rec["c_sum"], np.full_like(rec["c_sum"], neurons)),
              "rms": [None if v is None else math.sqrt(v)
                      for v in _vec(rec["c_sq"], np.full_like(rec["c_sq"], neurons))],
              "zero_share": _vec(rec["c_zero"], np.full_like(rec["c_zero"], neurons))},
        "cosine": cosine(rec["dots"]),
        "conflicts": {
            "elementwise": _conflict(rec, "elem"),
            "elementwise_trimmed": _conflict(rec, "elem_trim"),
            "svd": _conflict(rec, "svd"),
            "svd_trimmed": _conflict(rec, "svd_trim"),
            "pairwise": pairwise(""),
            "pairwise_trimmed": pairwise("_trim"),
        },
    }


# --- the distribution of c ---------------------------------------------------------------------


class CHistogram:
    """Streaming histogram of the coefficients c, per task and per key (module type), in
    log-spaced bins of |c| on each side of an exact-zero bin: ``PER_DECADE`` bins per decade
    from 10^``LOG_MIN`` to 10^``LOG_MAX`` (values beyond go to the end bins), with the exact
    smallest and largest value of each bin. Memory is fixed, whatever the model size.

    A quantile is the representative value (geometric centre) of the bin holding it, clamped to
    that bin's exact [min, max]: within ±1.2 % of the true quantile for |c| in range, and exact
    where the bin holds one distinct value (zeros, the extremes, a constant c)."""

    PER_DECADE = 100
    LOG_MIN = -12
    LOG_MAX = 4
    N_SIDE = (LOG_MAX - LOG_MIN) * PER_DECADE
    N_BINS = 2 * N_SIDE + 1  # negative side (descending |c|), zero, positive side

    def __init__(self, n_tasks: int) -> None:
        self.n_tasks = n_tasks
        self.counts: dict[Hashable, np.ndarray] = {}
        self.bin_min: dict[Hashable, np.ndarray] = {}  # smallest and largest value in each bin
        self.bin_max: dict[Hashable, np.ndarray] = {}

    def bin_index(self, c: torch.Tensor) -> torch.Tensor:
        mag = c.abs()
        e = torch.floor((torch.log10(mag.clamp(min=1e-300)) - self.LOG_MIN) * self.PER_DECADE)
        e = e.clamp(0, self.N_SIDE - 1).to(torch.int64)
        idx = torch.where(c > 0, self.N_SIDE + 1 + e, self.N_SIDE - 1 - e)
        return torch.where(c == 0, torch.full_like(idx, self.N_SIDE), idx)

    def bin_values(self) -> np.ndarray:
        """The representative value of each bin (0 for the zero bin)."""
        e = np.arange(self.N_SIDE)
        mag = 10.0 ** (self.LOG_MIN + (e + 0.5) / self.PER_DECADE)
        return np.concatenate([-mag[::-1], [0.0], mag])

    def add(self, c: torch.Tensor, key: Hashable = "all") -> None:
        """Count ``c`` (T, m): row t holds task t's coefficients."""
        if c.numel() == 0:
            return
        c = c.to(torch.float64)
        idx = self.bin_index(c)
        shape = (self.n_tasks, self.N_BINS)
        counts = self.counts.setdefault(key, np.zeros(shape, np.int64))
        lo = self.bin_min.setdefault(key, np.full(shape, np.inf))
        hi = self.bin_max.setdefault(key, np.full(shape, -np.inf))
        inf = torch.full((self.N_BINS,), math.inf, dtype=torch.float64, device=c.device)
        for t in range(self.n_tasks):
            counts[t] += torch.bincount(idx[t], minlength=self.N_BINS).cpu().numpy()
            lo[t] = np.minimum(lo[t], inf.scatter_reduce(0, idx[t], c[t], "amin").cpu().numpy())
            hi[t] = np.maximum(hi[t], (-inf).scatter_reduce(0, idx[t], c[t], "amax")
                               .cpu().numpy())

    def _select(self, keys: Sequence[Hashable] | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        keys = [k for k in (self.counts if keys is None else keys) if k in self.counts]
        if not keys:
            return None
        counts = np.sum([self.counts[k] for k in keys], axis=0)
        lo = np.min([self.bin_min[k] for k in keys], axis=0)
        hi = np.max([self.bin_max[k] for k in keys], axis=0)
        return counts, lo, hi

    def histogram(self, keys: Sequence[Hashable] | None = None) -> np.ndarray | None:
        """Counts (T, N_BINS) over ``keys`` (all keys: None)."""
        sel = self._select(keys)
        return None if sel is None else sel[0]

    def summary(self, keys: Sequence[Hashable] | None = None,
                quantiles: Sequence[float] = QUANTILES) -> list[dict[str, Any]] | None:
        """Per task: count, min, max, share of exact zeros and the quantiles (keys "p1", "p5",
        ...), over ``keys`` (all keys: None)."""
        sel = self._select(keys)
        if sel is None:
            return None
        counts, lo, hi = sel
        values = self.bin_values()
        out = []
        for t in range(self.n_tasks):
            n = int(counts[t].sum())
            cum = np.cumsum(counts[t])
            filled = np.nonzero(counts[t])[0]
            row: dict[str, Any] = {
                "count": n, "min": float(lo[t][filled[0]]), "max": float(hi[t][filled[-1]]),
                "zero_share": float(counts[t][self.N_SIDE] / n)}
            for q in quantiles:
                b = int(np.searchsorted(cum, max(1, math.ceil(q * n))))
                row[f"p{100 * q:g}"] = float(np.clip(values[b], lo[t][b], hi[t][b]))
            out.append(row)
        return out
