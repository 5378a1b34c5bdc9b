"""arcee_fusion: an independent numpy computation, properties, and mergekit 0.1.5 itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neuromerge.registry import TensorContext, get_method
from tests.methods.mergekit_cases import check_parity, family

arcee_fusion = get_method("arcee_fusion")
CTX = TensorContext()


def reference(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(other) + 1e-8, softmax(base) + 1e-8
    s = np.abs(other - base) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    srt = np.sort(s.reshape(-1))
    q1, q2, q3 = (srt[int(q * (srt.size - 1))] for q in (0.25, 0.5, 0.75))
    return base + (other - base) * (s >= q2 + 1.5 * (q3 - q1))


def test_against_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 9, generator=g, dtype=torch.float64)
    other = base + torch.randn(12, 9, generator=g, dtype=torch.float64) * torch.rand(
        12, 1, generator=g, dtype=torch.float64)
    out = arcee_fusion(base, [other], ctx=CTX)
    np.testing.assert_allclose(out.numpy(), reference(base.numpy(), other.numpy()), atol=1e-12)
    kept = (out != base).sum().item()
    assert 0 < kept < base.numel()  # only the outliers of the importance take the change


def test_hand_computed_one_row() -> None:
    # one row: KL is one number k > 0, s = k |d|; |d| = 0,1,2,3,10 → Q1 = k, Q2 = 2k, Q3 = 3k,
    # T = 2k + 3k = 5k: only the entry with |d| = 10 is kept
    base = torch.zeros(1, 5)
    other = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]])
    torch.testing.assert_close(arcee_fusion(base, [other], ctx=CTX),
                               torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0]]))


def test_same_models_give_the_base() -> None:
    base = torch.randn(4, 4)
    torch.testing.assert_close(arcee_fusion(base, [base.clone() + 0.0], ctx=CTX), base)


def test_matches_mergekit(mergekit, tmp_path: Path) -> None:
    base, models = family(tmp_path)
    check_parity(mergekit, tmp_path, {
        "merge_method": "arcee_fusion", "base_model": base,
        "models": [{"model": base}, {"model": models[0]}]})
