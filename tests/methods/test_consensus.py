"""Golden tests for Consensus merging (TALL masks): hand-computed masks and merges, and the
trimmed TIES variant against an explicit per-entry loop."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.kernels import trim
from neuromerge.methods import consensus_ta, consensus_ties
from neuromerge.registry import TensorContext

BASE = torch.zeros(4)
TAUS = [torch.tensor([1.0, 2.0, 0.0, -1.0]),
        torch.tensor([1.0, -2.0, 3.0, 0.5]),
        torch.tensor([1.0, 0.5, 0.1, -1.0])]


# Consensus TA, λ_TALL = 0.5: τ_MTL = Σ τt = [3, 0.5, 3.1, -1.5]; mask_t = |τt| > 0.5·|τ_MTL − τt|
#   entry 0: |1| > 0.5·|3 − 1| = 1 fails for every task (strict)             -> 0 tasks
#   entry 1: 2 > 0.5·1.5 ✓; 2 > 0.5·2.5 ✓; 0.5 > 0.5·0 ✓                     -> 3 tasks
#   entry 2: 0 > 1.55 ✗;   3 > 0.05 ✓;     0.1 > 1.5 ✗                        -> 1 task
#   entry 3: 1 > 0.25 ✓;   0.5 > 1.0 ✗;    1 > 0.25 ✓                         -> 2 tasks
@pytest.mark.parametrize(("k", "want"), [
    (0, [3.0, 0.5, 3.1, -1.5]),   # no weight removed: task arithmetic
    (1, [0.0, 0.5, 3.1, -1.5]),   # catastrophic weights (no task) removed
    (2, [0.0, 0.5, 0.0, -1.5]),   # and selfish ones (one task)
    (4, [0.0, 0.0, 0.0, 0.0]),    # k > T: the base
])
def test_consensus_ta_by_hand(k: int, want: list[float]) -> None:
    out = consensus_ta(BASE, TAUS, k=k, tall_lambda=0.5, scale=1.0, ctx=TensorContext())
    assert_close(out, torch.tensor(want))


# Consensus TIES without trimming (density 1), λ_TALL = 0.5. Elected signs: Σ = [3, 0.5, 3.1,
# -1.5] -> [+, +, +, -]; agreeing entries: [1 1 1], [2 0.5], [3 0.1], [-1 -1].
#   sum:  τ_MTL = [3, 2.5, 3.1, -2]
#     entry 0: 1 > 0.5·2 ✗ x3 -> 0;  entry 1: 2 > 0.25 ✓, 2 > 2.25 ✗, 0.5 > 1 ✗ -> 1
#     entry 2: 0 > 1.55 ✗, 3 > 0.05 ✓, 0.1 > 1.5 ✗ -> 1;  entry 3: 1 > 0.5 ✓, 0.5 > 1.25 ✗, ✓ -> 2
#   mean: τ_MTL = [1, 1.25, 1.55, -1]
#     entry 0: 1 > 0 ✓ x3 -> 3;  entry 1: 2 > 0.375 ✓, 2 > 1.625 ✓, 0.5 > 0.375 ✓ -> 3
#     entry 2: 0 > 0.775 ✗, 3 > 0.725 ✓, 0.1 > 0.725 ✗ -> 1;  entry 3: 1 > 0 ✓, 0.5 > 0.75 ✗, ✓ -> 2
@pytest.mark.parametrize(("aggregate", "k", "want"), [
    ("sum", 2, [0.0, 0.0, 0.0, -2.0]),
    ("sum", 1, [0.0, 2.5, 3.1, -2.0]),
    ("mean", 2, [1.0, 1.25, 0.0, -1.0]),
])
def test_consensus_ties_by_hand(aggregate: str, k: int, want: list[float]) -> None:
    out = consensus_ties(BASE, TAUS, density=1.0, trim_scope="tensor", k=k, tall_lambda=0.5,
                         aggregate=aggregate, scale=1.0, ctx=TensorContext())
    assert_close(out, torch.tensor(want))


def test_consensus_ties_masks_use_untrimmed_task_vectors() -> None:
    """Trimmed case against an explicit loop: TIES on the trimmed τ̂, masks on the raw τ."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(30, generator=gen)
    experts = [base + torch.randn(30, generator=gen) for _ in range(4)]
    out = consensus_ties(base, experts, density=0.5, trim_scope="tensor", k=2, tall_lambda=0.3,
                         aggregate="sum", scale=0.7, ctx=TensorContext())
    taus = [e - base for e in experts]
    trimmed = trim(torch.stack(taus), 0.5)  # the shared trim (tested in test_kernels)
    want = base.clone()
    for i in range(30):
        vals = [float(v[i]) for v in trimmed]
        s = 1.0 if sum(vals) >= 0 else -1.0  # no exact zero sums in this data
        multi = sum(v for v in vals if v * s > 0)
        n_keep = sum(abs(float(t[i])) > 0.3 * abs(multi - float(t[i])) for t in taus)
        if n_keep >= 2:
            want[i] += 0.7 * multi
    assert_close(out, want)


def test_identical_experts_and_zero_task_vectors() -> None:
    # one expert: Σ − τ1 = 0, so its mask keeps every non-zero entry, but k = 2 tasks never agree
    base = {"w": torch.randn(3, 2)}
    one = merge_state_dicts(base, [{"w": base["w"] + 1}], "consensus_ta").state_dict["w"]
    assert torch.equal(one, base["w"])
    k1 = merge_state_dicts(base, [{"w": base["w"] + 1}], "consensus_ta", {"k": 1, "scale": 1})
    assert_close(k1.state_dict["w"], base["w"] + 1)
