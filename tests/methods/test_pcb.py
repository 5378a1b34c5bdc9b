"""Golden tests for PCB-Merging: a hand-computed 2-task case, the degenerate cases the released
code leaves undefined, and a numpy transcription of the released ``pcb-merging.py`` (sorts,
min-max normalisation, exp, tanh) on random data."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.methods import pcb
from neuromerge.registry import TensorContext, get_method


def test_two_tasks_by_hand() -> None:
    # ratio 0.75 -> k = ceil(3) = 3 scores kept per task; clip 0 (no outlier clipping); T = 2.
    # τ1 = [1, -2, 0.5, 0], τ2 = [3, 1, -0.5, 2], Σ = [4, -1, 0, 2]
    # inter1 = tanh(τ1 Σ) = tanh([4, 2, 0, 0]); inter2 = tanh([12, -1, 0, 4])
    # |τ1| min-max [0.5, 1, 0.25, 0] -> intra1 = exp(2 x²) = [e^.5, e^2, e^.125, 1]
    # |τ2| min-max [1, 0.2, 0, 0.6] -> intra2 = [e^2, e^.08, 1, e^.72]
    # (tN = tanh(N))
    # score1 = [e^.5 t4, e^2 t2, 0, 0]: 3rd largest q1 = 0, max e^2 t2
    #   -> w1 = [e^-1.5 t4/t2, 1, 0, 0]
    # score2 = [e^2 t12, -e^.08 t1, 0, e^.72 t4]: q2 = 0, max e^2 t12 -> w2 = [1, 0, 0, ...]
    # merged = Σ w τ / Σ w: entry 0 = (w1·1 + 1·3) / (w1 + 1); entry 1 = -2; entry 2: no
    # weight -> 0; entry 3 = 2 (only task 2 weighs in).
    t = math.tanh
    w1 = math.exp(-1.5) * t(4) / t(2)
    want = [(w1 * 1 + 3) / (w1 + 1), -2.0, 0.0, 2.0]
    out = pcb(torch.zeros(4), [torch.tensor([1.0, -2.0, 0.5, 0.0]),
                               torch.tensor([3.0, 1.0, -0.5, 2.0])],
              ratio=0.75, clip=0.0, scale=1.0, ctx=TensorContext())
    assert_close(out, torch.tensor(want, dtype=torch.float32))


def test_lowest_score_gets_no_weight_even_at_ratio_one() -> None:
    # A zero task vector has constant scores: weight 0 everywhere (the released code: 0/0).
    # Task 2, τ = [1, 2, 3, 4]: scores exp(2 x²)·tanh(τ²) increase, so with ratio 1 the
    # threshold is the smallest score and that entry's weight is (q - q)/(max - q) = 0.
    out = pcb(torch.zeros(4), [torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 4.0])],
              ratio=1.0, clip=0.0, ctx=TensorContext())
    assert_close(out, torch.tensor([0.0, 2.0, 3.0, 4.0]))


def test_constant_scores_keep_the_top_entries() -> None:
    # one expert shifting every entry by 1: all scores tie, the top ones (all) get weight 1
    out = pcb(torch.zeros(6), [torch.ones(6)], ctx=TensorContext())
    assert_close(out, torch.ones(6))
    assert not get_method("pcb").row_local


# --- the released code, transcribed to numpy (pcb-merging.py: normalize, clamp, PCB_merge) ---


def ref_normalize(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    return (x - lo) / (hi - lo)


def ref_clamp(x: np.ndarray, min_ratio: float, max_ratio: float) -> np.ndarray:
    d = x.shape[1]
    s = np.sort(x, axis=1)
    lo = s[:, int(d * min_ratio)][:, None]
    hi = s[:, int(d * (1 - max_ratio) - 1)][:, None]
    return np.clip(x, lo, hi)


def ref_pcb(flat: np.ndarray, pcb_ratio: float, clip: float) -> np.ndarray:
    n = flat.shape[0]
    checks_abs = ref_clamp(np.abs(flat), clip, clip)
    clamped = np.sign(flat) * checks_abs
    self_pcb = np.exp(n * ref_normalize(checks_abs) ** 2)
    cross_pcb = np.tanh(flat * flat.sum(axis=0))
    scale = ref_normalize(ref_clamp(self_pcb * cross_pcb, 1 - pcb_ratio, 0))
    return (clamped * scale).sum(axis=0) / np.maximum(scale.sum(axis=0), 1e-12)


def test_matches_the_released_code_on_random_tensors() -> None:
    rng = np.random.default_rng(0)
    for shape, t_count, ratio in [((40, 25), 3, 0.1), ((20000,), 2, 0.2), ((7, 9), 4, 0.3)]:
        base = rng.normal(size=shape)
        taus = [rng.normal(scale=0.5, size=shape) for _ in range(t_count)]
        want = base + 1.0 * ref_pcb(np.stack([t.ravel() for t in taus]), ratio, 1e-4
                                    ).reshape(shape)
        out = merge_state_dicts(
            {"x": torch.from_numpy(base)}, [{"x": torch.from_numpy(base + t)} for t in taus],
            "pcb", {"ratio": ratio}, dtype="float64").state_dict["x"]
        assert_close(out, torch.from_numpy(want), rtol=1e-9, atol=1e-9)
