"""The streaming engine: planning and checks, statistics pass, dtypes, device handling."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.devices import compute_dtype, resolve_device
from neuromerge.engine import build_plan
from neuromerge.errors import ConfigError, InputError
from neuromerge.io.reader import StateDictReader
from neuromerge.registry import all_methods
from tests.helpers import toy_statistics


def family(dtype: torch.dtype = torch.float32) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(0)
    base = {"emb.weight": torch.randn(6, 4, generator=gen),
            "fc.weight": torch.randn(3, 4, generator=gen),
            "fc.bias": torch.randn(3, generator=gen),
            "scale": torch.tensor(1.5),
            "position_ids": torch.arange(6)}
    experts = []
    for _ in range(2):
        experts.append({k: (v + 0.1 * torch.randn(v.shape, generator=gen)
                            if v.is_floating_point() else v.clone()) for k, v in base.items()})
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    experts = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in e.items()}
               for e in experts]
    return base, experts


def readers(base: dict, experts: list[dict]) -> tuple:
    return StateDictReader(base, "base"), [StateDictReader(e, f"e{i}")
                                           for i, e in enumerate(experts)]


def test_plan_classifies_tensors() -> None:
    b, es = readers(*family())
    kinds = {p.name: p.kind for p in build_plan(b, es)}
    assert kinds == {"emb.weight": "neuronal", "fc.weight": "neuronal", "fc.bias": "point",
                     "scale": "point", "position_ids": "copy"}


def test_tensor_class_override_by_glob() -> None:
    b, es = readers(*family())
    plan = build_plan(b, es, tensor_class={"emb.*": "copy", "fc.weight": "point"})
    kinds = {p.name: p.kind for p in plan}
    assert kinds["emb.weight"] == "copy" and kinds["fc.weight"] == "point"
    with pytest.raises(ConfigError, match=r"fc.bias.*1-D"):
        build_plan(b, es, tensor_class={"fc.bias": "neuronal"})
    with pytest.raises(ConfigError, match=r"position_ids.*int64"):
        build_plan(b, es, tensor_class={"position_ids": "point"})


def test_copy_class_tensors_come_from_the_base() -> None:
    base, experts = family()
    out = merge_state_dicts(base, experts, "task_arithmetic",
                            tensor_class={"emb.*": "copy"}).state_dict
    assert torch.equal(out["emb.weight"], base["emb.weight"])
    assert torch.equal(out["position_ids"], base["position_ids"])
    assert not torch.equal(out["fc.weight"], base["fc.weight"])


def test_shape_mismatch_names_tensor_and_both_shapes() -> None:
    base, experts = family()
    experts[1]["emb.weight"] = torch.randn(7, 4)
    with pytest.raises(InputError, match=r"'emb.weight'.*\[7, 4\].*e1.*\[6, 4\].*vocabulary"):
        merge_state_dicts(base, {"e0": experts[0], "e1": experts[1]}, "ties")


def test_missing_and_extra_tensors() -> None:
    base, experts = family()
    del experts[0]["fc.bias"]
    with pytest.raises(InputError, match=r"lacks tensor 'fc.bias'"):
        merge_state_dicts(base, experts, "ties")
    out = merge_state_dicts(base, experts, "task_arithmetic", missing_tensors="base")
    assert torch.equal(out.state_dict["fc.bias"], base["fc.bias"])
    assert "fc.bias" in out.extra["copied"]
    base2, experts2 = family()
    experts2[1]["new.weight"] = torch.zeros(2)
    with pytest.raises(InputError, match=r"'new.weight' is not in the base"):
        merge_state_dicts(base2, experts2, "ties")


def test_float_in_base_but_int_in_expert_is_refused() -> None:
    base, experts = family()
    experts[0]["fc.bias"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(InputError, match=r"'fc.bias': int64"):
        merge_state_dicts(base, experts, "average")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused(bad: float) -> None:
    base, experts = family()
    experts[1]["fc.weight"][0, 0] = bad
    with pytest.raises(InputError, match=r"model_b: tensor 'fc.weight' contains NaN or Inf"):
        merge_state_dicts(base, {"model_a": experts[0], "model_b": experts[1]}, "average")


def test_trim_pass_runs_only_when_needed() -> None:
    base, experts = family()
    assert merge_state_dicts(base, experts, "task_arithmetic").trim is None
    assert merge_state_dicts(base, experts, "ties", {"density": 1.0}).trim is None
    assert merge_state_dicts(base, experts, "ties", {"trim_scope": "tensor"}).trim is None
    r = merge_state_dicts(base, experts, "ties", {"density": 0.3})
    assert r.trim is not None and r.trim.thresholds is not None
    r = merge_state_dicts(base, experts, "neuromerging", {"trim_scope": "tensor"})
    assert r.trim is not None and r.trim.thresholds is None  # σ for λ2 = auto only
    r = merge_state_dicts(base, experts, "neuromerging", {"lambda2": 1.0, "density": 1.0})
    assert r.trim is None and r.params["lambda2"] == 1.0 and r.params["lambda_point"] == 1.0


def test_global_trim_counts_only_merged_tensors() -> None:
    base, experts = family()
    r = merge_state_dicts(base, experts, "ties", {"density": 0.5},
                          tensor_class={"emb.*": "copy"})
    assert r.trim is not None
    assert r.trim.n_entries == 3 * 4 + 3 + 1  # fc.weight, fc.bias, scale


def test_global_trim_reads_the_inputs_once_plus_a_sample() -> None:
    # The sampled band holds the k-th values, so the stats skip their second read of the inputs.
    gen = torch.Generator().manual_seed(3)
    base = {f"l{i}.weight": torch.randn(256, 512, generator=gen) for i in range(4)}
    experts = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
               for _ in range(3)]
    size = sum(v.numel() * 4 for v in base.values()) * 4  # base + 3 experts, float32
    r = merge_state_dicts(base, experts, "ties", {"density": 0.2})
    assert r.trim is not None
    ref = merge_state_dicts(base, experts, "ties", {"density": 0.2, "trim_scope": "tensor"})
    assert ref.bytes_read == size  # the merge pass alone
    assert r.bytes_read < 2.1 * size  # stats pass + sample + merge pass; not 3 passes
    flat = [torch.cat([(e[k] - base[k]).abs().reshape(-1) for k in base]) for e in experts]
    k = -(-2 * flat[0].numel() // 10)
    assert r.trim.thresholds == tuple(float(f.sort(descending=True).values[k - 1])
                                       for f in flat)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32_and_written_in_their_dtype(dtype: torch.dtype
                                                                        ) -> None:
    base, experts = family(dtype)
    out = merge_state_dicts(base, experts, "task_arithmetic", {"scale": 1.0}).state_dict
    expected = base["fc.weight"].float() + sum(e["fc.weight"].float() - base["fc.weight"].float()
                                               for e in experts)
    assert out["fc.weight"].dtype == dtype
    assert_close(out["fc.weight"], expected.to(dtype))
    out32 = merge_state_dicts(base, experts, "task_arithmetic", {"scale": 1.0},
                              out_dtype="float32").state_dict
    assert out32["fc.weight"].dtype == torch.float32
    assert_close(out32["fc.weight"], expected)
    assert out32["position_ids"].dtype == torch.int64


def test_float64_compute_dtype() -> None:
    base, experts = family()
    r32 = merge_state_dicts(base, experts, "neuromerging", {"density": 0.5}).state_dict
    r64 = merge_state_dicts(base, experts, "neuromerging", {"density": 0.5}, dtype="float64",
                            out_dtype="float64").state_dict
    assert r64["fc.weight"].dtype == torch.float64
    assert_close(r64["fc.weight"].float(), r32["fc.weight"], rtol=1e-5, atol=1e-6)
    assert compute_dtype("bfloat16") == torch.float32


def test_overflow_in_out_dtype_is_an_error() -> None:
    base = {"w": torch.ones(2, dtype=torch.float16)}
    experts = [{"w": torch.full((2,), 60000.0, dtype=torch.float16)}]
    with pytest.raises(InputError, match=r"'w'.*not finite in float16"):
        merge_state_dicts(base, experts, "task_arithmetic", {"scale": 2.0})


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", [m.name for m in all_methods()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(method: str, dtype: torch.dtype) -> None:
    base, experts = family(dtype)
    stats = toy_statistics(method, experts)
    cpu = merge_state_dicts(base, experts, method, device="cpu", statistics=stats).state_dict
    gpu = merge_state_dicts(base, experts, method, device="cuda", statistics=stats).state_dict
    for k in base:
        assert gpu[k].device.type == "cpu" and gpu[k].dtype == cpu[k].dtype
        tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
        assert_close(gpu[k], cpu[k], **tol)


def test_result_reports_counts_and_timings() -> None:
    base, experts = family()
    r = merge_state_dicts(base, experts, "neuromerging", {"density": 0.5})
    assert r.counts == {"neuronal": 2, "point": 2, "copy": 1}
    assert r.seconds["total"] >= r.seconds["merge"] > 0
    assert r.bytes_read > 0


def test_copied_tensors_are_checked_and_never_alias_the_input() -> None:
    base, experts = family()
    out = merge_state_dicts(base, experts, "average").state_dict
    assert torch.equal(out["position_ids"], base["position_ids"])
    out["position_ids"][0] = 99
    assert base["position_ids"][0] == 0
    base["emb.weight"][0, 0] = float("nan")
    with pytest.raises(InputError, match=r"base: tensor 'emb.weight' contains NaN"):
        merge_state_dicts(base, experts, "average", tensor_class={"emb.*": "copy"})


def test_experts_may_lack_tensors_that_are_copied_from_the_base() -> None:
    # transformers 5 saves no `position_ids` buffer; a base saved by transformers 4 has one
    base, experts = family()
    for e in experts:
        del e["position_ids"]
    out = merge_state_dicts(base, experts, "ties").state_dict
    assert torch.equal(out["position_ids"], base["position_ids"])
    for e in experts:
        del e["emb.weight"]
    with pytest.raises(InputError, match=r"lacks tensor 'emb.weight'"):
        merge_state_dicts(base, experts, "ties")
    out = merge_state_dicts(base, experts, "ties", tensor_class={"emb.*": "copy"}).state_dict
    assert torch.equal(out["emb.weight"], base["emb.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_is_exact(dtype: torch.dtype) -> None:
    from neuromerge.engine.inputs import all_finite

    big = torch.finfo(dtype).max
    t = torch.full((1000,), big / 4, dtype=dtype)  # the float32 sum overflows, entries finite
    assert all_finite(t)
    assert all_finite(torch.zeros(0, dtype=dtype))
    assert all_finite(torch.randn(50, 7).to(dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = torch.randn(50, 7).to(dtype)
        u[13, 3] = bad
        assert not all_finite(u)
    pair = torch.tensor([float("inf"), -float("inf")], dtype=dtype)  # sums to NaN
    assert not all_finite(pair)
