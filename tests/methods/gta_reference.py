"""mergekit 0.1.5's generalized task arithmetic and its sparsifiers, transcribed in numpy (float64)
for the golden tests of breadcrumbs, breadcrumbs_ties, della and della_linear: written from
mergekit's source, not from neuromerge's code."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def l1_rescaled(tv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """mergekit's rescaled_masked_tensor with the L1 norm (no rescale below 1e-7)."""
    masked = tv * mask
    before, after = np.abs(tv).sum(), np.abs(masked).sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def magnitude_outliers_mask(tv: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """sparsify.magnitude_outliers: sort |τ| ascending, keep indices[n_bot : n_bot + target]."""
    n = tv.size
    if density >= 1:
        return np.ones(tv.shape)
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(np.abs(tv).ravel(), kind="stable")
    mask = np.zeros(n)
    mask[order[n_bot:n_bot + target]] = 1
    return mask.reshape(tv.shape)


def della_probabilities(tv: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """sparsify.della_magprune's probabilities: ranks along axis 1 (1-D: one row), 1-based,
    normalised by (max − min) rank."""
    x = tv[None] if tv.ndim < 2 else tv
    ranks = np.argsort(np.argsort(np.abs(x), axis=1, kind="stable"), axis=1) + 1.0
    lo, hi = ranks.min(axis=1, keepdims=True), ranks.max(axis=1, keepdims=True)
    rank_norm = np.clip((ranks - lo) / (hi - lo), 0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(tv.shape)


def gta(base: np.ndarray, deltas: Sequence[np.ndarray], weights: Sequence[float], *,
        consensus: bool, normalize: bool, lam: float) -> np.ndarray:
    """GeneralizedTaskArithmeticMerge.merge_group after sparsification: weigh, (sign consensus:
    majority = + where Σ ≥ 0), sum, normalise, λ."""
    d = np.stack([w * x for w, x in zip(weights, deltas, strict=True)])
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    if consensus:
        majority = np.where(d.sum(axis=0) >= 0, 1.0, -1.0)
        mask = (np.sign(d) == majority).astype(np.float64)
        mixed = (d * mask).sum(axis=0)
        divisor = (w * mask).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        mixed = d.sum(axis=0)
        divisor = np.full(base.shape, w.sum())
        divisor[np.abs(divisor) < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed
