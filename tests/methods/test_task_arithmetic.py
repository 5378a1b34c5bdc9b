import torch
from torch.testing import assert_close

from neuromerge.methods import task_arithmetic


def test_task_arithmetic_hand_computed() -> None:
    base = torch.tensor([1.0, 2.0, 3.0])
    a = torch.tensor([2.0, 2.0, 1.0])   # τ = [1, 0, -2]
    b = torch.tensor([0.0, 4.0, 3.0])   # τ = [-1, 2, 0]
    assert_close(task_arithmetic(base, [a, b], scale=0.5), torch.tensor([1.0, 3.0, 2.0]))


def test_task_arithmetic_default_scale_is_0_3() -> None:
    base = torch.zeros(2)
    out = task_arithmetic(base, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 10.0])])
    assert_close(out, torch.tensor([0.6, 3.0]))
