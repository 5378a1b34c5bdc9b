"""The neuron axis in the engine: resolution and overrides, methods see (neurons, fan-in), blocks
along a column axis give the whole-tensor result, reads and writes of such blocks, tied copies."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import neuromerge.engine as engine
from neuromerge import merge, merge_state_dicts
from neuromerge.architectures import UNKNOWN, from_config, neuron_axis, tied_copies
from neuromerge.engine import memory, units
from neuromerge.errors import ConfigError
from neuromerge.io.reader import StateDictReader, TensorMeta, open_checkpoint
from neuromerge.io.writer import ShardedSafetensorsWriter

GPT2 = {"model_type": "gpt2", "vocab_size": 11}
FC = "h.0.mlp.c_fc.weight"


def conv1d_models(n_experts: int = 3) -> tuple[dict, list[dict]]:
    """A GPT-2-shaped state dict: Conv1D (in, out) weights, an embedding, a bias, a norm."""
    gen = torch.Generator().manual_seed(0)
    base = {"wte.weight": torch.randn(11, 6, generator=gen),
            FC: torch.randn(6, 9, generator=gen),  # (in, out): 9 neurons of fan-in 6
            "h.0.mlp.c_fc.bias": torch.randn(9, generator=gen),
            "h.0.ln_1.weight": torch.randn(6, generator=gen)}
    return base, [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
                  for _ in range(n_experts)]


def meta(*shape: int) -> TensorMeta:
    return TensorMeta(shape, torch.float32)


def test_axis_rules_and_overrides() -> None:
    gpt2, llama = from_config(GPT2), from_config({"model_type": "llama"})
    assert neuron_axis(FC, meta(6, 9), gpt2, {})[0] == 1
    assert neuron_axis("h.0.attn.c_attn.weight", meta(6, 18), gpt2, {})[0] == 1
    assert neuron_axis("wte.weight", meta(11, 6), gpt2, {}) == (0, "")
    assert neuron_axis(FC, meta(6, 9), llama, {})[0] == 0  # the name alone decides nothing
    assert neuron_axis("pos", meta(1, 5, 6), UNKNOWN, {})[0] == 1  # broadcast (1, n, d)
    assert neuron_axis("conv.weight", meta(1, 3, 2, 2), UNKNOWN, {})[0] == 0  # conv, out = 1
    # first matching override wins, before the architecture's rules
    assert neuron_axis(FC, meta(6, 9), gpt2, {"*.c_fc.*": 0, "*": 1}) == (
        0, "neuron_axis '*.c_fc.*'")
    with pytest.raises(ConfigError, match=r"neuron_axis: '\*' gives 'w' axis 2, but it has "
                                          r"shape \[3, 4\]"):
        neuron_axis("w", meta(3, 4), UNKNOWN, {"*": 2})


def test_gpt2_mask_buffers_are_copied() -> None:
    base = {"h.0.attn.bias": torch.ones(1, 1, 4, 4), "h.0.attn.masked_bias": torch.tensor(-1e4),
            "h.0.attn.c_attn.bias": torch.zeros(6)}
    plan = engine.build_plan(StateDictReader(base), [StateDictReader(base)],
                             architecture=from_config(GPT2))
    kinds = {p.name: (p.kind, p.reason) for p in plan}
    assert kinds["h.0.attn.bias"] == ("copy", "GPT-2 attention mask buffer")
    assert kinds["h.0.attn.masked_bias"][0] == "copy"
    assert kinds["h.0.attn.c_attn.bias"] == ("point", "")


@pytest.mark.parametrize(("method", "params"), [
    ("task_arithmetic", {}), ("ties", {}), ("ties", {"trim_scope": "tensor"}),
    ("average", {}), ("consensus_ties", {"density": 0.5})])
def test_element_wise_methods_do_not_depend_on_the_axis(method: str, params: dict) -> None:
    base, experts = conv1d_models()
    rows = merge_state_dicts(base, experts, method, params).state_dict
    cols = merge_state_dicts(base, experts, method, params, config=GPT2)
    assert cols.extra["neuron_axes"] == {FC: 1}
    for name, value in rows.items():
        assert torch.equal(cols.state_dict[name], value), name


@pytest.mark.parametrize("params", [{}, {"lambda1": 0.7, "trim_scope": "tensor"},
                                    {"orthogonal_merge": "ties", "lambda1": 1.0}])
def test_neuromerging_on_columns_is_the_transposed_row_merge(params: dict) -> None:
    base, experts = conv1d_models()
    cols = merge_state_dicts(base, experts, "neuromerging", params, config=GPT2).state_dict
    rows = merge_state_dicts(base, experts, "neuromerging", params).state_dict
    t = [{k: (v.T.contiguous() if k == FC else v) for k, v in sd.items()}
         for sd in (base, *experts)]
    golden = merge_state_dicts(t[0], t[1:], "neuromerging", params).state_dict
    torch.testing.assert_close(cols[FC], golden[FC].T, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(rows[FC], cols[FC], atol=1e-4)  # the axis changes the result
    assert torch.equal(cols["wte.weight"], golden["wte.weight"])


@pytest.mark.parametrize(("method", "params"), [
    ("neuromerging", {}), ("neuromerging", {"trim_scope": "tensor", "lambda1": 0.5}),
    ("ties", {"trim_scope": "tensor"}), ("dare_neuromerging", {"seed": 2}),
    ("dare_ties", {"seed": 2})])
@pytest.mark.parametrize("max_entries", [1, 13])
def test_column_blocks_give_the_whole_tensor_result(method: str, params: dict,
                                                    max_entries: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base, experts = conv1d_models()
    monkeypatch.setattr(memory, "memory_budget", lambda limit: 1 << 40)
    whole = merge_state_dicts(base, experts, method, params, config=GPT2)
    per = units.bytes_per_entry(len(experts), 4, torch.float32)
    monkeypatch.setattr(memory, "memory_budget", lambda limit: per * max_entries)
    blocks = merge_state_dicts(base, experts, method, params, config=GPT2)
    assert blocks.extra["row_blocks"][FC] == (9 if max_entries == 1 else 5)  # 6 entries/neuron
    for name, value in whole.state_dict.items():
        torch.testing.assert_close(blocks.state_dict[name], value, rtol=1e-6, atol=1e-6,
                                   msg=name)


def test_read_and_write_blocks_along_an_axis(tmp_path: Path) -> None:
    t = torch.arange(2 * 7 * 3, dtype=torch.bfloat16).reshape(2, 7, 3)
    save_file({"a": torch.zeros(2), "t": t}, str(tmp_path / "model.safetensors"))
    r = open_checkpoint(tmp_path)
    try:
        assert torch.equal(r.read_rows("t", 2, 5, axis=1), t[:, 2:5])
        assert torch.equal(r.read_rows("t", 1, 3, axis=2), t[:, :, 1:3])
        assert torch.equal(r.read_rows("t", 1, 2), t[1:2])
    finally:
        r.close()
    out = tmp_path / "out"
    out.mkdir()
    w = ShardedSafetensorsWriter(out, [("t", TensorMeta(t.shape, t.dtype)),
                                       ("b", TensorMeta((2,), torch.float32))], 1 << 20)
    for start, stop in ((0, 3), (3, 4), (4, 7)):
        w.write("t", t[:, start:stop], start, axis=1)
    w.write("b", torch.ones(2))
    w.close()
    back = load_file(str(out / "model.safetensors"))
    assert torch.equal(back["t"], t) and torch.equal(back["b"], torch.ones(2))
    w = ShardedSafetensorsWriter(out, [("t", TensorMeta(t.shape, t.dtype))], 1 << 20)
    with pytest.raises(RuntimeError, match="axis 1 from 0"):
        w.write("t", t[:, 1:3], 1, axis=1)  # blocks come in order


def _gpt2_folder(folder: Path, sd: dict, config: dict) -> Path:
    folder.mkdir(parents=True)
    torch.save(sd, folder / "pytorch_model.bin")  # a .bin keeps both tied copies
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_tied_copies_are_merged_once_and_left_out(tmp_path: Path) -> None:
    base, experts = conv1d_models(2)
    sds = [dict(sd, **{"lm_head.weight": sd["wte.weight"].clone()}) for sd in (base, *experts)]
    cfg = {**GPT2, "architectures": ["GPT2LMHeadModel"]}
    paths = [_gpt2_folder(tmp_path / f"m{i}", sd, cfg) for i, sd in enumerate(sds)]
    readers = [open_checkpoint(p) for p in paths]
    assert tied_copies(readers[0], readers[1:], from_config(cfg)) == {
        "lm_head.weight": "wte.weight"}
    assert tied_copies(readers[0], readers[1:], from_config({**cfg, "tie_word_embeddings":
                                                             False})) == {}
    for r in readers:
        r.close()
    out = tmp_path / "out"
    result = merge({"merge_method": "dare_ties", "base_model": str(paths[0]),
                    "models": [str(p) for p in paths[1:]]}, out, progress=False)
    assert result.extra["tied"] == {"lm_head.weight": "wte.weight"}
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    record = json.loads((out / "neuromerge_result.json").read_text())
    assert record["tied"] == {"lm_head.weight": "wte.weight"}
    assert record["neuron_axes"] == {FC: 1}
    card = (out / "README.md").read_text()
    assert "`lm_head.weight` is tied to `wte.weight`" in card
    assert "1 neuronal tensors have their neurons on another axis than rows" in card
    assert "- architecture: gpt2" in card


def test_unequal_copies_are_not_tied(tmp_path: Path) -> None:
    base, experts = conv1d_models(2)
    sds = [dict(sd, **{"lm_head.weight": sd["wte.weight"].clone()}) for sd in (base, *experts)]
    sds[2]["lm_head.weight"][0, 0] += 1  # expert 2 was fine-tuned with an untied head
    readers = [StateDictReader(sd) for sd in sds]
    assert tied_copies(readers[0], readers[1:], from_config(GPT2)) == {}


def test_dry_run_prints_the_axes(tmp_path: Path, run_cli, caplog) -> None:  # type: ignore[no-untyped-def]
    base, experts = conv1d_models(2)
    paths = [_gpt2_folder(tmp_path / f"m{i}", sd, GPT2) for i, sd in enumerate((base, *experts))]
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(json.dumps({"merge_method": "neuromerging", "base_model": str(paths[0]),
                               "models": [str(p) for p in paths[1:]],
                               "neuron_axis": {"wte.*": 1}}))
    code, out, _ = run_cli("merge", cfg, "--dry-run")
    assert code == 0 and not (tmp_path / "out").exists()
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert out.splitlines()[0] == "architecture: gpt2"
    assert lines[FC][3:5] == ["neuronal", "1"] and "Conv1D" in " ".join(lines[FC])
    assert lines["wte.weight"][3:5] == ["neuronal", "1"]  # the override
    assert lines["h.0.ln_1.weight"][3:5] == ["point", "-"]
    code, _, err = run_cli("merge", cfg)
    assert code == 1 and "output folder is missing" in err


def test_no_config_warns_about_conv1d_names(caplog: pytest.LogCaptureFixture) -> None:
    base, experts = conv1d_models(2)
    with caplog.at_level(logging.WARNING, logger="neuromerge"):
        merge_state_dicts(base, experts, "task_arithmetic")
    assert "no config.json" in caplog.text and FC in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neuromerge"):
        merge_state_dicts(base, experts, "task_arithmetic", config=GPT2)
    assert "no config.json" not in caplog.text


def test_blocked_conv1d_merge_from_files(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Strided column reads from safetensors and strided writes give the whole-tensor merge."""
    base, experts = conv1d_models(2)
    paths = []
    for i, sd in enumerate((base, *experts)):
        (tmp_path / f"m{i}").mkdir()
        save_file(sd, str(tmp_path / f"m{i}" / "model.safetensors"))
        (tmp_path / f"m{i}" / "config.json").write_text(json.dumps(GPT2))
        paths.append(tmp_path / f"m{i}")
    cfg = {"merge_method": "neuromerging", "base_model": str(paths[0]),
           "models": [str(p) for p in paths[1:]], "parameters": {"lambda1": 0.5}}
    monkeypatch.setattr(memory, "memory_budget", lambda limit: 1 << 40)
    merge(cfg, tmp_path / "whole", progress=False)
    per = units.bytes_per_entry(2, 4, torch.float32)
    monkeypatch.setattr(memory, "memory_budget", lambda limit: per * 13)
    result = merge(cfg, tmp_path / "blocks", progress=False)
    assert result.extra["row_blocks"][FC] == 5
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    blocks = load_file(str(tmp_path / "blocks" / "model.safetensors"))
    for name, value in whole.items():
        torch.testing.assert_close(blocks[name], value, rtol=1e-6, atol=1e-6, msg=name)
