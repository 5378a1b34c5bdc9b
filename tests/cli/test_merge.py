"""``neuromerge merge`` end to end: config in, an HF folder out that transformers loads and
runs, with each method, input format, option and output safeguard.
Bad input is in test_merge_errors.py."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from neuromerge.io.reader import open_checkpoint
from neuromerge.pipeline import MERGEKIT_METHODS
from neuromerge.registry import get_method
from tests.cli.helpers import (
    METHODS,
    OUTPUT_FILES,
    SUPPORT,
    TEXTS,
    Family,
    assert_equal_tensors,
    leftovers,
    load_and_run,
    read_folder,
    tree_hashes,
)


@pytest.fixture
def merge_ok(run_cli: Callable[..., tuple[int, str, str]]) -> Callable[..., Path]:
    """``merge_ok(cfg, out, *args, warning=None)``: a quiet merge that must succeed silently,
    or with exactly the one warning line ``warning`` (a substring)."""

    def run(cfg: Path, out: Path, *args: Any, warning: str | None = None) -> Path:
        code, stdout, stderr = run_cli("merge", cfg, out, "--quiet", *args)
        if warning is None:
            assert (code, stdout, stderr) == (0, "", ""), stderr
        else:
            assert (code, stdout) == (0, "") and len(stderr.splitlines()) == 1, stderr
            assert warning in stderr
        assert leftovers(out.parent) == []
        return out

    return run


def relative_config(folder: Path, method: str, n_experts: int = 3, name: str = "merge.yaml",
                    **top: Any) -> Path:
    """A config inside a family folder naming its models by relative paths, so that two families
    in different places give the same model keys (and so the same DARE seeds)."""
    cfg = {"merge_method": method, "base_model": "base",
           "models": [f"expert_{i}" for i in range(1, n_experts + 1)], **top}
    path = folder / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --- a merge per method, loaded by transformers -----------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_merge_each_method_loads_and_runs(
        method: str, bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    before = tree_hashes(base.parent)
    cfg = write_config(method, base, experts)
    out = merge_ok(cfg, tmp_path / "merged")
    assert tree_hashes(base.parent) == before  # inputs never modified
    mergekit_record = ["mergekit_config.yml"] if method in MERGEKIT_METHODS else []
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES + mergekit_record)
    if mergekit_record:  # mergekit's record of the merge: the YAML exactly as written
        assert (out / "mergekit_config.yml").read_text() == cfg.read_text()
    for name in SUPPORT:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name

    merged = read_folder(out)
    b = load_file(str(base / "model.safetensors"))
    ex = [load_file(str(e / "model.safetensors")) for e in experts]
    assert sorted(merged) == sorted(b)
    n_changed = 0
    for k, w0 in b.items():
        assert merged[k].dtype == w0.dtype and merged[k].shape == w0.shape, k
        assert bool(torch.isfinite(merged[k]).all()), k
        if all(torch.equal(e[k], w0) for e in ex):
            assert torch.equal(merged[k], w0), f"{k}: no expert changed it, the merge did"
        else:
            assert not torch.equal(merged[k], w0), f"{k}: the experts changed it, the merge not"
            n_changed += 1
    assert n_changed == 16  # the 2-D weights of the tiny BERT

    model, hidden = load_and_run(out)
    loaded = model.state_dict()
    for k, t in merged.items():
        assert torch.equal(loaded[k], t), k  # transformers loaded exactly what was written
    _, base_hidden = load_and_run(base)
    assert not torch.allclose(hidden, base_hidden)

    record = json.loads((out / "neuromerge_result.json").read_text())
    card = (out / "README.md").read_text()
    assert record["method"] == method
    assert record["models"] == [str(e) for e in experts]
    assert record["shards"] == ["model.safetensors"]
    assert sum(record["tensors"].values()) == len(b)
    assert f"**{method}**" in card
    # a YAML leaving a parameter unset means mergekit's value where it differs from the paper's
    filled = get_method(method).mergekit.defaults
    for k, v in record["parameters"].items():
        shown = f"{v:.6g}" if isinstance(v, float) else f"`{v}`"
        how = "mergekit's default" if k in filled else "default"
        assert re.search(rf"^\| {re.escape(k)} \| {re.escape(shown)} \| {how} \|$", card,
                         re.M), (k, shown, how)
        if k in filled:
            assert v == filled[k], k


def _expected_linear(base: Path, experts: list[Path], how: str, scale: float
                     ) -> dict[str, torch.Tensor]:
    b = load_file(str(base / "model.safetensors"))
    ex = [load_file(str(e / "model.safetensors")) for e in experts]
    out = {}
    for k, w0 in b.items():
        tv = torch.stack([e[k].double() - w0.double() for e in ex])
        delta = tv.mean(0) if how == "average" else scale * tv.sum(0)
        out[k] = w0.double() + delta
    return out


@pytest.mark.parametrize(("method", "args", "scale"), [
    ("average", [], 1.0), ("task_arithmetic", [], 0.3),
    ("task_arithmetic", ["-p", "scale=0.7"], 0.7)])
def test_linear_methods_compute_the_formula(
        method: str, args: list[str], scale: float, bert_family: Callable[..., Family],
        write_config: Callable[..., Path], merge_ok: Callable[..., Path], tmp_path: Path
) -> None:
    base, experts = bert_family()
    out = merge_ok(write_config(method, base, experts), tmp_path / "out", *args)
    want = _expected_linear(base, experts, method, scale)
    got = read_folder(out)
    for k, w in want.items():
        torch.testing.assert_close(got[k].double(), w, rtol=1e-6, atol=1e-7)


def test_experts_equal_to_the_base_give_the_base(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, _ = bert_family(n_experts=1)
    out = merge_ok(write_config("neuromerging", base, [base, base]), tmp_path / "out")
    assert_equal_tensors(read_folder(out), load_file(str(base / "model.safetensors")))
    record = json.loads((out / "neuromerge_result.json").read_text())
    assert record["trim"]["sigma"] == [0.0, 0.0]
    assert record["parameters"]["lambda2"] == 1.0  # nothing trimmed: auto gives 1


def test_example_tokenizer_knows_its_vocabulary(bert_family: Callable[..., Family]) -> None:
    base, _ = bert_family(n_experts=1)
    vocab = (base / "vocab.txt").read_text().split()
    tok = AutoTokenizer.from_pretrained(str(base))
    assert len(tok) == len(vocab)
    ids = tok(TEXTS[0])["input_ids"]
    assert tok.unk_token_id not in ids


# --- formats: sharded in/out, .bin, half precision --------------------------------------------


@pytest.mark.parametrize(("fmt", "method"), [("sharded", m) for m in METHODS] + [
    ("bin", "average"), ("bin", "dare_linear"), ("bin", "neuromerging")])
def test_other_input_formats_give_identical_tensors(
        fmt: str, method: str, bert_family: Callable[..., Family],
        merge_ok: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative model paths resolve beside each config
    st_base, _ = bert_family()
    other_base, _ = bert_family(fmt=fmt)
    ref = merge_ok(relative_config(st_base.parent, method), tmp_path / "ref")
    args = ["--max-shard-size", "20KB"] if fmt == "sharded" else []
    out = merge_ok(relative_config(other_base.parent, method), tmp_path / "out", *args)
    got = read_folder(out)
    assert_equal_tensors(got, read_folder(ref))
    record = json.loads((out / "neuromerge_result.json").read_text())
    assert record["shards"] == sorted(p.name for p in out.glob("*.safetensors"))
    if fmt == "sharded":
        assert len(record["shards"]) > 1
        assert (out / "model.safetensors.index.json").exists()
        assert "model.safetensors" not in record["shards"]


def test_sharded_output_loads_and_respects_the_limit(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family(fmt="sharded")
    limit = 8000
    out = merge_ok(write_config("neuromerging", base, experts), tmp_path / "out",
                   "--max-shard-size", str(limit))
    merged = read_folder(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 10
    for shard in shards:
        names = [k for k, f in index["weight_map"].items() if f == shard]
        size = sum(merged[k].numel() * merged[k].element_size() for k in names)
        assert size <= limit or len(names) == 1, (shard, size)
    # the 169 x 32 word embeddings (21632 B) are alone in their shard
    emb = index["weight_map"]["embeddings.word_embeddings.weight"]
    assert [k for k, f in index["weight_map"].items() if f == emb] == [
        "embeddings.word_embeddings.weight"]
    model, _ = load_and_run(out)
    loaded = model.state_dict()
    for k, t in merged.items():
        assert torch.equal(loaded[k], t), k


def test_config_max_shard_size_and_cli_flag(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    cfg = write_config("average", base, experts, max_shard_size="30KB")
    a = merge_ok(cfg, tmp_path / "a")
    b = merge_ok(cfg, tmp_path / "b", "--max-shard-size", "1GB")  # the flag wins
    assert len(list(a.glob("*.safetensors"))) > 1
    assert [p.name for p in b.glob("*.safetensors")] == ["model.safetensors"]
    assert_equal_tensors(read_folder(a), read_folder(b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs(
        dtype: torch.dtype, bert_family: Callable[..., Family],
        write_config: Callable[..., Path], merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family(dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    keyed = dtype == torch.float16
    if keyed:  # a config.json that states its dtype, as HF checkpoints do
        for folder in [base, *experts]:
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**cfg, "dtype": name}, indent=2))

    params = {"trim_scope": "tensor"}
    same = merge_ok(write_config("ties", base, experts, name="a.yaml", parameters=params),
                    tmp_path / "same")
    wide = merge_ok(write_config("ties", base, experts, name="b.yaml", parameters=params,
                                 out_dtype="float32"), tmp_path / "wide")
    t_same, t_wide = read_folder(same), read_folder(wide)
    assert {t.dtype for t in t_same.values()} == {dtype}
    assert {t.dtype for t in t_wide.values()} == {torch.float32}
    # Computed in float32 either way; only the final cast differs.
    for k in t_same:
        assert torch.equal(t_same[k], t_wide[k].to(dtype)), k
    assert (same / "config.json").read_bytes() == (base / "config.json").read_bytes()
    cfg_wide = json.loads((wide / "config.json").read_text())
    cfg_base = json.loads((base / "config.json").read_text())
    assert AutoConfig.from_pretrained(str(wide)).dtype == torch.float32
    assert AutoConfig.from_pretrained(str(same)).dtype in (dtype, None)
    if keyed:
        assert cfg_wide["dtype"] == "float32"
        assert "torch_dtype" not in cfg_wide
    dtype_keys = ("dtype", "torch_dtype")
    assert {k: v for k, v in cfg_wide.items() if k not in dtype_keys} == {
        k: v for k, v in cfg_base.items() if k not in dtype_keys}

    model_same, _ = load_and_run(same)
    model_wide, _ = load_and_run(wide)
    assert next(model_same.parameters()).dtype == dtype
    assert next(model_wide.parameters()).dtype == torch.float32


def test_non_float_tensors_are_copied_from_the_base(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    for i, folder in enumerate([base, *experts]):
        f = folder / "model.safetensors"
        sd = load_file(str(f))
        sd["extra.ids"] = torch.arange(64, dtype=torch.int64).reshape(1, 64) + i
        sd["extra.mask"] = torch.tensor([True, False, i % 2 == 0])
        save_file(sd, str(f))
    out = merge_ok(write_config("neuromerging", base, experts, out_dtype="float16"),
                   tmp_path / "out")
    merged = read_folder(out)
    assert merged["extra.ids"].dtype == torch.int64
    assert torch.equal(merged["extra.ids"], torch.arange(64).reshape(1, 64))
    assert torch.equal(merged["extra.mask"], torch.tensor([True, False, True]))
    assert merged["pooler.dense.weight"].dtype == torch.float16
    record = json.loads((out / "neuromerge_result.json").read_text())
    assert record["tensors"]["copy"] == 2
    assert "2 copied: not a float tensor" in (out / "README.md").read_text()


def test_missing_tensors_base_option(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    f = experts[1] / "model.safetensors"
    sd = load_file(str(f))
    del sd["pooler.dense.weight"]
    save_file(sd, str(f))
    out = merge_ok(write_config("ties", base, experts, missing_tensors="base"), tmp_path / "out")
    merged = read_folder(out)
    b = load_file(str(base / "model.safetensors"))
    assert torch.equal(merged["pooler.dense.weight"], b["pooler.dense.weight"])
    assert not torch.equal(merged["encoder.layer.0.output.dense.weight"],
                           b["encoder.layer.0.output.dense.weight"])
    assert f"missing in {experts[1]}" in (out / "README.md").read_text()


# --- the model card and the result record -----------------------------------------------------


def test_model_card_and_record_agree(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    out = merge_ok(write_config("neuromerging", base, experts, parameters={"density": 0.3}),
                   tmp_path / "out")
    card = (out / "README.md").read_text()
    record = json.loads((out / "neuromerge_result.json").read_text())
    lam = record["parameters"]["lambda2"]
    sigma = record["trim"]["sigma"]
    assert isinstance(lam, float)
    assert len(sigma) == 3 and all(0 < s < 1 for s in sigma)
    assert lam == pytest.approx(1 / (1 - max(sigma)), rel=1e-9)
    assert record["parameters"]["lambda_point"] == lam
    assert record["trim"]["density"] == 0.3

    assert "- neuromerging" in card and "**neuromerging**" in card
    assert f"lambda2 = auto resolved to {lam:.6g}" in card
    assert re.search(rf"^\| lambda2 \| {re.escape(f'{lam:.6g}')} \| default \|$", card, re.M)
    assert re.search(r"^\| density \| 0\.3 \| 0\.3 \|$", card, re.M)
    for t, (e, s) in enumerate(zip(experts, sigma, strict=True)):
        assert re.search(rf"^\| {t + 1} \| `{re.escape(str(e))}` \| {s:.6f} \|", card, re.M), t

    # Inputs: paths and sizes.
    for role, folder in [("base", base)] + [(f"expert {i + 1}", e) for i, e in enumerate(experts)]:
        size = (folder / "model.safetensors").stat().st_size
        row = re.search(rf"^\| {role} \| `{re.escape(str(folder))}` \| ([^|]+) \| 1 \|", card,
                        re.M)
        assert row, role
        assert row.group(1).strip() == f"{size / 1000:.2f} KB"

    # The configuration as given, inside the card.
    block = re.search(r"```yaml\n(.*?)```", card, re.S)
    assert block
    given = yaml.safe_load(block.group(1))
    assert given["merge_method"] == "neuromerging"
    assert given["base_model"] == str(base)
    assert given["parameters"] == {"density": 0.3}

    # neuromerge_config.yaml: the same config with resolved parameters.
    resolved = yaml.safe_load((out / "neuromerge_config.yaml").read_text())
    assert resolved["parameters"] == record["parameters"]


def test_explicit_lambda2_is_not_reported_as_auto(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    out = merge_ok(write_config("neuromerging", base, experts), tmp_path / "out",
                   "-p", "lambda2=1.5")
    card = (out / "README.md").read_text()
    record = json.loads((out / "neuromerge_result.json").read_text())
    assert record["parameters"]["lambda2"] == 1.5
    assert "auto resolved" not in card
    assert re.search(r"^\| lambda2 \| 1\.5 \| 1\.5 \|$", card, re.M)


@pytest.mark.parametrize("method", ["neuromerging", "dare_ties"])
def test_written_config_reproduces_the_merge(
        method: str, bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    first = merge_ok(write_config(method, base, experts), tmp_path / "first", "--seed", "4")
    again = tmp_path / "again.yaml"
    shutil.copy(first / "neuromerge_config.yaml", again)
    second = merge_ok(again, tmp_path / "second")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors"
                                                          ).read_bytes()


# --- options ----------------------------------------------------------------------------------


def test_param_override_equals_config_parameter(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    scope = {"trim_scope": "tensor"}
    plain = write_config("ties", base, experts, name="plain.yaml", parameters=scope)
    dense = write_config("ties", base, experts, name="dense.yaml",
                         parameters={**scope, "density": 0.5})
    default = merge_ok(plain, tmp_path / "default")
    by_flag = merge_ok(plain, tmp_path / "flag", "-p", "density=0.5", "-p",
                       "parameters.scale=1.0")
    by_flag2 = merge_ok(plain, tmp_path / "flag2", "-p", "density=0.5")
    by_config = merge_ok(dense, tmp_path / "config")
    data = {p.name: (p / "model.safetensors").read_bytes()
            for p in (default, by_flag, by_flag2, by_config)}
    assert data["flag"] == data["flag2"] == data["config"]
    assert data["flag"] != data["default"]
    assert json.loads((by_flag / "neuromerge_result.json").read_text()
                      )["parameters"]["density"] == 0.5
    card = (by_flag2 / "README.md").read_text()
    assert re.search(r"^\| density \| 0\.5 \| 0\.5 \|$", card, re.M)
    assert re.search(r"^\| trim_scope \| `tensor` \| `tensor` \|$", card, re.M)
    # -p wins over the config (unset, a YAML's density is mergekit's 1.0)
    again = merge_ok(dense, tmp_path / "again", "-p", "density=1.0")
    assert (again / "model.safetensors").read_bytes() == data["default"]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_seed_is_deterministic(
        method: str, bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    # a YAML without drop_rate drops nothing (mergekit's density 1.0): no seed to follow
    cfg = write_config(method, base, experts, parameters={"drop_rate": 0.9})

    def weights(name: str, *args: str) -> bytes:
        return (merge_ok(cfg, tmp_path / name, *args) / "model.safetensors").read_bytes()

    a1, a2 = weights("a1", "--seed", "1"), weights("a2", "--seed", "1")
    b = weights("b", "--seed", "2")
    p = weights("p", "-p", "seed=1")
    default, zero = weights("default"), weights("zero", "--seed", "0")
    assert a1 == a2 == p
    assert a1 != b
    assert default == zero  # the default seed is 0
    assert default != a1


def test_dare_seeds_follow_models_not_their_order(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    drop = {"drop_rate": 0.9}
    fwd = merge_ok(write_config("dare_linear", base, experts, name="f.yaml", parameters=drop),
                   tmp_path / "f")
    rev = merge_ok(write_config("dare_linear", base, experts[::-1], name="r.yaml",
                                parameters=drop), tmp_path / "r")
    a, b = read_folder(fwd), read_folder(rev)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)  # only summation order
    # An explicit per-model seed overrides the derived one.
    cfg = yaml.safe_load((tmp_path / "f.yaml").read_text())
    cfg["models"][0]["parameters"] = {"seed": 123}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    seeded = read_folder(merge_ok(tmp_path / "s.yaml", tmp_path / "s"))
    assert any(not torch.equal(a[k], seeded[k]) for k in a)


def test_seed_ignored_by_deterministic_methods(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], run_cli: Callable[..., tuple[int, str, str]],
        tmp_path: Path) -> None:
    base, experts = bert_family()
    cfg = write_config("task_arithmetic", base, experts)
    a = merge_ok(cfg, tmp_path / "a")
    code, _, stderr = run_cli("merge", cfg, tmp_path / "b", "--seed", "9")
    assert code == 0
    assert "--seed ignored" in stderr
    assert (a / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors"
                                                      ).read_bytes()


def test_device_auto_and_cpu_agree(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family()
    cfg = write_config("dare_ties", base, experts)
    cpu = merge_ok(cfg, tmp_path / "cpu", "--device", "cpu")
    auto = merge_ok(cfg, tmp_path / "auto", "--device", "auto")
    if torch.cuda.is_available():
        a, b = read_folder(cpu), read_folder(auto)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    else:
        assert (cpu / "model.safetensors").read_bytes() == (auto / "model.safetensors"
                                                            ).read_bytes()


def test_quiet_and_verbose_output(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    base, experts = bert_family()
    cfg = write_config("neuromerging", base, experts)
    code, stdout, stderr = run_cli("merge", cfg, tmp_path / "loud")
    assert code == 0
    assert stdout.startswith(f"merged 3 models with neuromerging into {tmp_path / 'loud'}")
    assert "lambda2 resolved to" in stderr
    assert "neuromerge: error" not in stderr
    code, stdout, stderr = run_cli("merge", cfg, tmp_path / "quiet", "-q")
    assert (code, stdout, stderr) == (0, "", "")


def test_existing_output_refused_then_replaced_with_force(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]], merge_ok: Callable[..., Path],
        tmp_path: Path) -> None:
    base, experts = bert_family()
    cfg = write_config("average", base, experts)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    code, stdout, stderr = run_cli("merge", cfg, out, "--quiet")
    assert code != 0 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("neuromerge: error: ")
    assert str(out) in stderr and "--force" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert leftovers(tmp_path) == []

    merge_ok(cfg, out, "--force")
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    assert leftovers(tmp_path) == []
    assert len(read_folder(out)) == 39


def test_failure_during_write_keeps_the_old_output(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]], merge_ok: Callable[..., Path],
        tmp_path: Path) -> None:
    base, experts = bert_family()
    out = merge_ok(write_config("average", base, experts, name="good.yaml"), tmp_path / "out")
    old = tree_hashes(out)
    # A NaN in the last tensor: the merge fails after most of the output is written.
    last = open_checkpoint(base).names()[-1]
    f = experts[2] / "model.safetensors"
    sd = load_file(str(f))
    sd[last][0, 0] = float("nan")
    save_file(sd, str(f))
    inputs = tree_hashes(base.parent)
    code, stdout, stderr = run_cli("merge", write_config("average", base, experts), out,
                                   "--force", "--quiet")
    assert code != 0 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("neuromerge: error: ")
    assert str(experts[2]) in stderr and repr(last) in stderr and "NaN" in stderr
    assert tree_hashes(out) == old
    assert tree_hashes(base.parent) == inputs
    assert leftovers(tmp_path) == []


def test_output_overlapping_an_input_is_refused(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    base, experts = bert_family()
    cfg = write_config("average", base, experts)
    inputs = tree_hashes(base.parent)
    for out, force in [(base / "merged", []), (base.parent, ["--force"]),
                       (experts[1], ["--force"]), (base, ["--force"])]:
        code, stdout, stderr = run_cli("merge", cfg, out, "--quiet", *force)
        assert code != 0 and stdout == "", out
        assert stderr.count("\n") == 1 and stderr.startswith("neuromerge: error: ")
        assert "overlap" in stderr and str(out) in stderr
        assert tree_hashes(base.parent) == inputs
        assert not (base / "merged").exists()
        assert leftovers(out.parent) == []


def test_output_beside_bare_file_inputs_is_allowed(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family(n_experts=2)
    models = tmp_path / "models"
    models.mkdir()
    files = []
    for folder in [base, *experts]:
        files.append(models / f"{folder.name}.safetensors")
        shutil.copy(folder / "model.safetensors", files[-1])
    out = merge_ok(write_config("average", files[0], files[1:]), models / "merged",
                   warning="bare weights file")
    assert len(read_folder(out)) == 39


def test_bare_file_inputs(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        merge_ok: Callable[..., Path], tmp_path: Path) -> None:
    base, experts = bert_family(n_experts=2)
    (tmp_path / "bare").mkdir()
    files = []
    for folder in [base, *experts]:
        files.append(tmp_path / "bare" / f"{folder.name}.safetensors")
        shutil.copy(folder / "model.safetensors", files[-1])
    a = merge_ok(write_config("ties", files[0], files[1:], name="a.yaml"), tmp_path / "a",
                 warning="the base is a bare weights file: no config.json or tokenizer")
    b = merge_ok(write_config("ties", base, experts, name="b.yaml"), tmp_path / "b")
    assert_equal_tensors(read_folder(a), read_folder(b))
    assert not (a / "config.json").exists()  # nothing to copy beside a bare file
    card = (a / "README.md").read_text()
    assert f"`{files[0]}`" in card


def test_dry_run_writes_the_plan_as_json_with_overrides_and_limit(
        tmp_path: Path, bert_family: Callable[..., Any], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]]) -> None:
    base, experts = bert_family(n_experts=2)
    cfg = write_config("ties", base, experts, parameters={"trim_scope": "global"})
    code, out, err = run_cli("merge", cfg, "--dry-run", "-p", "density=0.3",
                             "--plan-json", tmp_path / "plan.json")
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"] == "ties" and plan["params"]["density"] == 0.3
    assert plan["models"] == [str(e) for e in experts]
    merged = [t for t in plan["tensors"] if t["kind"] != "copy"]
    assert merged and all(t["params"]["density"] == 0.3 for t in merged)
    assert all([s["model"] for s in t["sources"]] == ["base", *map(str, experts)]
               for t in merged)
    assert all(t["units"] is None for t in plan["tensors"])  # no limit: every tensor whole
    assert "threshold" in plan["passes"][0]  # a global trim runs first
    assert "pass before the merge: trim over the whole model" in out
    # the memory limit is part of the plan (its budget sizes the row blocks)
    code, out, err = run_cli("merge", cfg, "--dry-run", "--memory-limit", "4GB",
                             "--plan-json", "-")
    assert code == 0, err
    plan = json.loads(out)  # '-': the JSON alone on standard output
    assert plan["memory"]["limited"] is True
    assert not list(tmp_path.glob("*merged*"))


def test_plan_json_needs_dry_run(tmp_path: Path, bert_family: Callable[..., Any],
                                 write_config: Callable[..., Path],
                                 run_cli: Callable[..., tuple[int, str, str]]) -> None:
    base, experts = bert_family(n_experts=2)
    cfg = write_config("ties", base, experts)
    code, _, err = run_cli("merge", cfg, tmp_path / "out", "--plan-json", tmp_path / "p.json")
    assert code == 1 and "--plan-json goes with --dry-run" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.json").exists()
