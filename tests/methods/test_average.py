import torch
from torch.testing import assert_close

from neuromerge.methods import average


def test_average_hand_computed() -> None:
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = torch.tensor([[2.0, 2.0], [0.0, 4.0]])
    b = torch.tensor([[0.0, 5.0], [3.0, 1.0]])
    assert_close(average(base, [a, b]), torch.tensor([[1.0, 3.5], [1.5, 2.5]]))


def test_average_ignores_base_values() -> None:
    a, b = torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])
    assert_close(average(torch.tensor([100.0, 100.0]), [a, b]), torch.tensor([2.0, 0.0]))
