import pytest
import torch
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.methods import ties
from neuromerge.registry import TensorContext


def test_ties_hand_computed_per_tensor_trim() -> None:
    base = torch.zeros(4)
    a = torch.tensor([3.0, -1.0, 0.5, 2.0])   # density .5 keeps 3, 2
    b = torch.tensor([-1.0, -4.0, 0.2, 1.0])  # keeps -1 and -4 (ties at 1 kept? |1|=|-1|)
    c = torch.tensor([-2.0, 1.0, 5.0, 0.0])   # keeps -2, 5
    # b: |.| = 1, 4, .2, 1 → k = 2, threshold 1 → keeps -1, -4 and the tied 1.0
    # trimmed: a [3,0,0,2], b [-1,-4,0,1], c [-2,0,5,0]
    # sums: 0 → whole sum 4 (+), -4 (-), 5 (+), 3 (+)
    # means: col0 of + entries: 3; col1: -4; col2: 5; col3: (2+1)/2
    out = ties(base, [a, b, c], density=0.5, trim_scope="tensor", scale=1.0)
    assert_close(out, torch.tensor([3.0, -4.0, 5.0, 1.5]))


def test_ties_scale_and_base() -> None:
    base = torch.tensor([1.0, 1.0])
    a = torch.tensor([2.0, 1.0])
    assert_close(ties(base, [a], density=1.0, scale=0.5), torch.tensor([1.5, 1.0]))


def test_ties_with_global_thresholds_from_context() -> None:
    base = torch.zeros(3)
    a = torch.tensor([0.1, 0.2, 0.3])
    out = ties(base, [a], density=0.5, ctx=TensorContext(thresholds=(0.15,)))
    assert_close(out, torch.tensor([0.0, 0.2, 0.3]))


def test_global_trim_ranks_over_all_tensors() -> None:
    # task 1 has large values in "x" and small ones in "y": a global trim at density 0.5
    # keeps all of x (4 entries of 8) and none of y; per-tensor keeps half of each.
    base = {"x": torch.zeros(4), "y": torch.zeros(4)}
    e1 = {"x": torch.tensor([5.0, 6.0, 7.0, 8.0]), "y": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    g = merge_state_dicts(base, [e1], "ties", {"density": 0.5, "trim_scope": "global"})
    assert_close(g.state_dict["x"], e1["x"])
    assert_close(g.state_dict["y"], torch.zeros(4))
    assert g.trim is not None and g.trim.thresholds == (5.0,)
    assert g.trim.k == 4 and g.trim.n_entries == 8
    p = merge_state_dicts(base, [e1], "ties", {"density": 0.5, "trim_scope": "tensor"})
    assert_close(p.state_dict["x"], torch.tensor([0.0, 0.0, 7.0, 8.0]))
    assert_close(p.state_dict["y"], torch.tensor([0.0, 0.0, 0.3, 0.4]))


def test_global_trim_equals_trim_of_concatenation() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (5, 7), "b": (13,), "c": (3, 2, 2)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    experts = [{k: v + torch.randn(v.shape, generator=gen) * (i + 1) for k, v in base.items()}
               for i in range(3)]
    out = merge_state_dicts(base, experts, "ties", {"density": 0.3}).state_dict
    flat = lambda sd: torch.cat([sd[k].flatten() for k in shapes])  # noqa: E731
    whole = ties(flat(base), [flat(e) for e in experts], density=0.3, trim_scope="tensor")
    assert_close(flat(out), whole)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_identical_experts_cancel_to_base(scope: str) -> None:
    base = torch.randn(4, 3)
    out = ties(base, [base.clone(), base.clone()], density=0.2, trim_scope=scope)
    assert torch.equal(out, base)
