"""Scoring a body with task heads: features come from the body once per task split, and every
head is a linear layer on them (the standard protocol for merging classification experts: the
merged body with each expert's own head)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


def load_body(path: Path | None = None, state_dict: dict[str, torch.Tensor] | None = None,
              config_dir: Path | None = None) -> Any:
    """A BertModel-style encoder from a folder, or a config folder plus a state dict."""
    from transformers import AutoModel

    if state_dict is None:
        return AutoModel.from_pretrained(str(path)).eval()
    model = AutoModel.from_pretrained(str(config_dir)).eval()
    # Buffers such as position_ids are saved by some transformers versions and not by others.
    buffers = {name for name, _ in model.named_buffers()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in buffers]
    unexpected = [k for k in unexpected if k not in buffers]
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit the body: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model


@torch.inference_mode()
def pooled_features(body: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128,
                    batch_size: int = 64, progress: bool = False, desc: str = "encode"
                    ) -> torch.Tensor:
    """The pooled [CLS] output the classification head reads, for every text."""
    body.eval()
    # sorting by length keeps padding (and time) low; the order is restored afterwards
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), body.config.hidden_size)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False, dynamic_ncols=True):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        res = body(**enc)
        pooled = res.pooler_output if res.pooler_output is not None else \
            res.last_hidden_state[:, 0]
        out[idx] = pooled.float()
    return out


def accuracy(features: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor],
             labels: Sequence[int]) -> float:
    weight, bias = head
    pred = (features @ weight.T.float() + bias.float()).argmax(-1)
    return float((pred == torch.tensor(list(labels))).float().mean())
