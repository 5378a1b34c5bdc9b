"""A method's signature is its parameter list: validation and listings derive from it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated

import pytest
import torch
from pydantic import Field

from neuromerge import merge_state_dicts
from neuromerge.errors import ConfigError
from neuromerge.registry import (
    TensorContext,
    all_methods,
    describe_type,
    get_method,
    merge_method,
    unregister,
)


def test_builtin_methods_are_registered_with_references() -> None:
    names = {m.name for m in all_methods()}
    assert {"average", "task_arithmetic", "ties", "dare_linear", "dare_ties",
            "neuromerging", "dare_neuromerging", "pcb", "breadcrumbs", "consensus_ta",
            "consensus_ties", "tsv_m", "iso_c", "iso_cts"} <= names
    for m in all_methods():
        assert m.reference_url.startswith("https://")
        assert m.summary and "=" in m.summary  # the equation is in the docstring
        for p in m.params:
            assert p.description, f"{m.name}.{p.name} has no description"


def test_parameters_come_from_the_signature() -> None:
    nm = get_method("neuromerging")
    assert nm.param_names == ("density", "trim_scope", "lambda1", "lambda2", "lambda_point",
                              "rank_threshold", "orthogonal_merge", "compat", "weight")
    assert nm.defaults["density"] == 0.2 and nm.defaults["lambda2"] == "auto"
    assert nm.trims and get_method("ties").trims and not get_method("average").trims
    assert get_method("dare_ties").per_model_params == ("seed", "weight", "drop_rate")


def test_validate_fills_defaults_and_checks_values() -> None:
    ties = get_method("ties")
    assert ties.validate({"density": 0.5}) == {"density": 0.5, "trim_scope": "global",
                                               "trim_count": "ceil", "scale": 1.0,
                                               "weight": 1.0, "normalize": True}
    with pytest.raises(ConfigError, match=r"unknown parameter 'desnity' for method 'ties'"):
        ties.validate({"desnity": 0.5})
    with pytest.raises(ConfigError, match=r"parameters.density: .*less than or equal to 1"):
        ties.validate({"density": 1.5})
    with pytest.raises(ConfigError, match=r"trim_scope"):
        ties.validate({"trim_scope": "layer"})
    nm = get_method("neuromerging")
    assert nm.validate({"lambda2": 1.5})["lambda2"] == 1.5
    with pytest.raises(ConfigError, match=r"lambda2"):
        nm.validate({"lambda2": "big"})
    with pytest.raises(ConfigError, match=r"rank_threshold"):
        nm.validate({"rank_threshold": 0})


def test_unknown_method() -> None:
    with pytest.raises(ConfigError,
                       match=r"unknown merge_method 'tie'.*available: arcee_fusion, average"):
        get_method("tie")


def test_describe_type() -> None:
    nm = get_method("neuromerging")
    types = {p.name: p.type_name for p in nm.params}
    assert types["lambda2"] == "float | auto"
    assert types["trim_scope"] == "global | tensor"
    assert types["lambda_point"] == "float | null"
    assert describe_type(int) == "int"


@pytest.fixture
def scratch_method() -> Iterator[None]:
    yield
    unregister("test_scaled_mean")


def test_a_new_method_is_a_decorated_function(scratch_method: None) -> None:
    @merge_method(name="test_scaled_mean", reference_url="https://example.org/paper")
    def scaled_mean(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                    factor: Annotated[float, Field(gt=0, description="multiplier")] = 2.0,
                    ctx: TensorContext = TensorContext()) -> torch.Tensor:
        """θ = θ0 + factor · mean_t τt."""
        return base + factor * torch.stack([t - base for t in tensors]).mean(0)

    assert get_method("test_scaled_mean") is scaled_mean
    base = {"w": torch.zeros(2)}
    out = merge_state_dicts(base, [{"w": torch.ones(2)}], "test_scaled_mean", {"factor": 3.0})
    assert torch.equal(out.state_dict["w"], torch.full((2,), 3.0))
    with pytest.raises(ConfigError, match=r"factor"):
        scaled_mean.validate({"factor": -1})


def test_bad_signatures_are_rejected(scratch_method: None) -> None:
    with pytest.raises(TypeError, match=r"keyword-only with a default"):
        @merge_method(name="test_scaled_mean", reference_url="https://x")
        def bad(base, tensors, *, factor: float, ctx=TensorContext()):  # type: ignore
            return base
    with pytest.raises(TypeError, match=r"needs 'density' and 'trim_scope'"):
        @merge_method(name="test_scaled_mean", reference_url="https://x", trims=True)
        def bad2(base, tensors, *, ctx=TensorContext()):  # type: ignore
            return base


def test_direct_call_with_ctx_refuses_unresolved_auto() -> None:
    nm = get_method("neuromerging")
    with pytest.raises(ConfigError, match=r"auto"):
        nm(torch.ones(2, 2), [torch.ones(2, 2)], ctx=TensorContext())
