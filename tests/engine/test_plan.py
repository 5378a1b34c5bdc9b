"""The plan as a plain value: what ``prepare`` decides before any tensor is read, what
``MergePlan.to_dict`` / ``table`` show, and that executing it gives what ``merge_state_dicts``
gives."""

from __future__ import annotations

import json
import re

import pytest
import torch

from neuromerge import merge_state_dicts
from neuromerge.engine import DictSink, MergeJob, Source, memory, prepare, units
from neuromerge.errors import ConfigError
from neuromerge.io.reader import StateDictReader
from neuromerge.registry import get_method


def models() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(3)
    base = {"emb.weight": torch.randn(10, 4, generator=gen),
            "fc.weight": torch.randn(3, 4, generator=gen),
            "fc.bias": torch.randn(3, generator=gen),
            "position_ids": torch.arange(10)}
    experts = {name: {k: v + 0.1 * torch.randn(v.shape, generator=gen)
                      if v.is_floating_point() else v.clone() for k, v in base.items()}
               for name in ("math", "code")}
    return base, experts


def job_for(method: str, params: dict | None = None, **kw) -> MergeJob:  # type: ignore[no-untyped-def]
    base, experts = models()
    m = get_method(method)
    return prepare(StateDictReader(base, "base"),
                   [StateDictReader(sd, k) for k, sd in experts.items()], m,
                   m.validate(params), model_keys=list(experts), **kw)


def test_every_output_tensor_names_its_sources_kind_axis_and_parameters() -> None:
    job = job_for("neuromerging", {"density": 0.5})
    plan = job.plan
    by_name = {p.name: p for p in plan.tensors}
    assert list(by_name) == ["emb.weight", "fc.weight", "fc.bias", "position_ids"]
    assert by_name["fc.weight"].sources == (Source("base", "fc.weight"),
                                            Source("math", "fc.weight"),
                                            Source("code", "fc.weight"))
    assert by_name["position_ids"].kind == "copy"
    assert by_name["position_ids"].sources == (Source("base", "position_ids"),)
    assert by_name["fc.bias"].kind == "point" and by_name["emb.weight"].kind == "neuronal"
    assert by_name["fc.weight"].params["density"] == 0.5
    assert by_name["fc.weight"].params["lambda2"] == "auto"  # resolved by the trim pass
    assert plan.models == ("math", "code")
    assert [u.rows for u in plan.units] == [None] * 4
    assert len(plan.passes) == 1 and "resolves lambda2" in plan.passes[0]


def test_a_method_without_a_merge_wide_quantity_plans_no_pass() -> None:
    assert job_for("task_arithmetic").plan.passes == ()
    assert job_for("ties", {"trim_scope": "tensor"}).plan.passes == ()
    assert "threshold" in job_for("ties").plan.passes[0]  # global trim: thresholds first


def test_the_plan_is_json_and_shows_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    per = units.bytes_per_entry(2, 4, torch.float32)
    monkeypatch.setattr(memory, "memory_budget", lambda limit: per * 16)
    plan = job_for("task_arithmetic", memory_limit=1 << 30).plan
    data = json.loads(json.dumps(plan.to_dict()))
    tensors = {t["name"]: t for t in data["tensors"]}
    assert tensors["emb.weight"]["units"] == [[0, 4], [4, 8], [8, 10]]  # 4 rows of 4 entries
    assert tensors["fc.weight"]["units"] is None
    assert tensors["fc.weight"]["sources"][1] == {"model": "math", "name": "fc.weight"}
    assert data["memory"] == {"budget": per * 16, "limited": True, "band": plan.memory.band}
    assert plan.budget_blocks() == {"emb.weight": 3}
    assert any("tie-breaks" in p for p in data["passes"])
    table = plan.table()
    assert "units: 6 (1 tensor in row blocks" in table and "under --memory-limit" in table


def test_executing_the_plan_is_the_in_memory_merge() -> None:
    base, experts = models()
    job = job_for("dare_ties", {"seed": 7})
    sink = DictSink(job.plan.tensors)
    result = job.execute(sink, progress=False)
    direct = merge_state_dicts(base, experts, "dare_ties", {"seed": 7})
    assert result.params == direct.params
    for name, value in direct.state_dict.items():
        assert torch.equal(sink.state_dict[name], value), name
    assert job.output_metas() == [(p.name, p.meta) for p in job.plan.tensors]


def test_planning_refuses_before_any_tensor_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    per = units.bytes_per_entry(2, 4, torch.float32)
    monkeypatch.setattr(memory, "memory_budget", lambda limit: per * 8)
    with pytest.raises(ConfigError, match=r"emb\.weight.*not row-local"):
        job_for("tsv_m", memory_limit=1 << 30)


@pytest.mark.parametrize(("method", "message"), [
    ("nuslerp", "nuslerp merges exactly 2 models besides the base (got 1)"),
    ("model_stock", "model_stock merges at least 2 models besides the base (got 1)"),
])
def test_the_number_of_models_is_checked_when_planning(method: str, message: str) -> None:
    base, experts = models()
    m = get_method(method)
    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare(StateDictReader(base, "base"), [StateDictReader(experts["math"], "math")], m,
                m.validate(), model_keys=["math"])
    with pytest.raises(ConfigError, match=r"slerp merges 1 to 2 models besides the base \(got 3"):
        prepare(
            StateDictReader(base, "base"), [StateDictReader(sd, k) for k, sd in
                                            [*experts.items(), ("x", base)]],
            get_method("slerp"), get_method("slerp").validate(), model_keys=["a", "b", "x"])
