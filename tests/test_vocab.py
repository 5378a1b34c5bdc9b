"""Experts with added tokens: the default error, vocab: base, vocab: union (tiny BERT MLMs with
locally built tokenizers)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from neuromerge.errors import InputError
from neuromerge.examples import expert_update, save_tokenizer
from neuromerge.pipeline import merge

transformers = pytest.importorskip("transformers")

ADDED = {1: [("[NEW]", True), ("chat", False)], 2: [("[NEW]", True), ("<|im_start|>", True)]}


def family(root: Path) -> tuple[Path, list[Path]]:
    """A BertForMaskedLM base (vocab 169) and two experts that add tokens (and rows)."""
    save_tokenizer(root / "base")
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "base"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config).eval()
    model.save_pretrained(str(root / "base"))
    paths = []
    for i, added in ADDED.items():
        folder = root / f"expert_{i}"
        t = transformers.AutoTokenizer.from_pretrained(str(root / "base"))
        for token, special in added:
            t.add_tokens([token], special_tokens=special)
        m = transformers.BertForMaskedLM(copy.deepcopy(config)).eval()
        m.load_state_dict(model.state_dict())
        m.resize_token_embeddings(len(t))
        sd = expert_update({k: v.detach() for k, v in m.state_dict().items()}, i)
        m.load_state_dict(sd)
        m.save_pretrained(str(folder))
        t.save_pretrained(str(folder))
        paths.append(folder)
    return root / "base", paths


def config(tmp_path: Path, base: Path, experts: list[Path], **top: Any) -> Path:
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(e)} for e in experts], "parameters": {"scale": 1.0}, **top}
    path = tmp_path / f"merge{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


EMB = "bert.embeddings.word_embeddings.weight"


def assert_tokenizer_source_is_vocab(tmp_path: Path, base: Path, experts: list[Path],
                                     source: str, merged: dict[str, torch.Tensor]) -> None:
    """mergekit's `tokenizer_source: SOURCE` merges as `vocab: SOURCE` did (``merged``)."""
    merge(config(tmp_path, base, experts, tokenizer_source=source), tmp_path / "o2",
          progress=False)
    torch.testing.assert_close(load_file(str(tmp_path / "o2" / "model.safetensors"))[EMB],
                               merged[EMB])


def test_default_error_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "m")
    with pytest.raises(InputError, match=r"tensor '.*word_embeddings.weight': shape \[171, 32\] "
                                         r"in .*expert_1 differs from \[169, 32\] .*vocab: base"):
        merge(config(tmp_path, base, experts), tmp_path / "out", progress=False)


def test_base_keeps_the_base_vocabulary(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "m")
    out = tmp_path / "out"
    merge(config(tmp_path, base, experts, vocab="base"), out, progress=False)
    merged = load_file(str(out / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    e = [load_file(str(p / "model.safetensors")) for p in experts]
    want = b[EMB] + sum(x[EMB][:169] - b[EMB] for x in e)
    torch.testing.assert_close(merged[EMB], want)
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == 169
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 169
    model(**tok(["the merged model runs"], return_tensors="pt"))
    assert_tokenizer_source_is_vocab(tmp_path, base, experts, "base", merged)


def test_union_aligns_rows_by_token(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "m")
    out = tmp_path / "out"
    merge(config(tmp_path, base, experts, vocab="union"), out, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(out))
    assert len(tok) == 172 == model.config.vocab_size == model.get_input_embeddings().num_embeddings
    ids = tok.convert_tokens_to_ids(["[NEW]", "chat", "<|im_start|>"])
    assert ids == [169, 170, 171]
    added = tok.added_tokens_decoder
    assert added[169].special and not added[170].special and added[171].special
    merged = load_file(str(out / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    e1, e2 = (load_file(str(p / "model.safetensors")) for p in experts)
    # shared tokens: task arithmetic as usual
    torch.testing.assert_close(merged[EMB][:169], b[EMB] + (e1[EMB][:169] - b[EMB])
                               + (e2[EMB][:169] - b[EMB]))
    # a token one expert added: that expert's row (expert 2's id for <|im_start|> is 170)
    torch.testing.assert_close(merged[EMB][170], e1[EMB][170])
    torch.testing.assert_close(merged[EMB][171], e2[EMB][170])
    # a token both added: their mean (task vectors around it cancel in task arithmetic)
    torch.testing.assert_close(merged[EMB][169], (e1[EMB][169] + e2[EMB][169]) / 2)
    bias = "cls.predictions.bias"
    assert merged[bias].shape == (172,)
    torch.testing.assert_close(merged[bias][171], e2[bias][170])
    out_ids = tok(["chat [NEW] the"], return_tensors="pt")
    assert model(**out_ids).logits.shape[-1] == 172
    assert_tokenizer_source_is_vocab(tmp_path, base, experts, "union", merged)


def test_tokenizer_source_model_and_base_mismatch(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "m")
    out = tmp_path / "out"
    merge(config(tmp_path, base, experts, tokenizer_source=f"model:{experts[1]}"), out,
          progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    merged = load_file(str(out / "model.safetensors"))
    assert len(tok) == 171 == merged[EMB].shape[0]
    e1 = load_file(str(experts[0] / "model.safetensors"))
    # expert 1 lacks <|im_start|>: expert 2's row; [NEW] both have: their mean
    e2 = load_file(str(experts[1] / "model.safetensors"))
    torch.testing.assert_close(merged[EMB][170], e2[EMB][170])
    torch.testing.assert_close(merged[EMB][169], (e1[EMB][169] + e2[EMB][169]) / 2)
    # base mode refuses an expert whose ids do not extend the base's
    vocab_txt = (experts[0] / "vocab.txt")
    if vocab_txt.exists():
        vocab_txt.unlink()
    tj = experts[0] / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"the"', '"thee"', 1))
    with pytest.raises(InputError, match=r"expert_1: token id \d+ is 'thee' there but 'the' "
                                         r"in the base .*use vocab: union"):
        merge(config(tmp_path, base, experts, vocab="base"), tmp_path / "o3", progress=False)


def test_inputs_are_not_modified(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "m")
    before = {p: sorted((f.name, f.stat().st_mtime_ns) for f in p.iterdir())
              for p in (base, *experts)}
    merge(config(tmp_path, base, experts, vocab="union"), tmp_path / "out", progress=False)
    assert before == {p: sorted((f.name, f.stat().st_mtime_ns) for f in p.iterdir())
                      for p in (base, *experts)}
