"""The non-weight files of an HF model folder: copied from the base so the output loads with
``from_pretrained`` (config, generation config, tokenizer)."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

_SUPPORT_PATTERNS = (
    "config.json", "generation_config.json", "preprocessor_config.json",
    "processor_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
    "merges.txt", "spiece.model", "sentencepiece.bpe.model", "*.tiktoken",
    "chat_template.jinja", "chat_template.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def support_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file()
                  and any(fnmatch.fnmatchcase(p.name, pat) for pat in _SUPPORT_PATTERNS))


def copy_support_files(src: Path, dst: Path, *, out_dtype: str | None = None) -> list[str]:
    """Copy config and tokenizer files; record a changed output dtype in config.json."""
    copied = []
    for f in support_files(src):
        target = dst / f.name
        if f.name == "config.json" and out_dtype is not None:
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError):
                cfg = None
            if isinstance(cfg, dict):
                present = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
                for key in present:
                    cfg[key] = out_dtype
                target.write_text(json.dumps(cfg, indent=2) + "\n")
                copied.append(f.name)
                continue
        shutil.copy2(f, target)
        copied.append(f.name)
    return copied
