import torch
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.kernels import dare_drop, derive_seed
from neuromerge.methods import dare_linear, dare_ties
from neuromerge.registry import TensorContext


def test_dare_linear_matches_independent_computation() -> None:
    base = torch.randn(50)
    experts = [base + torch.randn(50) for _ in range(2)]
    ctx = TensorContext(name="w", model_seeds=(11, 22))
    out = dare_linear(base, experts, drop_rate=0.6, scale=0.5, ctx=ctx)
    expected = base.clone()
    for e, s in zip(experts, (11, 22), strict=True):
        gen = torch.Generator().manual_seed(derive_seed(s, "w"))
        keep = torch.rand(50, generator=gen) >= 0.6
        expected += 0.5 * torch.where(keep, (e - base) / 0.4, 0.0)
    assert_close(out, expected)


def test_dare_ties_is_drop_then_elect_and_disjoint_mean() -> None:
    base = torch.zeros(6)
    a = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0])
    b = torch.tensor([-1.0, -1.0, 1.0, 0.5, 2.0, -3.0])
    ctx = TensorContext(name="v", model_seeds=(1, 2))
    out = dare_ties(base, [a, b], drop_rate=0.5, ctx=ctx)
    da = dare_drop(a, 0.5, derive_seed(1, "v"))
    db = dare_drop(b, 0.5, derive_seed(2, "v"))
    s = torch.sign(da + db)
    s[s == 0] = 1.0 if float((da + db).sum()) >= 0 else -1.0
    expected = torch.zeros(6)
    for i in range(6):
        vals = [v for v in (float(da[i]), float(db[i])) if v != 0 and (v > 0) == (s[i] > 0)]
        expected[i] = sum(vals) / len(vals) if vals else 0.0
    assert_close(out, expected)


def test_dare_zero_drop_is_task_arithmetic() -> None:
    base = torch.randn(10)
    experts = [base + torch.randn(10) for _ in range(3)]
    out = dare_linear(base, experts, drop_rate=0.0, scale=0.3)
    assert_close(out, base + 0.3 * sum(e - base for e in experts))


def test_seed_controls_output() -> None:
    base = {"w": torch.zeros(64)}
    experts = {"m1": {"w": torch.randn(64)}, "m2": {"w": torch.randn(64)}}
    run = lambda seed: merge_state_dicts(  # noqa: E731
        base, experts, "dare_linear", {"drop_rate": 0.5, "seed": seed}).state_dict["w"]
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_per_model_seed_overrides_derived_seed() -> None:
    base = {"w": torch.zeros(64)}
    experts = [{"w": torch.randn(64)}]
    r1 = merge_state_dicts(base, experts, "dare_linear", {"seed": 0}, per_model=[{"seed": 5}])
    r2 = merge_state_dicts(base, experts, "dare_linear", {"seed": 9}, per_model=[{"seed": 5}])
    assert torch.equal(r1.state_dict["w"], r2.state_dict["w"])
