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
from tests.helpers import lora_adapter, tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "recipes.md").read_text()
FILES = dict(re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```", DOC, flags=re.S))
COMMANDS = [shlex.split(line, comments=True)[1:]
            for block in re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)
            for line in block.splitlines() if line.startswith("neuromerge ")]


def test_recipe_page_is_linked_and_complete() -> None:
    assert "docs/recipes.md" in (ROOT / "README.md").read_text()
    assert set(FILES) == {"llama-merge.yaml", "lora-merge.yaml", "load_lora.py",
                          "tasks/my_task.yaml", "tasks/my_task.jsonl"}
    assert len(COMMANDS) == 7
    for argv in COMMANDS:  # every documented command is one the CLI accepts
        build_parser().parse_args(argv)


def _expert(base: Path, out: Path, seed: int) -> None:
    """A 'full fine-tune': the base with every float tensor nudged."""
    shutil.copytree(base, out)
    sd = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    save_file({k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype)
               for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})


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
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    has_lm_eval = True
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        has_lm_eval = False
    ran = 0
    for argv in COMMANDS:
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
