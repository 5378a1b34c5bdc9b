"""Invariants every method must satisfy (hypothesis): model order does not matter, identical
copies of the base give the base, results are finite; NeuroMerging's orthogonal part is
orthogonal to the pretrained rows; DARE is reproducible from its seed."""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.testing import assert_close

from neuromerge import merge_state_dicts as _merge_state_dicts
from neuromerge.errors import ConfigError
from neuromerge.registry import all_methods, get_method
from tests.helpers import toy_statistics

METHODS = [m.name for m in all_methods()]


@st.composite
def model_family(draw: st.DrawFn) -> tuple[dict, list[dict]]:
    """A base state dict (a 2-D, a 1-D and a 3-D tensor, some zero rows) and 1-4 experts."""
    seed = draw(st.integers(0, 2**31 - 1))
    m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    n_experts = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(m, n, generator=gen), "b": torch.randn(n, generator=gen),
            "conv": torch.randn(2, 2, 3, generator=gen)}
    if draw(st.booleans()):
        base["w"][0] = 0.0  # a dead neuron
    experts = []
    for _ in range(n_experts):
        scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
        experts.append({k: v + scale * torch.randn(v.shape, generator=gen)
                        for k, v in base.items()})
    return base, experts


#: Models besides the base a method takes (mergekit's contracts), where not any number.
ARITY = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "nuslerp": 2, "passthrough": 1}


def takes(method: str, n: int) -> bool:
    """Whether the method merges n models besides the base (its declaration; ARITY where only
    one count gives a meaningful case)."""
    if method in ARITY:
        return ARITY[method] == n
    least, most = get_method(method).n_models
    return least <= n and (most is None or n <= most)


def merge_state_dicts(base: dict, experts, method: str, params: dict | None = None, **kw):
    listed = list(experts.values()) if isinstance(experts, dict) else experts
    if not takes(method, len(listed)):
        assume(False)
    try:
        return _merge_state_dicts(base, experts, method, params,
                                  statistics=toy_statistics(method, listed), **kw)
    except ConfigError as exc:
        # mergekit's multislerp refuses more than two task vectors whose unit vectors cancel
        # (all zero, as copies of the base, or antipodal): so does ours
        assume(not (method == "multislerp" and "unit task vectors is zero" in str(exc)))
        raise


def params_for(method: str) -> dict:
    if method == "karcher":  # mergekit's 10 iterations stop before the order stops mattering
        return {"max_iter": 100, "tol": 1e-7}
    return {"density": 0.5} if method in ("ties", "neuromerging") else {}


@given(family=model_family(), method=st.sampled_from(METHODS), data=st.data())
def test_order_of_models_does_not_matter(family: tuple, method: str, data: st.DataObject
                                         ) -> None:
    base, experts = family
    named = {f"model_{i}": e for i, e in enumerate(experts)}
    perm = data.draw(st.permutations(list(named)))
    a = merge_state_dicts(base, named, method, params_for(method)).state_dict
    b = merge_state_dicts(base, {k: named[k] for k in perm}, method, params_for(method)
                          ).state_dict
    # karcher: mergekit's float32 arccos near 1 (error ~3e-4 rad) and its skipped terms make
    # the iteration's result depend on the order at that level
    tol = 1e-3 if method == "karcher" else 1e-5
    for k in base:
        assert_close(a[k], b[k], rtol=tol, atol=tol)


@given(family=model_family(), method=st.sampled_from(METHODS), copies=st.integers(1, 4))
def test_identical_copies_of_the_base_give_the_base(family: tuple, method: str, copies: int
                                                    ) -> None:
    base, _ = family
    out = merge_state_dicts(base, [dict(base) for _ in range(copies)], method,
                            params_for(method)).state_dict
    for k in base:
        assert torch.equal(out[k], base[k]), k


@given(family=model_family(), density=st.sampled_from([0.1, 0.5, 1.0]),
       rho=st.sampled_from([1.0, 0.6]))
def test_neuromerging_orthogonal_part_is_orthogonal_to_pretrained_rows(
        family: tuple, density: float, rho: float) -> None:
    # Only the SVD frame guarantees this: its directions span the τ⊥ rows. The element-wise
    # TIES ablation takes each coordinate from a different task and leaves the subspace.
    base, experts = family
    out = merge_state_dicts(base, experts, "neuromerging", {
        "density": density, "lambda1": 0.0, "rank_threshold": rho}).state_dict
    for name in ("w", "conv"):
        w0 = base[name].reshape(base[name].shape[0], -1).double()
        delta = (out[name] - base[name]).reshape(w0.shape).double()
        dots = (delta * w0).sum(-1).abs()
        bound = 1e-5 * delta.norm(dim=-1) * w0.norm(dim=-1) + 1e-6
        assert bool((dots <= bound).all()), (name, dots, bound)


@given(family=model_family(),
       method=st.sampled_from(["dare_linear", "dare_ties", "dare_neuromerging"]),
       seed=st.integers(0, 2**32))
def test_dare_same_seed_same_output(family: tuple, method: str, seed: int) -> None:
    base, experts = family
    run = lambda: merge_state_dicts(  # noqa: E731
        base, experts, method, {"seed": seed, "drop_rate": 0.5}).state_dict
    a, b = run(), run()
    for k in base:
        assert torch.equal(a[k], b[k])


@given(family=model_family(), method=st.sampled_from(METHODS),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_results_are_finite_and_keep_the_base_dtype(family: tuple, method: str,
                                                    dtype: torch.dtype) -> None:
    base, experts = family
    base = {k: v.to(dtype) for k, v in base.items()}
    experts = [{k: v.to(dtype) for k, v in e.items()} for e in experts]
    out = merge_state_dicts(base, experts, method, params_for(method)).state_dict
    for k in base:
        assert out[k].dtype == dtype
        assert bool(torch.isfinite(out[k]).all())


def test_all_zero_task_vectors_and_zero_base_are_finite() -> None:
    base = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    experts = [dict(base), {"w": torch.ones(3, 4), "b": torch.zeros(4)}]
    for method in METHODS:
        out = merge_state_dicts(base, experts[-ARITY.get(method, 2):], method).state_dict
        assert all(bool(torch.isfinite(v).all()) for v in out.values()), method
