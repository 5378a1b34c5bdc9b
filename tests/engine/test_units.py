"""Out-of-core merging: a tensor too large for the memory budget is merged in row blocks, and
the result is the same as merging it whole, for every method and every tie-break."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neuromerge.engine as engine
from neuromerge import merge_state_dicts
from neuromerge.engine import memory, trim_pass, units
from neuromerge.errors import ConfigError
from neuromerge.io.reader import TensorMeta, open_checkpoint
from neuromerge.kernels import RNG_CHUNK, uniform_stream
from neuromerge.registry import get_method
from tests.helpers import toy_statistics

# Every method and the settings whose whole-tensor dependencies differ: a per-tensor trim
# threshold, the tie-break sums (trimmed τ, c, orthogonal parts), DARE's random stream.
CASES = [
    ("average", {}),
    ("linear", {}),
    ("linear", {"normalize": False, "weight": 0.5}),
    ("task_arithmetic", {}),
    ("ties", {"trim_scope": "tensor", "normalize": False, "weight": 0.7}),
    ("ties", {"trim_scope": "tensor"}),
    ("ties", {"trim_scope": "global"}),
    ("ties", {"trim_scope": "tensor", "density": 1.0}),
    ("dare_linear", {"seed": 3}),
    ("dare_ties", {"seed": 3, "drop_rate": 0.3}),
    ("neuromerging", {}),
    ("neuromerging", {"trim_scope": "tensor", "lambda1": 0.7}),
    ("neuromerging", {"orthogonal_merge": "ties", "lambda1": 1.0, "density": 0.5}),
    ("neuromerging", {"compat": "official", "lambda1": 0.5, "lambda2": 1.2}),
    ("neuromerging", {"rank_threshold": 0.6, "density": 0.3}),
    ("dare_neuromerging", {"seed": 3}),
    ("dare_neuromerging", {"seed": 1, "drop_rate": 0.3, "lambda1": 0.5,
                           "orthogonal_merge": "ties"}),
    ("consensus_ta", {"tall_lambda": 0.3}),
    ("consensus_ties", {"trim_scope": "tensor", "density": 0.5}),
    ("consensus_ties", {"trim_scope": "global", "aggregate": "mean", "k": 1}),
    ("fisher", {}),
    ("fisher", {"fisher_floor": 0.0, "scale": 0.5}),
    ("regmean", {}),
    ("regmean", {"offdiag_scale": 1.0}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("nearswap", {}),
    ("nearswap", {"t": 0.5}),
    ("passthrough", {"scale": 0.5}),
    ("della", {}),
    ("della_linear", {"normalize": False}),
]

#: Methods whose merged rows depend on other rows (per-tensor order statistics, an SVD).
WHOLE_TENSOR = ["breadcrumbs", "pcb", "tsv_m", "iso_c", "iso_cts", "breadcrumbs_ties", "sce",
                "slerp", "nuslerp", "multislerp", "karcher",
                "arcee_fusion"]


def models_for(method: str) -> tuple[dict, list[dict]]:
    """The tie-heavy models with as many experts as the method takes (3 where it takes more)."""
    least, most = get_method(method).n_models
    return tie_heavy_models(least if most is not None and most < 3 else 3)


def tie_heavy_models(n_experts: int = 3) -> tuple[dict, list[dict]]:
    """Small-integer task vectors: many exact cancellations (Σt = 0), so the tensor-wide
    tie-breaks decide entries, and blocks whose own sums differ in sign from the tensor's."""
    gen = torch.Generator().manual_seed(0)
    base = {"emb": torch.randint(-3, 4, (37, 6), generator=gen).float(),
            "w": torch.randint(-3, 4, (9, 4, 2), generator=gen).float(),
            "b": torch.randint(-3, 4, (29,), generator=gen).float(),
            "ids": torch.arange(5)}
    experts = []
    for _ in range(n_experts):
        ex = {}
        for k, v in base.items():
            if v.is_floating_point():
                delta = torch.randint(-2, 3, v.shape, generator=gen).float()
                ex[k] = v + delta
            else:
                ex[k] = v.clone()
        experts.append(ex)
    return base, experts


def merged(method: str, params: dict, base: dict, experts: list[dict], *,
           max_entries: int | None, monkeypatch: pytest.MonkeyPatch) -> engine.MergeResult:
    if max_entries is None:
        monkeypatch.setattr(memory, "memory_budget", lambda limit: 1 << 40)
    else:
        # a budget that admits max_entries entries per block for these inputs
        per = units.bytes_per_entry(len(experts), 4, torch.float32)
        monkeypatch.setattr(memory, "memory_budget", lambda limit: per * max_entries)
    keyed = {f"m{i}": e for i, e in enumerate(experts)}
    return merge_state_dicts(base, keyed, method, params,
                             statistics=toy_statistics(method, experts))


@pytest.mark.parametrize(("method", "params"), CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("max_entries", [1, 7, 20])
def test_row_blocks_give_the_whole_tensor_result(method: str, params: dict, max_entries: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    base, experts = models_for(method)
    whole = merged(method, params, base, experts, max_entries=None, monkeypatch=monkeypatch)
    blocks = merged(method, params, base, experts, max_entries=max_entries,
                    monkeypatch=monkeypatch)
    assert whole.extra["row_blocks"] == {}
    assert set(blocks.extra["row_blocks"]) >= {"emb", "w", "b"}  # really split
    assert blocks.params == whole.params
    for name, value in whole.state_dict.items():
        # float64 rounding of sums may differ in the last bit between block and whole sums
        torch.testing.assert_close(blocks.state_dict[name], value, rtol=1e-6, atol=1e-6,
                                   msg=f"{method} {params} {name}")


#: della ranks a 1-D tensor whole, so with a drop it runs under compute blocks only (a budget that
#: splits a 1-D tensor is refused: tests/methods/test_della.py)
DROPPING = [("della", {"density": 0.5, "epsilon": 0.2, "seed": 3}),
            ("della_linear", {"density": 0.6, "seed": 1, "rescale": False})]


@pytest.mark.parametrize(("method", "params"),
                         CASES + DROPPING + [(m, {}) for m in WHOLE_TENSOR],
                         ids=lambda v: str(v))
def test_compute_blocks_read_once_and_give_the_whole_tensor_result(
        method: str, params: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors whose inputs fit the budget but exceed COMPUTE_BLOCK_ENTRIES are merged in row
    blocks (row-local methods only; 1-D tensors stay whole) from inputs read once and held:
    same result, one read."""
    base, experts = models_for(method)
    whole = merged(method, params, base, experts, max_entries=None, monkeypatch=monkeypatch)
    monkeypatch.setattr(units, "COMPUTE_BLOCK_ENTRIES", 7)
    blocks = merged(method, params, base, experts, max_entries=None, monkeypatch=monkeypatch)
    assert blocks.extra["row_blocks"] == {}
    if get_method(method).row_local:
        assert set(blocks.extra["compute_blocks"]) == {"emb", "w"}
    else:
        assert blocks.extra["compute_blocks"] == {}
    assert blocks.bytes_read == whole.bytes_read  # the blocks' passes reuse the held inputs
    for name, value in whole.state_dict.items():
        torch.testing.assert_close(blocks.state_dict[name], value, rtol=1e-6, atol=1e-6,
                                   msg=f"{method} {params} {name}")


def test_tie_breaks_matter_in_this_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard for the test above: with the tie-breaks' sums taken per block instead of over the
    whole tensor (what a naive blocked merge does), the TIES result changes."""
    base, experts = tie_heavy_models()
    whole = merged("ties", {"trim_scope": "tensor", "density": 1.0}, base, experts,
                   max_entries=None, monkeypatch=monkeypatch)
    real = trim_pass.prepare_blocks

    def naive(*args, **kwargs):  # type: ignore[no-untyped-def]
        fields = real(*args, **kwargs)
        return {**fields, "sums": None}

    monkeypatch.setattr(trim_pass, "prepare_blocks", naive)
    per = units.bytes_per_entry(3, 4, torch.float32)
    monkeypatch.setattr(memory, "memory_budget", lambda limit: per * 6)
    naive_out = merge_state_dicts(base, {f"m{i}": e for i, e in enumerate(experts)}, "ties",
                                  {"trim_scope": "tensor", "density": 1.0})
    assert not torch.equal(naive_out.state_dict["emb"], whole.state_dict["emb"])


def test_split_rows() -> None:
    meta = TensorMeta((10, 4), torch.float32)
    assert units.split_rows(meta, 40) == [None]
    assert units.split_rows(meta, 12) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert units.split_rows(meta, 1) == [(i, i + 1) for i in range(10)]  # at least one row
    assert units.split_rows(TensorMeta((), torch.float32), 0) == [None]
    assert units.split_rows(TensorMeta((1, 99), torch.float32), 5) == [None]


def test_a_method_that_needs_whole_tensors_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    base, experts = tie_heavy_models()
    whole_only = dataclasses.replace(get_method("average"), row_local=False)
    per = units.bytes_per_entry(3, 4, torch.float32)
    monkeypatch.setattr(memory, "memory_budget", lambda limit: per * 10)
    with pytest.raises(ConfigError, match=r"'emb' does not fit the memory budget .* not "
                                          r"row-local\): raise --memory-limit"):
        merge_state_dicts(base, experts, whole_only)


@pytest.mark.parametrize("method", WHOLE_TENSOR)
def test_whole_tensor_methods_are_refused_rather_than_blocked(
        method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not get_method(method).row_local
    base, experts = models_for(method)
    per = units.bytes_per_entry(len(experts), 4, torch.float32)
    monkeypatch.setattr(memory, "memory_budget", lambda limit: per * 10)
    with pytest.raises(ConfigError, match=r"not row-local"):
        merge_state_dicts(base, experts, method)


def test_every_method_is_classified() -> None:
    from neuromerge.registry import all_methods

    names = {m.name for m in all_methods()}
    assert {m for m, _ in CASES} | set(WHOLE_TENSOR) == names
    assert {m.name for m in all_methods() if not m.row_local} == set(WHOLE_TENSOR)


def test_a_memory_limit_below_the_start_up_footprint_is_refused() -> None:
    base, experts = tie_heavy_models()
    with pytest.raises(ConfigError, match=r"--memory-limit 10 MB is too low: the process "
                                          r"already uses"):
        merge_state_dicts(base, experts, "average", memory_limit=10_000_000)


class _FakeLibc:
    """Records the allocator calls a run makes (mallopt's setting is the process's)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_each_run_sets_its_own_mmap_threshold_and_trims_under_a_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run under a memory limit lowers glibc's mmap threshold and trims the heap after every
    tensor; the next run without a limit sets 32 MB again (no setting is cached across runs),
    and trims only when much of the heap is free."""
    libc = _FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(memory, "_mallinfo2", lambda: lambda: type("I", (), {"fordblks": 0})())
    monkeypatch.setattr(memory.sys, "platform", "linux")
    base = {"w": torch.randn(64, 32), "b": torch.randn(64)}
    experts = [{k: v + 0.1 * torch.randn(v.shape) for k, v in base.items()} for _ in range(2)]
    # the same budget on both limited runs: the same threshold, which must be set again
    monkeypatch.setattr(memory, "memory_budget",
                        lambda limit: 64 << 20 if limit else 1 << 40)
    for limit in (1 << 30, None, 1 << 30):
        libc.calls.clear()
        merge_state_dicts(base, experts, "ties", memory_limit=limit)
        (threshold,) = [v for k, v in libc.calls if k == "mallopt"]
        trims = sum(1 for k, _ in libc.calls if k == "malloc_trim")
        if limit is None:
            assert threshold == 32 << 20 and trims == 0  # fordblks 0: nothing worth trimming
        else:
            assert 128 << 10 <= threshold < 32 << 20
            assert trims >= 2  # after each of the two tensors (and the statistics passes)


@given(seed=st.integers(0, 2**40), offset=st.integers(0, 3 * RNG_CHUNK),
       count=st.integers(0, RNG_CHUNK + 17))
def test_uniform_stream_blocks_are_slices_of_one_stream(seed: int, offset: int,
                                                        count: int) -> None:
    whole = uniform_stream(seed, 0, offset + count)
    assert torch.equal(uniform_stream(seed, offset, count), whole[offset:])


def test_uniform_stream_starts_as_the_seeded_generator() -> None:
    gen = torch.Generator().manual_seed(123)
    assert torch.equal(uniform_stream(123, 0, 500), torch.rand(500, generator=gen))


def test_read_rows_is_a_slice_of_the_tensor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    t = torch.arange(60, dtype=torch.bfloat16).reshape(12, 5)
    save_file({"a": torch.zeros(3), "t": t}, str(tmp_path / "model.safetensors"))
    r = open_checkpoint(tmp_path)
    try:
        assert torch.equal(r.read_rows("t", 4, 9), t[4:9])
        assert torch.equal(r.read_rows("t", 11, 12), t[11:])
        assert r.read_rows("t", 5, 5).shape == (0, 5)
    finally:
        r.close()


def generic_models(n_experts: int = 3) -> tuple[dict, list[dict]]:
    """Random values: no exact ties, and distinct singular values in every neuron's SVD frame
    (with integer data a frame can be degenerate, and a GPU eigensolver may pick another basis
    of it than the CPU's: a difference of devices, not of blocks)."""
    gen = torch.Generator().manual_seed(1)
    base = {"emb": torch.randn(37, 6, generator=gen), "w": torch.randn(9, 4, 2, generator=gen),
            "b": torch.randn(29, generator=gen)}
    return base, [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
                  for _ in range(n_experts)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "params"), CASES, ids=lambda v: str(v))
def test_cuda_row_blocks_match_cpu_whole(method: str, params: dict,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base, experts = generic_models()
    whole = merged(method, params, base, experts, max_entries=None, monkeypatch=monkeypatch)
    per = units.bytes_per_entry(len(experts), 4, torch.float32)
    monkeypatch.setattr(memory, "memory_budget", lambda limit: per * 7)
    gpu = merge_state_dicts(base, {f"m{i}": e for i, e in enumerate(experts)}, method, params,
                            device="cuda")
    assert gpu.extra["row_blocks"]
    for name, value in whole.state_dict.items():
        torch.testing.assert_close(gpu.state_dict[name], value, rtol=1e-5, atol=1e-5)
