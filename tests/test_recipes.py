"""docs/recipes.md, run as written: its files are written to a temp folder holding tiny random
Llama models under the names the page uses, and its commands run there (those needing a GPU or
the HF hub are only parsed)."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuromerge.cli import build_parser
from neuromerge.io.reader import open_checkpoint
from tests.cli.helpers import read_folder
from tests.helpers import lora_adapter, tiny_causal_lm
from tests.hub_server import serve_hub

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "recipes.md").read_text()
FILES = dict(re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```", DOC, flags=re.S))
COMMANDS = [shlex.split(line, comments=True)[1:]
            for block in re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)
            for line in block.splitlines() if line.startswith("neuromerge ")]


def test_recipe_page_is_linked_and_complete() -> None:
    assert "docs/recipes.md" in (ROOT / "README.md").read_text()
    assert set(FILES) == {"llama-merge.yaml", "lora-merge.yaml", "load_lora.py",
                          "tasks/my_task.yaml", "tasks/my_task.jsonl", "clip-merge.yaml",
                          "split_heads.py", "vit-merge.yaml", "reattach.py", "vocab-merge.yaml",
                          "chat_check.py", "mergekit-ties.yaml", "mergekit-neuromerging.yaml"}
    assert len(COMMANDS) == 14
    for argv in COMMANDS:  # every documented command is one the CLI accepts
        build_parser().parse_args(argv)


def _nudged(sd: dict[str, torch.Tensor], seed: int, only: str = "") -> dict[str, torch.Tensor]:
    """``sd`` with every float tensor whose name starts with ``only`` nudged (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g)
            if v.is_floating_point() and k.startswith(only) else v.clone()
            for k, v in sd.items()}


def _expert(base: Path, out: Path, seed: int) -> None:
    """A 'full fine-tune': the base with every float tensor nudged (in float32, stored as the
    base's dtype)."""
    shutil.copytree(base, out)
    sd = load_file(base / "model.safetensors")
    nudged = _nudged({k: v.float() for k, v in sd.items()}, seed)
    save_file({k: nudged[k].to(v.dtype) for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def _write_files(folder: Path) -> None:
    for name, text in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _commands(config: str) -> list[list[str]]:
    return [argv for argv in COMMANDS if config in argv]


def test_recipes_run_as_documented(tmp_path: Path, run_cli: Any,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    base = tiny_causal_lm(tmp_path / "llama-base", "llama", torch.bfloat16)
    for i, name in enumerate(("llama-math", "llama-code", "llama-chinese")):
        _expert(base, tmp_path / name, seed=i)
    for i, name in enumerate(("lora-math", "lora-code")):
        lora_adapter(base, tmp_path / name, seed=10 + i, r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj", "up_proj"])
    _write_files(tmp_path)

    has_lm_eval = True
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        has_lm_eval = False
    ran = 0
    for argv in COMMANDS:
        if any(a in argv for a in ("clip-merge.yaml", "vit-merge.yaml", "vocab-merge.yaml",
                                   "mergekit-ties.yaml", "mergekit-neuromerging.yaml")):
            continue  # the tests below
        if "cuda" in argv or (argv[0] == "eval" and not has_lm_eval):
            continue  # needs a GPU / the hub (gsm8k, cmmlu) / the eval extra
        code, _, err = run_cli(*argv, "--quiet") if argv[0] == "merge" else run_cli(*argv)
        assert code == 0, (argv, err)
        ran += 1
    assert ran == (5 if has_lm_eval else 3)

    merged = open_checkpoint(tmp_path / "llama-merged")
    assert {merged.meta(n).dtype for n in merged.names()} == {torch.bfloat16}
    assert not (tmp_path / "llama-merged-cuda").exists()

    rec = json.loads((tmp_path / "lora-merged" / "neuromerge_result.json").read_text())["lora"]
    assert rec["rank"] == 8 and rec["relative_errors"]
    # the full expert moved norms too: reported as not in the adapter
    assert any(n.endswith("norm.weight") for n in rec["not_encoded"])
    ns = runpy.run_path(str(tmp_path / "load_lora.py"))
    sd = ns["merged"].state_dict()
    lora_merged, theta0 = open_checkpoint(tmp_path / "lora-merged"), open_checkpoint(base)
    for name, rel in rec["relative_errors"].items():
        want, b = lora_merged.read(name).float(), theta0.read(name).float()
        err = torch.linalg.vector_norm(sd[name].float() - want)
        # bf16 output: the adapter's sum is rounded to bf16 as the merged tensor was
        bound = rel * torch.linalg.vector_norm(want - b) + 8e-3 * torch.linalg.vector_norm(want)
        assert err <= bound, name

    if has_lm_eval:
        scores = json.loads((tmp_path / "my_task.json").read_text())
        assert scores["n-samples"]["my_task"]["effective"] == 3
        assert 0.0 <= scores["results"]["my_task"]["acc,none"] <= 1.0


VISION = {"image_size": 8, "patch_size": 4, "num_channels": 3, "hidden_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def test_vision_recipe_runs_as_documented(tmp_path: Path, run_cli: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """CLIP experts merged whole (text tower untouched: it comes out as the base's); ViT
    classifiers with heads of different sizes split, their encoders merged, heads put back."""
    tf = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    _write_files(tmp_path)
    torch.manual_seed(0)
    clip_cfg = tf.CLIPConfig(text_config={"vocab_size": 50, "hidden_size": 16,
                                          "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "intermediate_size": 32, "max_position_embeddings": 16},
                             vision_config=VISION, projection_dim=8)
    clip = tf.CLIPModel(clip_cfg).eval()
    clip.save_pretrained(tmp_path / "clip-base")
    base_sd = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    for i, task in enumerate(("cars", "dtd", "eurosat")):
        clip.load_state_dict(_nudged(base_sd, i, only="vision_model."))
        clip.save_pretrained(tmp_path / f"clip-{task}")

    vit_base = tf.ViTModel(tf.ViTConfig(**VISION)).eval()  # with a pooler, as ViT checkpoints
    vit_base.save_pretrained(tmp_path / "vit-base")
    enc_sd = {k: v.detach().clone() for k, v in vit_base.state_dict().items()
              if not k.startswith("pooler.")}
    heads = {}
    for i, (task, n) in enumerate((("cars", 5), ("dtd", 3), ("eurosat", 4))):
        expert = tf.ViTForImageClassification(tf.ViTConfig(**VISION, num_labels=n)).eval()
        expert.vit.load_state_dict(_nudged(enc_sd, 10 + i))
        expert.save_pretrained(tmp_path / f"vit-{task}")
        heads[task] = expert.classifier.weight.detach().clone()

    for argv in _commands("clip-merge.yaml") + _commands("vit-merge.yaml"):
        if argv[1] == "vit-merge.yaml":
            runpy.run_path(str(tmp_path / "split_heads.py"))
        code, out, err = run_cli(*argv, "--quiet")
        assert code == 0, (argv, err)
        if "--dry-run" in argv:  # lists the vision tensors' neuron axes, writes nothing
            assert "vision_model.embeddings.patch_embedding.weight" in out + err
            assert not (tmp_path / "clip-merged").exists()

    merged = open_checkpoint(tmp_path / "clip-merged")
    base = open_checkpoint(tmp_path / "clip-base")
    for name in merged.names():
        if name.startswith("text_model."):  # zero task vectors: the base's, exactly
            assert torch.equal(merged.read(name), base.read(name)), name
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(merged.read(name), base.read(name))
    loaded = tf.CLIPModel.from_pretrained(tmp_path / "clip-merged").eval()
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor([[1, 5, 9]]),
                        pixel_values=torch.randn(1, 3, 8, 8)).logits_per_image
    assert torch.isfinite(logits).all()

    ns = runpy.run_path(str(tmp_path / "reattach.py"))
    model = ns["model"].eval()
    assert torch.equal(model.classifier.weight, heads["cars"])
    merged_sd = ns["encoder"].state_dict()
    expert_sd = tf.ViTForImageClassification.from_pretrained(tmp_path / "vit-cars").vit.state_dict()
    for name, value in model.vit.state_dict().items():
        assert torch.equal(value, merged_sd[name]), name  # the merged encoder...
    # ...not the expert's
    assert not all(torch.equal(v, expert_sd[k]) for k, v in merged_sd.items())
    encoder = open_checkpoint(tmp_path / "vit-merged")
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 8, 8)).logits
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    # the pooler came from the base (missing_tensors: base)
    assert torch.equal(encoder.read("pooler.dense.weight"),
                       open_checkpoint(tmp_path / "vit-base").read("pooler.dense.weight"))


def test_vocab_recipe_runs_as_documented(tmp_path: Path, run_cli: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The default error is the one the page shows; `vocab: union` gives the chat expert's rows
    to its added tokens and a tokenizer and model that agree."""
    tf = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    _write_files(tmp_path)
    base = tiny_causal_lm(tmp_path / "llama-base", "llama")
    _expert(base, tmp_path / "llama-math", seed=1)
    tok = tf.AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chat = tf.AutoModelForCausalLM.from_pretrained(base)
    chat.resize_token_embeddings(len(tok))
    chat.load_state_dict(_nudged({k: v.detach() for k, v in chat.state_dict().items()}, 2))
    chat.save_pretrained(tmp_path / "llama-chat")
    tok.save_pretrained(tmp_path / "llama-chat")

    # the page's error, with the default vocab: error
    (tmp_path / "default.yaml").write_text(FILES["vocab-merge.yaml"].replace("vocab: union", ""))
    code, _, err = run_cli("merge", "default.yaml", "default-out", "--quiet")
    shown = re.search(r"```text\n(neuromerge: error: .*?)\n```", DOC, flags=re.S)
    assert code != 0 and shown is not None
    want = shown.group(1)
    v = len(tok) - 2
    want = want.replace("V+2", str(v + 2)).replace("[V,", f"[{v},").replace(", d]", ", 16]")
    assert err.strip() == want, (err, want)

    (argv,) = _commands("vocab-merge.yaml")
    code, _, err = run_cli(*argv, "--quiet")
    assert code == 0, err
    ns = runpy.run_path(str(tmp_path / "chat_check.py"))
    assert ns["logits"].shape[-1] == len(tok) and torch.isfinite(ns["logits"]).all()
    merged = open_checkpoint(tmp_path / "chat-merged")
    emb = merged.read("model.embed_tokens.weight")
    chat_emb = open_checkpoint(tmp_path / "llama-chat").read("model.embed_tokens.weight")
    ids = ns["tok"].convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids == [v, v + 1]
    assert torch.equal(emb[v:], chat_emb[v:])  # one expert added them: that expert's rows


#: The hub ids recipe 6 names, and the tiny stand-ins served under them.
HUB_MODELS = {"NousResearch/Meta-Llama-3-8B": "base",
              "NousResearch/Meta-Llama-3-8B-Instruct": "instruct",
              "cognitivecomputations/dolphin-2.9-llama3-8b": "dolphin"}


def test_mergekit_recipe_runs_on_hub_ids(tmp_path: Path, run_cli: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipe 6 as written: the dry run reads headers only, the TIES merge gives what the same
    config gives on local folders (per-layer densities and weights resolved per tensor), and
    the one edit to neuromerging runs too."""
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "stand-ins"
    base = tiny_causal_lm(models / "base", "llama", torch.bfloat16)
    _expert(base, models / "instruct", seed=1)
    _expert(base, models / "dolphin", seed=2)
    _write_files(tmp_path)
    dry, ties = _commands("mergekit-ties.yaml")
    (nm,) = _commands("mergekit-neuromerging.yaml")
    with serve_hub(monkeypatch, tmp_path) as hub:
        for repo, folder in HUB_MODELS.items():
            hub.add(repo, models / folder)
        code, out, err = run_cli(*dry)
        assert code == 0, err
        assert hub.weight_downloads() == []  # planned and checked from the headers
        assert "density=[1, 0.5]" in out and "density=[0.5, 0.5]" in out  # layers 0 and 1
        for argv in (ties, nm):
            code, _, err = run_cli(*argv, "--quiet")
            assert code == 0, (argv, err)
        assert hub.weight_downloads()
    record = json.loads((tmp_path / "llama3-ties" / "neuromerge_result.json").read_text())
    assert record["parameters"]["trim_scope"] == "tensor"
    layer1 = next(v for k, v in record["tensor_params"].items() if ".layers.1." in k)
    assert layer1 == {"density": [0.5, 0.5], "weight": [0.5, 0.5]}
    nm_record = json.loads((tmp_path / "llama3-neuromerging" / "neuromerge_result.json"
                            ).read_text())
    assert nm_record["method"] == "neuromerging" and nm_record["parameters"]["lambda2"] > 1
    # the same config on local folders: the same tensors
    local = (tmp_path / "mergekit-ties.yaml").read_text()
    for repo, folder in sorted(HUB_MODELS.items(), key=lambda kv: -len(kv[0])):
        local = local.replace(repo, str(models / folder))  # longest id first: one is a prefix
    (tmp_path / "local.yaml").write_text(local)
    code, _, err = run_cli("merge", "local.yaml", "local-ties", "--quiet")
    assert code == 0, err
    hub_out, local_out = read_folder(tmp_path / "llama3-ties"), read_folder(tmp_path / "local-ties")
    assert sorted(hub_out) == sorted(local_out)
    assert all(torch.equal(hub_out[k], local_out[k]) for k in hub_out)
