"""The streaming sharded writer, read back by the independent ``safetensors`` library, and the
all-or-nothing output folder."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from neuromerge.errors import ConfigError, OutputError
from neuromerge.io.reader import TensorMeta, open_checkpoint
from neuromerge.io.writer import OutputFolder, ShardedSafetensorsWriter, parse_size, plan_shards


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {
        "emb.weight": torch.randn(40, 8, generator=g),
        "half": torch.randn(3, 5, generator=g).half(),
        "brain": torch.randn(7, generator=g).bfloat16(),
        "double": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "ids": torch.arange(12, dtype=torch.int64).reshape(1, 12),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "small_ints": torch.tensor([-3, 4], dtype=torch.int8),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    return sd


def write_all(folder: Path, sd: dict[str, torch.Tensor], max_size: int
              ) -> ShardedSafetensorsWriter:
    w = ShardedSafetensorsWriter(folder, [(k, TensorMeta(tuple(v.shape), v.dtype))
                                          for k, v in sd.items()], max_size)
    for k, v in sd.items():
        w.write(k, v)
    w.close()
    return w


def read_back(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of the folder via safetensors.safe_open, and which file holds each."""
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert k not in out, f"{k} in two shards"
                out[k] = sf.get_tensor(k)
                where[k] = f.name
    return out, where


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def data_size(path: Path) -> int:
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - hlen


# --- the writer -------------------------------------------------------------------------------


def test_single_file_when_everything_fits(tmp_path: Path) -> None:
    sd = sample_tensors()
    w = write_all(tmp_path, sd, 10**9)
    assert w.filenames == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no index
    got, _ = read_back(tmp_path)
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        assert_bits_equal(got[k], v)
    assert w.total_size == sum(nbytes(v) for v in sd.values())
    # The data section starts 8-byte aligned.
    (hlen,) = struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])
    assert hlen % 8 == 0


def test_sharded_output_with_index(tmp_path: Path) -> None:
    sd = sample_tensors()
    limit = 64
    w = write_all(tmp_path, sd, limit)
    n = len(w.filenames)
    assert n == len(plan_shards([(k, TensorMeta(tuple(v.shape), v.dtype))
                                 for k, v in sd.items()], limit))
    assert n > 2
    assert w.filenames == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == w.filenames
    got, where = read_back(tmp_path)
    for k, v in sd.items():
        assert_bits_equal(got[k], v)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == where
    assert index["metadata"]["total_size"] == sum(nbytes(v) for v in sd.values())
    for fname in w.filenames:
        names = [k for k, f in where.items() if f == fname]
        size = data_size(tmp_path / fname)
        assert size == sum(nbytes(sd[k]) for k in names)
        assert size <= limit or len(names) == 1  # only a lone oversized tensor may exceed it


def test_oversized_tensor_gets_a_shard_of_its_own(tmp_path: Path) -> None:
    sd = {"a": torch.ones(10), "big": torch.randn(100), "b": torch.ones(10), "c": torch.ones(5)}
    w = write_all(tmp_path, sd, 100)  # big is 400 bytes
    got, where = read_back(tmp_path)
    assert [k for k in where if where[k] == where["big"]] == ["big"]
    assert len(w.filenames) == 3  # [a] [big] [b c]
    assert where["b"] == where["c"] != where["a"]
    assert_bits_equal(got["big"], sd["big"])


def test_sharded_output_is_read_back_by_our_reader_and_transformers_layout(tmp_path: Path
                                                                          ) -> None:
    sd = sample_tensors()
    write_all(tmp_path, sd, 64)
    r = open_checkpoint(tmp_path)
    assert sorted(r.names()) == sorted(sd)
    for k, v in sd.items():
        assert_bits_equal(r.read(k), v)


def test_empty_model_is_a_valid_file(tmp_path: Path) -> None:
    w = ShardedSafetensorsWriter(tmp_path, [], 100)
    w.close()
    assert w.filenames == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as sf:
        assert list(sf.keys()) == []


def test_noncontiguous_input_is_written_correctly(tmp_path: Path) -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    assert not t.is_contiguous()
    write_all(tmp_path, {"t": t}, 10**6)
    got, _ = read_back(tmp_path)
    assert torch.equal(got["t"], t)


def test_writer_refuses_out_of_plan_writes(tmp_path: Path) -> None:
    metas = [("a", TensorMeta((2,), torch.float32)), ("b", TensorMeta((3,), torch.float16))]
    w = ShardedSafetensorsWriter(tmp_path, metas, 10**6)
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("b", torch.zeros(3, dtype=torch.float16))  # wrong order
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("a", torch.zeros(3))  # wrong shape
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("a", torch.zeros(2, dtype=torch.float64))  # wrong dtype
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="'b' was never written"):
        w.close()
    w3 = ShardedSafetensorsWriter(tmp_path, metas[:1], 10**6)
    w3.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="unplanned"):
        w3.write("b", torch.zeros(3, dtype=torch.float16))


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.uint8, torch.bool]


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(0, 8))
    sd = {}
    for i in range(n):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        numel = math.prod(shape)
        raw = torch.arange(numel, dtype=torch.int64) * (i + 3) - 7
        sd[f"layer.{i}.w"] = (raw % 2 == 0 if dtype == torch.bool else raw.to(dtype)
                              ).reshape(shape)
    return sd


@settings(max_examples=30)
@given(sd=state_dicts(), limit=st.integers(1, 300))
def test_roundtrip_property(sd: dict[str, torch.Tensor], limit: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        w = write_all(folder, sd, limit)
        got, where = read_back(folder)
        assert sorted(got) == sorted(sd)
        for k, v in sd.items():
            assert_bits_equal(got[k], v)
        assert sum(1 for _ in folder.glob("*.safetensors")) == len(w.filenames)
        if len(w.filenames) > 1:
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            assert index["weight_map"] == where
            assert index["metadata"]["total_size"] == sum(nbytes(v) for v in sd.values())
        else:
            assert not (folder / "model.safetensors.index.json").exists()


# --- planning and sizes -----------------------------------------------------------------------


def _m(nbytes: int) -> TensorMeta:
    return TensorMeta((nbytes,), torch.uint8)


def test_plan_shards_greedy_in_order() -> None:
    entries = [(f"t{i}", _m(400)) for i in range(10)]
    shards = plan_shards(entries, 1000)
    assert [[n for n, _ in s] for s in shards] == [
        ["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6", "t7"], ["t8", "t9"]]
    # Exactly at the limit still fits.
    assert len(plan_shards([("a", _m(500)), ("b", _m(500))], 1000)) == 1
    assert len(plan_shards([("a", _m(500)), ("b", _m(501))], 1000)) == 2


def test_plan_shards_oversized_alone_and_order_kept() -> None:
    entries = [("big", _m(5000)), ("a", _m(10)), ("b", _m(10)), ("huge", _m(9000)), ("c", _m(1))]
    shards = plan_shards(entries, 100)
    assert [[n for n, _ in s] for s in shards] == [["big"], ["a", "b"], ["huge"], ["c"]]
    assert plan_shards([], 100) == [[]]
    assert [n for s in plan_shards(entries, 1) for n, _ in s] == [n for n, _ in entries]


@pytest.mark.parametrize(("text", "size"), [
    ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("20KB", 20_000),
    ("20kb", 20_000), ("1KiB", 1024), (" 3 MB ", 3 * 10**6), ("1.5GB", 1_500_000_000),
    ("100", 100), ("100B", 100), ("1TB", 10**12), (4096, 4096),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "5XB", "GB", "-1", "1e3", "5 G B", "0", "0KB",
                                  "0.0001B", 0, -5])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ConfigError, match="max_shard_size") as ei:
        parse_size(text)
    assert "\n" not in str(ei.value)


# --- the output folder ------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "neuromerge-" in p.name)


def test_output_folder_success_creates_target(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out"
    with OutputFolder(target) as tmp:
        assert tmp.parent == target.parent  # same file system: the rename is atomic
        assert tmp.name.startswith(".out.neuromerge-tmp")
        assert not target.exists()  # nothing visible until complete
        (tmp / "model.safetensors").write_text("x")
    assert (target / "model.safetensors").read_text() == "x"
    assert leftovers(target.parent) == []


def test_output_folder_exists_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(OutputError, match="--force") as ei:
        OutputFolder(target)
    assert str(target) in str(ei.value)
    assert (target / "keep.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_output_folder_existing_file_refused_even_with_force(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(OutputError, match="not a folder"):
        OutputFolder(target, force=True)
    assert target.read_text() == "a file"


@pytest.mark.parametrize("existing", [False, True])
def test_output_folder_failure_removes_temp_and_keeps_target(tmp_path: Path, existing: bool
                                                             ) -> None:
    target = tmp_path / "out"
    if existing:
        target.mkdir()
        (target / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="boom"), OutputFolder(target, force=True) as tmp:
        (tmp / "model.safetensors").write_text("half written")
        assert tmp.is_dir()
        raise ValueError("boom")
    assert leftovers(tmp_path) == []
    if existing:
        assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
        assert (target / "keep.txt").read_text() == "old"
    else:
        assert not target.exists()


def test_output_folder_keyboard_interrupt_also_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), OutputFolder(target) as tmp:
        (tmp / "x").write_text("x")
        raise KeyboardInterrupt
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_output_folder_force_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "sub").mkdir()
    with OutputFolder(target, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # the old folder stays until the new is complete
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_output_folder_unwritable_parent(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError) as ei, OutputFolder(blocker / "out"):
        pass
    assert "cannot create output folder" in str(ei.value)


def test_output_folder_refuses_a_target_that_appears_during_the_merge(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared during the merge"), \
            OutputFolder(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        target.mkdir()
        (target / "theirs").write_text("keep me")
    assert (target / "theirs").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_folder_removes_parents_it_created_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), OutputFolder(target):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
