"""Statistics of a Hugging Face model folder on a JSON-lines text file (``neuromerge
statistics``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from neuromerge.errors import InputError
from neuromerge.statistics.estimate import (
    FisherType,
    Kind,
    Statistics,
    fisher_diagonal,
    regmean_grams,
)
from neuromerge.statistics.files import data_hash, save_statistics


def text_batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int] | None = None, *,
                 batch_size: int = 16, max_length: int = 128) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches (right padding) of ``texts``, with ``labels`` when given."""
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items()}
        if labels is not None:
            batch["labels"] = torch.tensor([int(y) for y in labels[start:start + batch_size]])
        yield batch


def read_jsonl(path: str | os.PathLike[str], text_field: str = "text",
               label_field: str = "label") -> tuple[list[str], list[int] | None]:
    """Texts (and integer labels, when every line has one) from a JSON-lines file."""
    p = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{p}:{i}: not a JSON object") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise InputError(f"{p}:{i}: no string field {text_field!r}")
        texts.append(rec[text_field])
        if label_field in rec:
            if not isinstance(rec[label_field], int) or isinstance(rec[label_field], bool):
                raise InputError(f"{p}:{i}: {label_field!r} must be an integer class index")
            labels.append(rec[label_field])
    if not texts:
        raise InputError(f"{p}: no examples")
    if labels and len(labels) != len(texts):
        raise InputError(f"{p}: {label_field!r} is on some lines but not all")
    return texts, labels or None


def load_hf_model(model_dir: str | os.PathLike[str]) -> Any:
    """An HF sequence-classification or causal-LM model from a local folder (by its
    ``architectures``), in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not an HF model folder (no config.json)")
    arch = " ".join(AutoConfig.from_pretrained(str(folder)).architectures or [])
    if "ForSequenceClassification" in arch:
        auto: Any = AutoModelForSequenceClassification
    elif "ForCausalLM" in arch or "LMHeadModel" in arch:
        auto = AutoModelForCausalLM
    else:
        raise InputError(f"{folder}: architectures {arch or 'unset'}: statistics need a "
                         f"*ForSequenceClassification or *ForCausalLM model (logits)")
    return auto.from_pretrained(str(folder)).float()


def compute_for_folder(kind: Kind, model_dir: str | os.PathLike[str],
                       data: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       text_field: str = "text", label_field: str = "label",
                       max_examples: int | None = None, batch_size: int = 16,
                       max_length: int = 128, fisher_type: FisherType = "expected",
                       seed: int = 0, device: str = "cpu", progress: bool = True) -> Statistics:
    """``neuromerge statistics``: compute ``kind`` for an HF model folder on a JSONL file and
    write it to ``out``, tensor names as in the folder's checkpoint."""
    from transformers import AutoTokenizer

    from neuromerge.devices import resolve_device
    from neuromerge.io.reader import fingerprint, open_checkpoint

    texts, labels = read_jsonl(data, text_field, label_field)
    if max_examples is not None:
        texts = texts[:max_examples]
        labels = labels[:max_examples] if labels is not None else None
    if kind == "fisher" and fisher_type == "empirical" and labels is None:
        raise InputError(f"{data}: empirical Fisher needs a {label_field!r} on every line")
    model = load_hf_model(model_dir).to(resolve_device(device))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:  # causal LMs often have none; right padding is masked anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    dev = next(model.parameters()).device
    batches = ({k: v.to(dev) for k, v in b.items()} for b in
               text_batches(tok, texts, labels, batch_size=batch_size, max_length=max_length))
    if kind == "fisher":
        stats = fisher_diagonal(model, batches, fisher_type=fisher_type, seed=seed,
                                progress=progress)
    else:
        stats = regmean_grams(model, batches, progress=progress)
    ckpt = open_checkpoint(model_dir)
    try:
        stored = set(ckpt.names())
        # keep the names the checkpoint holds (a tied weight is stored once)
        stats.tensors = {k: v for k, v in stats.tensors.items() if k in stored}
        fp = fingerprint(ckpt)
    finally:
        ckpt.close()
    if not stats.tensors:
        raise InputError(f"{model_dir}: none of the statistics' names are in its checkpoint")
    save_statistics(stats, out, model_fingerprint=fp, data=data_hash(texts, labels))
    return stats
