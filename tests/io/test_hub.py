"""Hub model ids (io/hub.py) against a local stand-in of the Hugging Face Hub
(tests/hub_server.py): parsing, header-only readers, downloads into the cache, offline use and
the one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuromerge.errors import InputError
from neuromerge.examples import make_bert_family
from neuromerge.io.hub import Hub, HubRef, ModelRef, download, is_hub_id, parse_model_ref
from neuromerge.io.reader import open_checkpoint
from tests.hub_server import FakeHub, offline, serve_hub


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    with serve_hub(monkeypatch, tmp_path) as fake:
        yield fake


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return make_bert_family(tmp_path / "fam", 2)


# --- parsing ----------------------------------------------------------------------------------


def test_parse_model_ref_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_model_ref("org/name") == ModelRef("org/name", HubRef("org/name"))
    assert parse_model_ref("gpt2").model == HubRef("gpt2")
    assert parse_model_ref("org/name@v1.0").model == HubRef("org/name", "v1.0")
    assert parse_model_ref("org/name@refs/pr/1").model == HubRef("org/name", "refs/pr/1")
    ref = parse_model_ref("org/base+org/lora@abc")
    assert (ref.model, ref.lora) == (HubRef("org/base"), HubRef("org/lora", "abc"))
    (tmp_path / "local").mkdir()
    ref = parse_model_ref("local+org/lora")
    assert (ref.model, ref.lora) == (Path("local"), HubRef("org/lora"))
    for path in ("./x", "/abs/x", "x.safetensors", "a/b/c", "org/na..me", "~/m", "org/-x"):
        assert not is_hub_id(path), path
        assert isinstance(parse_model_ref(path).model, Path), path


def test_a_local_folder_wins_over_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")
    assert parse_model_ref("org/name") == ModelRef("org/name", Path("org/name"))
    (tmp_path / "a+b").mkdir()
    assert parse_model_ref("a+b") == ModelRef("a+b", Path("a+b"))  # a path with a '+'


# --- headers, downloads, revisions ------------------------------------------------------------


def test_headers_then_download(hub: FakeHub, family: tuple[Path, list[Path]]) -> None:
    base, _ = family
    hub.add("org/base", base)
    h = Hub(progress=False)
    model = h.fetch(HubRef("org/base"))
    assert (model.folder / "config.json").is_file() and (model.folder / "vocab.txt").is_file()
    assert model.weights == ("model.safetensors",) and not model.cached()
    heads = h.headers(model)
    local = open_checkpoint(base)
    assert heads.names() == local.names()
    assert all(heads.meta(n) == local.meta(n) for n in local.names())
    with pytest.raises(InputError, match="only its header is known"):
        heads.read(local.names()[0])
    assert hub.weight_downloads() == []
    assert {r.range for r in hub.requests() if r.file == "model.safetensors"} == {
        "bytes=0-100000"}
    folder = h.download(model)
    assert hub.weight_downloads() == [f"/org/base/resolve/{model.commit}/model.safetensors"]
    got = open_checkpoint(folder)
    for n in local.names():
        assert torch.equal(got.read(n), local.read(n)), n
    got.close()
    local.close()


def test_sharded_repo_headers_follow_the_index(hub: FakeHub, tmp_path: Path) -> None:
    base, _ = make_bert_family(tmp_path / "sharded", 1, fmt="sharded")
    hub.add("org/sharded", base)
    h = Hub(progress=False)
    model = h.fetch(HubRef("org/sharded"))
    assert len(model.weights) > 1 and all(w.endswith(".safetensors") for w in model.weights)
    local = open_checkpoint(base)
    heads = h.headers(model)
    assert sorted(heads.names()) == sorted(local.names())
    assert hub.weight_downloads() == []


def test_revision_picks_that_commit(hub: FakeHub, tmp_path: Path) -> None:
    a, _ = make_bert_family(tmp_path / "a", 1, seed=1)
    b, _ = make_bert_family(tmp_path / "b", 1, seed=2)
    hub.add("org/m", a)
    sha = hub.add("org/m", b, revision="v2")
    old = open_checkpoint(download(HubRef("org/m"), progress=False))
    new = open_checkpoint(download(HubRef("org/m", "v2"), progress=False))
    by_sha = download(HubRef("org/m", sha), progress=False)
    assert by_sha.name == sha
    name = next(n for n in old.names() if n.endswith("query.weight"))
    assert not torch.equal(old.read(name), new.read(name))
    assert torch.equal(new.read(name), open_checkpoint(b).read(name))


def test_bin_only_repo_has_no_headers(hub: FakeHub, tmp_path: Path) -> None:
    base, _ = make_bert_family(tmp_path / "bin", 1, fmt="bin")
    hub.add("org/bin", base)
    h = Hub(progress=False)
    model = h.fetch(HubRef("org/bin"))
    assert model.weights == ("pytorch_model.bin",)
    with pytest.raises(InputError, match=r"org/bin: stores PyTorch \.bin weights"):
        h.headers(model)
    assert open_checkpoint(h.download(model)).names()


# --- offline and errors -----------------------------------------------------------------------


def test_offline_uses_the_cache_and_names_an_uncached_id(
        hub: FakeHub, family: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = family
    hub.add("org/base", base)
    online = download(HubRef("org/base"), progress=False)
    hub.clear_log()
    offline(monkeypatch, True)
    assert download(HubRef("org/base"), progress=False) == online
    assert hub.requests() == []
    with pytest.raises(InputError) as ei:
        Hub().fetch(HubRef("org/other"))
    msg = str(ei.value)
    assert msg.startswith("org/other: not in the Hugging Face cache (")
    assert "HF_HUB_OFFLINE is set" in msg and "\n" not in msg
    assert hub.requests() == []


def test_offline_without_cached_weights_says_so(
        hub: FakeHub, family: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = family
    hub.add("org/base", base)
    Hub(progress=False).fetch(HubRef("org/base"))  # small files only (as --dry-run leaves it)
    offline(monkeypatch, True)
    with pytest.raises(InputError, match=r"^org/base: its weights are not in the Hugging Face "
                                         r"cache \(.*\) and HF_HUB_OFFLINE is set$"):
        Hub().fetch(HubRef("org/base"))


@pytest.mark.parametrize(("ref", "said"), [
    (HubRef("org/nope"), r"^org/nope: no such model on the Hub at http://127\.0\.0\.1:\d+"),
    (HubRef("org/base", "nobranch"), r"^org/base@nobranch: revision 'nobranch' not found on "
                                     r"the Hub \(404: Invalid rev id: nobranch\)$"),
    (HubRef("org/gated"), r"^org/gated: a gated model: accept its conditions on the Hub and set "
                          r"HF_TOKEN .*\(401: Access to model is restricted"),
])
def test_hub_errors_are_one_line_naming_the_id(
        hub: FakeHub, family: tuple[Path, list[Path]], ref: HubRef, said: str) -> None:
    base, _ = family
    hub.add("org/base", base)
    hub.add("org/gated", base, gated=True)
    with pytest.raises(InputError) as ei:
        Hub(progress=False).fetch(ref)
    assert "\n" not in str(ei.value)
    assert ei.match(said)


def test_token_is_sent_for_a_gated_model(hub: FakeHub, family: tuple[Path, list[Path]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = family
    hub.add("org/gated", base, gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert (download(HubRef("org/gated"), progress=False) / "model.safetensors").is_file()
