"""``neuromerge merge`` on Hugging Face Hub ids, against a local stand-in of the Hub
(tests/hub_server.py): the same tensors as from local folders, ``--dry-run`` and every header
check before any weight download (asserted from the server's request log), the cache reused
offline, ``org/name@revision`` and ``MODEL+LORA``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from neuromerge.examples import make_bert_family
from tests.cli.helpers import assert_equal_tensors, read_folder
from tests.helpers import lora_adapter, tiny_causal_lm
from tests.hub_server import FakeHub, offline, serve_hub

Cli = Callable[..., tuple[int, str, str]]
TIES = {"density": 0.5}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    with serve_hub(monkeypatch, tmp_path) as fake:
        yield fake


def config(tmp_path: Path, name: str, base: str, models: list[str], method: str = "ties",
           **top: Any) -> Path:
    path = tmp_path / name
    params = TIES if method == "ties" else {"scale": 0.7}
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": base,
                                    "models": models, "parameters": params, **top}))
    return path


@pytest.fixture
def bert_hub(hub: FakeHub, tmp_path: Path) -> tuple[Path, list[Path]]:
    """org/base, org/e1 (main) and org/e2 (only at revision v2) from a tiny BERT family."""
    base, experts = make_bert_family(tmp_path / "fam", 2)
    hub.add("org/base", base)
    hub.add("org/e1", experts[0])
    hub.add("org/e2", experts[1], revision="v2")
    return base, experts


def test_merge_from_hub_ids_equals_the_local_merge_then_runs_offline(
        hub: FakeHub, bert_hub: tuple[Path, list[Path]], run_cli: Cli, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    base, experts = bert_hub
    local = config(tmp_path, "local.yaml", str(base), [str(e) for e in experts])
    remote = config(tmp_path, "hub.yaml", "org/base", ["org/e1", "org/e2@v2"])
    assert run_cli("merge", local, tmp_path / "out-local", "--quiet")[0] == 0
    code, _, err = run_cli("merge", remote, tmp_path / "out-hub", "--quiet")
    assert code == 0, err
    want = read_folder(tmp_path / "out-local")
    assert_equal_tensors(read_folder(tmp_path / "out-hub"), want)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (tmp_path / "out-hub" / f).read_bytes() == (tmp_path / "out-local" / f
                                                           ).read_bytes(), f
    downloads = sorted(p.split("/resolve/")[0] for p in hub.weight_downloads())
    assert downloads == ["/org/base", "/org/e1", "/org/e2"]  # each weight file once
    card = (tmp_path / "out-hub" / "README.md").read_text()
    assert "org/e2@v2" in card

    hub.clear_log()
    offline(monkeypatch, True)
    code, _, err = run_cli("merge", remote, tmp_path / "out-offline", "--quiet")
    assert code == 0, err
    assert hub.requests() == []  # the cache only
    assert_equal_tensors(read_folder(tmp_path / "out-offline"), want)

    uncached = config(tmp_path, "uncached.yaml", "org/base", ["org/e1", "org/e3"])
    code, _, err = run_cli("merge", uncached, tmp_path / "out-uncached", "--quiet")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("neuromerge: error: org/e3: not in the Hugging Face cache (")
    assert "HF_HUB_OFFLINE is set" in err
    assert hub.requests() == []


def test_dry_run_downloads_no_weight_file(hub: FakeHub, bert_hub: tuple[Path, list[Path]],
                                          run_cli: Cli, tmp_path: Path) -> None:
    base, experts = bert_hub
    remote = config(tmp_path, "hub.yaml", "org/base", ["org/e1", "org/e2@v2"])
    local = config(tmp_path, "local.yaml", str(base), [str(e) for e in experts])
    code, table, err = run_cli("merge", remote, "--dry-run")
    assert code == 0, err
    assert hub.weight_downloads() == []
    header_reads = [r for r in hub.requests() if r.file == "model.safetensors"]
    assert len(header_reads) == 3 and all(r.range == "bytes=0-100000" for r in header_reads)
    small = {r.file for r in hub.requests() if r.method == "GET" and r.file}
    assert {"config.json", "tokenizer.json", "vocab.txt"} <= small
    assert not (tmp_path / "out").exists()
    assert run_cli("merge", local, "--dry-run")[1] == table  # the same plan
    by_tokenizer = config(tmp_path, "tok.yaml", "org/base", ["org/e1", "org/e2@v2"],
                          tokenizer_source="model:org/e1")
    code, _, err = run_cli("merge", by_tokenizer, "--dry-run")
    assert code == 0, err
    assert hub.weight_downloads() == []


def test_header_mismatch_fails_before_any_weight_download(
        hub: FakeHub, bert_hub: tuple[Path, list[Path]], run_cli: Cli, tmp_path: Path) -> None:
    other, _ = make_bert_family(tmp_path / "wide", 1, hidden=48)
    hub.add("org/wide", other)
    remote = config(tmp_path, "hub.yaml", "org/base", ["org/e1", "org/wide"])
    for args in (("--dry-run",), (tmp_path / "out", "--quiet")):
        code, _, err = run_cli("merge", remote, *args)
        # one error line (without --quiet, the info line on mergekit's defaults may precede it)
        errors = [line for line in err.splitlines() if "error" in line]
        assert code == 1 and len(errors) == 1 and errors == err.splitlines()[-1:], err
        assert "org/wide" in errors[0] and "shape" in errors[0], err
        assert hub.weight_downloads() == []
    assert not (tmp_path / "out").exists()


def test_unknown_repo_and_revision_are_one_line(hub: FakeHub, bert_hub: tuple[Path, list[Path]],
                                                run_cli: Cli, tmp_path: Path) -> None:
    for model, said in (("org/nope", "org/nope: no such model on the Hub"),
                        ("org/e1@v9", "org/e1@v9: revision 'v9' not found on the Hub")):
        cfg = config(tmp_path, "bad.yaml", "org/base", [model])
        code, _, err = run_cli("merge", cfg, tmp_path / "out", "--quiet")
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"neuromerge: error: {said}"), err
    assert hub.weight_downloads() == []


def test_model_plus_lora_from_the_hub(hub: FakeHub, run_cli: Cli, tmp_path: Path) -> None:
    base = tiny_causal_lm(tmp_path / "llama")
    adapters = []
    for i in range(2):
        lora_adapter(base, tmp_path / f"lora{i}", seed=10 + i, r=2, lora_alpha=4,
                     target_modules=["q_proj", "v_proj", "up_proj"])
        hub.add(f"org/lora{i}", tmp_path / f"lora{i}")
        adapters.append(tmp_path / f"lora{i}")
    hub.add("org/llama", base)
    local = config(tmp_path, "local.yaml", str(base), [str(a) for a in adapters],
                   method="task_arithmetic")
    remote = config(tmp_path, "hub.yaml", "org/llama",
                    ["org/llama+org/lora0", f"{base}+org/lora1"], method="task_arithmetic")
    code, _, err = run_cli("merge", remote, "--dry-run")
    assert code == 0, err
    assert hub.weight_downloads() == []  # adapters' and model's weights: headers only
    assert run_cli("merge", local, tmp_path / "out-local", "--quiet")[0] == 0
    code, _, err = run_cli("merge", remote, tmp_path / "out-hub", "--quiet")
    assert code == 0, err
    assert_equal_tensors(read_folder(tmp_path / "out-hub"), read_folder(tmp_path / "out-local"))
    files = sorted(p.split("/resolve/")[1].split("/", 1)[1] for p in hub.weight_downloads())
    assert files == ["adapter_model.safetensors", "adapter_model.safetensors",
                     "model.safetensors"]  # org/llama once, though named twice


def test_the_card_and_record_name_the_commit_each_hub_id_resolved_to(
        hub: FakeHub, run_cli: Cli, tmp_path: Path) -> None:
    base, experts = make_bert_family(tmp_path / "fam", 2)
    shas = {"org/base": hub.add("org/base", base), "org/e1": hub.add("org/e1", experts[0]),
            "org/e2": hub.add("org/e2", experts[1], revision="v2")}
    cfg = config(tmp_path, "hub.yaml", "org/base", ["org/e1", str(experts[1])])
    code, _, err = run_cli("merge", cfg, tmp_path / "out", "--quiet")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "neuromerge_result.json").read_text())
    assert record["hub_commits"] == {"org/base": {"org/base": shas["org/base"]},
                                     "org/e1": {"org/e1": shas["org/e1"]}}  # local: none
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"org/e1 @ `{shas['org/e1']}`" in card
    cfg2 = config(tmp_path, "rev.yaml", "org/base", ["org/e1", "org/e2@v2"])
    assert run_cli("merge", cfg2, tmp_path / "out2", "--quiet")[0] == 0
    record = json.loads((tmp_path / "out2" / "neuromerge_result.json").read_text())
    assert record["hub_commits"]["org/e2@v2"] == {"org/e2": shas["org/e2"]}  # the tag's commit


def _front_matter(card: str) -> dict[str, Any]:
    head, sep, _ = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep, card[:200]
    return yaml.safe_load(head)


def test_the_card_follows_mergekits_layout_and_mergekit_config_is_the_yaml_as_written(
        hub: FakeHub, bert_hub: tuple[Path, list[Path]], run_cli: Cli, tmp_path: Path) -> None:
    base, experts = bert_hub
    text = ("# as published\nmerge_method: ties\nbase_model: org/base\nmodels:\n"
            "  - model: org/e1\n    parameters: {weight: 0.6}\n  - model: org/e2@v2\n"
            "    parameters: {weight: 0.4}\nparameters: {density: 0.5}\n")
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(text)
    out = tmp_path / "my-merge"
    assert run_cli("merge", cfg, out, "--quiet")[0] == 0
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    # the hub repos merged, as the Hub's model tree reads them from mergekit's cards
    assert meta["base_model"] == ["org/base", "org/e1", "org/e2"]
    assert meta["tags"] == ["merge", "neuromerge", "ties"]
    assert "\n# my-merge\n" in card
    assert "using [org/base](https://huggingface.co/org/base) as a base" in card
    models = card.split("### Models Merged")[1].split("###")[0]
    assert re.findall(r"^\* \[(\S+)\]\(https://huggingface.co/\1\)$", models, re.M) == [
        "org/e1", "org/e2"]
    assert f"```yaml\n{text.rstrip()}\n```" in card  # verbatim, comment included
    assert (out / "mergekit_config.yml").read_text() == text
    # unset TIES settings take mergekit's values: the card says so
    assert re.search(r"^\| trim_scope \| `tensor` \| mergekit's default \|$", card, re.M)
    assert re.search(r"^\| density \| 0\.5 \| 0\.5 \|$", card, re.M)
    assert "## Configuration as neuromerge read it" in card

    # neuromerge's own methods: a card, but no mergekit_config.yml (mergekit cannot run it);
    # local paths: no base_model in the front matter
    nm = tmp_path / "nm.yaml"
    nm.write_text(yaml.safe_dump({"merge_method": "neuromerging", "base_model": str(base),
                                  "models": [str(e) for e in experts]}))
    assert run_cli("merge", nm, tmp_path / "nm", "--quiet")[0] == 0
    assert not (tmp_path / "nm" / "mergekit_config.yml").exists()
    nm_card = (tmp_path / "nm" / "README.md").read_text()
    assert "base_model" not in _front_matter(nm_card)
    assert f"* `{experts[0]}`" in nm_card
