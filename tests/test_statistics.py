"""Data statistics: the diagonal Fisher against a brute-force per-example computation, the
Gram matrices against XᵀX of hooked inputs (padding left out), the files, the cache, and
`neuromerge statistics` + a fisher / regmean merge from YAML on tiny random BERT classifiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from neuromerge.errors import ConfigError, InputError
from neuromerge.statistics import (
    cached_statistics,
    data_hash,
    fisher_diagonal,
    open_statistics,
    regmean_grams,
    save_statistics,
    statistics_metadata,
    text_batches,
)

tf = pytest.importorskip("transformers")

TEXTS = ["the a of water", "good time home now", "it was", "we can go now then there"]
LABELS = [0, 1, 2, 1]


def classifier(seed: int = 0, num_labels: int = 3):  # type: ignore[no-untyped-def]
    from neuromerge.examples import _VOCAB

    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=len(_VOCAB), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                        num_labels=num_labels)
    return tf.BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from neuromerge.examples import save_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    return tf.AutoTokenizer.from_pretrained(str(folder))


def brute_force_fisher(model, tokenizer, weights_of):  # type: ignore[no-untyped-def]
    """Σx Σy wy(x) (∂ log p(y|x) / ∂θ)² / N, one example and one class at a time."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i, text in enumerate(TEXTS):
        enc = tokenizer([text], return_tensors="pt")
        for c, w in weights_of(i, model(**enc).logits[0].softmax(-1).detach()):
            model.zero_grad()
            torch.log_softmax(model(**enc).logits[0], -1)[c].backward()
            for n, p in model.named_parameters():
                total[n] += w * p.grad ** 2
    model.zero_grad()
    return {n: t / len(TEXTS) for n, t in total.items()}


def test_fisher_matches_brute_force_per_example_gradients(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = list(text_batches(tokenizer, TEXTS, LABELS, batch_size=3))  # padded batches
    expected = fisher_diagonal(model, batches)
    want = brute_force_fisher(model, tokenizer, lambda i, p: [(c, float(p[c]))
                                                              for c in range(3)])
    assert expected.n_examples == 4 and set(expected.tensors) == set(want)
    for n, t in want.items():
        assert_close(expected.tensors[n], t, rtol=1e-4, atol=1e-9, msg=n)
    empirical = fisher_diagonal(model, batches, fisher_type="empirical")
    want_emp = brute_force_fisher(model, tokenizer, lambda i, p: [(LABELS[i], 1.0)])
    assert_close(empirical.tensors["classifier.weight"], want_emp["classifier.weight"],
                 rtol=1e-4, atol=1e-9)
    # sampled: reproducible from its seed; a different seed draws other labels
    s1 = fisher_diagonal(model, batches, fisher_type="sampled", seed=1)
    s1b = fisher_diagonal(model, batches, fisher_type="sampled", seed=1)
    assert torch.equal(s1.tensors["classifier.weight"], s1b.tensors["classifier.weight"])
    for n, p in model.named_parameters():  # the model is left as it was
        assert torch.equal(p.detach(), before[n])
    assert not model.training
    prefixed = fisher_diagonal(model, batches[:1], prefix="bert.", max_examples=2)
    assert prefixed.n_examples == 2
    assert "embeddings.word_embeddings.weight" in prefixed.tensors
    assert "classifier.weight" not in prefixed.tensors


def test_grams_are_xtx_over_unpadded_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = classifier()
    padded = regmean_grams(model, list(text_batches(tokenizer, TEXTS, batch_size=4)))
    single = [regmean_grams(model, list(text_batches(tokenizer, [t], batch_size=1)))
              for t in TEXTS]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert padded.tensors[name].shape == (16, 16)
    rows = [s.info["rows"][name] for s in single]
    assert padded.info["rows"][name] == sum(rows)  # padding tokens are left out
    want = sum(s.tensors[name].double() * r for s, r in zip(single, rows, strict=True)) / sum(rows)
    assert_close(padded.tensors[name].double(), want, rtol=1e-5, atol=1e-6)
    # the classifier reads one pooled vector per example
    assert padded.info["rows"]["classifier.weight"] == 4
    # by hand: XᵀX / n of the classifier's inputs
    seen = []
    h = model.classifier.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(**tokenizer(TEXTS, padding=True, return_tensors="pt"))
    h.remove()
    x = seen[0].double()
    assert_close(padded.tensors["classifier.weight"].double(), x.T @ x / 4, rtol=1e-5,
                 atol=1e-7)


def test_files_metadata_kind_check_and_cache(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = classifier()
    batches = list(text_batches(tokenizer, TEXTS, batch_size=4))
    calls = []

    def compute():  # type: ignore[no-untyped-def]
        calls.append(1)
        return regmean_grams(model, batches)

    key = data_hash(TEXTS)
    p1 = cached_statistics(tmp_path, "regmean", "fp1", key, compute)
    p2 = cached_statistics(tmp_path, "regmean", "fp1", key, compute)
    assert p1 == p2 and len(calls) == 1
    p3 = cached_statistics(tmp_path, "regmean", "fp1", data_hash(TEXTS[:2]), compute)
    assert p3 != p1 and len(calls) == 2
    meta = statistics_metadata(p1)
    assert meta["neuromerge_statistics"] == "regmean" and meta["data_hash"] == key
    assert meta["model_fingerprint"] == "fp1" and meta["n_examples"] == "4"
    with pytest.raises(InputError, match=r"a regmean file, but the method needs fisher "
                                         r"statistics \(statistics of ex\)"):
        open_statistics(p1, "fisher", model="ex")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match=r"not a neuromerge statistics file"):
        open_statistics(tmp_path / "plain.safetensors", "fisher")
    assert data_hash(TEXTS, LABELS) != data_hash(TEXTS, [0, 0, 0, 0])
    stats = fisher_diagonal(model, list(text_batches(tokenizer, TEXTS[:1])))
    save_statistics(stats, tmp_path / "f.safetensors")
    assert open_statistics(tmp_path / "f.safetensors", "fisher").names()


def test_language_model_fisher_needs_sampled_or_empirical(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from neuromerge.examples import _VOCAB

    torch.manual_seed(0)
    lm = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(_VOCAB), n_embd=16, n_layer=1,
                                          n_head=2, n_positions=32)).eval()
    batches = list(text_batches(tokenizer, TEXTS, batch_size=4))
    batches = [{k: v for k, v in b.items() if k != "token_type_ids"} for b in batches]
    with pytest.raises(ConfigError, match=r"for a language model use sampled"):
        fisher_diagonal(lm, batches)
    emp = fisher_diagonal(lm, batches, fisher_type="empirical")
    smp = fisher_diagonal(lm, batches, fisher_type="sampled", seed=3)
    assert emp.n_examples == smp.n_examples == 4
    assert all(bool(torch.isfinite(t).all()) for t in emp.tensors.values())
    assert float(emp.tensors["transformer.wte.weight"].sum()) > 0


def _expert_folders(tmp_path: Path) -> tuple[Path, list[Path]]:
    from neuromerge.examples import save_tokenizer

    base = classifier(0, num_labels=2)
    folders = []
    for i, model in enumerate([base] + [classifier(0, num_labels=2) for _ in range(2)]):
        if i:
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        folder = tmp_path / ("base" if i == 0 else f"expert{i}")
        model.save_pretrained(str(folder))
        save_tokenizer(folder)
        folders.append(folder)
    return folders[0], folders[1:]


def test_cli_statistics_then_merge_from_yaml(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    base, experts = _expert_folders(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": y % 2})
                              for t, y in zip(TEXTS, LABELS, strict=True)) + "\n")
    for kind in ("fisher", "regmean"):
        stat_files = []
        for i, e in enumerate(experts):
            out = tmp_path / f"{kind}{i}.safetensors"
            code, _, err = run_cli("statistics", kind, e, "--data", data, "--out", out,
                                        "--quiet")
            assert code == 0, err
            stat_files.append(out)
        meta = statistics_metadata(stat_files[0])
        assert meta["neuromerge_statistics"] == kind and meta["n_examples"] == "4"
        cfg = {"merge_method": kind, "base_model": str(base),
               "models": [{"model": str(e), "statistics": str(s)}
                          for e, s in zip(experts, stat_files, strict=True)]}
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code, _, err = run_cli("merge", path, tmp_path / f"out-{kind}", "--quiet")
        assert code == 0, err
        merged = tf.AutoModelForSequenceClassification.from_pretrained(
            str(tmp_path / f"out-{kind}"))
        assert all(bool(torch.isfinite(p).all()) for p in merged.parameters())
        record = json.loads((tmp_path / f"out-{kind}" / "neuromerge_result.json").read_text())
        assert record["statistics"] == [str(s) for s in stat_files]
    # the output exists: refused without --force; errors are one line
    code, _, err = run_cli("statistics", "fisher", experts[0], "--data", data, "--out",
                           tmp_path / "fisher0.safetensors")
    assert code == 1 and "exists (use --force" in err and err.count("\n") == 1
    code, _, err = run_cli("statistics", "fisher", experts[0], "--data", tmp_path / "nope",
                           "--out", tmp_path / "x.safetensors")
    assert code == 1 and "nope: cannot read" in err
    (tmp_path / "bad.jsonl").write_text('{"txt": "a"}\n')
    code, _, err = run_cli("statistics", "regmean", experts[0], "--data",
                           tmp_path / "bad.jsonl", "--out", tmp_path / "x.safetensors")
    assert code == 1 and "bad.jsonl:1: no string field 'text'" in err


def test_config_refuses_missing_or_misplaced_statistics(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    base, experts = _expert_folders(tmp_path)
    cfg = {"merge_method": "fisher", "base_model": str(base),
           "models": [{"model": str(e)} for e in experts]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("merge", path, tmp_path / "out")
    assert code == 1 and err.count("\n") == 1
    assert f"models[0] ({experts[0]}): fisher needs the model's fisher statistics" in err
    cfg["merge_method"] = "average"
    cfg["models"][0]["statistics"] = "x.safetensors"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("merge", path, tmp_path / "out")
    assert code == 1 and "models[0].statistics: average uses no data statistics" in err
    cfg["merge_method"] = "regmean"
    cfg["models"][1]["statistics"] = "x.safetensors"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("merge", path, tmp_path / "out")
    assert code == 1 and "x.safetensors: no such file or folder" in err
    with pytest.raises(SystemExit) as exc:
        run_cli("statistics", "--help")
    assert exc.value.code == 0


def test_help_names_the_data_format(capsys: pytest.CaptureFixture[str]) -> None:
    from neuromerge.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["statistics", "--help"])
    out = capsys.readouterr().out
    assert "MODEL_DIR" in out and '{"text": "...", "label": 2}' in out
