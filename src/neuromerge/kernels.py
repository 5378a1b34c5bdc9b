"""The shared building blocks of TIES-family methods: one trim, one elect, one disjoint mean,
one DARE drop. Every method that needs them calls these; none re-implements them.

Tensors of task vectors are stacked along dim 0: shape (T, ...) for T tasks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction

import torch


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """τt = θt − θ0, stacked to (T, ...), computed in ``dtype`` (at least float32)."""
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    b = base.to(dtype)
    out = torch.empty((len(tensors), *base.shape), dtype=dtype, device=base.device)
    for i, t in enumerate(tensors):
        _difference_into(out[i], t, b)
    return out


def each_task_vector(base: torch.Tensor, tensors: Iterable[torch.Tensor],
                     dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """τt = θt − θ0 for each task in turn, in ONE reused buffer (the caller is done with one
    before asking for the next), with the arithmetic of :func:`task_vectors`."""
    b = base.to(dtype)
    buf = torch.empty_like(b)
    for t in tensors:
        yield _difference_into(buf, t, b)


def _difference_into(out: torch.Tensor, t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # in place: no temporary per expert (each would be a fresh, page-faulting allocation)
    out.copy_(t)
    return out.sub_(b)


def keep_count(density: float, n: int, rule: str = "ceil") -> int:
    """k = ceil(density · n), exact for decimal densities: 0.2 of 10 entries is 2, not 3.
    ``rule="floor"``: mergekit's k = max(1, int(density · n)), in its float arithmetic."""
    if n <= 0:
        return 0
    if density >= 1:
        return n
    if rule == "floor":
        return min(n, max(1, int(float(density) * n)))
    k = math.ceil(Fraction(repr(float(density))) * n)
    return min(n, max(1, k))


def floor_count(fraction: float, n: int) -> int:
    """⌊fraction · n⌋, exact for decimal fractions: 0.01 of 300 entries is 3, not 2."""
    return max(0, math.floor(Fraction(repr(float(fraction))) * n))


def magnitudes(tv: torch.Tensor) -> torch.Tensor:
    """|τ| in float32: trimming ranks magnitudes at float32 precision whatever the compute dtype,
    so the streaming global threshold (which selects over float32 bit patterns) is exact."""
    return tv.abs().to(torch.float32)


#: Below this many entries a sort-based selection is cheaper than two histogram passes.
_RADIX_MIN = 1 << 16
_SAMPLE_STRIDE = 61  # prime: no alignment with row lengths


def kth_largest(mags: torch.Tensor, k: int) -> float:
    """The k-th largest value of a non-negative tensor (k ≥ 1), exactly.

    Large tensors use the radix select over float32 bit patterns (two histogram passes, several
    times faster than ``torch.kthvalue`` on the CPU)."""
    flat = mags.reshape(-1)
    if flat.numel() < _RADIX_MIN or flat.dtype != torch.float32:
        return float(torch.kthvalue(flat, flat.numel() - k + 1).values)
    from neuromerge.thresholds import MagnitudeSelect, band_from

    # A strided sample guesses the k-th value's coarse bin, so one histogram pass usually suffices.
    sample = MagnitudeSelect(flat.device, track_l1=False)
    sample.add(flat[::_SAMPLE_STRIDE])
    select = MagnitudeSelect(flat.device, track_l1=False)
    select.set_band(*band_from(sample, k, flat.numel()))
    select.add(flat)
    select.locate(k)
    if select.needs_refine:
        select.refine(flat)
    return select.result()[0]


def per_task(value: float | Sequence[float], n: int) -> tuple[float, ...]:
    """One value per task: a scalar repeated, or a sequence of exactly ``n`` values."""
    if isinstance(value, int | float):
        return (float(value),) * n
    out = tuple(float(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{len(out)} per-model values for {n} task vectors")
    return out


def trim(tv: torch.Tensor, density: float | Sequence[float],
         thresholds: Sequence[float] | None = None, *, inplace: bool = False,
         count: str = "ceil") -> torch.Tensor:
    """Keep each task's largest-magnitude entries, zero the rest (TIES step 1).

    With ``thresholds`` (one per task, from a model-wide pass) keep |τt| ≥ h_t; without, h_t is the
    k-th largest |τt| of this tensor, k = ceil(density_t · numel) (``density``: one for all tasks
    or one per task). Ties at the threshold are kept, except with ``count="floor"``:
    mergekit's k (:func:`keep_count`) and exactly k entries (:func:`exactly_k`); thresholds
    from a model-wide pass (a global trim, a tensor merged in row blocks) keep ties.
    ``inplace`` zeroes entries of ``tv`` itself (one task at a time, to bound memory).
    """
    densities = per_task(density, tv.shape[0])
    if thresholds is None and all(d >= 1 for d in densities):
        return tv
    if thresholds is not None and len(thresholds) != tv.shape[0]:
        raise ValueError(f"{len(thresholds)} thresholds for {tv.shape[0]} task vectors")
    out = tv if inplace else tv.clone()
    for t in range(out.shape[0]):
        if thresholds is None and densities[t] >= 1:
            continue
        mags = magnitudes(out[t])
        if thresholds is None and count == "floor":
            out[t].masked_fill_(~exactly_k(mags, keep_count(densities[t], mags.numel(), count)),
                                0)
            continue
        h = (thresholds[t] if thresholds is not None
             else kth_largest(mags, keep_count(densities[t], tv[0].numel(), count)))
        out[t].masked_fill_(mags < h, 0)
    return out


def exactly_k(mags: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries (bool mask): those above the k-th largest value and, where more
    than needed tie with it, the ones mergekit's ``argsort(descending=True)[:k]`` picks (it
    keeps exactly k; bf16 task vectors tie often). The sort runs only in that case."""
    h = kth_largest(mags, k)
    keep = mags > h
    need = k - int(keep.sum())
    tied = mags == h
    if need > 0 and int(tied.sum()) > need:
        keep = torch.zeros(mags.numel(), dtype=torch.bool, device=mags.device)
        keep[torch.argsort(mags.reshape(-1).float(), descending=True)[:k]] = True
        return keep.reshape(mags.shape)
    return keep | tied if need > 0 else keep


def weigh(tv: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    """τt ← w_t · τt in place (per-model weights, mergekit's ``weight``); ``None``: unchanged."""
    if weights is not None and any(w != 1 for w in weights):
        for t, w in enumerate(weights):
            tv[t].mul_(w)
    return tv


def elect_sign(values: torch.Tensor, *, tensor_fallback: bool = True,
               whole_sum: float | None = None) -> torch.Tensor:
    """TIES sign election over dim 0: s = sign(Σt values_t).

    Where that sum is exactly 0 the sign of the sum over the whole tensor is used
    (``tensor_fallback``; ``whole_sum`` supplies it when ``values`` is only a block of the
    tensor), and + when that is 0 too (or without the fallback)."""
    s = torch.sign(values.sum(dim=0))
    fallback = 1.0
    if tensor_fallback:
        whole = float(values.sum()) if whole_sum is None else whole_sum
        fallback = -1.0 if whole < 0 else 1.0
    return torch.where(s == 0, torch.full_like(s, fallback), s)


def _agreeing(values: torch.Tensor, sign: torch.Tensor, *, count: bool, inplace: bool = False,
              weights: Sequence[float] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over dim 0 of the non-zero entries whose sign agrees with ``sign`` (±1), and (``count``)
    how many there are, or with ``weights`` the sum of the agreeing tasks' weights. ``inplace``
    works in ``values`` itself (destroying it): a few passes and no (T, ...) temporaries;
    otherwise one task at a time, so the temporaries are one tensor."""
    if inplace and weights is None:
        values.mul_(sign)  # > 0 exactly where non-zero and of the elected sign
        n = (values > 0).sum(dim=0, dtype=values.dtype) if count else None
        return values.clamp_(min=0).sum(dim=0).mul_(sign), n
    total = torch.zeros(sign.shape, dtype=values.dtype, device=values.device)
    n = torch.zeros(sign.shape, dtype=values.dtype, device=values.device) if count else None
    for t, v in enumerate(values):
        agree = (v * sign) > 0  # non-zero and of the elected sign
        total += torch.where(agree, v, 0.0)
        if n is not None:
            n += agree if weights is None else agree.to(n.dtype) * weights[t]
    return total, n


def disjoint_mean(values: torch.Tensor, sign: torch.Tensor, *,
                  inplace: bool = False, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Mean over dim 0 of the non-zero entries whose sign agrees with ``sign`` (±1); 0 where none
    do (``inplace``: ``values`` is scratch and is overwritten). With ``weights`` (``values``
    already weighted) the divisor is the sum of the agreeing tasks' weights (mergekit's
    ``normalize``), left at 1 where that is 0."""
    total, n = _agreeing(values, sign, count=True, inplace=inplace, weights=weights)
    assert n is not None
    return total.div_(n.masked_fill_(n == 0, 1))


def disjoint_sum(values: torch.Tensor, sign: torch.Tensor, *,
                 inplace: bool = False) -> torch.Tensor:
    """Sum over dim 0 of the non-zero entries whose sign agrees with ``sign`` (±1): the TIES
    code's "dis-sum" aggregation (TALL masks / Consensus merging use it)."""
    return _agreeing(values, sign, count=False, inplace=inplace)[0]


def ties_merge(tv: torch.Tensor, whole_sum: float | None = None, *, aggregate: str = "mean",
               inplace: bool = False, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Elect + disjoint mean (``aggregate="sum"``: disjoint sum), element-wise, of already-trimmed
    task vectors (``inplace``: ``tv`` is a scratch copy the caller no longer needs).

    ``weights``: the per-task weights ``tv`` was already multiplied by (:func:`weigh`, mergekit's
    ``weight``); the mean then divides by the sum of the agreeing tasks' weights, not their
    count (mergekit's ``normalize``)."""
    if weights is not None and all(w == 1 for w in weights):
        weights = None
    sign = elect_sign(tv, whole_sum=whole_sum)
    if aggregate == "sum":
        return disjoint_sum(tv, sign, inplace=inplace)
    return disjoint_mean(tv, sign, inplace=inplace, weights=weights)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (model seed, tensor name): same parts, same seed."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


#: DARE draws its uniforms in chunks of this many entries, each from its own seed, so the mask of
#: any row block can be drawn without drawing (or holding) the rows before it.
RNG_CHUNK = 1 << 20


def uniform_stream(seed: int, offset: int, count: int) -> torch.Tensor:
    """Entries ``offset .. offset+count`` of the seeded uniform stream of a flattened tensor.

    Chunk j of the stream comes from seed ``seed`` (j = 0) or ``derive_seed(seed, "chunk", j)``,
    drawn on the CPU: the same numbers whatever the device or the row blocks asked for."""
    out = torch.empty(count, dtype=torch.float32)
    pos = offset
    while pos < offset + count:
        j = pos // RNG_CHUNK
        start = j * RNG_CHUNK
        gen = torch.Generator(device="cpu").manual_seed(
            seed if j == 0 else derive_seed(seed, "chunk", j))
        chunk = torch.rand(min(RNG_CHUNK, offset + count - start), generator=gen,
                           dtype=torch.float32)
        piece = chunk[pos - start:]
        out[pos - offset:pos - offset + piece.numel()] = piece
        pos += piece.numel()
    return out


def dare_drop(tv: torch.Tensor, drop_rate: float, seed: int, offset: int = 0, *,
              rescale: bool = True) -> torch.Tensor:
    """DARE: drop each entry with probability p, rescale survivors by 1/(1 − p) (``rescale``).

    The mask comes from ``uniform_stream(seed, offset, numel)``: ``offset`` is the position of
    ``tv``'s first entry in the whole flattened tensor when ``tv`` is a row block of it."""
    if drop_rate <= 0:
        return tv
    keep = (uniform_stream(seed, offset, tv.numel()) >= drop_rate).reshape(tv.shape)
    keep = keep.to(tv.device)
    kept = tv / (1.0 - drop_rate) if rescale else tv
    return torch.where(keep, kept, torch.zeros((), dtype=tv.dtype, device=tv.device))
