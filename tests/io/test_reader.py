"""Checkpoint readers against files written by the independent writers (safetensors.torch,
torch.save, transformers save_pretrained), and every way an input file can be broken."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuromerge.errors import InputError
from neuromerge.examples import make_bert_family
from neuromerge.io.reader import (
    SafetensorsFile,
    StateDictReader,
    TensorMeta,
    TorchBinReader,
    fingerprint,
    open_checkpoint,
)


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    """Every dtype safetensors and torch share, plus 0-D, empty and odd shapes."""
    g = torch.Generator().manual_seed(0)
    sd = {
        "f64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "f32": torch.randn(5, 7, generator=g),
        "f16": torch.randn(2, 3, 4, generator=g).half(),
        "bf16": torch.randn(9, generator=g).bfloat16(),
        "i64": torch.tensor([-(2**62), -1, 0, 1, 2**62], dtype=torch.int64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (6,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**15), 2**15 - 1, (2, 2), generator=g, dtype=torch.int16),
        "i8": torch.arange(-128, 128, dtype=torch.int8),
        "u8": torch.arange(0, 256, dtype=torch.uint8).reshape(16, 16),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "scalar_f32": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "empty_f32": torch.zeros(0),
        "empty_2d_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "f32_special": torch.tensor([0.0, -0.0, 1e-45, 3.4e38, -3.4e38]),
    }
    if hasattr(torch, "float8_e4m3fn"):
        sd["f8_e4m3"] = torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)
    return sd


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    # Compare bit patterns: equal() is not defined for float8 and treats -0.0 == 0.0.
    assert torch.equal(got.contiguous().reshape(-1).view(torch.uint8),
                       want.contiguous().reshape(-1).view(torch.uint8))


def assert_roundtrip(reader, sd: dict[str, torch.Tensor]) -> None:
    assert sorted(reader.names()) == sorted(sd)
    for name, want in sd.items():
        meta = reader.meta(name)
        assert meta == TensorMeta(tuple(want.shape), want.dtype)
        assert meta.nbytes == want.numel() * want.element_size()
        assert_same(reader.read(name), want)


def one_line_input_error(path: Path | str, excinfo: pytest.ExceptionInfo[InputError]) -> str:
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    assert "\n" not in msg
    return msg


# --- round trips ------------------------------------------------------------------------------


def test_safetensors_file_roundtrip_all_dtypes(tmp_path: Path) -> None:
    sd = all_dtype_tensors()
    path = tmp_path / "all.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "note": "x"})
    f = SafetensorsFile(path)
    try:
        assert_roundtrip(f, sd)
        assert f.metadata == {"format": "pt", "note": "x"}
    finally:
        f.close()


def test_bare_safetensors_file_via_open_checkpoint(tmp_path: Path) -> None:
    sd = all_dtype_tensors()
    path = tmp_path / "weights.safetensors"
    save_file(sd, str(path))
    r = open_checkpoint(path)
    try:
        assert r.source == str(path)
        assert r.files() == [path]
        assert_roundtrip(r, sd)
    finally:
        r.close()


def test_safetensors_read_gives_fresh_writable_tensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path))
    before = path.read_bytes()
    r = open_checkpoint(path)
    t = r.read("w")
    t.fill_(-1.0)  # must neither fail nor leak into the file or later reads
    assert torch.equal(r.read("w"), torch.arange(6.0).reshape(2, 3))
    r.close()
    assert path.read_bytes() == before


def test_fingerprint_identifies_the_content(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(a))
    save_file({"w": torch.zeros(2, 2)}, str(b))
    save_file({"w": torch.ones(2, 2)}, str(c))  # same header, other values
    big = tmp_path / "big.safetensors"
    values = torch.zeros(1 << 20)
    save_file({"w": values}, str(big))
    fa, fb, fc = (fingerprint(open_checkpoint(p)) for p in (a, b, c))
    assert fa == fb
    assert fa != fc
    before = fingerprint(open_checkpoint(big))
    values[-1] = 1.0  # a change in the last MiB of a 4 MiB file
    save_file({"w": values}, str(big))
    assert fingerprint(open_checkpoint(big)) != before
    assert fingerprint(StateDictReader({"w": values})) == ""


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_torch_bin_roundtrip_all_dtypes(tmp_path: Path, suffix: str) -> None:
    sd = all_dtype_tensors()
    path = tmp_path / f"pytorch_model{suffix}"
    torch.save(sd, path)
    r = open_checkpoint(path)
    try:
        assert isinstance(r, TorchBinReader)
        assert r.files() == [path]
        assert_roundtrip(r, sd)
    finally:
        r.close()


def test_torch_bin_shared_storage_views_and_state_dict_wrapper(tmp_path: Path) -> None:
    whole = torch.arange(10.0)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": {"whole": whole, "view": whole[2:5], "t": whole.reshape(2, 5).t()}},
               path)
    r = TorchBinReader(str(path), [path])
    assert sorted(r.names()) == ["t", "view", "whole"]
    assert torch.equal(r.read("view"), torch.tensor([2.0, 3.0, 4.0]))
    assert r.meta("t") == TensorMeta((5, 2), torch.float32)
    assert torch.equal(r.read("t"), torch.arange(10.0).reshape(2, 5).t())
    r.read("whole").fill_(0)  # read() gives a copy
    assert torch.equal(r.read("view"), torch.tensor([2.0, 3.0, 4.0]))


def test_state_dict_reader() -> None:
    sd = all_dtype_tensors()
    r = StateDictReader(sd, "mem")
    assert r.source == "mem"
    assert r.files() == []
    assert_roundtrip(r, sd)
    r.close()


def test_folder_with_model_safetensors(tmp_path: Path) -> None:
    base, _ = make_bert_family(tmp_path / "fam", 1)
    want = load_file(str(base / "model.safetensors"))
    r = open_checkpoint(base)
    try:
        assert r.source == str(base)
        assert r.files() == [base / "model.safetensors"]
        assert_roundtrip(r, want)
    finally:
        r.close()


def test_sharded_folder_written_by_save_pretrained(tmp_path: Path) -> None:
    st_base, _ = make_bert_family(tmp_path / "st", 1)
    sh_base, _ = make_bert_family(tmp_path / "sh", 1, fmt="sharded")
    index = json.loads((sh_base / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 1  # the fixture really is sharded
    want = open_checkpoint(st_base)
    r = open_checkpoint(sh_base)
    try:
        assert sorted(p.name for p in r.files()) == shard_names
        assert sorted(r.names()) == sorted(index["weight_map"])
        assert sorted(r.names()) == sorted(want.names())
        for name in want.names():
            assert_same(r.read(name), want.read(name))
        assert re.fullmatch(r"[0-9a-f]{16}", fingerprint(r))
    finally:
        r.close()
        want.close()


def test_folder_with_pytorch_model_bin(tmp_path: Path) -> None:
    st_base, _ = make_bert_family(tmp_path / "st", 1)
    bin_base, _ = make_bert_family(tmp_path / "bin", 1, fmt="bin")
    want = open_checkpoint(st_base)
    r = open_checkpoint(bin_base)
    assert isinstance(r, TorchBinReader)
    assert r.files() == [bin_base / "pytorch_model.bin"]
    assert sorted(r.names()) == sorted(want.names())
    for name in want.names():
        assert_same(r.read(name), want.read(name))


def test_sharded_bin_folder_with_index(tmp_path: Path) -> None:
    a = {"x": torch.randn(3, 3), "y": torch.arange(4)}
    b = {"z": torch.randn(2).bfloat16()}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {"x": "pytorch_model-00001-of-00002.bin", "y": "pytorch_model-00001-of-00002.bin",
                  "z": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    r = open_checkpoint(tmp_path)
    assert len(r.files()) == 2
    assert_roundtrip(r, {**a, **b})


def test_safetensors_preferred_over_bin_in_one_folder(tmp_path: Path) -> None:
    save_file({"st": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    torch.save({"bin": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert open_checkpoint(tmp_path).names() == ["st"]


def test_folder_with_one_lone_safetensors_file(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "adapter.safetensors"))
    r = open_checkpoint(tmp_path)
    assert r.files() == [tmp_path / "adapter.safetensors"]
    assert torch.equal(r.read("w"), torch.ones(2))


# --- errors -----------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError) as ei:
        open_checkpoint(missing)
    assert "no such file or folder" in one_line_input_error(missing, ei)


@pytest.mark.parametrize("setup", ["empty", "two_lone", "other_files"])
def test_folder_without_weights(tmp_path: Path, setup: str) -> None:
    if setup == "two_lone":
        save_file({"w": torch.ones(1)}, str(tmp_path / "a.safetensors"))
        save_file({"w": torch.ones(1)}, str(tmp_path / "b.safetensors"))
    elif setup == "other_files":
        (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError) as ei:
        open_checkpoint(tmp_path)
    assert "no weights found" in one_line_input_error(tmp_path, ei)


def test_unknown_file_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(InputError) as ei:
        open_checkpoint(path)
    assert "unknown checkpoint format" in one_line_input_error(path, ei)


def _valid_safetensors(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(8, 8), "b": torch.randn(16)}, str(path))
    return path, path.read_bytes()


def _with_header(raw: bytes, header: bytes) -> bytes:
    (hlen,) = struct.unpack("<Q", raw[:8])
    return struct.pack("<Q", len(header)) + header + raw[8 + hlen:]


def _header(raw: bytes) -> dict:
    (hlen,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + hlen])


CORRUPTIONS = {
    "empty": lambda raw: b"",
    "seven_bytes": lambda raw: raw[:7],
    "garbage": lambda raw: bytes(range(256)) * 20,
    "truncated_in_header": lambda raw: raw[:40],
    "truncated_in_data": lambda raw: raw[:-10],
    "truncated_to_header_only": lambda raw: raw[:8 + struct.unpack("<Q", raw[:8])[0]],
    "header_not_json": lambda raw: _with_header(raw, b"{not json" + b" " * 100),
    "header_not_utf8": lambda raw: _with_header(raw, b"\xff\xfe" * 40),
    "header_is_list": lambda raw: _with_header(raw, b"[1, 2, 3]"),
    "unknown_dtype": lambda raw: _with_header(raw, json.dumps(
        {k: ({**v, "dtype": "X99"} if k == "a" else v) for k, v in _header(raw).items()}
    ).encode()),
    "entry_without_offsets": lambda raw: _with_header(raw, json.dumps(
        {k: ({"dtype": "F32", "shape": [8, 8]} if k == "a" else v)
         for k, v in _header(raw).items()}).encode()),
    "shape_does_not_match_offsets": lambda raw: _with_header(raw, json.dumps(
        {k: ({**v, "shape": [8, 9]} if k == "a" else v) for k, v in _header(raw).items()}
    ).encode()),
    "offsets_past_end": lambda raw: _with_header(raw, json.dumps(
        {k: ({**v, "data_offsets": [10**6, 10**6 + 64]} if k == "b" else v)
         for k, v in _header(raw).items()}).encode()),
    "huge_header_length": lambda raw: struct.pack("<Q", 2**63) + raw[8:],
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_corrupt_safetensors(tmp_path: Path, kind: str, as_folder: bool) -> None:
    path, raw = _valid_safetensors(tmp_path)
    path.write_bytes(CORRUPTIONS[kind](raw))
    with pytest.raises(InputError) as ei:
        open_checkpoint(tmp_path if as_folder else path)
    # The message names the file itself, not only the folder.
    one_line_input_error(path, ei)


def test_corrupt_entry_message_names_the_tensor(tmp_path: Path) -> None:
    path, raw = _valid_safetensors(tmp_path)
    path.write_bytes(CORRUPTIONS["shape_does_not_match_offsets"](raw))
    with pytest.raises(InputError) as ei:
        SafetensorsFile(path)
    msg = one_line_input_error(path, ei)
    assert "'a'" in msg
    assert "[8, 9]" in msg


def test_file_shrunk_after_open_gives_input_error(tmp_path: Path) -> None:
    path, raw = _valid_safetensors(tmp_path)
    f = SafetensorsFile(path)
    path.write_bytes(raw[:-16])  # truncated behind the reader's back
    with pytest.raises(InputError) as ei:
        f.read("b")
    assert "'b'" in one_line_input_error(path, ei)
    f.close()


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "dir.safetensors"
    path.mkdir()  # open() fails for a folder even as root, unlike chmod 0
    with pytest.raises(InputError) as ei:
        SafetensorsFile(path)
    assert "cannot open" in one_line_input_error(path, ei)


def _valid_bin(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.randn(64, 64), "b": torch.arange(10)}, path)
    return path, path.read_bytes()


BIN_CORRUPTIONS = {
    "empty": lambda raw: b"",
    "garbage": lambda raw: bytes(range(256)) * 20,
    "truncated_half": lambda raw: raw[: len(raw) // 2],
    "truncated_end": lambda raw: raw[:-64],
    "text": lambda raw: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n",
}


@pytest.mark.parametrize("kind", sorted(BIN_CORRUPTIONS))
@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_corrupt_bin(tmp_path: Path, kind: str, as_folder: bool) -> None:
    path, raw = _valid_bin(tmp_path)
    path.write_bytes(BIN_CORRUPTIONS[kind](raw))
    with pytest.raises(InputError) as ei:
        open_checkpoint(tmp_path if as_folder else path)
    one_line_input_error(path, ei)


@pytest.mark.parametrize("kind", ["garbage", "text", "truncated_half"])
def test_corrupt_bin_message_is_clear(tmp_path: Path, kind: str) -> None:
    path, raw = _valid_bin(tmp_path)
    path.write_bytes(BIN_CORRUPTIONS[kind](raw))
    with pytest.raises(InputError) as ei:
        open_checkpoint(path)
    msg = one_line_input_error(path, ei)
    assert not re.search(r"mmap|_use_new_zipfile_serialization|Errno", msg), msg


def test_bin_with_arbitrary_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "opt": _Unsafe()}, path)
    with pytest.raises(InputError) as ei:
        open_checkpoint(path)
    one_line_input_error(path, ei)


class _Unsafe:
    """Not loadable with weights_only=True."""


def test_bin_pickle_refusal_message_is_clean_text(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "opt": _Unsafe()}, path)
    with pytest.raises(InputError) as ei:
        open_checkpoint(path)
    msg = one_line_input_error(path, ei)
    assert not re.search(r"[\x00-\x1f\x7f]", msg), repr(msg)


def test_bin_not_a_dict_or_not_tensors(tmp_path: Path) -> None:
    lst = tmp_path / "list.bin"
    torch.save([torch.ones(1)], lst)
    with pytest.raises(InputError) as ei:
        open_checkpoint(lst)
    assert "dict" in one_line_input_error(lst, ei)
    mixed = tmp_path / "mixed.bin"
    torch.save({"w": torch.ones(1), "step": 5}, mixed)
    with pytest.raises(InputError) as ei:
        open_checkpoint(mixed)
    assert "'step'" in one_line_input_error(mixed, ei)


def test_legacy_format_bin_is_readable(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    sd = {"w": torch.randn(3, 3), "i": torch.arange(3)}
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert torch.load(path, weights_only=True)["w"].shape == (3, 3)  # torch itself reads it
    assert_roundtrip(open_checkpoint(tmp_path), sd)


def _sharded(tmp_path: Path) -> Path:
    base, _ = make_bert_family(tmp_path / "fam", 1, fmt="sharded")
    return base


def test_sharded_missing_shard(tmp_path: Path) -> None:
    base = _sharded(tmp_path)
    victim = sorted(base.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(InputError) as ei:
        open_checkpoint(base)
    msg = one_line_input_error(base / "model.safetensors.index.json", ei)
    assert victim.name in msg


@pytest.mark.parametrize("text", ["{not json", "[]", '{"metadata": {}}', '{"weight_map": [1]}'])
def test_sharded_malformed_index(tmp_path: Path, text: str) -> None:
    base = _sharded(tmp_path)
    index = base / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(InputError) as ei:
        open_checkpoint(base)
    assert "index" in one_line_input_error(index, ei)


def test_sharded_index_lists_tensor_no_shard_holds(tmp_path: Path) -> None:
    base = _sharded(tmp_path)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(base.glob("model-*.safetensors"))[0].name
    index["weight_map"]["ghost.weight"] = first
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError) as ei:
        open_checkpoint(base)
    assert "'ghost.weight'" in one_line_input_error(base, ei)


def test_sharded_with_truncated_shard_names_the_shard(tmp_path: Path) -> None:
    base = _sharded(tmp_path)
    shard = sorted(base.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(InputError) as ei:
        open_checkpoint(base)
    one_line_input_error(shard, ei)
